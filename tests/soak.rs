//! Load and soak, run explicitly (`scripts/soak.sh`): many concurrent
//! clients connect, query and leave in a loop with valid and invalid tokens
//! mixed, while the issuer rotates keys and its JWKS endpoint fails half
//! the time. Valid tokens never fail, invalid ones are always refused, the
//! process's memory stays flat and Postgres never sees more connections
//! than the pool allows.
//!
//! `SOAK_SECONDS` (default 120) and `SOAK_CLIENTS` (default 200) bound it.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use common::proxy::{AUDIENCE, ProxyOptions, TestProxy};
use common::{Behaviour, JwksServer, Postgres, TestKey, claims, describe};

/// Upstream connections per role; Postgres must never see more.
const POOL: usize = 20;
/// How often the issuer publishes a new key.
const ROTATE_EVERY: Duration = Duration::from_secs(4);
/// Keys kept published: a key signs for one period, then stays this many
/// periods more, so a token signed just before a rotation still verifies.
const KEYS_KEPT: usize = 4;
/// Memory growth allowed between the end of warm-up and the end, in KiB
/// (the verified-token cache fills up to its bound meanwhile).
const RSS_GROWTH_KIB: u64 = 96 * 1024;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// VmRSS of this process (the proxy runs in it) in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value")
}

/// The issuer's keys: the newest the proxy has been seen to accept signs.
struct Keys {
    published: Vec<Arc<TestKey>>,
    current: Arc<TestKey>,
}

#[derive(Default)]
struct Counts {
    valid: AtomicU64,
    invalid: AtomicU64,
    invalid_accepted: AtomicU64,
    valid_failures: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load test: run with scripts/soak.sh"]
async fn soak_clients_with_rotating_and_failing_jwks() {
    common::proxy::watch_panics();
    let seconds = env_number("SOAK_SECONDS", 120);
    let clients = env_number("SOAK_CLIENTS", 200) as usize;
    let run_for = Duration::from_secs(seconds);
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let first = Arc::new(TestKey::es256("k-0"));
    let jwks = Arc::new(JwksServer::with_keys(&[&first]).await);
    let mut opts = ProxyOptions::new(pg.port());
    opts.max_per_role = POOL;
    opts.acquire_timeout = "60s";
    let proxy = Arc::new(TestProxy::start(&jwks, opts).await);
    let iss = jwks.issuer();
    let keys = Arc::new(Mutex::new(Keys {
        published: vec![first.clone()],
        current: first,
    }));
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    let rotator = tokio::spawn(rotate(
        jwks.clone(),
        proxy.clone(),
        keys.clone(),
        stop.clone(),
    ));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (proxy, keys, counts, stop, iss) = (
            proxy.clone(),
            keys.clone(),
            counts.clone(),
            stop.clone(),
            iss.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                round += 1;
                one_round(&proxy, &keys, &counts, &iss, c, round).await;
            }
        }));
    }

    // Warm up for a quarter of the run, then watch memory and connections.
    tokio::time::sleep(run_for / 4).await;
    let rss_warm = rss_kib();
    let su = pg.superuser().await;
    let mut most_backends = 0;
    while started.elapsed() < run_for {
        let n: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'authenticated'",
                &[],
            )
            .await
            .expect("count backends")
            .get(0);
        most_backends = most_backends.max(n);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("a client finishes its round within 60 s")
            .expect("client task");
    }
    rotator.await.expect("rotator");
    let rss_end = rss_kib();

    let valid = counts.valid.load(Ordering::SeqCst);
    let invalid = counts.invalid.load(Ordering::SeqCst);
    let failures = counts.valid_failures.lock().expect("lock").clone();
    eprintln!(
        "soak: {seconds} s, {clients} clients: {valid} valid sessions, {invalid} invalid \
         refused, {} valid failures, at most {most_backends} backends, \
         RSS {rss_warm} KiB after warm-up, {rss_end} KiB at the end",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "valid tokens failed: {:?}",
        &failures[..failures.len().min(10)]
    );
    assert_eq!(
        counts.invalid_accepted.load(Ordering::SeqCst),
        0,
        "an invalid token got in"
    );
    assert!(valid > 0 && invalid > 0, "the soak did nothing");
    assert!(
        most_backends <= POOL as i64,
        "{most_backends} upstream connections"
    );
    assert!(
        rss_end <= rss_warm + RSS_GROWTH_KIB,
        "RSS grew from {rss_warm} to {rss_end} KiB"
    );
    assert_eq!(common::proxy::panics(), 0, "a task panicked");
}

/// One connection: three in four with a valid token, the rest invalid in
/// four ways (expired, wrong audience, forged signature, not a JWT).
async fn one_round(
    proxy: &TestProxy,
    keys: &Mutex<Keys>,
    counts: &Counts,
    iss: &str,
    c: usize,
    round: u64,
) {
    let sub = format!("client-{c}");
    let key = keys.lock().expect("keys").current.clone();
    let kind = (c as u64 + round) % 8;
    let token = match kind {
        0 => {
            key.sign(&json!({"sub": sub, "iss": iss, "aud": AUDIENCE, "exp": common::now() - 300}))
        }
        1 => key.sign(&claims(&sub, iss, "other-audience")),
        2 => {
            let t = key.sign(&claims(&sub, iss, AUDIENCE));
            let (head, sig) = t.rsplit_once('.').expect("three parts");
            let flipped = if sig.starts_with('A') { 'B' } else { 'A' };
            format!("{head}.{flipped}{}", &sig[1..])
        }
        3 => format!("not-a-jwt-{round}"),
        _ => key.sign(&claims(&sub, iss, AUDIENCE)),
    };
    let valid = kind >= 4;
    let session = async {
        let client = proxy.connect("authenticated", Some(&token)).await?;
        let row = client
            .query_one("SELECT auth.user_id(), count(*) FROM todos", &[])
            .await?;
        Ok::<String, tokio_postgres::Error>(row.get(0))
    };
    let outcome = tokio::time::timeout(Duration::from_secs(60), session).await;
    match (valid, outcome) {
        (true, Ok(Ok(got))) if got == sub => {
            counts.valid.fetch_add(1, Ordering::SeqCst);
        }
        (true, Ok(Ok(got))) => counts
            .valid_failures
            .lock()
            .expect("lock")
            .push(format!("{sub} saw {got}")),
        (true, Ok(Err(e))) => counts
            .valid_failures
            .lock()
            .expect("lock")
            .push(describe(&e)),
        (true, Err(_)) => counts
            .valid_failures
            .lock()
            .expect("lock")
            .push("valid session hung".into()),
        (false, Ok(Err(e))) if e.as_db_error().is_some_and(|d| d.code().code() == "28000") => {
            counts.invalid.fetch_add(1, Ordering::SeqCst);
        }
        (false, other) => {
            eprintln!(
                "invalid token kind {kind}: {:?}",
                other.map(|r| r.map_err(|e| describe(&e)))
            );
            counts.invalid_accepted.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Every period: publish a new key (JWKS healthy), log in with it once so
/// the proxy has it, let clients sign with it, then fail the endpoint with
/// 500 for half the period.
async fn rotate(
    jwks: Arc<JwksServer>,
    proxy: Arc<TestProxy>,
    keys: Arc<Mutex<Keys>>,
    stop: Arc<AtomicBool>,
) {
    let iss = jwks.issuer();
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let key = Arc::new(TestKey::es256(&format!("k-{n}")));
        jwks.set_behaviour(Behaviour::Normal);
        let published: Vec<Arc<TestKey>> = {
            let mut k = keys.lock().expect("keys");
            k.published.push(key.clone());
            let excess = k.published.len().saturating_sub(KEYS_KEPT);
            k.published.drain(..excess);
            k.published.clone()
        };
        jwks.set_keys(&published.iter().map(|k| k.as_ref()).collect::<Vec<_>>());

        // The unknown-kid cooldown may delay the refetch: retry for a while.
        let token = key.sign(&claims("rotator", &iss, AUDIENCE));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match proxy.connect("authenticated", Some(&token)).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = describe(&e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!(
                    "the proxy never accepted rotated key k-{n}: {}",
                    describe(&e)
                ),
            }
        }
        keys.lock().expect("keys").current = key;

        tokio::time::sleep(ROTATE_EVERY / 2).await;
        jwks.set_behaviour(Behaviour::Status(500));
        tokio::time::sleep(ROTATE_EVERY / 2).await;
    }
    jwks.set_behaviour(Behaviour::Normal);
}
