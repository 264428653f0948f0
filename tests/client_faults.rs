//! Clients that vanish at the worst moment: mid-transaction, mid-COPY, with
//! results unread, mid-message, mid-extended-query. With one upstream
//! connection per role, the next client always gets that connection back
//! (reset) or a fresh one, and finds nothing of the one before.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::SimpleQueryMessage;

use common::proxy::{
    AUDIENCE, ProxyOptions, Reply, TestProxy, message, next_reply, query, raw_login,
};
use common::{JwksServer, Postgres, TestKey, claims, describe};

/// How a client leaves.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Inside a transaction holding a temp table, a prepared statement, a
    /// setting and an uncommitted row; socket closed, no Terminate.
    MidTransaction,
    /// Inside a failed transaction (status `E`).
    FailedTransaction,
    /// In COPY FROM STDIN after some rows.
    MidCopyIn,
    /// In COPY TO STDOUT of a large result, nothing read.
    MidCopyOut,
    /// A large query sent, nothing read, socket closed.
    UnreadResults,
    /// Half a Query message sent.
    MidMessage,
    /// Parse/Bind/Execute in a transaction, no Sync.
    Unsynced,
    /// Terminate sent with a query still running.
    TerminateMidQuery,
}

const FAULTS: [Fault; 8] = [
    Fault::MidTransaction,
    Fault::FailedTransaction,
    Fault::MidCopyIn,
    Fault::MidCopyOut,
    Fault::UnreadResults,
    Fault::MidMessage,
    Fault::Unsynced,
    Fault::TerminateMidQuery,
];

/// Reads until ReadyForQuery; returns its status byte.
async fn until_ready(stream: &mut TcpStream) -> u8 {
    loop {
        match next_reply(stream, Duration::from_secs(20)).await {
            Reply::Message(b'Z', status) => return status[0],
            Reply::Message(..) | Reply::Error(_) => {}
            other => panic!("waiting for ReadyForQuery: {other:?}"),
        }
    }
}

/// Reads until a message with `tag`.
async fn until_tag(stream: &mut TcpStream, tag: u8) {
    loop {
        match next_reply(stream, Duration::from_secs(20)).await {
            Reply::Message(t, _) if t == tag => return,
            Reply::Message(..) => {}
            other => panic!("waiting for {:?}: {other:?}", tag as char),
        }
    }
}

async fn leave(stream: &mut TcpStream, fault: Fault) {
    let dirty = "SET work_mem = '1234kB'; SET application_name = 'dirty';
                 CREATE TEMP TABLE dirty_tmp (x int); PREPARE dirty_stmt AS SELECT 1;
                 LISTEN dirty_channel; SELECT pg_advisory_lock(77);";
    match fault {
        Fault::MidTransaction => {
            let sql = format!("{dirty} BEGIN; INSERT INTO todos (title) VALUES ('dirty');");
            stream.write_all(&query(&sql)).await.expect("send");
            assert_eq!(until_ready(stream).await, b'T');
        }
        Fault::FailedTransaction => {
            let sql = format!("{dirty} BEGIN; INSERT INTO todos (title) VALUES ('dirty');");
            stream.write_all(&query(&sql)).await.expect("send");
            until_ready(stream).await;
            stream.write_all(&query("SELECT 1/0")).await.expect("send");
            assert_eq!(until_ready(stream).await, b'E');
        }
        Fault::MidCopyIn => {
            stream
                .write_all(&query("COPY copy_sink FROM STDIN"))
                .await
                .expect("send");
            until_tag(stream, b'G').await;
            for n in 0..100 {
                let row = format!("dirty\t{n}\n");
                stream
                    .write_all(&message(b'd', row.as_bytes()))
                    .await
                    .expect("copy data");
            }
        }
        Fault::MidCopyOut => {
            let sql = "COPY (SELECT repeat('x', 1000) FROM generate_series(1, 200000)) TO STDOUT";
            stream.write_all(&query(sql)).await.expect("send");
            until_tag(stream, b'H').await;
        }
        Fault::UnreadResults => {
            let sql = "SELECT repeat('x', 1000) FROM generate_series(1, 200000)";
            stream.write_all(&query(sql)).await.expect("send");
        }
        Fault::MidMessage => {
            let whole = query("SELECT 'a long enough query text to be cut in half'");
            stream
                .write_all(&whole[..whole.len() / 2])
                .await
                .expect("send");
        }
        Fault::Unsynced => {
            stream.write_all(&query("BEGIN")).await.expect("send");
            until_ready(stream).await;
            let mut out = BytesMut::new();
            rlsproxy::wire::extended_query(
                &mut out,
                "INSERT INTO todos (title) VALUES ($1)",
                &["dirty"],
            );
            stream.write_all(&out).await.expect("send");
        }
        Fault::TerminateMidQuery => {
            let mut bytes = query("SELECT pg_sleep(1)");
            bytes.extend(message(b'X', b""));
            stream.write_all(&bytes).await.expect("send");
        }
    }
    // Let the proxy relay what was sent before the socket goes.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Every session-scoped trace a previous client could leave, read with the
/// simple protocol (tokio-postgres prepares statements of its own otherwise).
const CHECK_SQL: &str = "SELECT pg_backend_pid()::text, auth.user_id(),
    (now() = statement_timestamp())::text,
    (to_regclass('pg_temp.dirty_tmp') IS NULL)::text,
    (SELECT count(*) FROM pg_prepared_statements)::text,
    (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')::text,
    (SELECT count(*) FROM pg_listening_channels())::text,
    current_setting('work_mem'), current_setting('application_name')";

#[tokio::test]
async fn a_client_that_vanishes_leaves_nothing_for_the_next() {
    common::proxy::watch_panics();
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    pg.exec("CREATE TABLE copy_sink (writer text, n int); GRANT INSERT, SELECT ON copy_sink TO authenticated;")
        .await;
    let key = TestKey::es256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let mut opts = ProxyOptions::new(pg.port());
    opts.max_per_role = 1;
    opts.acquire_timeout = "20s";
    let proxy = TestProxy::start(&jwks, opts).await;
    let token = |sub: &str| key.sign(&claims(sub, &jwks.issuer(), AUDIENCE));

    let mut reused = 0;
    for (i, fault) in FAULTS.into_iter().enumerate() {
        let mut stream = proxy.raw().await;
        raw_login(&mut stream, &token(&format!("faulty-{i}"))).await;
        stream
            .write_all(&query("SELECT pg_backend_pid()"))
            .await
            .expect("send");
        until_ready(&mut stream).await;
        leave(&mut stream, fault).await;
        drop(stream);

        let sub = format!("next-{i}");
        let next = proxy.connect("authenticated", Some(&token(&sub))).await;
        let next = next.unwrap_or_else(|e| panic!("{fault:?}: next client: {}", describe(&e)));
        let rows = next.simple_query(CHECK_SQL).await;
        let rows = rows.unwrap_or_else(|e| panic!("{fault:?}: {}", describe(&e)));
        let row = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        });
        let Some(row) = row else {
            panic!("{fault:?}: no row")
        };
        let got: Vec<&str> = (1..9).map(|c| row.get(c).unwrap_or("NULL")).collect();
        assert_eq!(
            got,
            [
                sub.as_str(),
                "true",
                "true",
                "0",
                "0",
                "0",
                "4MB",
                "rlsproxy"
            ],
            "{fault:?}: user, fresh transaction, no temp table, prepared statement, \
             advisory lock, LISTEN, settings"
        );
        let first_pid = row.get(0).map(str::to_owned);
        drop(next);

        // The pool keeps one connection; a second one would mean a leak.
        let su = pg.superuser().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = su
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'authenticated'",
                    &[],
                )
                .await
                .expect("count backends")
                .get(0);
            if n <= 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{fault:?}: {n} authenticated backends linger"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let again = proxy
            .connect("authenticated", Some(&token("probe")))
            .await
            .expect("probe");
        let pid = again
            .simple_query("SELECT pg_backend_pid()::text")
            .await
            .expect("pid");
        for m in &pid {
            if let SimpleQueryMessage::Row(r) = m {
                reused += usize::from(r.get(0).map(str::to_owned) == first_pid);
            }
        }
        eprintln!("{fault:?}: next client checked");
    }
    // A clean Terminate returns the connection: the probe always reused it.
    assert_eq!(reused, FAULTS.len(), "clean sessions reuse their backend");

    let su = pg.superuser().await;
    let dirty: i64 = su
        .query_one(
            "SELECT (SELECT count(*) FROM todos WHERE title = 'dirty')
                  + (SELECT count(*) FROM copy_sink)",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        dirty, 0,
        "nothing of an abandoned transaction or COPY was committed"
    );
    assert_eq!(common::proxy::panics(), 0, "a task panicked");
}

#[tokio::test]
async fn a_query_whose_client_vanished_is_cancelled_upstream() {
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let key = TestKey::es256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let proxy = TestProxy::start(&jwks, ProxyOptions::new(pg.port())).await;
    let token = key.sign(&claims("leaver", &jwks.issuer(), AUDIENCE));

    let mut stream = proxy.raw().await;
    raw_login(&mut stream, &token).await;
    stream
        .write_all(&query("SELECT pg_sleep(60) AS abandoned"))
        .await
        .expect("send");
    let su = pg.superuser().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while abandoned_queries(&su).await == 0 {
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The client's socket closes without a Terminate, mid-query.
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(10);
    while abandoned_queries(&su).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned query still runs upstream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn abandoned_queries(su: &tokio_postgres::Client) -> i64 {
    su.query_one(
        "SELECT count(*) FROM pg_stat_activity
         WHERE state = 'active' AND query LIKE '%AS abandoned'",
        &[],
    )
    .await
    .expect("activity")
    .get(0)
}
