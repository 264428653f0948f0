//! JWKS fetches over real TLS from loopback https issuers, redirects
//! included. The fetching client trusts the test CA through
//! `SSL_CERT_FILE`, which the platform verifier behind reqwest reads; a test
//! cannot set it in its own process (no unsafe code, and other tests share
//! the process), so each test runs again in a child process that has it.
//! Where the platform verifier ignores that variable (macOS, Windows, Android)
//! the file is empty.

#![cfg(all(unix, not(target_vendor = "apple"), not(target_os = "android")))]

mod common;

use std::path::PathBuf;

use common::{Behaviour, JwksServer, TestCa, TestKey};
use rlsproxy::auth::jwks::{KeySource, Location};
use rlsproxy::config::JwksConfig;

/// Set in the child: the directory with the CA's server certificate.
const CHILD_DIR: &str = "RLSPROXY_TEST_TLS_DIR";

/// In the parent, runs test `name` in a child of this binary that trusts a
/// fresh test CA, asserts that it passed and returns `None`. In the child,
/// returns the directory holding `jwks.crt` and `jwks.key`, issued by that
/// CA for 127.0.0.1 and localhost.
async fn in_child_trusting_a_test_ca(name: &str) -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        return Some(dir.into());
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, _, _) = TestCa::new("rlsproxy JWKS test CA").write_server_files(dir.path(), "jwks");
    let exe = std::env::current_exe().expect("this test binary");
    let out = tokio::process::Command::new(exe)
        .args([name, "--exact", "--nocapture"])
        .env(CHILD_DIR, dir.path())
        .env("SSL_CERT_FILE", &ca)
        .env_remove("SSL_CERT_DIR")
        .output()
        .await
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // "1 passed": a name that matched no test would pass with 0.
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "child {name}: {}\n{stdout}\n{stderr}",
        out.status
    );
    None
}

fn source(url: &str, config: &JwksConfig) -> KeySource {
    let location = Location::Url(url.parse().expect("url"));
    KeySource::new("https://issuer.test", location, config).expect("source")
}

#[tokio::test]
async fn https_jwks_redirected_down_to_http_is_refused() {
    let name = "https_jwks_redirected_down_to_http_is_refused";
    let Some(dir) = in_child_trusting_a_test_ca(name).await else {
        return;
    };
    let (cert, key) = (dir.join("jwks.crt"), dir.join("jwks.key"));
    let signing = TestKey::es256("k");
    let https = JwksServer::start_tls(&cert, &key).await;
    https.set_keys(&[&signing]);
    let plain = JwksServer::with_keys(&[&signing]).await;
    let defaults = JwksConfig::default();

    // The controls: keys come in over TLS, and through an https redirect.
    assert!(https.url().starts_with("https://127.0.0.1:"));
    assert_eq!(source(&https.url(), &defaults).reload().await.ok(), Some(1));
    let hop = JwksServer::start_tls(&cert, &key).await;
    hop.set_behaviour(Behaviour::Redirect(https.url()));
    assert_eq!(source(&hop.url(), &defaults).reload().await.ok(), Some(1));

    // Down to http is refused, to loopback and with allow_http alike.
    https.set_behaviour(Behaviour::Redirect(plain.url()));
    for allow_http in [false, true] {
        let config = JwksConfig {
            allow_http,
            ..JwksConfig::default()
        };
        let e = source(&https.url(), &config)
            .reload()
            .await
            .expect_err("downgrade followed");
        assert_eq!(e.reason(), "redirect", "{e}");
        assert!(e.to_string().contains("redirect from https to http"), "{e}");
    }
    assert_eq!(plain.fetch_count(), 0, "the http URL was asked");
}
