//! Shared harness for the integration tests: a throwaway Postgres, a
//! loopback JWKS issuer and signing keys, all made at run time.
//! Use with `mod common;` from a file in `tests/`.

#![allow(
    dead_code,
    unused_imports,
    reason = "each test file uses a different part of the harness"
)]

mod certs;
mod env;
mod jwks;
mod keys;
mod metrics;
mod pg;
mod process;
pub mod proxy;

use std::net::TcpListener;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

pub use certs::TestCa;
pub use env::{AUDIENCE, Env, Options, config_text, test_env};
pub use jwks::{Behaviour, JwksServer};
pub use keys::{TestKey, alg_confusion_token, alg_none_token, b64, hs256_token};
pub use metrics::{Recorded, TestRecorder, recorded};
pub use pg::{
    ANONYMOUS_PASSWORD, AUTHENTICATED_PASSWORD, DATABASE, MD5_PASSWORD, PLAIN_PASSWORD, Postgres,
    SUPERUSER, SUPERUSER_PASSWORD, SessionJwt, TRUST_PASSWORD, connect, describe, jwk_options,
    password_of,
};
pub use process::ProxyProcess;

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since_epoch.as_secs()).expect("time fits i64")
}

/// Ordinary access-token claims: `exp` in ten minutes, `iat` now.
pub fn claims(sub: &str, iss: &str, aud: &str) -> Value {
    let now = now();
    json!({ "sub": sub, "iss": iss, "aud": aud, "iat": now, "exp": now + 600 })
}

/// A tokio-postgres config for `role` at a proxy on 127.0.0.1:`port`.
pub fn client_config(port: u16, role: &str, password: Option<&str>) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1").port(port).user(role).dbname(DATABASE);
    c.connect_timeout(std::time::Duration::from_secs(10));
    if let Some(p) = password {
        c.password(p);
    }
    c
}

/// A port that was free a moment ago on 127.0.0.1. Another process may take
/// it before the caller binds it; callers that can, retry.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}
