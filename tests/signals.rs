//! The binary under signals: SIGHUP reloads (certificates, issuers) while
//! sessions stay open, a broken config is refused, SIGTERM drains.

mod common;

use std::time::Duration;

use common::{JwksServer, Options, ProxyProcess, TestCa, TestKey, claims, describe, free_port};

struct Stack {
    pg: common::Postgres,
    jwks: JwksServer,
    key: TestKey,
    port: u16,
}

impl Stack {
    async fn start() -> Stack {
        let pg = common::Postgres::start().await;
        pg.setup_schema().await;
        let key = TestKey::es256("k1");
        let jwks = JwksServer::with_keys(&[&key]).await;
        Stack {
            pg,
            jwks,
            key,
            port: free_port(),
        }
    }

    fn config(&self, opts: &Options) -> String {
        let listen = format!("127.0.0.1:{}", self.port);
        let admin = format!("\n[admin]\naddr = \"127.0.0.1:{}\"\n", free_port());
        common::config_text(&self.pg, &self.jwks, &listen, opts) + &admin
    }

    fn spawn(&self, config: &str) -> ProxyProcess {
        ProxyProcess::start(
            config,
            self.port,
            &[("AUTH_PW", common::AUTHENTICATED_PASSWORD)],
        )
    }

    async fn connect(&self, token: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        common::connect(&common::client_config(
            self.port,
            "authenticated",
            Some(token),
        ))
        .await
    }

    fn token(&self, sub: &str) -> String {
        self.key
            .sign(&claims(sub, &self.jwks.issuer(), common::AUDIENCE))
    }
}

fn psql_verify_full(port: u16, ca: &std::path::Path, token: &str) -> Result<String, String> {
    let conninfo = format!(
        "host=localhost port={port} user=authenticated dbname=postgres sslmode=verify-full sslrootcert={}",
        ca.display()
    );
    let out = std::process::Command::new("psql")
        .args(["-X", "-A", "-t", &conninfo, "-c", "SELECT auth.user_id()"])
        .env("PGPASSWORD", token)
        .output()
        .expect("psql");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rotates_the_certificate_and_adds_an_issuer_while_a_session_stays_open() {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let (ca1, cert, key) = TestCa::new("first CA").write_server_files(dir.path(), "proxy");
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\nrequire = false\n",
        cert.display(),
        key.display()
    );
    let config = stack.config(&Options {
        extra: tls.clone(),
        ..Default::default()
    });
    let proxy = stack.spawn(&config);

    let open = stack
        .connect(&stack.token("alice"))
        .await
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let token = stack.token("alice");
    let port = stack.port;
    let first = tokio::task::block_in_place(|| psql_verify_full(port, &ca1, &token));
    assert_eq!(first.as_deref(), Ok("alice"));

    // Rotate the certificate to another CA and add a second issuer.
    let second_ca = TestCa::new("second CA");
    let (cert2, key2) = second_ca.server_cert(&["localhost", "127.0.0.1"]);
    std::fs::write(&cert, cert2).expect("rotate cert");
    std::fs::write(&key, key2).expect("rotate key");
    let ca2 = dir.path().join("second-ca.pem");
    std::fs::write(&ca2, second_ca.pem()).expect("write CA");
    let other_key = TestKey::ed25519("other-k1");
    let other = JwksServer::with_keys(&[&other_key]).await;
    let second_issuer = format!(
        "\n[[issuers]]\nissuer = \"{}\"\njwks_url = \"{}\"\naudience = \"{}\"\n",
        other.issuer(),
        other.url(),
        common::AUDIENCE
    );
    proxy.rewrite_config(&(config.clone() + &second_issuer));
    proxy.signal("HUP");
    proxy.wait_for_log("configuration reloaded", 0).await;

    let row = open
        .query_one("SELECT auth.user_id()", &[])
        .await
        .expect("the open session still works");
    assert_eq!(row.get::<_, String>(0), "alice");
    let token = stack.token("alice");
    let rotated = tokio::task::block_in_place(|| psql_verify_full(port, &ca2, &token));
    assert_eq!(
        rotated.as_deref(),
        Ok("alice"),
        "the new certificate is served"
    );
    let old = tokio::task::block_in_place(|| psql_verify_full(port, &ca1, &token));
    assert!(old.is_err(), "the old CA no longer matches");

    let carol = other_key.sign(&claims("carol", &other.issuer(), common::AUDIENCE));
    let client = stack
        .connect(&carol)
        .await
        .unwrap_or_else(|e| panic!("new issuer: {}", describe(&e)));
    let row = client
        .query_one("SELECT auth.user_id()", &[])
        .await
        .expect("query");
    assert_eq!(row.get::<_, String>(0), "carol");
    assert!(!proxy.log().contains(&carol), "tokens are never logged");
}

#[tokio::test]
async fn sighup_with_a_broken_config_keeps_the_old_one() {
    let stack = Stack::start().await;
    let config = stack.config(&Options::default());
    let proxy = stack.spawn(&config);
    proxy.rewrite_config(&config.replace("max_per_role = 5", "max_per_role = \"lots\""));
    proxy.signal("HUP");
    proxy.wait_for_log("reload refused", 0).await;
    assert!(
        proxy.log().contains("pool.max_per_role"),
        "the log names the bad key:\n{}",
        proxy.log()
    );
    let client = stack
        .connect(&stack.token("alice"))
        .await
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    client
        .simple_query("SELECT 1")
        .await
        .expect("still serving");
}

#[tokio::test]
async fn sigterm_drains_an_open_session_then_exits_0() {
    let stack = Stack::start().await;
    let config = stack.config(&Options {
        listen_extra: "shutdown_timeout = \"20s\"".into(),
        ..Default::default()
    });
    let mut proxy = stack.spawn(&config);
    let open = stack
        .connect(&stack.token("alice"))
        .await
        .unwrap_or_else(|e| panic!("{}", describe(&e)));

    proxy.signal("TERM");
    proxy.wait_for_log("stopped accepting", 0).await;
    assert!(
        stack.connect(&stack.token("bob")).await.is_err(),
        "no new clients while draining"
    );
    let row = open
        .query_one("SELECT auth.user_id()", &[])
        .await
        .expect("the open session keeps working");
    assert_eq!(row.get::<_, String>(0), "alice");
    assert!(
        proxy.wait_exit(Duration::from_millis(300)).await.is_none(),
        "still draining"
    );

    drop(open);
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits once drained");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn sigterm_closes_sessions_left_after_shutdown_timeout_with_57p01() {
    let stack = Stack::start().await;
    let config = stack.config(&Options {
        listen_extra: "shutdown_timeout = \"500ms\"".into(),
        ..Default::default()
    });
    let mut proxy = stack.spawn(&config);
    let open = stack
        .connect(&stack.token("alice"))
        .await
        .unwrap_or_else(|e| panic!("{}", describe(&e)));

    proxy.signal("TERM");
    let status = proxy
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exits after the drain time");
    assert!(status.success(), "{status:?}");
    let err = open
        .simple_query("SELECT 1")
        .await
        .expect_err("the session was closed");
    let said_57p01 = err
        .as_db_error()
        .is_some_and(|e| e.code().code() == "57P01");
    assert!(said_57p01 || err.is_closed(), "{}", describe(&err));
    assert!(
        proxy.log().contains("closing open sessions"),
        "{}",
        proxy.log()
    );
}
