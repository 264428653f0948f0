//! 100,000 rows through the proxy from 20 concurrent sessions, each with a
//! token of its own: half by COPY into a plain staging table (COPY FROM
//! cannot target a table with RLS), half by multi-row INSERT into the RLS
//! table `todos`, whose owner defaults to and is checked against
//! `auth.user_id()`. Read back as superuser: every row exactly once, every
//! owner its writer's `sub`.

mod common;

use std::fmt::Write as _;

use futures_util::SinkExt;

use common::proxy::{AUDIENCE, ProxyOptions, TestProxy};
use common::{JwksServer, Postgres, TestKey, claims, describe};

const WRITERS: usize = 20;
/// Rows each writer sends by COPY, and as many again by INSERT.
const ROWS_PER_WAY: usize = 2_500;
/// Rows per COPY chunk and per INSERT statement.
const BATCH: usize = 250;

async fn write(client: tokio_postgres::Client, sub: String) -> Result<(), tokio_postgres::Error> {
    let sink = client
        .copy_in("COPY staging (writer, seq) FROM STDIN")
        .await?;
    futures_util::pin_mut!(sink);
    for start in (0..ROWS_PER_WAY).step_by(BATCH) {
        let mut chunk = String::new();
        for seq in start..start + BATCH {
            writeln!(chunk, "{sub}\t{seq}").expect("write to String");
        }
        sink.send(bytes::Bytes::from(chunk)).await?;
    }
    let copied = sink.finish().await?;
    assert_eq!(copied, ROWS_PER_WAY as u64, "{sub}: COPY count");

    for start in (0..ROWS_PER_WAY).step_by(BATCH) {
        let values: Vec<String> = (start..start + BATCH)
            .map(|seq| format!("('{sub}:{seq}')"))
            .collect();
        let sql = format!("INSERT INTO todos (title) VALUES {}", values.join(","));
        let n = client.execute(sql.as_str(), &[]).await?;
        assert_eq!(n, BATCH as u64, "{sub}: INSERT count");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_rows_arrive_once_each_owned_by_their_writer() {
    common::proxy::watch_panics();
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    pg.exec(
        "CREATE TABLE staging (writer text NOT NULL, seq int NOT NULL);
         GRANT INSERT ON staging TO authenticated;",
    )
    .await;
    let key = TestKey::es256("k1");
    let jwks = JwksServer::with_keys(&[&key]).await;
    let mut opts = ProxyOptions::new(pg.port());
    opts.max_per_role = WRITERS;
    let proxy = TestProxy::start(&jwks, opts).await;

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let sub = format!("writer-{w:02}");
        let token = key.sign(&claims(&sub, &jwks.issuer(), AUDIENCE));
        let config = proxy.config("authenticated", Some(&token));
        tasks.push(tokio::spawn(async move {
            let client = common::connect(&config).await?;
            write(client, sub).await
        }));
    }
    for (w, task) in tasks.into_iter().enumerate() {
        let result = task.await.expect("writer task");
        result.unwrap_or_else(|e| panic!("writer {w}: {}", describe(&e)));
    }

    let su = pg.superuser().await;
    let row = su
        .query_one(
            "SELECT
               (SELECT count(*) FROM staging),
               (SELECT count(*) FROM (SELECT DISTINCT writer, seq FROM staging) d),
               (SELECT count(*) FROM (SELECT writer FROM staging GROUP BY writer
                  HAVING count(*) = $1 AND min(seq) = 0 AND max(seq) = $1 - 1) w),
               (SELECT count(*) FROM todos WHERE title LIKE 'writer-%'),
               (SELECT count(DISTINCT title) FROM todos WHERE title LIKE 'writer-%'),
               (SELECT count(*) FROM todos WHERE title LIKE 'writer-%'
                  AND owner <> split_part(title, ':', 1)),
               (SELECT count(DISTINCT owner) FROM todos WHERE title LIKE 'writer-%')",
            &[&(ROWS_PER_WAY as i64)],
        )
        .await
        .expect("count");
    let got: Vec<i64> = (0..7).map(|i| row.get(i)).collect();
    let per_way = (WRITERS * ROWS_PER_WAY) as i64;
    assert_eq!(
        got,
        [
            per_way,
            per_way,
            WRITERS as i64,
            per_way,
            per_way,
            0,
            WRITERS as i64
        ],
        "staging rows, distinct, complete writers; todos rows, distinct, \
         foreign owners, owners"
    );
    assert_eq!(common::proxy::panics(), 0, "a task panicked");
}
