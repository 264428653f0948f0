//! Cancel requests that must do nothing: a stale key whose backend has
//! moved on to another client, a wrong secret, a wrong pid. Then the right
//! key cancels (so the quiet outcomes above are not a broken cancel path),
//! and keys handed out are distinct, unrelated to backend pids, not sequential.

mod common;

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::proxy::{
    AUDIENCE, ProxyOptions, Reply, TestProxy, message, next_reply, query, raw_login, send_cancel,
};
use common::{JwksServer, Postgres, TestKey, claims};

/// Logins made only to collect cancel keys.
const KEY_SAMPLES: usize = 20;

/// Sends `sql` and reads to ReadyForQuery: the first column of the first
/// row (if any) and the first error (if any).
async fn raw_query(stream: &mut TcpStream, sql: &str) -> (Option<String>, Option<String>) {
    stream.write_all(&query(sql)).await.expect("send query");
    let (mut value, mut error) = (None, None);
    loop {
        match next_reply(stream, Duration::from_secs(40)).await {
            Reply::Message(b'D', body) if value.is_none() => {
                let len = i32::from_be_bytes(body[2..6].try_into().expect("len"));
                let len = usize::try_from(len).expect("not NULL");
                value = Some(String::from_utf8(body[6..6 + len].to_vec()).expect("utf-8"));
            }
            Reply::Message(b'Z', _) => return (value, error),
            Reply::Message(..) => {}
            Reply::Error(e) if error.is_none() => error = Some(e.code),
            Reply::Error(_) => {}
            other => panic!("{sql}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn stale_and_wrong_cancels_never_reach_another_client() {
    common::proxy::watch_panics();
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let key = TestKey::es256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let mut opts = ProxyOptions::new(pg.port());
    opts.max_per_role = 1;
    let proxy = TestProxy::start(&jwks, opts).await;
    let token = |sub: &str| key.sign(&claims(sub, &jwks.issuer(), AUDIENCE));

    // Alice gets a cancel key, notes her backend, and leaves cleanly.
    let mut alice = proxy.raw().await;
    let alice_key = raw_login(&mut alice, &token("alice")).await;
    let (alice_backend, _) = raw_query(&mut alice, "SELECT pg_backend_pid()").await;
    let alice_backend: i32 = alice_backend.expect("pid").parse().expect("number");
    assert_ne!(
        alice_key.0, alice_backend,
        "the proxy must not expose backend pids"
    );
    alice
        .write_all(&message(b'X', b""))
        .await
        .expect("terminate");
    drop(alice);

    // Bob gets the same backend (one connection per role) and sleeps.
    let mut bob = proxy.raw().await;
    let bob_key = raw_login(&mut bob, &token("bob")).await;
    let (bob_backend, _) = raw_query(&mut bob, "SELECT pg_backend_pid()").await;
    assert_eq!(
        bob_backend.as_deref(),
        Some(alice_backend.to_string().as_str()),
        "reused backend"
    );
    let (who, _) = raw_query(&mut bob, "SELECT auth.user_id()").await;
    assert_eq!(who.as_deref(), Some("bob"));

    let started = Instant::now();
    bob.write_all(&query("SELECT pg_sleep(3)"))
        .await
        .expect("send sleep");
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_cancel(proxy.port, alice_key.0, alice_key.1).await;
    send_cancel(proxy.port, bob_key.0, bob_key.1 ^ 0x5a5a_5a5a).await;
    send_cancel(proxy.port, bob_key.0 ^ 1, bob_key.1).await;
    send_cancel(proxy.port, alice_backend, bob_key.1).await;
    let mut error = None;
    loop {
        match next_reply(&mut bob, Duration::from_secs(20)).await {
            Reply::Message(b'Z', _) => break,
            Reply::Message(..) => {}
            Reply::Error(e) => error = Some(e),
            other => panic!("bob's sleep: {other:?}"),
        }
    }
    assert_eq!(error, None, "a stale or wrong cancel reached bob");
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "the sleep ran to its end"
    );

    // Bob's own key does cancel: the requests above were routed, and dropped.
    let started = Instant::now();
    bob.write_all(&query("SELECT pg_sleep(30)"))
        .await
        .expect("send sleep");
    tokio::time::sleep(Duration::from_millis(300)).await;
    send_cancel(proxy.port, bob_key.0, bob_key.1).await;
    let mut code = None;
    loop {
        match next_reply(&mut bob, Duration::from_secs(20)).await {
            Reply::Message(b'Z', _) => break,
            Reply::Message(..) => {}
            Reply::Error(e) => code = Some(e.code),
            other => panic!("bob's cancelled sleep: {other:?}"),
        }
    }
    assert_eq!(code.as_deref(), Some("57014"), "bob's own cancel works");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "cancelled promptly"
    );
    bob.write_all(&message(b'X', b"")).await.expect("terminate");
    drop(bob);

    // Keys: all distinct, none sequential, none a backend pid.
    let mut keys = vec![alice_key, bob_key];
    for i in 0..KEY_SAMPLES {
        let mut s = proxy.raw().await;
        keys.push(raw_login(&mut s, &token(&format!("k{i}"))).await);
        s.write_all(&message(b'X', b"")).await.expect("terminate");
    }
    let mut pids: Vec<i32> = keys.iter().map(|k| k.0).collect();
    let mut secrets: Vec<i32> = keys.iter().map(|k| k.1).collect();
    let sequential = pids
        .windows(2)
        .filter(|w| w[1].wrapping_sub(w[0]).unsigned_abs() <= 1)
        .count();
    assert_eq!(sequential, 0, "cancel pids look sequential: {pids:?}");
    pids.sort_unstable();
    pids.dedup();
    secrets.sort_unstable();
    secrets.dedup();
    assert_eq!(
        (pids.len(), secrets.len()),
        (keys.len(), keys.len()),
        "keys repeat"
    );
    assert!(
        !pids.contains(&alice_backend),
        "a backend pid leaked as a cancel key"
    );
    assert_eq!(common::proxy::panics(), 0, "a task panicked");
}
