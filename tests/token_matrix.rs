//! Every kind of bad token, through the real proxy to a real client: each
//! is refused with its SQLSTATE and a message naming the failed check, and
//! a valid token (including one of exactly the size limit) still works.

mod common;

use serde_json::{Value, json};

use common::proxy::{AUDIENCE, ProxyOptions, TestProxy};
use common::{JwksServer, Postgres, TestKey, b64, claims, describe};

/// The proxy's default `auth.max_token_bytes`.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A token signed by `key` whose compact form is exactly `len` bytes, made
/// by growing a padding claim (base64 skips some lengths, so a second claim
/// shifts the remainder).
fn token_of_len(key: &TestKey, base: &Value, len: usize) -> String {
    for shift in 0..4 {
        for pad in (len * 3 / 4).saturating_sub(600)..len {
            let mut c = base.clone();
            c["pad"] = json!("a".repeat(pad));
            c["shift"] = json!("b".repeat(shift));
            let t = key.sign(&c);
            if t.len() == len {
                return t;
            }
            if t.len() > len {
                break;
            }
        }
    }
    panic!("no token of exactly {len} bytes")
}

#[tokio::test]
async fn every_bad_token_is_refused_with_its_reason() {
    common::proxy::watch_panics();
    let pg = Postgres::start().await;
    pg.setup_schema().await;
    let es = TestKey::es256("k-es");
    let rs = TestKey::rs256("k-rs");
    let ed = TestKey::ed25519("k-ed");
    let jwks = JwksServer::with_keys(&[&es, &rs, &ed]).await;
    let proxy = TestProxy::start(&jwks, ProxyOptions::new(pg.port())).await;

    let iss = jwks.issuer();
    let now = common::now();
    let good = claims("alice", &iss, AUDIENCE);
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            c[k] = v.clone();
        }
        c
    };
    let without = |claim: &str| {
        let mut c = good.clone();
        c.as_object_mut().expect("object").remove(claim);
        c
    };
    let valid = es.sign(&good);
    let parts: Vec<&str> = valid.split('.').collect();
    let es384_same_kid = TestKey::es384("k-es");
    let es256_impostor = TestKey::es256("k-es");
    let stranger = TestKey::ed25519("k-stranger");

    let cases: Vec<(&str, String, &str, &str)> = vec![
        (
            "expired",
            es.sign(&with(json!({"exp": now - 120}))),
            "28000",
            "token expired at",
        ),
        (
            "nbf in the future",
            es.sign(&with(json!({"nbf": now + 600}))),
            "28000",
            "not valid before",
        ),
        (
            "iat in the future",
            es.sign(&with(json!({"iat": now + 600}))),
            "28000",
            "issued in the future",
        ),
        (
            "wrong iss",
            es.sign(&with(json!({"iss": "https://evil.example"}))),
            "28000",
            "issuer \"https://evil.example\" is not trusted",
        ),
        (
            "iss missing",
            es.sign(&without("iss")),
            "28000",
            "token has no \"iss\" claim",
        ),
        (
            "iss a number",
            es.sign(&with(json!({"iss": 7}))),
            "28000",
            "\"iss\" must be a string",
        ),
        (
            "wrong aud",
            es.sign(&with(json!({"aud": "other"}))),
            "28000",
            "audience \"other\" is not accepted",
        ),
        (
            "wrong aud array",
            es.sign(&with(json!({"aud": ["x", "y"]}))),
            "28000",
            "is not accepted",
        ),
        (
            "missing aud when required",
            es.sign(&without("aud")),
            "28000",
            "no \"aud\" claim",
        ),
        (
            "alg none",
            common::alg_none_token("k-es", &good),
            "28000",
            "\"none\" is not accepted",
        ),
        (
            "alg mismatching the key",
            es.sign_with_header(&json!({"alg": "RS256", "kid": "k-es"}), &good),
            "28000",
            "fits algorithm RS256",
        ),
        (
            "EdDSA header on an RSA key",
            rs.sign_with_header(&json!({"alg": "EdDSA", "kid": "k-rs"}), &good),
            "28000",
            "fits algorithm EdDSA",
        ),
        (
            "HS256 signed with the RSA public key",
            common::alg_confusion_token(&rs, &good),
            "28000",
            "\"HS256\" is not accepted",
        ),
        (
            "ES384 token against a P-256 key",
            es384_same_kid.sign(&good),
            "28000",
            "fits algorithm ES384",
        ),
        (
            "another key with the same kid",
            es256_impostor.sign(&good),
            "28000",
            "signature is invalid",
        ),
        (
            "no kid, signed by no published key",
            es256_impostor.sign_with_header(&json!({"alg": "ES256"}), &good),
            "28000",
            "signature is invalid",
        ),
        (
            "kid not in the JWKS",
            stranger.sign(&good),
            "28000",
            "unknown key id \"k-stranger\"",
        ),
        (
            "16 KiB + 1",
            token_of_len(&es, &good, MAX_TOKEN_BYTES + 1),
            "28000",
            "is 16385 bytes, more than the 16384 allowed",
        ),
        (
            "three dots",
            format!("{valid}."),
            "28000",
            "three dot-separated parts",
        ),
        (
            "two parts",
            format!("{}.{}", parts[0], parts[1]),
            "28000",
            "three dot-separated parts",
        ),
        (
            "base64 with padding",
            format!("{}.{}==.{}", parts[0], parts[1], parts[2]),
            "28000",
            "payload is not base64url",
        ),
        (
            "standard base64 alphabet",
            format!("{}.{}.+/{}", parts[0], parts[1], parts[2]),
            "28000",
            "signature is not base64url",
        ),
        (
            "non-JSON payload",
            format!("{}.{}.{}", parts[0], b64(b"not json"), parts[2]),
            "28000",
            "payload is not a JSON object",
        ),
        (
            "payload a JSON array",
            format!("{}.{}.{}", parts[0], b64(b"[1,2]"), parts[2]),
            "28000",
            "payload is not a JSON object",
        ),
        (
            "exp as a string",
            es.sign(&with(json!({"exp": (now + 600).to_string()}))),
            "28000",
            "\"exp\" must be a number",
        ),
        (
            "exp missing",
            es.sign(&without("exp")),
            "28000",
            "no \"exp\" claim",
        ),
        (
            "sub missing",
            es.sign(&without("sub")),
            "28000",
            "no \"sub\" claim",
        ),
        (
            "sub a number",
            es.sign(&with(json!({"sub": 42}))),
            "28000",
            "\"sub\" must be a string",
        ),
        ("empty password", String::new(), "28P01", "needs a JWT"),
        ("not a JWT", "hunter2".to_owned(), "28000", "not a JWT"),
    ];

    for (name, token, code, fragment) in &cases {
        let err = proxy.connect("authenticated", Some(token)).await.err();
        let err = err.unwrap_or_else(|| panic!("{name}: accepted"));
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{name}: {}", describe(&err)));
        assert_eq!(
            (db.severity(), db.code().code()),
            ("FATAL", *code),
            "{name}: {}",
            db.message()
        );
        assert!(
            db.message().contains(fragment),
            "{name}: {:?} lacks {fragment:?}",
            db.message()
        );
        assert!(
            !db.message().contains(token.as_str()) || token.len() < 8,
            "{name}: token echoed"
        );
    }

    // The same valid token, and one of exactly the limit, still log in.
    for (name, token) in [
        ("valid", valid),
        ("16 KiB", token_of_len(&ed, &good, MAX_TOKEN_BYTES)),
    ] {
        let client = proxy.connect("authenticated", Some(&token)).await;
        let client = client.unwrap_or_else(|e| panic!("{name}: {}", describe(&e)));
        let row = client
            .query_one("SELECT auth.user_id()", &[])
            .await
            .expect("query");
        assert_eq!(row.get::<_, String>(0), "alice", "{name}");
    }
    assert_eq!(common::proxy::panics(), 0, "a task panicked");
}
