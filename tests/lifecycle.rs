//! Operating the proxy: limits, start-up timeout, admin endpoints, TLS to
//! clients and to the upstream. The proxy runs in this process.

mod common;

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use common::{Env, Options, TestCa, describe};

/// Starts the admin endpoint of `env` on a free port; returns its base URL.
async fn admin(env: &Env) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(rlsproxy::admin::serve(listener, env.handle.clone()));
    url
}

async fn get(url: &str) -> (u16, String) {
    let resp = reqwest::get(url).await.expect("GET");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

#[tokio::test]
async fn max_clients_plus_one_gets_a_clear_error() {
    let listen_extra = "max_clients = 2".to_owned();
    let env = Env::start_with(Options {
        listen_extra,
        ..Default::default()
    })
    .await;
    let a = env.as_user(&env.es, "alice").await;
    let b = env.as_user(&env.ed, "bob").await;
    let err = env
        .connect("anonymous", None)
        .await
        .expect_err("third client refused");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{}", describe(&err)));
    assert_eq!(db.code().code(), "53300");
    assert_eq!(
        db.message(),
        "too many clients: this proxy serves at most 2 at once"
    );
    drop(a);
    // The slot frees when the first client's connection task ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match env.connect("anonymous", None).await {
            Ok(c) => {
                c.simple_query("SELECT 1").await.expect("query");
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "slot never freed: {}",
                describe(&e)
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(b);
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_dropped_after_startup_timeout() {
    let listen_extra = "startup_timeout = \"500ms\"".to_owned();
    let env = Env::start_with(Options {
        listen_extra,
        ..Default::default()
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", env.proxy_port))
        .await
        .expect("connect");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "expected the proxy to close: {read:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // A client that starts but never sends its password is cut off too, with a message.
    let mut half = tokio::net::TcpStream::connect(("127.0.0.1", env.proxy_port))
        .await
        .expect("connect");
    let mut startup = Vec::new();
    let body = b"\x00\x03\x00\x00user\x00authenticated\x00\x00";
    startup.extend_from_slice(&(i32::try_from(body.len() + 4).expect("small")).to_be_bytes());
    startup.extend_from_slice(body);
    tokio::io::AsyncWriteExt::write_all(&mut half, &startup)
        .await
        .expect("send startup");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("57014") && text.contains("did not finish within"),
        "{text:?}"
    );

    let alice = env.as_user(&env.es, "alice").await;
    alice
        .simple_query("SELECT 1")
        .await
        .expect("others are still served");
}

#[tokio::test]
async fn metrics_count_a_refused_token_and_health_endpoints_answer() {
    // The recorder must be in place before the proxy counts anything.
    rlsproxy::admin::metrics_handle();
    let env = Env::start().await;
    let url = admin(&env).await;
    let forged = {
        let t = env.token(&env.es, "alice");
        let (rest, _) = t.rsplit_once('.').expect("jwt");
        format!(
            "{rest}.{}",
            env.token(&env.es, "bob").rsplit_once('.').expect("jwt").1
        )
    };
    let before = refused_count(&get(&format!("{url}/metrics")).await.1, "signature");
    env.connect("authenticated", Some(&forged))
        .await
        .expect_err("refused");
    let (status, metrics) = get(&format!("{url}/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        refused_count(&metrics, "signature"),
        before + 1,
        "{metrics}"
    );
    assert!(metrics.contains("rlsproxy_jwks_fetches_total"), "{metrics}");
    assert_eq!(
        get(&format!("{url}/healthz")).await,
        (200, "ok\n".to_owned())
    );
    assert_eq!(
        get(&format!("{url}/readyz")).await,
        (200, "ready\n".to_owned())
    );
}

fn refused_count(metrics: &str, reason: &str) -> u64 {
    let prefix = format!("rlsproxy_tokens_refused_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().expect("counter value"))
}

#[tokio::test]
async fn readyz_is_unready_while_the_issuer_has_never_answered() {
    let pg = common::Postgres::start().await;
    pg.setup_schema().await;
    let dead = common::free_port();
    let text = format!(
        r#"
        [listen]
        addr = "127.0.0.1:0"
        [upstream]
        host = "127.0.0.1"
        port = {}
        [roles.authenticated]
        password = "x"
        [[issuers]]
        issuer = "http://127.0.0.1:{dead}"
        jwks_url = "http://127.0.0.1:{dead}/jwks.json"
        [jwks]
        connect_timeout = "200ms"
        "#,
        pg.port()
    );
    let config = rlsproxy::config::Config::parse(&text, &|_| None).expect("config");
    let proxy = rlsproxy::listener::Proxy::bind(config).await.expect("bind");
    let handle = proxy.handle();
    tokio::spawn(proxy.run(std::future::pending()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(rlsproxy::admin::serve(listener, handle));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = get(&format!("{url}/readyz")).await;
    assert_eq!(status, 503);
    assert!(body.contains("no issuer has signing keys"), "{body}");
    assert_eq!(get(&format!("{url}/healthz")).await.0, 200);
}

/// psql with the token as PGPASSWORD; returns (success, stdout + stderr).
fn psql(conninfo: &str, token: &str, sql: &str) -> (bool, String) {
    let out = std::process::Command::new("psql")
        .args(["-X", "-A", "-t", conninfo, "-c", sql])
        .env("PGPASSWORD", token)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn client_tls_required_optional_and_verify_full() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new("client-side CA");
    let (ca_path, cert, key) = ca.write_server_files(dir.path(), "proxy");
    let tls = |require: bool| {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nrequire = {require}\n",
            cert.display(),
            key.display()
        )
    };

    let env = Env::start_with(Options {
        extra: tls(true),
        ..Default::default()
    })
    .await;
    let token = env.token(&env.es, "alice");
    let base = format!(
        "host=localhost port={} user=authenticated dbname=postgres",
        env.proxy_port
    );
    let (ok, out) = tokio::task::block_in_place(|| {
        psql(
            &format!(
                "{base} sslmode=verify-full sslrootcert={}",
                ca_path.display()
            ),
            &token,
            "SELECT auth.user_id(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
    });
    assert!(ok, "{out}");
    assert_eq!(out, "alice|f", "TLS to the client, plain upstream");
    let (ok, out) = tokio::task::block_in_place(|| {
        psql(&format!("{base} sslmode=disable"), &token, "SELECT 1")
    });
    assert!(!ok);
    assert!(out.contains("TLS is required"), "{out}");

    let other_ca = TestCa::new("someone else");
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca.pem()).expect("write");
    let (ok, out) = tokio::task::block_in_place(|| {
        psql(
            &format!("{base} sslmode=verify-full sslrootcert={}", other.display()),
            &token,
            "SELECT 1",
        )
    });
    assert!(!ok, "a certificate from an untrusted CA must fail: {out}");

    let optional = Env::start_with(Options {
        extra: tls(false),
        ..Default::default()
    })
    .await;
    let base = format!(
        "host=localhost port={} user=authenticated dbname=postgres",
        optional.proxy_port
    );
    let token = optional.token(&optional.es, "bob");
    for mode in ["disable", "require"] {
        let (ok, out) = tokio::task::block_in_place(|| {
            psql(
                &format!("{base} sslmode={mode}"),
                &token,
                "SELECT auth.user_id()",
            )
        });
        assert!(ok && out == "bob", "sslmode={mode}: {out}");
    }
}

#[tokio::test]
async fn upstream_tls_verify_full_and_a_wrong_ca_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = TestCa::new("upstream CA");
    let (ca_path, _, _) = ca.write_server_files(dir.path(), "unused");
    let (cert, key) = ca.server_cert(&["127.0.0.1", "localhost"]);

    let upstream = |root: &std::path::Path| {
        format!(
            "sslmode = \"verify-full\"\nroot_cert = \"{}\"\n",
            root.display()
        )
    };
    // The generated config's [upstream] table gets the TLS keys patched in.
    let env = Env::start_with(Options::default()).await;
    env.pg.enable_ssl(&cert, &key).await;
    let text = common::config_text(&env.pg, &env.jwks, "127.0.0.1:0", &Options::default()).replace(
        "connect_timeout = \"2s\"",
        &format!("connect_timeout = \"2s\"\n{}", upstream(&ca_path)),
    );
    let config = rlsproxy::config::Config::parse(&text, &common::test_env).expect("config");
    let proxy = rlsproxy::listener::Proxy::bind(config).await.expect("bind");
    let port = proxy.local_addr().port();
    tokio::spawn(proxy.run(std::future::pending()));

    let token = env.token(&env.ed, "alice");
    let at = |port: u16| common::client_config(port, "authenticated", Some(&token));
    let client = common::connect(&at(port))
        .await
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    let row = client
        .query_one(
            "SELECT ssl, auth.user_id() FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query");
    assert!(
        row.get::<_, bool>(0),
        "the upstream connection is encrypted"
    );
    assert_eq!(row.get::<_, String>(1), "alice");

    let wrong = TestCa::new("wrong CA");
    let wrong_path = dir.path().join("wrong.pem");
    std::fs::write(&wrong_path, wrong.pem()).expect("write");
    let text = common::config_text(&env.pg, &env.jwks, "127.0.0.1:0", &Options::default()).replace(
        "connect_timeout = \"2s\"",
        &format!("connect_timeout = \"2s\"\n{}", upstream(&wrong_path)),
    );
    let config = rlsproxy::config::Config::parse(&text, &common::test_env).expect("config");
    let proxy = rlsproxy::listener::Proxy::bind(config).await.expect("bind");
    let port = proxy.local_addr().port();
    tokio::spawn(proxy.run(std::future::pending()));
    let err = common::connect(&at(port))
        .await
        .expect_err("untrusted upstream certificate");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{}", describe(&err)));
    assert_eq!(db.code().code(), "08006");
    assert!(
        db.message()
            .contains("TLS handshake with the upstream server failed"),
        "{}",
        db.message()
    );
}

#[tokio::test]
async fn bytes_stuffed_after_sslrequest_are_refused_with_tls() {
    use tokio::io::AsyncWriteExt;

    let dir = tempfile::tempdir().expect("dir");
    let (_, cert, key) = TestCa::new("ca").write_server_files(dir.path(), "proxy");
    let extra = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let env = Env::start_with(Options {
        extra,
        ..Default::default()
    })
    .await;

    // An SSLRequest and, in the same write, a plaintext startup packet that
    // an attacker wants read as if it came inside the TLS session.
    let mut bytes = vec![0, 0, 0, 8];
    bytes.extend_from_slice(&rlsproxy::wire::SSL_REQUEST_CODE.to_be_bytes());
    let body = b"\x00\x03\x00\x00user\x00authenticated\x00\x00";
    bytes.extend_from_slice(&(i32::try_from(body.len() + 4).expect("small")).to_be_bytes());
    bytes.extend_from_slice(body);
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", env.proxy_port))
        .await
        .expect("connect");
    tcp.write_all(&bytes).await.expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        !answer.starts_with(b"S"),
        "the proxy must not start TLS: {text:?}"
    );
    assert!(
        text.contains("08P01") && text.contains("unencrypted data after SSLRequest"),
        "{text:?}"
    );
}

#[tokio::test]
async fn readyz_turns_unready_when_the_upstream_refuses_the_proxys_login() {
    let env = Env::start().await;
    // The same cluster, but the proxy holds a wrong password for the role.
    let text = common::config_text(&env.pg, &env.jwks, "127.0.0.1:0", &Options::default());
    let config = rlsproxy::config::Config::parse(&text, &|var| {
        (var == "AUTH_PW").then(|| "not-the-password".to_owned())
    })
    .expect("config");
    let proxy = rlsproxy::listener::Proxy::bind(config).await.expect("bind");
    let (port, handle) = (proxy.local_addr().port(), proxy.handle());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.has_keys() {
        assert!(Instant::now() < deadline, "no keys");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::spawn(proxy.run(std::future::pending()));
    assert_eq!(
        handle.ready().await,
        Ok(()),
        "ready before any login failed"
    );

    let token = env.token(&env.es, "alice");
    let c = common::client_config(port, "authenticated", Some(&token));
    let err = common::connect(&c)
        .await
        .expect_err("login refused upstream");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("08006"),
        "{}",
        describe(&err)
    );

    let why = handle
        .ready()
        .await
        .expect_err("unready after a failed login");
    assert!(why.contains("the last upstream login failed"), "{why}");
}

#[tokio::test]
async fn databases_nobody_can_log_in_to_leave_no_pool_behind() {
    rlsproxy::admin::metrics_handle();
    let env = Env::start().await;
    let url = admin(&env).await;
    for i in 0..3 {
        let token = env.token(&env.es, "alice");
        let mut config = env.config("authenticated", Some(&token));
        config.dbname(format!("no_such_db_{i}"));
        let err = common::connect(&config).await.expect_err("no database");
        assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("3D000"));
    }
    assert_eq!(env.handle.upstream_pools(), 0, "no pool for a failed login");
    let alice = env.as_user(&env.es, "alice").await;
    alice.simple_query("SELECT 1").await.expect("query");
    assert_eq!(env.handle.upstream_pools(), 1);
    let (_, metrics) = get(&format!("{url}/metrics")).await;
    assert!(
        metrics.contains(
            "rlsproxy_pool_in_use_connections{database=\"postgres\",role=\"authenticated\"}"
        ),
        "{metrics}"
    );
    assert!(!metrics.contains("no_such_db"), "{metrics}");
}
