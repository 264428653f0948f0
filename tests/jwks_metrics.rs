//! JWKS fetch outcomes are counted by issuer and reason. One test in its
//! own binary: the debugging recorder is process-global.

mod common;

use common::{Behaviour, JwksServer, TestKey, claims};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use rlsproxy::auth::Authenticator;
use rlsproxy::config::Config;

/// A counter's name, labels and value.
type Counter = (String, Vec<(String, String)>, u64);

/// Counters since the last call (a snapshot drains them): name, labels, value.
fn drain(snapshotter: &Snapshotter) -> Vec<Counter> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| {
            let DebugValue::Counter(n) = value else {
                return None;
            };
            let key = key.key();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            Some((key.name().to_owned(), labels, n))
        })
        .collect()
}

fn count(counters: &[Counter], name: &str, labels: &[(&str, &str)]) -> u64 {
    counters
        .iter()
        .filter(|(n, have, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
        })
        .map(|(.., value)| value)
        .sum()
}

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
    let fetches = |counters: &[_], result: &str| {
        count(
            counters,
            "rlsproxy_jwks_fetches_total",
            &[("issuer", &issuer), ("result", result)],
        )
    };

    source.reload().await.expect("first fetch");
    assert_eq!(fetches(&drain(&snapshotter), "ok"), 1);

    server.set_behaviour(Behaviour::Status(500));
    source.reload().await.expect_err("500");
    assert_eq!(fetches(&drain(&snapshotter), "status"), 1);

    server.set_behaviour(Behaviour::Body("<html></html>".into()));
    source.reload().await.expect_err("html");
    assert_eq!(fetches(&drain(&snapshotter), "invalid"), 1);

    // An unknown kid refetches once and says so.
    server.set_behaviour(Behaviour::Normal);
    let stranger = TestKey::es256("stranger");
    let token = stranger.sign(&claims("a", &issuer, "app"));
    assert!(auth.verify(&token, "authenticated").await.is_err());
    let counters = drain(&snapshotter);
    let refetches = count(
        &counters,
        "rlsproxy_jwks_unknown_kid_refetches_total",
        &[("issuer", &issuer)],
    );
    assert_eq!(refetches, 1);
    assert_eq!(fetches(&counters, "ok"), 1);
    let misses = count(
        &counters,
        "rlsproxy_token_cache_total",
        &[("result", "miss")],
    );
    assert_eq!(misses, 1);
}
