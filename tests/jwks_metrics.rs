//! JWKS fetch outcomes are counted by issuer and reason. One test in its
//! own binary: the debugging recorder is process-global.

mod common;

use common::{Behaviour, JwksServer, TestKey, claims, recorded};
use metrics_util::debugging::DebuggingRecorder;
use rlsproxy::auth::Authenticator;
use rlsproxy::config::Config;

#[tokio::test]
async fn fetch_outcomes_are_counted_by_issuer_and_reason() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("install the recorder");

    let key = TestKey::es256("k");
    let server = JwksServer::with_keys(&[&key]).await;
    let issuer = server.issuer();
    let text = format!(
        r#"
        [upstream]
        host = "127.0.0.1"
        [roles.authenticated]
        [[issuers]]
        issuer = "{issuer}"
        jwks_url = "{url}"
        "#,
        url = server.url(),
    );
    let config = Config::parse(&text, &|_| None).expect("valid config");
    let auth = Authenticator::new(&config).expect("authenticator");
    let source = auth.sources()[0].clone();
    let fetches = |seen: &common::Recorded, result: &str| {
        let labels = [("issuer", issuer.as_str()), ("result", result)];
        seen.counter("rlsproxy_jwks_fetches_total", &labels)
    };

    source.reload().await.expect("first fetch");
    assert_eq!(fetches(&recorded(&snapshotter), "ok"), 1);

    server.set_behaviour(Behaviour::Status(500));
    source.reload().await.expect_err("500");
    assert_eq!(fetches(&recorded(&snapshotter), "status"), 1);

    server.set_behaviour(Behaviour::Body("<html></html>".into()));
    source.reload().await.expect_err("html");
    assert_eq!(fetches(&recorded(&snapshotter), "invalid"), 1);

    // An unknown kid refetches once and says so.
    server.set_behaviour(Behaviour::Normal);
    let stranger = TestKey::es256("stranger");
    let token = stranger.sign(&claims("a", &issuer, "app"));
    assert!(auth.verify(&token, "authenticated").await.is_err());
    let seen = recorded(&snapshotter);
    let refetches = seen.counter(
        "rlsproxy_jwks_unknown_kid_refetches_total",
        &[("issuer", &issuer), ("reason", "unknown_kid")],
    );
    assert_eq!(refetches, 1);
    assert_eq!(fetches(&seen, "ok"), 1);
    let misses = seen.counter("rlsproxy_token_cache_total", &[("result", "miss")]);
    assert_eq!(misses, 1);
}
