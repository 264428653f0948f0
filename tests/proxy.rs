//! End to end: real Postgres, real loopback JWKS issuer, the proxy in
//! process on port 0, tokio-postgres as the client.

mod common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use common::{Env, Options, TestKey, describe};

async fn one_row(client: &Client, sql: &str) -> tokio_postgres::Row {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
}

async fn owners(client: &Client) -> Vec<String> {
    let rows = client
        .query("SELECT DISTINCT owner FROM todos ORDER BY 1", &[])
        .await;
    rows.expect("select todos")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn each_user_sees_only_their_own_rows() {
    let env = Env::start().await;
    let alice = env.as_user(&env.es, "alice").await;
    let bob = env.as_user(&env.ed, "bob").await;

    assert_eq!(owners(&alice).await, vec!["alice"]);
    assert_eq!(owners(&bob).await, vec!["bob"]);
    let row = one_row(
        &alice,
        "SELECT auth.user_id(), current_user::text, session_user::text",
    )
    .await;
    let got: (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        got,
        (
            "alice".into(),
            "authenticated".into(),
            "authenticated".into()
        )
    );

    // Writes go through RLS too: bob cannot insert a row owned by alice.
    let err = bob
        .execute(
            "INSERT INTO todos (owner, title) VALUES ('alice', 'forged')",
            &[],
        )
        .await
        .expect_err("WITH CHECK refuses");
    assert!(
        describe(&err).contains("row-level security"),
        "{}",
        describe(&err)
    );
    bob.execute("INSERT INTO todos (title) VALUES ('mine')", &[])
        .await
        .expect("own insert");
    assert_eq!(owners(&bob).await, vec!["bob"]);

    let rsa_user = env.as_user(&env.rs, "alice").await;
    assert_eq!(owners(&rsa_user).await, vec!["alice"]);
}

#[tokio::test]
async fn anonymous_needs_no_password_and_sees_public_rows() {
    let env = Env::start().await;
    let anon = env
        .connect("anonymous", None)
        .await
        .expect("anonymous connects");
    assert_eq!(owners(&anon).await, vec!["public"]);
    let row = one_row(&anon, "SELECT current_user::text, auth.user_id()").await;
    assert_eq!(row.get::<_, String>(0), "anonymous");
    assert_eq!(row.get::<_, Option<String>>(1), None);
}

#[tokio::test]
async fn every_refusal_names_its_check_and_the_proxy_keeps_serving() {
    let env = Env::start().await;
    let iss = env.jwks.issuer();
    let now = common::now();
    let with = |patch: Value| {
        let mut c = env.claims("alice");
        for (k, v) in patch.as_object().expect("object") {
            c[k] = v.clone();
        }
        c
    };
    let tampered = {
        let t = env.token(&env.es, "alice");
        let (rest, sig) = t.rsplit_once('.').expect("three parts");
        let flipped = if sig.starts_with('A') { "B" } else { "A" };
        format!("{rest}.{flipped}{}", &sig[1..])
    };
    let forged_payload = {
        let t = env.token(&env.es, "alice");
        let parts: Vec<&str> = t.split('.').collect();
        let payload = common::b64(env.claims("bob").to_string().as_bytes());
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let stranger = TestKey::es256("k-stranger");
    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "expired",
            env.es.sign(&with(json!({"exp": now - 120}))),
            "28000",
            "token expired at",
        ),
        (
            "not yet valid",
            env.es.sign(&with(json!({"nbf": now + 600}))),
            "28000",
            "not valid before",
        ),
        (
            "wrong issuer",
            env.es.sign(&with(json!({"iss": "https://evil.example"}))),
            "28000",
            "issuer \"https://evil.example\" is not trusted",
        ),
        (
            "wrong audience",
            env.es.sign(&with(json!({"aud": "other"}))),
            "28000",
            "audience \"other\" is not accepted",
        ),
        (
            "tampered signature",
            tampered,
            "28000",
            "signature is invalid",
        ),
        (
            "forged payload",
            forged_payload,
            "28000",
            "signature is invalid",
        ),
        (
            "alg none",
            common::alg_none_token("k-es", &env.claims("alice")),
            "28000",
            "\"none\" is not accepted",
        ),
        (
            "hs256 with rsa public key",
            common::alg_confusion_token(&env.rs, &env.claims("alice")),
            "28000",
            "\"HS256\" is not accepted",
        ),
        (
            "unknown kid",
            stranger.sign(&env.claims("alice")),
            "28000",
            "unknown key id \"k-stranger\"",
        ),
        ("garbage", "hunter2".to_owned(), "28000", "not a JWT"),
        ("empty", String::new(), "28P01", "needs a JWT"),
        (
            "too large",
            "x".repeat(16 * 1024 + 1),
            "28000",
            "more than the 16384 allowed",
        ),
    ];
    for (name, token, code, message) in cases {
        let err = env.connect("authenticated", Some(&token)).await.err();
        let err = err.unwrap_or_else(|| panic!("{name}: accepted"));
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{name}: {err:?}"));
        assert_eq!(db.code().code(), code, "{name}: {}", db.message());
        assert!(
            db.message().contains(message),
            "{name}: {:?} lacks {message:?}",
            db.message()
        );
        assert_eq!(db.severity(), "FATAL", "{name}");
    }
    let err = env
        .connect("postgres", Some("x"))
        .await
        .expect_err("unknown role");
    let db = err.as_db_error().expect("server error");
    assert_eq!(
        (db.code().code(), db.message()),
        ("28000", "role \"postgres\" is not served by this proxy")
    );

    let alice = env.as_user(&env.es, "alice").await;
    assert_eq!(owners(&alice).await, vec!["alice"]);
    assert!(iss.starts_with("http://127.0.0.1"));
}

#[tokio::test]
async fn a_key_added_after_start_is_accepted_on_first_use() {
    let env = Env::start().await;
    let alice = env.as_user(&env.es, "alice").await;
    drop(alice);
    let fetches_before = env.jwks.fetch_count();

    let rotated = TestKey::ed25519("k-rotated");
    env.jwks.set_keys(&[&env.es, &env.rs, &env.ed, &rotated]);
    let client = env
        .connect("authenticated", Some(&env.token(&rotated, "carol")))
        .await
        .unwrap_or_else(|e| panic!("rotated key refused: {}", describe(&e)));
    let row = one_row(&client, "SELECT auth.user_id()").await;
    assert_eq!(row.get::<_, String>(0), "carol");
    assert_eq!(
        env.jwks.fetch_count(),
        fetches_before + 1,
        "exactly one refetch"
    );
}

#[tokio::test]
async fn a_pooled_backend_carries_nothing_to_the_next_user() {
    let env = Env::start_with(Options {
        max_per_role: 1,
        ..Default::default()
    })
    .await;
    let alice = env.as_user(&env.es, "alice").await;
    let alice_pid: i32 = one_row(&alice, "SELECT pg_backend_pid()").await.get(0);
    alice
        .batch_execute(
            "SET work_mem = '1234kB';
             SET application_name = 'alice-app';
             CREATE TEMP TABLE alice_tmp (x int);
             PREPARE alice_stmt AS SELECT 1;
             SELECT pg_advisory_lock(4242);
             LISTEN alice_channel;
             BEGIN;
             INSERT INTO todos (title) VALUES ('uncommitted');",
        )
        .await
        .expect("alice's session state");
    drop(alice);

    // The reset runs when alice leaves, not when the next client comes:
    // her advisory lock is gone with nobody checking the connection out.
    let su = env.pg.superuser().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let locks: i64 = su
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
                &[],
            )
            .await
            .expect("locks")
            .get(0);
        if locks == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice's advisory lock outlived her session"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let bob = env.as_user(&env.ed, "bob").await;
    let row = one_row(
        &bob,
        "SELECT pg_backend_pid(), auth.user_id(), current_setting('work_mem'),
                (SELECT count(*) FROM pg_prepared_statements WHERE name = 'alice_stmt'),
                (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'),
                (SELECT count(*) FROM pg_listening_channels()),
                to_regclass('pg_temp.alice_tmp') IS NULL,
                current_setting('application_name')",
    )
    .await;
    assert_eq!(
        row.get::<_, i32>(0),
        alice_pid,
        "bob must reuse alice's backend"
    );
    assert_eq!(row.get::<_, String>(1), "bob");
    assert_eq!(row.get::<_, String>(2), "4MB");
    assert_eq!(row.get::<_, i64>(3), 0, "prepared statements");
    assert_eq!(row.get::<_, i64>(4), 0, "advisory locks");
    assert_eq!(row.get::<_, i64>(5), 0, "LISTEN channels");
    assert!(row.get::<_, bool>(6), "temp table");
    assert_ne!(row.get::<_, String>(7), "alice-app");
    drop(bob);

    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM todos WHERE title = 'uncommitted'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 0, "alice's open transaction was rolled back");
}

#[tokio::test]
async fn cancel_request_stops_a_running_query() {
    let env = Env::start().await;
    let client = env.as_user(&env.es, "alice").await;
    let cancel = client.cancel_token();
    let started = Instant::now();
    let query =
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel_query(NoTls).await.expect("cancel sent");
    let err = query.await.expect("task").expect_err("query cancelled");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "{}",
        describe(&err)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn copy_both_ways_and_a_10_mb_result_pass_intact() {
    use futures_util::{SinkExt, TryStreamExt};

    let env = Env::start().await;
    // Postgres refuses COPY FROM into a table with RLS, so this one has none.
    env.pg
        .exec("CREATE TABLE copy_sink (id bigserial, title text); GRANT ALL ON copy_sink, copy_sink_id_seq TO authenticated;")
        .await;
    let alice = env.as_user(&env.es, "alice").await;

    let sink = alice
        .copy_in("COPY copy_sink (title) FROM STDIN")
        .await
        .expect("copy in");
    let mut sink = std::pin::pin!(sink);
    let mut data = String::new();
    for i in 0..20_000 {
        data.push_str(&format!("copied row {i}\n"));
    }
    sink.send(bytes::Bytes::from(data))
        .await
        .expect("send rows");
    let n = sink.finish().await.expect("finish copy");
    assert_eq!(n, 20_000);

    let out = alice
        .copy_out("COPY (SELECT title FROM copy_sink ORDER BY id) TO STDOUT")
        .await
        .expect("copy out");
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.expect("read copy");
    let text: Vec<u8> = chunks.concat();
    let lines: Vec<&str> = std::str::from_utf8(&text).expect("utf8").lines().collect();
    assert_eq!(lines.len(), 20_000);
    assert_eq!(lines[19_999], "copied row 19999");

    let rows = alice
        .simple_query(
            "SELECT repeat('x', 10 * 1024 * 1024) AS big, md5(repeat('x', 10 * 1024 * 1024))",
        )
        .await
        .expect("big row");
    let SimpleQueryMessage::Row(row) = &rows[1] else {
        panic!("expected a row")
    };
    let big = row.get(0).expect("value");
    assert_eq!(big.len(), 10 * 1024 * 1024);
    assert!(big.bytes().all(|b| b == b'x'));
}

#[tokio::test]
async fn notices_and_notifications_reach_the_client() {
    use futures_util::StreamExt;
    use tokio_postgres::AsyncMessage;

    let env = Env::start().await;
    let token = env.token(&env.es, "alice");
    let (client, mut connection) = env
        .config("authenticated", Some(&token))
        .connect(NoTls)
        .await
        .expect("connect");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            let _ = tx.send(m);
        }
    });
    client
        .batch_execute("LISTEN todo_events; DO $$ BEGIN RAISE NOTICE 'hello from plpgsql'; END $$;")
        .await
        .expect("listen + notice");
    let other = env.as_user(&env.ed, "bob").await;
    other
        .batch_execute("NOTIFY todo_events, 'row added'")
        .await
        .expect("notify");
    client.batch_execute("SELECT 1").await.expect("poke");

    let mut notice = None;
    let mut notification = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while (notice.is_none() || notification.is_none()) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(AsyncMessage::Notice(n))) => notice = Some(n.message().to_owned()),
            Ok(Some(AsyncMessage::Notification(n))) => notification = Some(n.payload().to_owned()),
            _ => {}
        }
    }
    assert_eq!(notice.as_deref(), Some("hello from plpgsql"));
    assert_eq!(notification.as_deref(), Some("row added"));
}

#[tokio::test]
async fn guc_mode_serves_policies_on_request_jwt_claims() {
    let env = Env::start_with(Options {
        mode: "guc",
        ..Default::default()
    })
    .await;
    let alice = env.as_user(&env.rs, "alice").await;
    let rows = alice
        .query("SELECT DISTINCT owner FROM guc_todos", &[])
        .await
        .expect("select");
    let owners: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(owners, vec!["alice"]);
    let sub: String = one_row(
        &alice,
        "SELECT current_setting('request.jwt.claims')::jsonb->>'sub'",
    )
    .await
    .get(0);
    assert_eq!(sub, "alice");
}

#[tokio::test]
async fn upstream_logins_with_md5_cleartext_and_trust() {
    let extra_roles = r#"
        [roles.md5_role]
        password = "md5-secret"
        [roles.plain_role]
        password = "plain-secret"
        [roles.trust_role]
        requires_token = false
    "#;
    let env = Env::start_with(Options {
        extra_roles,
        ..Default::default()
    })
    .await;
    for role in ["md5_role", "plain_role"] {
        let token = env.token(&env.es, "alice");
        let client = env
            .connect(role, Some(&token))
            .await
            .unwrap_or_else(|e| panic!("{role}: {}", describe(&e)));
        let row = one_row(&client, "SELECT current_user::text, auth.user_id()").await;
        assert_eq!(
            (row.get::<_, String>(0), row.get::<_, String>(1)),
            (role.to_owned(), "alice".to_owned())
        );
    }
    let client = env
        .connect("trust_role", None)
        .await
        .expect("trust_role connects");
    assert_eq!(
        one_row(&client, "SELECT current_user::text")
            .await
            .get::<_, String>(0),
        "trust_role"
    );
}

#[tokio::test]
async fn a_full_pool_makes_the_next_client_wait_then_refuses_clearly() {
    let env = Env::start_with(Options {
        max_per_role: 1,
        acquire_timeout: "500ms",
        ..Default::default()
    })
    .await;
    let alice = env.as_user(&env.es, "alice").await;
    let started = Instant::now();
    let err = env
        .connect("authenticated", Some(&env.token(&env.ed, "bob")))
        .await
        .expect_err("pool full");
    let db = err.as_db_error().expect("server error");
    assert_eq!(db.code().code(), "53300");
    assert!(
        db.message()
            .contains("no upstream connection became free within 500ms"),
        "{}",
        db.message()
    );
    assert!(started.elapsed() >= Duration::from_millis(450));
    drop(alice);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let bob = env.as_user(&env.ed, "bob").await;
    assert_eq!(owners(&bob).await, vec!["bob"]);
}

#[tokio::test]
async fn startup_settings_apply_per_session_and_identity_ones_are_refused() {
    let env = Env::start().await;
    let token = env.token(&env.es, "alice");
    let mut config = env.config("authenticated", Some(&token));
    config
        .application_name("my-app")
        .options("-c statement_timeout=1234");
    let client = common::connect(&config).await.expect("connect");
    let row = one_row(
        &client,
        "SELECT current_setting('application_name'), current_setting('statement_timeout')",
    )
    .await;
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        ("my-app".into(), "1234ms".into())
    );

    config.options("-c pg_session_jwt.jwk={}");
    let err = common::connect(&config).await.expect_err("refused");
    assert!(
        describe(&err).contains("may not be set through this proxy"),
        "{}",
        describe(&err)
    );

    let mut missing_db = env.config("authenticated", Some(&token));
    missing_db.dbname("no_such_db");
    let err = common::connect(&missing_db).await.expect_err("no database");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("3D000"),
        "{}",
        describe(&err)
    );
}

#[tokio::test]
async fn claims_refused_after_an_early_hand_over_end_the_session_with_the_reason() {
    let env = Env::start_with(Options {
        max_per_role: 1,
        ..Default::default()
    })
    .await;
    let su = env.pg.superuser().await;
    // A client whose settings all apply cleanly is handed over before the
    // set-up reply is in; a refusal then arrives on its first query.
    su.batch_execute(
        "ALTER FUNCTION auth.jwt_session_init(text) RENAME TO jwt_session_init_saved;
         CREATE FUNCTION auth.jwt_session_init(jwt text) RETURNS void LANGUAGE plpgsql
             AS $$ BEGIN RAISE EXCEPTION 'no claims today'; END $$;",
    )
    .await
    .expect("break the claims function");
    let mut config = env.config("authenticated", Some(&env.token(&env.es, "alice")));
    config.application_name("early");
    let client = common::connect(&config)
        .await
        .expect("handed over before the set-up reply");
    let err = client
        .query_one("SELECT auth.user_id()", &[])
        .await
        .expect_err("no query runs without claims");
    let db = err.as_db_error().expect("server error");
    assert_eq!(db.code().code(), "28000", "{}", describe(&err));
    assert!(
        db.message().contains("claims were refused upstream")
            && db.message().contains("no claims today"),
        "{}",
        db.message()
    );
    assert!(client.is_closed(), "the session ends with its set-up");

    // A setting Postgres may refuse is applied before the hand-over, so its
    // error arrives at connect time, as from Postgres itself.
    su.batch_execute(
        "DROP FUNCTION auth.jwt_session_init(text);
         ALTER FUNCTION auth.jwt_session_init_saved(text) RENAME TO jwt_session_init;",
    )
    .await
    .expect("restore the claims function");
    let mut bad_setting = env.config("authenticated", Some(&env.token(&env.es, "alice")));
    bad_setting.options("-c work_mem=lots");
    let err = common::connect(&bad_setting)
        .await
        .expect_err("refused at connect");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("22023"),
        "{}",
        describe(&err)
    );

    // Neither failed connection went back to the pool: the one slot serves.
    let bob = env.as_user(&env.ed, "bob").await;
    assert_eq!(
        one_row(&bob, "SELECT auth.user_id()")
            .await
            .get::<_, String>(0),
        "bob"
    );
}
