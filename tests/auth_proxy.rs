//! Per-issuer role rules end to end: a Stack Auth style anonymous user's
//! token, presented for `authenticated`, runs as the `anonymous` role with
//! its claims, and disagreeing markers are refused. Real Postgres, real
//! loopback issuer (found through OIDC discovery), the proxy in process.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_postgres::Client;

use common::{JwksServer, Postgres, TestKey, claims, describe};
use rlsproxy::config::Config;
use rlsproxy::listener::Proxy;

struct Env {
    _pg: Postgres,
    jwks: JwksServer,
    key: TestKey,
    port: u16,
}

impl Env {
    async fn start() -> Env {
        let pg = Postgres::start().await;
        pg.setup_schema().await;
        let key = TestKey::es256("stack-1");
        let jwks = JwksServer::with_keys(&[&key]).await;
        let text = format!(
            r#"
            [listen]
            addr = "127.0.0.1:0"
            [upstream]
            host = "127.0.0.1"
            port = {port}
            [roles.authenticated]
            password = "{auth_pw}"
            [roles.anonymous]
            password = "{anon_pw}"
            requires_token = false
            [[issuers]]
            issuer = "{iss}"
            discover = true
            audience = ["app", "app:anon"]
            roles = ["authenticated"]
            anonymous_users = "anonymous_role"
            "#,
            port = pg.port(),
            auth_pw = common::AUTHENTICATED_PASSWORD,
            anon_pw = common::ANONYMOUS_PASSWORD,
            iss = jwks.issuer(),
        );
        let config = Config::parse(&text, &|_| None).expect("valid test config");
        let proxy = Proxy::bind(config).await.expect("proxy binds");
        let port = proxy.local_addr().port();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !proxy.has_keys() {
            assert!(Instant::now() < deadline, "the proxy never fetched keys");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::spawn(proxy.run(std::future::pending()));
        Env {
            _pg: pg,
            jwks,
            key,
            port,
        }
    }

    async fn connect(&self, role: &str, token: &str) -> Result<Client, tokio_postgres::Error> {
        common::connect(&common::client_config(self.port, role, Some(token))).await
    }
}

#[tokio::test]
async fn anonymous_user_token_runs_as_the_anonymous_role_with_its_claims() {
    let env = Env::start().await;
    let mut anon = claims("anon-42", &env.jwks.issuer(), "app:anon");
    anon["is_anonymous"] = json!(true);
    let client = env
        .connect("authenticated", &env.key.sign(&anon))
        .await
        .unwrap_or_else(|e| panic!("anonymous user connects: {}", describe(&e)));
    let row = client
        .query_one(
            "SELECT current_user::text, session_user::text, auth.user_id()",
            &[],
        )
        .await
        .expect("identity query");
    let got: (String, String, Option<String>) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        got,
        (
            "anonymous".into(),
            "anonymous".into(),
            Some("anon-42".into())
        )
    );

    // A regular user of the same issuer still gets `authenticated`.
    let user = claims("alice", &env.jwks.issuer(), "app");
    let client = env
        .connect("authenticated", &env.key.sign(&user))
        .await
        .unwrap_or_else(|e| panic!("alice connects: {}", describe(&e)));
    let row = client
        .query_one("SELECT current_user::text, auth.user_id()", &[])
        .await
        .expect("identity query");
    assert_eq!(row.get::<_, String>(0), "authenticated");
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("alice"));

    // Disagreeing markers are refused with a message that says so.
    let mut odd = claims("anon-43", &env.jwks.issuer(), "app:anon");
    odd["is_anonymous"] = json!(false);
    let e = env
        .connect("authenticated", &env.key.sign(&odd))
        .await
        .expect_err("ambiguous token");
    assert!(describe(&e).contains("ambiguous"), "{}", describe(&e));
    assert_eq!(env.jwks.discovery_count(), 1);
}
