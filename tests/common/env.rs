//! The usual test stack: a Postgres with the test schema, an issuer with
//! ES256, RS256 and Ed25519 keys, and the proxy in this process on port 0.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio_postgres::Client;

use super::{JwksServer, Postgres, TestKey, claims, describe};
use rlsproxy::config::Config;
use rlsproxy::listener::{Proxy, ProxyHandle};

pub const AUDIENCE: &str = "app";

/// Knobs for the proxy config of [`Env`].
pub struct Options {
    pub mode: &'static str,
    pub max_per_role: usize,
    pub acquire_timeout: &'static str,
    /// Extra `[roles.*]` tables.
    pub extra_roles: &'static str,
    /// Extra settings under `[listen]`.
    pub listen_extra: String,
    /// Extra TOML sections appended at the end.
    pub extra: String,
    /// Upstream port override (default: the test cluster's).
    pub upstream_port: Option<u16>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: "pg_session_jwt",
            max_per_role: 5,
            acquire_timeout: "2s",
            extra_roles: "",
            listen_extra: String::new(),
            extra: String::new(),
            upstream_port: None,
        }
    }
}

/// A Postgres with the test schema, an issuer with three keys and a proxy.
pub struct Env {
    pub pg: Postgres,
    pub jwks: JwksServer,
    pub es: TestKey,
    pub rs: TestKey,
    pub ed: TestKey,
    pub proxy_port: u16,
    pub handle: ProxyHandle,
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Env {
        let pg = Postgres::start().await;
        pg.setup_schema().await;
        let (es, rs, ed) = (
            TestKey::es256("k-es"),
            TestKey::rs256("k-rs"),
            TestKey::ed25519("k-ed"),
        );
        let jwks = JwksServer::with_keys(&[&es, &rs, &ed]).await;
        let text = config_text(&pg, &jwks, "127.0.0.1:0", &opts);
        let config = Config::parse(&text, &test_env).expect("valid test config");
        let proxy = Proxy::bind(config).await.expect("proxy binds");
        let proxy_port = proxy.local_addr().port();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !proxy.has_keys() {
            assert!(
                Instant::now() < deadline,
                "the proxy never fetched the JWKS"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let handle = proxy.handle();
        tokio::spawn(proxy.run(std::future::pending()));
        Env {
            pg,
            jwks,
            es,
            rs,
            ed,
            proxy_port,
            handle,
        }
    }

    pub fn token(&self, key: &TestKey, sub: &str) -> String {
        key.sign(&claims(sub, &self.jwks.issuer(), AUDIENCE))
    }

    pub fn claims(&self, sub: &str) -> Value {
        claims(sub, &self.jwks.issuer(), AUDIENCE)
    }

    pub fn config(&self, role: &str, password: Option<&str>) -> tokio_postgres::Config {
        super::client_config(self.proxy_port, role, password)
    }

    pub async fn connect(
        &self,
        role: &str,
        password: Option<&str>,
    ) -> Result<Client, tokio_postgres::Error> {
        super::connect(&self.config(role, password)).await
    }

    pub async fn as_user(&self, key: &TestKey, sub: &str) -> Client {
        let token = self.token(key, sub);
        self.connect("authenticated", Some(&token))
            .await
            .unwrap_or_else(|e| panic!("{sub} connects: {}", describe(&e)))
    }
}

/// `${AUTH_PW}` in test configs.
pub fn test_env(var: &str) -> Option<String> {
    (var == "AUTH_PW").then(|| super::AUTHENTICATED_PASSWORD.to_owned())
}

/// The proxy config for this cluster and issuer, listening on `listen`.
pub fn config_text(pg: &Postgres, jwks: &JwksServer, listen: &str, opts: &Options) -> String {
    format!(
        r#"
        [listen]
        addr = "{listen}"
        {listen_extra}
        [upstream]
        host = "127.0.0.1"
        port = {port}
        connect_timeout = "2s"
        [roles.authenticated]
        password = "${{AUTH_PW}}"
        [roles.anonymous]
        password = "{anon}"
        requires_token = false
        {extra_roles}
        [claims]
        mode = "{mode}"
        [[issuers]]
        issuer = "{iss}"
        jwks_url = "{url}"
        audience = "{AUDIENCE}"
        [pool]
        max_per_role = {max}
        acquire_timeout = "{acquire}"
        {extra}
        "#,
        listen_extra = opts.listen_extra,
        port = opts.upstream_port.unwrap_or(pg.port()),
        anon = super::ANONYMOUS_PASSWORD,
        extra_roles = opts.extra_roles,
        mode = opts.mode,
        iss = jwks.issuer(),
        url = jwks.url(),
        max = opts.max_per_role,
        acquire = opts.acquire_timeout,
        extra = opts.extra,
    )
}
