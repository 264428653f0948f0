//! Key quirks of real-world JWKS documents, one regression test each, named
//! after what broke. Provider-shaped documents live in
//! `tests/fixtures/jwks/` as templates whose `${LABEL.field}` placeholders
//! are filled with keys generated at run time.

mod common;

use std::path::Path;

use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

use common::{TestKey, b64, claims};
use rlsproxy::auth::jwks::JwksError;
use rlsproxy::auth::keys::{KeySet, KeyType};
use rlsproxy::auth::verify::{self, TokenError};

const ISS: &str = "https://issuer.test";

/// A fixture with each `${LABEL.field}` replaced by that key's JWK field.
fn fixture(name: &str, keys: &[(&str, &TestKey)]) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwks")
        .join(name);
    let mut text = std::fs::read_to_string(&path).expect("read fixture");
    for (label, key) in keys {
        let jwk = key.jwk();
        for field in ["kid", "n", "e", "x", "y"] {
            if let Some(value) = jwk[field].as_str() {
                text = text.replace(&format!("${{{label}.{field}}}"), value);
            }
        }
    }
    assert!(!text.contains("${"), "{name}: unfilled placeholder");
    text.into_bytes()
}

fn parse_set(body: &[u8]) -> (KeySet, Vec<String>) {
    KeySet::parse(body).expect("a key set")
}

fn set_of(jwks: Vec<Value>) -> KeySet {
    parse_set(json!({ "keys": jwks }).to_string().as_bytes()).0
}

/// The `kid` of the key that verified `token`, or why none did.
fn verify(set: &KeySet, token: &str) -> Result<Option<String>, TokenError> {
    let unverified = verify::parse(token)?;
    set.verify(&unverified, ISS).map(|k| k.kid.clone())
}

fn token(key: &TestKey) -> String {
    key.sign(&claims("alice", ISS, "app"))
}

#[test]
fn azure_key_without_alg() {
    let (a, b) = (TestKey::rs256("azure-a"), TestKey::rs256("azure-b"));
    let (set, skipped) = parse_set(&fixture("azure-style.json", &[("A", &a), ("B", &b)]));
    assert!(skipped.is_empty(), "{skipped:?}");
    assert!(set.keys.iter().all(|k| k.alg.is_none()));

    // With no `alg`, the RSA key serves every RSA algorithm its type allows.
    assert_eq!(verify(&set, &token(&b)), Ok(Some("azure-b".into())));
    let ps = TestKey::ps256("azure-ps");
    let ps_set = set_of(vec![without(ps.jwk(), "alg")]);
    assert_eq!(verify(&ps_set, &token(&ps)), Ok(Some("azure-ps".into())));
}

#[test]
fn ec_keys_without_alg_get_es256_or_es384_from_their_curve() {
    for (key, kind, alg) in [
        (TestKey::es256("p256"), KeyType::P256, Algorithm::ES256),
        (TestKey::es384("p384"), KeyType::P384, Algorithm::ES384),
    ] {
        assert_alg_comes_from_the_key_type(&key, kind, alg);
    }
}

#[test]
fn okp_key_without_alg_gets_eddsa_from_its_curve() {
    let key = TestKey::ed25519("ed");
    assert_alg_comes_from_the_key_type(&key, KeyType::Ed25519, Algorithm::EdDSA);
}

/// `key`'s JWK without `alg` is a `kind` key that serves `alg` alone, and
/// verifies `key`'s tokens with a `kid` and without one.
fn assert_alg_comes_from_the_key_type(key: &TestKey, kind: KeyType, alg: Algorithm) {
    let set = set_of(vec![without(key.jwk(), "alg")]);
    let parsed = &set.keys[0];
    assert_eq!((parsed.alg, parsed.kind), (None, kind));
    for other in [
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
        Algorithm::RS256,
    ] {
        assert_eq!(
            parsed.fits(other),
            other == alg,
            "{kind:?} key and {other:?}"
        );
    }

    let kid = Some(key.kid().to_owned());
    assert_eq!(verify(&set, &token(key)), Ok(kid.clone()));
    let header = json!({ "alg": key.alg() });
    let no_kid = key.sign_with_header(&header, &claims("alice", ISS, "app"));
    assert_eq!(verify(&set, &no_kid), Ok(kid));
}

#[test]
fn keycloak_jwks_with_encryption_key() {
    let (enc, sig) = (TestKey::rs256("kc-enc"), TestKey::rs256("kc-sig"));
    let (set, skipped) = parse_set(&fixture(
        "keycloak-style.json",
        &[("ENC", &enc), ("SIG", &sig)],
    ));
    assert_eq!(set.keys.len(), 1);
    assert!(skipped[0].contains("use \"enc\""), "{skipped:?}");
    assert_eq!(verify(&set, &token(&sig)), Ok(Some("kc-sig".into())));

    // A token that names the encryption key finds no key by that id.
    let forged = enc.sign(&claims("alice", ISS, "app"));
    assert!(matches!(
        verify(&set, &forged),
        Err(TokenError::UnknownKid { .. })
    ));
}

#[test]
fn stack_auth_es256_and_better_auth_ed25519_documents_verify() {
    let es = TestKey::es256("stack-1");
    let (set, _) = parse_set(&fixture("stack-auth-style.json", &[("SIG", &es)]));
    assert_eq!(verify(&set, &token(&es)), Ok(Some("stack-1".into())));

    let ed = TestKey::ed25519("neon-auth-1");
    let (set, _) = parse_set(&fixture("better-auth-style.json", &[("SIG", &ed)]));
    assert_eq!(set.keys[0].kind, KeyType::Ed25519);
    assert_eq!(verify(&set, &token(&ed)), Ok(Some("neon-auth-1".into())));
}

#[test]
fn unsupported_keys_are_skipped_one_by_one() {
    let (es, rs) = (TestKey::es256("good"), TestKey::rs256("rsa"));
    let body = fixture("unsupported-mixed.json", &[("SIG", &es), ("SIG_RSA", &rs)]);
    let (set, skipped) = parse_set(&body);
    assert_eq!(set.keys.len(), 1, "{skipped:?}");
    assert_eq!(skipped.len(), 10, "{skipped:?}");
    for reason in [
        "key type \"oct\"",
        "\"HS256\" is not supported",
        "curve \"P-521\"",
        "curve \"X25519\"",
        "curve \"Ed448\"",
        "\"RSA1_5\" is not supported",
        "key_ops",
        "RS256 does not fit",
        "EC coordinates",
        "not a JSON object",
    ] {
        assert!(
            skipped.iter().any(|s| s.contains(reason)),
            "no skip for {reason}: {skipped:?}"
        );
    }
    assert_eq!(verify(&set, &token(&es)), Ok(Some("good".into())));
}

#[test]
fn es384_token_never_verifies_with_p256_key() {
    let p256 = TestKey::es256("shared");
    let p384 = TestKey::es384("shared");
    let forged = p384.sign(&claims("alice", ISS, "app"));

    // Declared alg and derived alg both refuse the mismatch before any math.
    for jwk in [p256.jwk(), without(p256.jwk(), "alg")] {
        let set = set_of(vec![jwk]);
        assert!(matches!(
            verify(&set, &forged),
            Err(TokenError::NoFittingKey { .. })
        ));
    }
    // And an ES256 header on a P-384 signature is a bad signature, not a pass.
    let header = json!({ "alg": "ES256", "kid": "shared" });
    let lying = p384.sign_with_header(&header, &claims("alice", ISS, "app"));
    let set = set_of(vec![p256.jwk()]);
    assert_eq!(verify(&set, &lying), Err(TokenError::BadSignature));
}

#[test]
fn duplicate_kid_keys_are_all_tried() {
    // During a rotation some issuers publish old and new key under one kid.
    let (old, new, rsa) = (
        TestKey::es256("dup"),
        TestKey::es256("dup"),
        TestKey::rs256("dup"),
    );
    let set = set_of(vec![rsa.jwk(), old.jwk(), new.jwk()]);
    assert_eq!(verify(&set, &token(&new)), Ok(Some("dup".into())));
    assert_eq!(verify(&set, &token(&old)), Ok(Some("dup".into())));
    assert_eq!(verify(&set, &token(&rsa)), Ok(Some("dup".into())));
}

#[test]
fn token_without_kid_tries_every_compatible_key() {
    let (rs, es1, es2) = (
        TestKey::rs256("r"),
        TestKey::es256("e1"),
        TestKey::es256("e2"),
    );
    let set = set_of(vec![rs.jwk(), es1.jwk(), es2.jwk()]);
    let header = json!({ "alg": "ES256", "typ": "JWT" });
    let no_kid = es2.sign_with_header(&header, &claims("alice", ISS, "app"));
    assert_eq!(verify(&set, &no_kid), Ok(Some("e2".into())));

    let stranger = TestKey::es256("x").sign_with_header(&header, &claims("alice", ISS, "app"));
    assert_eq!(verify(&set, &stranger), Err(TokenError::BadSignature));
}

#[test]
fn jwks_body_that_is_not_a_key_set_is_a_fetch_error() {
    for body in [
        "<html><body>Sign in</body></html>",
        "[]",
        "{}",
        r#"{"keys": {}}"#,
        r#"{"keys": null}"#,
        "",
    ] {
        assert!(
            matches!(KeySet::parse(body.as_bytes()), Err(JwksError::NotAKeySet)),
            "{body:?} must be an error"
        );
    }
    let (empty, _) = parse_set(br#"{"keys": []}"#);
    assert!(empty.keys.is_empty());
}

#[test]
fn rsa_modulus_under_2048_bits_refused() {
    let rs = TestKey::rs256("weak");
    let mut n = modulus(&rs);
    // 1024 bits, and 2047 bits (top bit of a 256-byte modulus clear).
    let short = n[..128].to_vec();
    n[0] = 0x40 | (n[0] & 0x3f);
    for (bytes, bits) in [(short, "1024"), (n, "2047")] {
        let mut jwk = rs.jwk();
        jwk["n"] = json!(b64(&bytes));
        let (set, skipped) = parse_set(json!({ "keys": [jwk] }).to_string().as_bytes());
        assert!(set.keys.is_empty());
        assert!(skipped[0].contains(&format!("{bits} bits")), "{skipped:?}");
    }
}

#[test]
fn leading_zero_byte_in_modulus_tolerated() {
    let rs = TestKey::rs256("padded");
    let mut padded = vec![0u8];
    padded.extend(modulus(&rs));
    let mut jwk = rs.jwk();
    jwk["n"] = json!(b64(&padded));
    let set = set_of(vec![jwk]);
    assert_eq!(verify(&set, &token(&rs)), Ok(Some("padded".into())));
    // The same key with and without the zero byte is the same key.
    assert_eq!(set.keys[0].id, set_of(vec![rs.jwk()]).keys[0].id);
}

#[test]
fn x5c_is_optional() {
    let rs = TestKey::rs256("no-chain");
    let plain = set_of(vec![rs.jwk()]);
    assert_eq!(verify(&plain, &token(&rs)), Ok(Some("no-chain".into())));

    // A chain that is present is not parsed or trusted: the JWK fields rule.
    let mut jwk = rs.jwk();
    jwk["x5c"] = json!(["bm90IGEgY2VydGlmaWNhdGU"]);
    let chained = set_of(vec![jwk]);
    assert_eq!(verify(&chained, &token(&rs)), Ok(Some("no-chain".into())));
}

#[test]
fn ec_point_not_on_the_curve_is_skipped() {
    let es = TestKey::es256("off-curve");
    let mut jwk = es.jwk();
    jwk["y"] = json!(b64(&[7u8; 32]));
    let (set, skipped) = parse_set(json!({ "keys": [jwk] }).to_string().as_bytes());
    assert!(set.keys.is_empty());
    assert!(skipped[0].contains("not a valid"), "{skipped:?}");
}

fn without(mut jwk: Value, field: &str) -> Value {
    jwk.as_object_mut().expect("object").remove(field);
    jwk
}

fn modulus(key: &TestKey) -> Vec<u8> {
    use base64::Engine;
    let n = key.jwk()["n"].as_str().expect("n").to_owned();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(n)
        .expect("base64url")
}
