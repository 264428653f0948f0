//! The test harness on its own, no proxy: the throwaway cluster and its login
//! methods, pg_session_jwt (or its stand-in) with the RLS schema, the JWKS
//! server, and tokens from `TestKey` as a standard verifier sees them.

mod common;

use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tokio_postgres::Client;
use tokio_postgres::error::DbError;

use common::*;

const CHECK_VIOLATION: &str = "23514";
const INSUFFICIENT_PRIVILEGE: &str = "42501";

#[tokio::test]
async fn cluster_starts_and_answers_superuser() {
    let pg = Postgres::start().await;

    let client = pg.superuser().await;
    let row = client
        .query_one("select 1::int4, current_user::text", &[])
        .await
        .expect("select 1");

    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(row.get::<_, String>(1), SUPERUSER);
}

#[tokio::test]
async fn every_login_method_admits_its_role() {
    let pg = Postgres::start().await;
    pg.setup_schema().await;

    for role in [
        "authenticated",
        "anonymous",
        "md5_role",
        "plain_role",
        "trust_role",
    ] {
        let client = pg.connect(role, password_of(role)).await;
        let client = client.unwrap_or_else(|e| panic!("{role}: {}", describe(&e)));
        let row = client
            .query_one("select current_user::text", &[])
            .await
            .expect("query");
        assert_eq!(row.get::<_, String>(0), role);
    }

    // The methods really differ: wrong passwords fail except under trust.
    for role in ["authenticated", "md5_role", "plain_role"] {
        let refused = pg
            .connect(role, "wrong")
            .await
            .expect_err("wrong password refused");
        let db = refused.as_db_error().expect("server error");
        assert_eq!(db.code().code(), "28P01", "{role}: {}", describe(&refused));
    }
    pg.connect("trust_role", "wrong")
        .await
        .expect("trust ignores the password");

    let client = pg.superuser().await;
    let stored = client
        .query_one(
            "select left(rolpassword, 3), left((select rolpassword from pg_authid
                 where rolname = 'authenticated'), 13)
             from pg_authid where rolname = 'md5_role'",
            &[],
        )
        .await
        .expect("read pg_authid");
    assert_eq!(stored.get::<_, String>(0), "md5");
    assert_eq!(stored.get::<_, String>(1), "SCRAM-SHA-256");
}

#[tokio::test]
async fn restart_keeps_port_and_data() {
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let port = pg.port();

    pg.restart();
    let client = pg.superuser().await;
    let row = client
        .query_one("select count(*) from todos", &[])
        .await
        .expect("count");

    assert_eq!(pg.port(), port);
    assert_eq!(row.get::<_, i64>(0), 4);
}

#[tokio::test]
async fn session_claims_drive_rls() {
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let key = TestKey::ed25519("upstream");
    let client = session_client(&pg, Some(&key)).await;

    client
        .execute("select auth.init()", &[])
        .await
        .expect("auth.init");
    init_session(&client, &key.sign(&session_claims("alice", 1)))
        .await
        .expect("alice");

    let row = client
        .query_one(
            "select auth.user_id(), auth.session()->>'sub', auth.uid()::text",
            &[],
        )
        .await
        .expect("read claims");
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("alice"));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("alice"));
    assert_eq!(row.get::<_, Option<String>>(2), None, "sub is not a uuid");
    assert_eq!(owners(&client, "todos").await, ["alice", "alice"]);

    // The column default and WITH CHECK both follow the claims.
    client
        .execute("insert into todos (title) values ('new')", &[])
        .await
        .expect("insert own");
    let err = db_error(
        &client,
        "insert into todos (owner, title) values ('bob', 'x')",
    )
    .await;
    assert_eq!(err.code().code(), INSUFFICIENT_PRIVILEGE);

    init_session(&client, &key.sign(&session_claims("bob", 2)))
        .await
        .expect("bob");
    assert_eq!(owners(&client, "todos").await, ["bob"]);
}

#[tokio::test]
async fn jti_must_increase_per_backend() {
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let key = TestKey::ed25519("upstream");
    let client = session_client(&pg, Some(&key)).await;
    let first = key.sign(&session_claims("alice", 5));

    init_session(&client, &first).await.expect("jti 5");
    init_session(&client, &first)
        .await
        .expect("the very same token again");

    let same_jti = key.sign(&session_claims("bob", 5));
    let lower_jti = key.sign(&session_claims("bob", 4));
    for token in [same_jti, lower_jti] {
        let err = init_session(&client, &token)
            .await
            .expect_err("jti not above 5");
        assert_eq!(
            err.message(),
            "Token ID must be strictly monotonically increasing."
        );
        assert_eq!(err.code().code(), CHECK_VIOLATION);
    }

    // The counter belongs to the backend, not to the settings a reset clears.
    client
        .batch_execute("DISCARD ALL")
        .await
        .expect("discard all");
    let err = init_session(&client, &key.sign(&session_claims("bob", 5))).await;
    assert_eq!(
        err.expect_err("jti 5 after DISCARD ALL").message(),
        "Token ID must be strictly monotonically increasing."
    );
    init_session(&client, &key.sign(&session_claims("bob", 6)))
        .await
        .expect("jti 6");

    // A fresh backend starts again from zero.
    let other = session_client(&pg, Some(&key)).await;
    init_session(&other, &key.sign(&session_claims("carol", 1)))
        .await
        .expect("new backend");
}

#[tokio::test]
async fn bad_tokens_are_refused() {
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let key = TestKey::ed25519("upstream");
    let client = session_client(&pg, Some(&key)).await;
    let now = now();

    let mut expired = session_claims("alice", 1);
    expired["exp"] = json!(now - 120);
    let err = init_session(&client, &key.sign(&expired))
        .await
        .expect_err("expired");
    assert_eq!(err.message(), "Token used after it has expired");
    assert_eq!(err.detail(), Some(format!("exp={}", now - 120).as_str()));

    let mut early = session_claims("alice", 2);
    early["nbf"] = json!(now + 300);
    let err = init_session(&client, &key.sign(&early))
        .await
        .expect_err("not yet valid");
    assert_eq!(err.message(), "Token used before it is ready");

    let no_jti = json!({ "sub": "alice", "exp": now + 600 });
    let err = init_session(&client, &key.sign(&no_jti))
        .await
        .expect_err("no jti");
    assert_eq!(
        err.message(),
        "JWT payload must contain a valid 'jti' (JWT ID)"
    );

    let err = init_session(&client, "not-a-jwt")
        .await
        .expect_err("not a JWT");
    assert_eq!(err.message(), "invalid JWT encoding");

    let mut numeric_sub = session_claims("alice", 3);
    numeric_sub["sub"] = json!(42);
    init_session(&client, &key.sign(&numeric_sub))
        .await
        .expect_err("sub must be a string");

    // Within the 60 s leeway, and the failures above used up no jti.
    let mut just_expired = session_claims("alice", 1);
    just_expired["exp"] = json!(now - 30);
    init_session(&client, &key.sign(&just_expired))
        .await
        .expect("inside the leeway");
}

#[tokio::test]
async fn without_jwk_init_fails_and_guc_claims_apply() {
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let client = session_client(&pg, None).await;

    let err = db_error(&client, "select auth.init()").await;
    assert_eq!(
        err.message(),
        "Missing runtime parameter: pg_session_jwt.jwk"
    );
    let token = TestKey::ed25519("k").sign(&session_claims("alice", 1));
    let err = init_session(&client, &token).await.expect_err("no jwk");
    assert_eq!(
        err.message(),
        "Missing runtime parameter: pg_session_jwt.jwk"
    );

    // The PostgREST fallback: any client can set this, hence spoofable.
    client
        .batch_execute(r#"SET request.jwt.claims = '{"sub":"bob"}'"#)
        .await
        .expect("set claims");
    let row = client
        .query_one("select auth.user_id()", &[])
        .await
        .expect("user_id");
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("bob"));
    assert_eq!(owners(&client, "guc_todos").await, ["bob"]);
}

#[tokio::test]
async fn with_jwk_guc_claims_are_ignored() {
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let key = TestKey::ed25519("upstream");
    let client = session_client(&pg, Some(&key)).await;

    client
        .batch_execute(r#"SET request.jwt.claims = '{"sub":"bob"}'"#)
        .await
        .expect("set claims");
    let row = client
        .query_one("select auth.user_id()", &[])
        .await
        .expect("user_id");

    assert_eq!(row.get::<_, Option<String>>(0), None);
    assert!(owners(&client, "todos").await.is_empty());
}

#[tokio::test]
async fn anonymous_sees_public_rows_only() {
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let client = pg
        .connect("anonymous", ANONYMOUS_PASSWORD)
        .await
        .expect("connect");

    assert_eq!(owners(&client, "todos").await, ["public"]);
    assert_eq!(owners(&client, "guc_todos").await, ["public"]);
    let err = db_error(
        &client,
        "insert into todos (owner, title) values ('public', 'x')",
    )
    .await;
    assert_eq!(err.code().code(), INSUFFICIENT_PRIVILEGE);
}

#[tokio::test]
async fn ec_jwk_is_rejected() {
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let key = TestKey::es256("upstream");
    let client = session_client(&pg, Some(&key)).await;

    db_error(&client, "select auth.init()").await;
}

/// Documents the stand-in's limit: it does not check signatures, so tests
/// about forged claims must not rely on it.
#[tokio::test]
async fn stand_in_skips_signature_but_not_alg() {
    let pg = Postgres::start().await;
    if pg.setup_schema().await != SessionJwt::StandIn {
        return;
    }
    let key = TestKey::ed25519("upstream");
    let client = session_client(&pg, Some(&key)).await;

    let token = key.sign(&session_claims("alice", 1));
    let (body, _signature) = token.rsplit_once('.').expect("three parts");
    init_session(&client, &format!("{body}.AAAA"))
        .await
        .expect("garbage signature");

    let header = json!({ "alg": "ES256", "typ": "JWT" });
    let wrong_alg = key.sign_with_header(&header, &session_claims("alice", 2));
    init_session(&client, &wrong_alg)
        .await
        .expect_err("alg must be EdDSA");
}

#[tokio::test]
async fn jwks_server_serves_keys_and_counts_fetches() {
    let (es, rs) = (TestKey::es256("es"), TestKey::rs256("rs"));
    let server = JwksServer::with_keys(&[&es, &rs]).await;
    let http = reqwest::Client::new();

    let response = http.get(server.url()).send().await.expect("GET jwks");
    assert_eq!(response.status(), 200);
    let body = json_body(response).await;
    assert_eq!(body["keys"][0]["kid"], "es");
    assert_eq!(body["keys"][1]["kid"], "rs");
    assert_eq!(server.fetch_count(), 1);

    server.set_keys(&[&rs]);
    server.set_cache_control(Some("max-age=60"));
    let response = http.get(server.url()).send().await.expect("GET jwks");
    assert_eq!(response.headers()["cache-control"], "max-age=60");
    let body = json_body(response).await;
    assert_eq!(body["keys"].as_array().map(Vec::len), Some(1));

    server.set_behaviour(Behaviour::Status(500));
    let response = http.get(server.url()).send().await.expect("GET jwks");
    assert_eq!(response.status(), 500);

    server.set_behaviour(Behaviour::Body("not json".into()));
    let response = http.get(server.url()).send().await.expect("GET jwks");
    assert_eq!(response.text().await.expect("body"), "not json");

    server.set_behaviour(Behaviour::Delay(Duration::from_millis(200)));
    let started = Instant::now();
    http.get(server.url()).send().await.expect("GET jwks");
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(server.fetch_count(), 5);

    let discovery_url = format!("{}/.well-known/openid-configuration", server.issuer());
    let discovery = json_body(http.get(discovery_url).send().await.expect("GET")).await;
    assert_eq!(discovery["jwks_uri"], server.url());
    assert_eq!(discovery["issuer"], server.issuer());
    assert_eq!(server.discovery_count(), 1);
}

#[test]
fn test_keys_verify_with_jsonwebtoken() {
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    let keys = [
        (TestKey::es256("es256"), Algorithm::ES256),
        (TestKey::es384("es384"), Algorithm::ES384),
        (TestKey::rs256("rs256"), Algorithm::RS256),
        (TestKey::ps256("ps256"), Algorithm::PS256),
        (TestKey::ed25519("eddsa"), Algorithm::EdDSA),
    ];

    for (key, alg) in &keys {
        let token = key.sign(&claims("alice", "https://issuer.test", "app"));
        let verified = verify(&token, key, *alg).unwrap_or_else(|e| panic!("{}: {e}", key.alg()));
        assert_eq!(verified["sub"], "alice", "{}", key.alg());
        assert_eq!(verified["aud"], "app");
    }
}

#[test]
fn forged_tokens_have_the_attack_shape() {
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    let rsa = TestKey::rs256("rs");
    let claims = claims("alice", "https://issuer.test", "app");

    // HMAC-valid with the public PEM as secret, but no RS256 signature.
    let confused = alg_confusion_token(&rsa, &claims);
    let pem = rsa.public_key_pem();
    let hmac_key = DecodingKey::from_secret(pem.as_bytes()).expect("HMAC key");
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_audience(&["app"]);
    jsonwebtoken::decode::<Value>(&confused, &hmac_key, &validation).expect("valid HS256");
    verify(&confused, &rsa, Algorithm::RS256).expect_err("not an RS256 token");

    let unsigned = alg_none_token(rsa.kid(), &claims);
    assert!(unsigned.ends_with('.'));
    verify(&unsigned, &rsa, Algorithm::RS256).expect_err("alg none");

    // A header that lies about alg still carries this key's signature.
    let lying = rsa.sign_with_header(&json!({ "alg": "ES256", "kid": "rs" }), &claims);
    verify(&lying, &rsa, Algorithm::RS256).expect_err("header says ES256");
}

/// Claims as the proxy re-signs them for pg_session_jwt.
fn session_claims(sub: &str, jti: i64) -> Value {
    json!({ "sub": sub, "jti": jti, "iat": now(), "exp": now() + 600 })
}

/// Logs in as `authenticated`, with `key` as pg_session_jwt.jwk if given.
async fn session_client(pg: &Postgres, key: Option<&TestKey>) -> Client {
    let mut config = pg.config("authenticated", AUTHENTICATED_PASSWORD);
    if let Some(key) = key {
        config.options(jwk_options(&key.jwk()));
    }
    let client = connect(&config).await;
    client.unwrap_or_else(|e| panic!("connect: {}", describe(&e)))
}

async fn init_session(client: &Client, token: &str) -> Result<(), DbError> {
    let result = client
        .execute("select auth.jwt_session_init($1)", &[&token])
        .await;
    result
        .map(drop)
        .map_err(|e| e.as_db_error().cloned().expect("server error"))
}

async fn db_error(client: &Client, sql: &str) -> DbError {
    let err = client.batch_execute(sql).await.expect_err(sql);
    err.as_db_error()
        .cloned()
        .unwrap_or_else(|| panic!("{sql}: {err}"))
}

/// The `owner` of every visible row of `table`, in id order.
async fn owners(client: &Client, table: &str) -> Vec<String> {
    let sql = format!("select owner from {table} order by id");
    let rows = client.query(&sql, &[]).await.expect("select owners");
    rows.iter().map(|r| r.get(0)).collect()
}

/// reqwest is built without its `json` feature.
async fn json_body(response: reqwest::Response) -> Value {
    let text = response.text().await.expect("response body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn verify(token: &str, key: &TestKey, alg: Algorithm) -> jsonwebtoken::errors::Result<Value> {
    let jwk: Jwk = serde_json::from_value(key.jwk()).expect("parse JWK");
    let decoding_key = DecodingKey::from_jwk(&jwk)?;
    let mut validation = Validation::new(alg);
    validation.set_audience(&["app"]);
    validation.set_issuer(&["https://issuer.test"]);
    jsonwebtoken::decode::<Value>(token, &decoding_key, &validation).map(|data| data.claims)
}
