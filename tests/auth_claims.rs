//! Claims quirks, per-issuer role rules and the verified-token cache, at
//! the `Authenticator` level: real key set in a `jwks_file`, real tokens,
//! no network and no Postgres. Cache tests run on tokio's paused clock,
//! which ages cache entries, with a wall clock that follows it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::{Value, json};
use tempfile::TempDir;

use common::{Recorded, TestKey, TestRecorder, claims, now};
use rlsproxy::auth::verify::TokenError;
use rlsproxy::auth::{Authenticator, VerifiedToken};
use rlsproxy::config::Config;

const ISS: &str = "https://issuer.test";
const AUD: &str = "app";
/// Stack Auth style: regular users get `app`, anonymous users `app:anon`.
const BOTH_AUDIENCES: &str = r#"["app", "app:anon"]"#;
const ANONYMOUS_ROLE: &str = r#"anonymous_users = "anonymous_role""#;

struct Env {
    auth: Authenticator,
    key: TestKey,
    dir: TempDir,
}

impl Env {
    /// One issuer with one ES256 key and audience `app`; `issuer_extra`
    /// goes into its table, `top_extra` before it.
    async fn start(issuer_extra: &str, top_extra: &str) -> Env {
        Env::start_with(&format!("{AUD:?}"), issuer_extra, top_extra).await
    }

    /// Same, with `audience` given as a TOML value.
    async fn start_with(audience: &str, issuer_extra: &str, top_extra: &str) -> Env {
        let key = TestKey::es256("k1");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({ "keys": [key.jwk()] }).to_string()).expect("write");
        let text = format!(
            r#"
            [upstream]
            host = "127.0.0.1"
            [roles.authenticated]
            [roles.editor]
            [roles.anonymous]
            requires_token = false
            {top_extra}
            [[issuers]]
            issuer = "{ISS}"
            jwks_file = "{path}"
            audience = {audience}
            {issuer_extra}
            "#,
            path = path.display(),
        );
        let config = Config::parse(&text, &|_| None).expect("valid test config");
        let auth = Authenticator::new(&config).expect("authenticator");
        auth.sources()[0].reload().await.expect("keys load");
        Env { auth, key, dir }
    }

    async fn verify(&self, claims: &Value) -> Result<String, TokenError> {
        self.verify_as(claims, "authenticated").await
    }

    async fn verify_as(&self, claims: &Value, role: &str) -> Result<String, TokenError> {
        let token = self.key.sign(claims);
        self.auth.verify(&token, role).await.map(|t| t.role.clone())
    }

    /// The same authenticator reading `clock` as its wall clock.
    fn with_clock(mut self, clock: &TestClock) -> Env {
        let clock = clock.clone();
        self.auth = self.auth.with_wall_clock(move || clock.now());
        self
    }

    /// Verifies `token` for `authenticated` under `recorder`. With the keys
    /// loaded nothing waits, so the whole call runs on this thread.
    fn verify_recorded(
        &self,
        recorder: &TestRecorder,
        token: &str,
    ) -> Result<Arc<VerifiedToken>, TokenError> {
        recorder.record(|| {
            let verify = self.auth.verify(token, "authenticated");
            verify
                .now_or_never()
                .expect("no waiting with the keys loaded")
        })
    }
}

/// A wall clock (Unix seconds) that moves with tokio's paused clock, plus
/// steps a test adds to play a wall clock jumping ahead of the monotonic one.
#[derive(Clone)]
struct TestClock {
    wall_at_start: f64,
    start: tokio::time::Instant,
    steps: Arc<AtomicI64>,
}

impl TestClock {
    fn new() -> TestClock {
        TestClock {
            wall_at_start: now() as f64,
            start: tokio::time::Instant::now(),
            steps: Arc::default(),
        }
    }

    fn now(&self) -> f64 {
        let steps = self.steps.load(Ordering::SeqCst) as f64;
        self.wall_at_start + self.start.elapsed().as_secs_f64() + steps
    }

    /// Moves the wall clock alone; cache entries do not age.
    fn step(&self, seconds: i64) {
        self.steps.fetch_add(seconds, Ordering::SeqCst);
    }

    /// A token lifetime ending `seconds` from now on this clock.
    fn exp_in(&self, seconds: i64) -> Value {
        json!(self.now() as i64 + seconds)
    }
}

/// Token-cache hits and misses, and verifications timed, in `seen`.
fn cache_counts(seen: &Recorded) -> (u64, u64, usize) {
    let count = |result| seen.counter("rlsproxy_token_cache_total", &[("result", result)]);
    let timed = seen.histogram("rlsproxy_token_verify_seconds", &[]).len();
    (count("hit"), count("miss"), timed)
}

fn with(patch: Value) -> Value {
    let mut c = claims("alice", ISS, AUD);
    for (k, v) in patch.as_object().expect("object") {
        if v.is_null() {
            c.as_object_mut().expect("object").remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

#[tokio::test]
async fn numeric_dates_given_as_strings_are_refused() {
    let env = Env::start("", "").await;
    let later = (now() + 600).to_string();
    for claim in ["exp", "nbf", "iat"] {
        let e = env
            .verify(&with(json!({ claim: later.clone() })))
            .await
            .expect_err("string date");
        assert_eq!(
            e,
            TokenError::ClaimType {
                claim,
                expected: "a number"
            }
        );
    }
}

#[tokio::test]
async fn float_numeric_dates_are_accepted() {
    let env = Env::start("", "").await;
    let t = now() as f64;
    let c = with(json!({ "exp": t + 600.5, "iat": t - 0.25, "nbf": t - 1.5 }));
    assert_eq!(env.verify(&c).await.as_deref(), Ok("authenticated"));
}

#[tokio::test]
async fn aud_may_be_a_string_or_an_array() {
    let env = Env::start("", "").await;
    assert!(env.verify(&with(json!({ "aud": AUD }))).await.is_ok());
    assert!(
        env.verify(&with(json!({ "aud": ["other", AUD] })))
            .await
            .is_ok()
    );
    let e = env
        .verify(&with(json!({ "aud": ["other"] })))
        .await
        .expect_err("wrong audience");
    assert!(matches!(e, TokenError::WrongAudience { .. }), "{e:?}");
}

#[tokio::test]
async fn configured_audience_with_missing_aud_fails() {
    let env = Env::start("", "").await;
    let e = env
        .verify(&with(json!({ "aud": null })))
        .await
        .expect_err("no aud");
    assert_eq!(e, TokenError::MissingAudience(vec![AUD.to_owned()]));
}

#[tokio::test]
async fn token_without_iss_is_accepted_when_the_single_issuer_allows_it() {
    let env = Env::start("allow_missing_iss = true", "").await;
    let no_iss = with(json!({ "iss": null }));
    assert_eq!(env.verify(&no_iss).await.as_deref(), Ok("authenticated"));

    // It allows a missing iss, not a wrong one.
    let e = env
        .verify(&with(json!({ "iss": "https://evil.example" })))
        .await
        .expect_err("wrong iss");
    assert_eq!(
        e,
        TokenError::UntrustedIssuer("https://evil.example".into())
    );
}

#[tokio::test]
async fn token_without_iss_is_refused_unless_allowed() {
    let env = Env::start("", "").await;
    let e = env
        .verify(&with(json!({ "iss": null })))
        .await
        .expect_err("no iss");
    assert_eq!(e, TokenError::MissingIssuer);
    assert_eq!(e.to_string(), "token has no \"iss\" claim");
}

#[tokio::test]
async fn token_over_max_token_bytes_is_refused_before_parsing() {
    let env = Env::start("", "[auth]\nmax_token_bytes = \"1KiB\"").await;
    // Not even a JWT: a parse would say "malformed"; the size check comes first.
    let junk = "x".repeat(1025);
    let e = env
        .auth
        .verify(&junk, "authenticated")
        .await
        .expect_err("too large");
    assert_eq!(
        e,
        TokenError::TooLarge {
            len: 1025,
            max: 1024
        }
    );
    assert_eq!(
        e.to_string(),
        "token is 1025 bytes, more than the 1024 allowed"
    );
}

#[tokio::test]
async fn issuer_roles_limit_the_roles_its_tokens_log_into() {
    let env = Env::start(r#"roles = ["editor"]"#, "").await;
    let c = claims("alice", ISS, AUD);
    assert_eq!(env.verify_as(&c, "editor").await.as_deref(), Ok("editor"));
    let e = env.verify(&c).await.expect_err("role not allowed");
    assert_eq!(
        e,
        TokenError::RoleNotAllowed {
            issuer: ISS.into(),
            role: "authenticated".into()
        }
    );
    // The same token, cached for one role, is still refused for another.
    let token = env.key.sign(&c);
    assert!(env.auth.verify(&token, "editor").await.is_ok());
    assert!(env.auth.verify(&token, "authenticated").await.is_err());
}

#[tokio::test]
async fn anonymous_user_tokens_are_refused_by_default() {
    let env = Env::start_with(BOTH_AUDIENCES, "", "").await;
    let anon = with(json!({ "is_anonymous": true, "aud": "app:anon" }));
    let e = env.verify(&anon).await.expect_err("anonymous");
    assert_eq!(e, TokenError::AnonymousUser(ISS.into()));
    assert!(e.to_string().contains("anonymous users"), "{e}");
}

#[tokio::test]
async fn anonymous_user_tokens_map_to_the_anonymous_role_with_their_claims() {
    let env = Env::start_with(BOTH_AUDIENCES, ANONYMOUS_ROLE, "").await;
    let anon = with(json!({ "is_anonymous": true, "aud": "app:anon", "sub": "anon-7" }));
    let token = env.key.sign(&anon);
    let verified = env
        .auth
        .verify(&token, "authenticated")
        .await
        .expect("mapped");
    assert_eq!(verified.role, "anonymous");
    assert!(verified.anonymous);
    assert_eq!(verified.claims.get("sub"), Some(&Value::from("anon-7")));

    // A regular user's token keeps the role it asked for.
    let user = claims("alice", ISS, AUD);
    assert_eq!(env.verify(&user).await.as_deref(), Ok("authenticated"));
}

#[tokio::test]
async fn anonymous_markers_that_disagree_are_refused() {
    let env = Env::start_with(BOTH_AUDIENCES, ANONYMOUS_ROLE, "").await;
    for patch in [
        json!({ "is_anonymous": false, "aud": "app:anon" }),
        json!({ "is_anonymous": true, "aud": "app" }),
    ] {
        let e = env
            .verify(&with(patch.clone()))
            .await
            .expect_err("ambiguous");
        assert!(
            matches!(e, TokenError::AnonymousMarkersDisagree { .. }),
            "{patch}: {e:?}"
        );
        assert!(e.to_string().contains("ambiguous"), "{e}");
    }
}

#[tokio::test(start_paused = true)]
async fn token_cache_hit_skips_the_signature_check() {
    let clock = TestClock::new();
    let env = Env::start("", "").await.with_clock(&clock);
    let token = env.key.sign(&claims("alice", ISS, AUD));
    let recorder = TestRecorder::new();

    env.verify_recorded(&recorder, &token).expect("first use");
    assert_eq!(
        cache_counts(&recorder.take()),
        (0, 1, 1),
        "a miss, verified"
    );

    for _ in 0..3 {
        let hit = env.verify_recorded(&recorder, &token).expect("reconnect");
        assert_eq!(hit.sub, "alice");
    }
    // Hits, and no verification timed: the signature was not checked again.
    assert_eq!(cache_counts(&recorder.take()), (3, 0, 0));

    // Another role is another entry: the role is part of the key.
    let editor = recorder.record(|| env.auth.verify(&token, "editor").now_or_never());
    assert!(editor.expect("no waiting").is_ok());
    assert_eq!(cache_counts(&recorder.take()), (0, 1, 1));
}

#[tokio::test]
async fn verify_latency_is_recorded_for_accepted_and_refused_tokens() {
    let env = Env::start("", "").await;
    let recorder = TestRecorder::new();
    let valid = env.key.sign(&claims("alice", ISS, AUD));
    let expired = env.key.sign(&with(json!({ "exp": now() - 120 })));
    let wrong_aud = env.key.sign(&with(json!({ "aud": "other" })));

    env.verify_recorded(&recorder, &valid).expect("valid");
    env.verify_recorded(&recorder, &valid).expect("cached");
    // Refusals that never wait (a forged signature would, for a refetch).
    for refused in [&expired, &wrong_aud, "not.a.jwt", &"x".repeat(20_000)] {
        env.verify_recorded(&recorder, refused)
            .expect_err("refused");
    }

    // One verification each, cache hits and oversized tokens not timed.
    let seen = recorder.take();
    let timed = |result| seen.histogram("rlsproxy_token_verify_seconds", &[("result", result)]);
    let (ok, refused) = (timed("ok"), timed("refused"));
    assert_eq!((ok.len(), refused.len()), (1, 3), "{ok:?} {refused:?}");
    assert!(ok.iter().chain(&refused).all(|s| (0.0..1.0).contains(s)));
}

#[tokio::test(start_paused = true)]
async fn cache_hit_never_skips_the_exp_check() {
    let clock = TestClock::new();
    let env = Env::start("", "").await.with_clock(&clock);
    let token = env.key.sign(&with(json!({ "exp": clock.exp_in(600) })));
    let recorder = TestRecorder::new();
    env.verify_recorded(&recorder, &token).expect("fresh token");
    env.verify_recorded(&recorder, &token).expect("cached");
    assert_eq!(cache_counts(&recorder.take()), (1, 1, 1));

    // The wall clock steps past exp + leeway while the monotonic clock, by
    // which the entry ages, stands still: the entry is live, the token is not.
    clock.step(700);
    let e = env
        .verify_recorded(&recorder, &token)
        .expect_err("expired while cached");
    assert!(matches!(e, TokenError::Expired(_)), "{e:?}");
    assert_eq!(
        cache_counts(&recorder.take()),
        (1, 0, 0),
        "refused on the hit"
    );
}

#[tokio::test(start_paused = true)]
async fn cached_token_lives_no_longer_than_its_exp() {
    let clock = TestClock::new();
    let env = Env::start("", "").await.with_clock(&clock);
    let recorder = TestRecorder::new();
    let short = env.key.sign(&with(json!({ "exp": clock.exp_in(120) })));
    env.verify_recorded(&recorder, &short).expect("fresh token");

    tokio::time::advance(Duration::from_secs(119)).await;
    env.verify_recorded(&recorder, &short).expect("before exp");
    assert_eq!(cache_counts(&recorder.take()), (1, 1, 1));

    // Past exp but inside the 30 s leeway: still valid, no longer cached,
    // and not cached again with nothing left of its lifetime.
    tokio::time::advance(Duration::from_secs(2)).await;
    env.verify_recorded(&recorder, &short)
        .expect("inside the leeway");
    env.verify_recorded(&recorder, &short)
        .expect("inside the leeway");
    assert_eq!(cache_counts(&recorder.take()), (0, 2, 2));

    // A token valid for two hours is cached for one.
    let long = env.key.sign(&with(json!({ "exp": clock.exp_in(7200) })));
    env.verify_recorded(&recorder, &long).expect("fresh token");
    tokio::time::advance(Duration::from_secs(3599)).await;
    env.verify_recorded(&recorder, &long).expect("cached");
    tokio::time::advance(Duration::from_secs(2)).await;
    env.verify_recorded(&recorder, &long)
        .expect("verified again");
    assert_eq!(cache_counts(&recorder.take()), (1, 2, 2));
}

#[tokio::test]
async fn cached_token_is_dropped_when_its_key_leaves_the_jwks() {
    let env = Env::start("", "").await;
    let token = env.key.sign(&claims("alice", ISS, AUD));
    assert!(env.auth.verify(&token, "authenticated").await.is_ok());

    let other = TestKey::es256("k2");
    let path = env.dir.path().join("jwks.json");
    std::fs::write(&path, json!({ "keys": [other.jwk()] }).to_string()).expect("write");
    env.auth.sources()[0].reload().await.expect("reload");

    let e = env
        .auth
        .verify(&token, "authenticated")
        .await
        .expect_err("key gone");
    assert!(matches!(e, TokenError::UnknownKid { .. }), "{e:?}");
}
