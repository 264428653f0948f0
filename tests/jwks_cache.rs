//! The JWKS cache policy against a real loopback JWKS server, on tokio's
//! paused clock: TTL from Cache-Control and its clamps, refresh ahead of
//! expiry, single-flight unknown-kid refetches and their cooldown,
//! stale-if-error and its bound, OIDC discovery.
//!
//! Time stands still unless a test calls `tokio::time::advance`: a blocking
//! task held for the whole test stops tokio from auto-advancing the paused
//! clock while real loopback I/O is pending, which would otherwise fire
//! the client's timeouts in the middle of a fetch.

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::Value;

use common::{Behaviour, JwksServer, TestKey, claims};
use rlsproxy::auth::Authenticator;
use rlsproxy::auth::jwks::{KeySource, Location};
use rlsproxy::auth::verify::TokenError;
use rlsproxy::config::{Config, JwksConfig};

const AUD: &str = "app";

/// Keeps the paused clock from auto-advancing until dropped.
struct FrozenClock(#[allow(dead_code, reason = "held for its drop")] mpsc::Sender<()>);

fn freeze_clock() -> FrozenClock {
    let (tx, rx) = mpsc::channel::<()>();
    tokio::task::spawn_blocking(move || {
        let _ = rx.recv();
    });
    FrozenClock(tx)
}

/// Waits in real time (virtual time stands still) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(2)))
            .await
            .expect("sleep task");
    }
}

/// Lets woken tasks start their fetch, then waits for it to finish.
async fn settle(source: &KeySource) {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    until("the fetch in flight", || !source.in_flight()).await;
}

/// Moves virtual time forward and lets any fetch it caused finish.
async fn advance(source: &KeySource, by: Duration) {
    tokio::time::advance(by).await;
    settle(source).await;
}

fn config(server: &JwksServer, jwks: &str) -> Config {
    let text = format!(
        r#"
        [upstream]
        host = "127.0.0.1"
        [roles.authenticated]
        [[issuers]]
        issuer = "{iss}"
        jwks_url = "{url}"
        audience = "{AUD}"
        [jwks]
        {jwks}
        "#,
        iss = server.issuer(),
        url = server.url(),
    );
    Config::parse(&text, &|_| None).expect("valid test config")
}

/// An authenticator whose first fetch has finished.
async fn started(config: &Config) -> (Authenticator, Arc<KeySource>) {
    let auth = Authenticator::new(config).expect("authenticator");
    auth.start();
    let source = auth.sources()[0].clone();
    until("the first fetch", || source.attempts() >= 1).await;
    (auth, source)
}

fn token(server: &JwksServer, key: &TestKey, sub: &str) -> String {
    key.sign(&claims(sub, &server.issuer(), AUD))
}

async fn accepts(auth: &Authenticator, token: &str) -> Result<(), TokenError> {
    auth.verify(token, "authenticated").await.map(|_| ())
}

#[tokio::test(start_paused = true)]
async fn rotated_key_is_accepted_on_first_use() {
    let _clock = freeze_clock();
    let (old, new) = (TestKey::es256("old"), TestKey::ed25519("new"));
    let server = JwksServer::with_keys(&[&old]).await;
    let (auth, _) = started(&config(&server, "")).await;
    assert_eq!(accepts(&auth, &token(&server, &old, "a")).await, Ok(()));

    server.set_keys(&[&old, &new]);
    assert_eq!(accepts(&auth, &token(&server, &new, "b")).await, Ok(()));
    assert_eq!(
        server.fetch_count(),
        2,
        "one refetch, no waiting for the TTL"
    );
}

#[tokio::test(start_paused = true)]
async fn key_rotated_in_under_the_same_kid_is_accepted_on_first_use() {
    let _clock = freeze_clock();
    // Some issuers keep the kid when they rotate: same type, or a new one.
    let (old, same_type, new_type) = (
        TestKey::es256("k"),
        TestKey::es256("k"),
        TestKey::ed25519("k"),
    );
    let server = JwksServer::with_keys(&[&old]).await;
    let (auth, source) = started(&config(&server, "")).await;
    assert_eq!(accepts(&auth, &token(&server, &old, "a")).await, Ok(()));

    server.set_keys(&[&same_type]);
    assert_eq!(
        accepts(&auth, &token(&server, &same_type, "b")).await,
        Ok(())
    );
    assert_eq!(
        server.fetch_count(),
        2,
        "one refetch, no waiting for the TTL"
    );

    advance(&source, Duration::from_secs(11)).await;
    server.set_keys(&[&new_type]);
    assert_eq!(
        accepts(&auth, &token(&server, &new_type, "c")).await,
        Ok(())
    );
    assert_eq!(server.fetch_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn token_without_kid_signed_by_a_newly_rotated_key_is_accepted_on_first_use() {
    let _clock = freeze_clock();
    let (old, new) = (TestKey::rs256("old"), TestKey::rs256("new"));
    let server = JwksServer::with_keys(&[&old]).await;
    let (auth, _) = started(&config(&server, "")).await;
    let no_kid = |key: &TestKey| {
        let header = serde_json::json!({ "alg": key.alg(), "typ": "JWT" });
        key.sign_with_header(&header, &claims("a", &server.issuer(), AUD))
    };
    assert_eq!(accepts(&auth, &no_kid(&old)).await, Ok(()));

    server.set_keys(&[&old, &new]);
    assert_eq!(accepts(&auth, &no_kid(&new)).await, Ok(()));
    assert_eq!(server.fetch_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn hundred_forged_signatures_inside_the_cooldown_cause_one_fetch() {
    let _clock = freeze_clock();
    let known = TestKey::es256("known");
    let server = JwksServer::with_keys(&[&known]).await;
    let (auth, source) = started(&config(&server, "")).await;

    // Signed by strangers under the known kid, with and without a kid.
    let header = serde_json::json!({ "alg": "ES256" });
    let forged: Vec<String> = (0..100)
        .map(|i| {
            let stranger = TestKey::es256("known");
            let c = claims("mallory", &server.issuer(), AUD);
            if i % 2 == 0 {
                stranger.sign(&c)
            } else {
                stranger.sign_with_header(&header, &c)
            }
        })
        .collect();
    let results = join_all(forged.iter().map(|t| accepts(&auth, t))).await;
    assert!(
        results.iter().all(|r| *r == Err(TokenError::BadSignature)),
        "{:?}",
        results
            .iter()
            .find(|r| **r != Err(TokenError::BadSignature))
    );
    assert_eq!(server.fetch_count(), 2);

    // Still inside the cooldown: no fetch at all, and real tokens still pass.
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(
        accepts(&auth, &forged[0]).await,
        Err(TokenError::BadSignature)
    );
    assert_eq!(accepts(&auth, &token(&server, &known, "a")).await, Ok(()));
    assert_eq!(server.fetch_count(), 2);

    // After it, one more fetch for the whole flood.
    advance(&source, Duration::from_secs(2)).await;
    let results = join_all(forged.iter().map(|t| accepts(&auth, t))).await;
    assert!(results.iter().all(Result::is_err));
    assert_eq!(server.fetch_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn jwks_server_down_for_an_hour_keeps_known_keys() {
    let _clock = freeze_clock();
    let key = TestKey::rs256("k");
    let server = JwksServer::with_keys(&[&key]).await;
    let (auth, source) = started(&config(&server, "")).await;
    let token = token(&server, &key, "a");

    server.set_behaviour(Behaviour::Status(500));
    for _ in 0..120 {
        advance(&source, Duration::from_secs(30)).await;
        assert_eq!(accepts(&auth, &token).await, Ok(()));
    }
    assert!(source.has_keys());
    // Retries back off to min_ttl (1m): about one per minute once the
    // first refresh at 225 s has failed.
    assert!(source.failures() >= 55, "failures: {}", source.failures());
    assert_eq!(source.attempts(), 1 + source.failures());
}

#[tokio::test(start_paused = true)]
async fn failed_refreshes_are_retried_after_2_4_8_16_32_seconds_then_each_min_ttl() {
    let _clock = freeze_clock();
    let key = TestKey::es256("k");
    let server = JwksServer::with_keys(&[&key]).await;
    let (_auth, source) = started(&config(&server, "")).await;

    // The refresh at 75% of the default 5m TTL is the first failure.
    server.set_behaviour(Behaviour::Status(500));
    advance(&source, Duration::from_secs(225)).await;
    assert_eq!((server.fetch_count(), source.failures()), (2, 1));

    let almost = Duration::from_millis(10);
    for (i, secs) in [2, 4, 8, 16, 32, 60, 60].into_iter().enumerate() {
        let fetches = server.fetch_count();
        advance(&source, Duration::from_secs(secs) - almost).await;
        assert_eq!(server.fetch_count(), fetches, "retry {i} before {secs}s");
        advance(&source, almost).await;
        assert_eq!(server.fetch_count(), fetches + 1, "retry {i} after {secs}s");
    }

    // A success ends the backoff: the next fetch is the regular refresh.
    server.set_behaviour(Behaviour::Normal);
    advance(&source, Duration::from_secs(60)).await;
    assert_eq!(server.fetch_count(), 10);
    advance(&source, Duration::from_secs(224)).await;
    assert_eq!(server.fetch_count(), 10, "backoff outlived the success");
    advance(&source, Duration::from_secs(1)).await;
    assert_eq!(server.fetch_count(), 11);
    assert_eq!(source.failures(), 8);
}

#[tokio::test(start_paused = true)]
async fn hundred_unknown_kids_inside_the_cooldown_cause_one_fetch() {
    let _clock = freeze_clock();
    let known = TestKey::es256("known");
    let server = JwksServer::with_keys(&[&known]).await;
    let (auth, source) = started(&config(&server, "")).await;

    let strangers: Vec<TestKey> = (0..100).map(|i| TestKey::es256(&format!("u{i}"))).collect();
    let tokens: Vec<String> = strangers
        .iter()
        .map(|k| token(&server, k, "mallory"))
        .collect();
    let results = join_all(tokens.iter().map(|t| accepts(&auth, t))).await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(TokenError::UnknownKid { .. })))
    );
    assert_eq!(server.fetch_count(), 2);

    // Still inside the cooldown: no fetch at all.
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(accepts(&auth, &tokens[0]).await.is_err());
    assert_eq!(server.fetch_count(), 2);

    // After it, the next unknown kid may fetch again, once.
    advance(&source, Duration::from_secs(2)).await;
    let results = join_all(tokens.iter().map(|t| accepts(&auth, t))).await;
    assert!(results.iter().all(Result::is_err));
    assert_eq!(server.fetch_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn thousand_connections_with_a_never_seen_kid_cause_one_fetch() {
    let _clock = freeze_clock();
    let first = TestKey::es256("first");
    let server = JwksServer::with_keys(&[&first]).await;

    // Cold: the source has never fetched.
    let config = config(&server, "");
    let auth = Authenticator::new(&config).expect("authenticator");
    let tokens: Vec<String> = (0..1000)
        .map(|i| token(&server, &first, &format!("user{i}")))
        .collect();
    let results = join_all(tokens.iter().map(|t| accepts(&auth, t))).await;
    assert!(results.iter().all(Result::is_ok), "{:?}", results[0]);
    assert_eq!(server.fetch_count(), 1);

    // Warm: a key rotated in while running.
    let rotated = TestKey::ps256("rotated");
    server.set_keys(&[&first, &rotated]);
    tokio::time::advance(Duration::from_secs(11)).await;
    let tokens: Vec<String> = (0..1000)
        .map(|i| token(&server, &rotated, &format!("user{i}")))
        .collect();
    let results = join_all(tokens.iter().map(|t| accepts(&auth, t))).await;
    assert!(results.iter().all(Result::is_ok), "{:?}", results[0]);
    assert_eq!(server.fetch_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn max_age_is_honoured_and_clamped() {
    let _clock = freeze_clock();
    // (Cache-Control, when the refresh comes: 75% of the clamped TTL)
    let cases = [
        (Some("max-age=600"), 450),
        (Some("public, max-age=999999"), 2700),
        (Some("max-age=5"), 45),
        (Some("no-cache"), 45),
        (Some("no-store, max-age=600"), 45),
        (Some("max-age=0"), 45),
        (Some("max-age=bogus"), 225),
        (None, 225),
    ];
    for (header, refresh_secs) in cases {
        let key = TestKey::es256("k");
        let server = JwksServer::with_keys(&[&key]).await;
        server.set_cache_control(header);
        let (auth, source) = started(&config(&server, "")).await;

        advance(&source, Duration::from_secs(refresh_secs - 1)).await;
        assert_eq!(server.fetch_count(), 1, "{header:?}: refreshed too early");
        for i in 0..20 {
            accepts(&auth, &token(&server, &key, &format!("u{i}")))
                .await
                .expect("known key");
        }
        assert_eq!(server.fetch_count(), 1, "{header:?}: fetched per token");
        advance(&source, Duration::from_secs(2)).await;
        assert_eq!(server.fetch_count(), 2, "{header:?}: no refresh");
    }
}

#[tokio::test(start_paused = true)]
async fn failed_refreshes_keep_the_last_good_keys() {
    let _clock = freeze_clock();
    let five_mb = format!(r#"{{"keys": [], "pad": "{}"}}"#, "x".repeat(5 << 20));
    let cases = [
        ("500", Behaviour::Status(500)),
        (
            "html",
            Behaviour::Body("<html><body>Sign in</body></html>".into()),
        ),
        ("5 MB body", Behaviour::Body(five_mb)),
        ("empty object", Behaviour::Body("{}".into())),
        ("slow", Behaviour::Delay(Duration::from_secs(30))),
        (
            "redirect to http",
            Behaviour::Redirect("http://jwks.example.invalid/jwks.json".into()),
        ),
    ];
    for (name, behaviour) in cases {
        let key = TestKey::ed25519("k");
        let server = JwksServer::with_keys(&[&key]).await;
        let (auth, source) = started(&config(&server, "")).await;
        let token = token(&server, &key, "a");

        let slow = matches!(behaviour, Behaviour::Delay(_));
        server.set_behaviour(behaviour);
        tokio::time::advance(Duration::from_secs(225)).await;
        if slow {
            // The fetch waits on the server; the 5 s total timeout ends it.
            until("the slow fetch to start", || server.fetch_count() == 2).await;
            assert!(source.in_flight());
            tokio::time::advance(Duration::from_secs(5)).await;
        }
        settle(&source).await;

        assert_eq!(source.failures(), 1, "{name}: not counted as a failure");
        assert!(source.has_keys(), "{name}: keys lost");
        assert_eq!(accepts(&auth, &token).await, Ok(()), "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn redirect_loops_are_cut_after_three() {
    let _clock = freeze_clock();
    let key = TestKey::es256("k");
    let target = JwksServer::with_keys(&[&key]).await;
    let hops: Vec<JwksServer> = join_all((0..4).map(|_| JwksServer::start())).await;
    // hops[i] redirects to hops[i + 1]; the last one to the real key set.
    for (i, hop) in hops.iter().enumerate() {
        let next = hops.get(i + 1).map_or(target.url(), JwksServer::url);
        hop.set_behaviour(Behaviour::Redirect(next));
    }
    let source = |url: String| {
        let location = Location::Url(url.parse().expect("url"));
        Arc::new(KeySource::new("https://iss", location, &JwksConfig::default()).expect("source"))
    };

    // Three redirects are followed.
    assert_eq!(source(hops[1].url()).reload().await.ok(), Some(1));
    // Four are not.
    let four = source(hops[0].url());
    let e = four.reload().await.expect_err("too many redirects");
    assert_eq!(e.reason(), "redirect", "{e}");
    assert!(e.to_string().ends_with("more than 3 redirects"), "{e}");
    assert!(!four.has_keys());
}

#[tokio::test(start_paused = true)]
async fn max_stale_drops_keys() {
    let _clock = freeze_clock();
    let key = TestKey::es256("k");
    let server = JwksServer::with_keys(&[&key]).await;
    let (auth, source) = started(&config(&server, r#"max_stale = "10m""#)).await;
    let token = token(&server, &key, "a");

    server.set_behaviour(Behaviour::Status(503));
    for _ in 0..9 {
        advance(&source, Duration::from_secs(60)).await;
    }
    assert_eq!(accepts(&auth, &token).await, Ok(()), "within max_stale");
    for _ in 0..3 {
        advance(&source, Duration::from_secs(60)).await;
    }
    assert!(!source.has_keys());
    let e = accepts(&auth, &token).await.expect_err("keys dropped");
    assert!(
        matches!(e, TokenError::NoKeys(_) | TokenError::UnknownKid { .. }),
        "{e:?}"
    );

    // The issuer comes back: keys return with the next retry.
    server.set_behaviour(Behaviour::Normal);
    advance(&source, Duration::from_secs(60)).await;
    assert_eq!(accepts(&auth, &token).await, Ok(()));
}

#[tokio::test(start_paused = true)]
async fn discovery_reads_jwks_uri_and_follows_it_when_it_moves() {
    let _clock = freeze_clock();
    let (old, new) = (TestKey::es256("old"), TestKey::es256("new"));
    let issuer = JwksServer::with_keys(&[&old]).await;
    let moved = JwksServer::with_keys(&[&old, &new]).await;
    let text = format!(
        r#"
        [upstream]
        host = "127.0.0.1"
        [roles.authenticated]
        [[issuers]]
        issuer = "{iss}"
        discover = true
        "#,
        iss = issuer.issuer(),
    );
    let config = Config::parse(&text, &|_| None).expect("valid");
    let (auth, source) = started(&config).await;
    assert!(source.has_keys());
    assert_eq!((issuer.discovery_count(), issuer.fetch_count()), (1, 1));
    assert_eq!(accepts(&auth, &token(&issuer, &old, "a")).await, Ok(()));

    // Refreshes use the remembered jwks_uri without re-reading the document.
    advance(&source, Duration::from_secs(225)).await;
    assert_eq!((issuer.discovery_count(), issuer.fetch_count()), (1, 2));

    // The key set moves: its old URL answers 404, the document names the new one.
    issuer.set_behaviour(Behaviour::Status(404));
    issuer.set_discovery_jwks_uri(Some(&moved.url()));
    assert_eq!(accepts(&auth, &token(&issuer, &new, "b")).await, Ok(()));
    assert_eq!(issuer.discovery_count(), 2);
    assert_eq!(moved.fetch_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn discovery_document_naming_plain_http_elsewhere_is_refused() {
    let _clock = freeze_clock();
    let issuer = JwksServer::start().await;
    issuer.set_discovery_jwks_uri(Some("http://keys.example.invalid/jwks.json"));
    let location = Location::Discovery(
        format!("{}/.well-known/openid-configuration", issuer.issuer())
            .parse()
            .expect("url"),
    );
    let source =
        KeySource::new(&issuer.issuer(), location, &JwksConfig::default()).expect("source");
    let e = source.reload().await.expect_err("refused");
    assert_eq!(e.reason(), "discovery");
    assert!(
        e.to_string().contains("http is allowed only to loopback"),
        "{e}"
    );
    assert_eq!(issuer.fetch_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn jwks_file_is_reread_when_it_changes() {
    let _clock = freeze_clock();
    let (a, b) = (TestKey::es256("a"), TestKey::es256("b"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    let write = |keys: &[&TestKey]| {
        let jwks: Vec<Value> = keys.iter().map(|k| k.jwk()).collect();
        let body = serde_json::json!({ "keys": jwks }).to_string();
        std::fs::write(&path, body).expect("write jwks file");
    };
    write(&[&a]);
    let location = Location::File(path.clone());
    let source =
        Arc::new(KeySource::new("https://iss", location, &JwksConfig::default()).expect("source"));
    source.spawn_refresh();
    until("the file read", || source.has_keys()).await;
    let first = source.generation();

    // A file whose contents did not change is not parsed again.
    advance(&source, Duration::from_secs(5)).await;
    assert_eq!(source.generation(), first);

    // mtime resolution can be coarse: make sure the new file looks newer.
    std::thread::sleep(Duration::from_millis(20));
    write(&[&a, &b]);
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(later))
        .expect("touch");
    advance(&source, Duration::from_secs(2)).await;
    assert_eq!(source.keys().keys.len(), 2);
}
