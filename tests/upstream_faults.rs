//! Faults on the Postgres side: a restart under open and pooled sessions,
//! a server that is down or never answers, and one backend that stops
//! answering mid-query. Clients get a clear error or carry on; no broken
//! pooled connection is handed out; one stuck session blocks no other.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use common::proxy::{AUDIENCE, ProxyOptions, TestProxy};
use common::{JwksServer, Postgres, TestKey, claims, describe};

/// Clients run one after another after the restart; more than the pool
/// holds, so every stale pooled connection would be met.
const CLIENTS_AFTER_RESTART: usize = 8;

async fn user_id(client: &Client) -> Result<String, tokio_postgres::Error> {
    Ok(client.query_one("SELECT auth.user_id()", &[]).await?.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_fails_open_sessions_and_no_stale_connection_is_lent() {
    common::proxy::watch_panics();
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let key = TestKey::es256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let mut opts = ProxyOptions::new(pg.port());
    opts.max_per_role = 4;
    opts.connect_timeout = "2s";
    let proxy = TestProxy::start(&jwks, opts).await;
    let token = |sub: &str| key.sign(&claims(sub, &jwks.issuer(), AUDIENCE));
    let connect = |sub: String| {
        let t = token(&sub);
        let config = proxy.config("authenticated", Some(&t));
        async move { common::connect(&config).await }
    };

    // Two sessions stay open; two more leave their connections in the pool.
    let mut open = Vec::new();
    for sub in ["open-1", "open-2", "pooled-1", "pooled-2"] {
        let c = connect(sub.into()).await.expect("connect before restart");
        assert_eq!(user_id(&c).await.expect("query"), sub);
        open.push(c);
    }
    open.truncate(2);
    tokio::time::sleep(Duration::from_millis(200)).await;

    tokio::task::block_in_place(|| pg.restart());

    for c in &open {
        let err = user_id(c)
            .await
            .expect_err("a session open across the restart fails");
        eprintln!("open session after restart: {}", describe(&err));
    }
    drop(open);
    for i in 0..CLIENTS_AFTER_RESTART {
        let sub = format!("after-{i}");
        let c = connect(sub.clone()).await;
        let c = c.unwrap_or_else(|e| panic!("client {i} after the restart: {}", describe(&e)));
        let got = user_id(&c)
            .await
            .unwrap_or_else(|e| panic!("client {i}: {}", describe(&e)));
        assert_eq!(got, sub);
    }

    // Down: refused with 08006 at once. Back: served again.
    tokio::task::block_in_place(|| pg.stop());
    let started = Instant::now();
    let err = connect("while-down".into())
        .await
        .expect_err("Postgres is down");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{}", describe(&err)));
    assert_eq!(db.code().code(), "08006", "{}", db.message());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    tokio::task::block_in_place(|| pg.resume());
    let c = connect("back".into())
        .await
        .unwrap_or_else(|e| panic!("{}", describe(&e)));
    assert_eq!(user_id(&c).await.expect("query"), "back");
    assert_eq!(common::proxy::panics(), 0, "a task panicked");
}

#[tokio::test]
async fn an_unreachable_or_mute_upstream_gives_08006_within_connect_timeout() {
    common::proxy::watch_panics();
    let key = TestKey::es256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let token = key.sign(&claims("alice", &jwks.issuer(), AUDIENCE));

    // A listener that accepts and never says a word.
    let mute = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mute_port = mute.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = mute.accept().await {
            conns.push(s);
        }
    });
    let closed_port = common::free_port();

    for (name, port, at_least) in [
        ("closed port", closed_port, Duration::ZERO),
        ("mute server", mute_port, Duration::from_millis(1900)),
    ] {
        let mut opts = ProxyOptions::new(port);
        opts.connect_timeout = "2s";
        let proxy = TestProxy::start(&jwks, opts).await;
        let started = Instant::now();
        let err = proxy
            .connect("authenticated", Some(&token))
            .await
            .expect_err(name);
        let took = started.elapsed();
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{name}: {}", describe(&err)));
        assert_eq!(db.code().code(), "08006", "{name}: {}", db.message());
        assert!(
            !db.message().contains(common::AUTHENTICATED_PASSWORD),
            "{name}: password leaked"
        );
        assert!(
            took >= at_least && took < Duration::from_secs(6),
            "{name}: took {took:?}"
        );
    }
    held.abort();
    assert_eq!(common::proxy::panics(), 0, "a task panicked");
}

/// Sends SIGCONT to a stopped backend when dropped, even if the test fails.
struct Stopped(i32);

impl Stopped {
    fn signal(pid: i32, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill {signal} {pid}");
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        Self::signal(self.0, "-CONT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_session_does_not_block_the_others() {
    common::proxy::watch_panics();
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let key = TestKey::es256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let proxy = TestProxy::start(&jwks, ProxyOptions::new(pg.port())).await;
    let client = |sub: &'static str| {
        let t = key.sign(&claims(sub, &jwks.issuer(), AUDIENCE));
        let config = proxy.config("authenticated", Some(&t));
        async move {
            let c = common::connect(&config).await;
            c.unwrap_or_else(|e| panic!("{sub}: {}", describe(&e)))
        }
    };

    // One session sleeps and its backend is then frozen (SIGSTOP): it stops
    // answering altogether. Another waits on a lock the superuser holds.
    let sleeper = client("sleeper").await;
    let sleeper_pid: i32 = sleeper
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let sleeping =
        tokio::spawn(async move { sleeper.simple_query("SELECT pg_sleep(2)").await.map(|_| ()) });
    let su = pg.superuser().await;
    su.batch_execute("BEGIN; LOCK TABLE todos IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let waiter = client("waiter").await;
    let waiting = tokio::spawn(async move {
        waiter
            .query("SELECT count(*) FROM todos", &[])
            .await
            .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    Stopped::signal(sleeper_pid, "-STOP");
    let frozen = Stopped(sleeper_pid);

    for i in 0..10 {
        let started = Instant::now();
        let c = client("other").await;
        assert_eq!(user_id(&c).await.expect("query"), "other");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "client {i} took {:?}",
            started.elapsed()
        );
    }
    assert!(
        !sleeping.is_finished() && !waiting.is_finished(),
        "the stuck sessions are still stuck"
    );

    drop(frozen);
    su.batch_execute("COMMIT").await.expect("unlock");
    let within = Duration::from_secs(20);
    tokio::time::timeout(within, sleeping)
        .await
        .expect("sleeper ends")
        .expect("task")
        .expect("sleep");
    tokio::time::timeout(within, waiting)
        .await
        .expect("waiter ends")
        .expect("task")
        .expect("count");
    assert_eq!(common::proxy::panics(), 0, "a task panicked");
}
