//! JWT verification on the hot path, against raw aws-lc-rs with a key
//! parsed once (the floor), and jsonwebtoken 12's verify (the old path):
//! a first-seen token whose key is cached, a verified-token-cache hit, the
//! EdDSA re-sign of the claims, and a cold start of 1,000 concurrent
//! verifications with a never-seen kid (one HTTP fetch).
//!
//! Run: `cargo bench --bench verify -- --warm-up-time 1 --measurement-time 3`

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use aws_lc_rs::signature::ParsedPublicKey;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use futures_util::future::join_all;
use serde_json::{Value, json};

use common::{JwksServer, TestKey, TestRecorder, claims};
use rlsproxy::auth::Authenticator;
use rlsproxy::auth::claims::Claims;
use rlsproxy::auth::keys::{KeySet, aws_algorithm};
use rlsproxy::auth::verify;
use rlsproxy::config::Config;
use rlsproxy::session::sign_claims;
use rlsproxy::upstream::connect::SessionKey;

const ISS: &str = "https://issuer.bench";
const AUD: &str = "app";

/// An authenticator over a `jwks_file` holding `keys`, keys loaded.
fn authenticator(keys: &[&TestKey], cache_entries: u64) -> (Authenticator, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    let jwks: Vec<Value> = keys.iter().map(|k| k.jwk()).collect();
    std::fs::write(&path, json!({ "keys": jwks }).to_string()).expect("write jwks");
    let text = format!(
        r#"
        [upstream]
        host = "127.0.0.1"
        [roles.authenticated]
        [auth]
        token_cache_entries = {cache_entries}
        [[issuers]]
        issuer = "{ISS}"
        jwks_file = "{}"
        audience = "{AUD}"
        "#,
        path.display()
    );
    let config = Config::parse(&text, &|_| None).expect("valid config");
    let auth = Authenticator::new(&config).expect("authenticator");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime
        .block_on(auth.sources()[0].reload())
        .expect("keys load");
    (auth, dir)
}

/// Typical access-token claims, as Stack Auth / Better Auth issue them.
fn token_claims() -> Value {
    let mut c = claims("6f1c1f0e-7d1b-4a51-9a3c-2f6b1de0c001", ISS, AUD);
    c["email"] = json!("alice@example.com");
    c["role"] = json!("authenticated");
    c["sid"] = json!("0b7e2d5c-31f4-4c2f-a7a6-3c1f5f0e9a12");
    c
}

fn keys() -> Vec<TestKey> {
    vec![
        TestKey::es256("es256"),
        TestKey::es384("es384"),
        TestKey::rs256("rs256"),
        TestKey::ps256("ps256"),
        TestKey::ed25519("eddsa"),
    ]
}

fn cached_key(c: &mut Criterion) {
    rlsproxy::auth::install_crypto_provider();
    let keys = keys();
    let refs: Vec<&TestKey> = keys.iter().collect();
    let (auth, _dir) = authenticator(&refs, 0);
    let (set, _) = KeySet::parse(
        json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() })
            .to_string()
            .as_bytes(),
    )
    .expect("key set");

    for key in &keys {
        let token = key.sign(&token_claims());
        let name = key.alg();

        c.bench_function(&format!("verify_cached_key/{name}"), |b| {
            b.iter(|| {
                let verified = auth
                    .verify(black_box(&token), "authenticated")
                    .now_or_never()
                    .expect("no waiting with a cached key")
                    .expect("valid token");
                black_box(verified);
            })
        });

        // The floor: aws-lc-rs with the key parsed once, signature decoded.
        let unverified = verify::parse(&token).expect("parse");
        let alg = unverified.header.alg;
        let jwk = key.jwk();
        let parsed = raw_key(&jwk, alg);
        let message = unverified.signing_input.as_bytes().to_vec();
        let signature = unverified.signature.clone();
        c.bench_function(&format!("raw_aws_lc/{name}"), |b| {
            b.iter(|| {
                parsed
                    .verify_sig(black_box(&message), black_box(&signature))
                    .expect("valid signature")
            })
        });

        // Everything but the signature: split, base64, JSON, header checks.
        c.bench_function(&format!("parse_only/{name}"), |b| {
            b.iter(|| black_box(verify::parse(black_box(&token)).expect("parse")))
        });

        // Signature only, through our key set (no claims work).
        c.bench_function(&format!("keyset_signature_only/{name}"), |b| {
            b.iter(|| {
                let key = set.verify(black_box(&unverified), ISS).expect("verifies");
                black_box(key);
            })
        });

        // The path this replaced: jsonwebtoken's verify with a DecodingKey.
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.jwk()).expect("jwk");
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("decoding key");
        let (input, sig_b64) = token.rsplit_once('.').expect("three parts");
        c.bench_function(&format!("jsonwebtoken_verify/{name}"), |b| {
            b.iter(|| {
                let ok = jsonwebtoken::crypto::verify(
                    black_box(sig_b64),
                    black_box(input.as_bytes()),
                    &decoding,
                    alg,
                )
                .expect("verify runs");
                assert!(ok);
            })
        });
    }
}

fn raw_key(jwk: &Value, alg: jsonwebtoken::Algorithm) -> ParsedPublicKey {
    let field = |name: &str| {
        URL_SAFE_NO_PAD
            .decode(jwk[name].as_str().expect("field"))
            .expect("base64url")
    };
    let aws = aws_algorithm(alg).expect("supported");
    match jwk["kty"].as_str() {
        Some("RSA") => {
            let components = aws_lc_rs::signature::RsaPublicKeyComponents {
                n: field("n"),
                e: field("e"),
            };
            let params = match alg {
                jsonwebtoken::Algorithm::RS256 => &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
                _ => &aws_lc_rs::signature::RSA_PSS_2048_8192_SHA256,
            };
            components.to_parsed_public_key(params).expect("rsa key")
        }
        Some("EC") => {
            let point = [vec![4u8], field("x"), field("y")].concat();
            ParsedPublicKey::new(aws, point).expect("ec key")
        }
        _ => ParsedPublicKey::new(aws, field("x")).expect("ed25519 key"),
    }
}

fn token_cache_hit(c: &mut Criterion) {
    let key = TestKey::es256("es256");
    let (auth, _dir) = authenticator(&[&key], 10_000);
    let token = key.sign(&token_claims());
    let verify = || {
        auth.verify(black_box(&token), "authenticated")
            .now_or_never()
            .expect("no waiting")
            .expect("valid token")
    };
    verify();
    // Once, outside the timed loop: what is timed below must be a hit.
    let recorder = TestRecorder::new();
    recorder.record(verify);
    let seen = recorder.take();
    let count = |result| seen.counter("rlsproxy_token_cache_total", &[("result", result)]);
    assert_eq!((count("hit"), count("miss")), (1, 0), "not a cache hit");
    c.bench_function("token_cache_hit", |b| b.iter(|| black_box(verify())));
}

fn resign(c: &mut Criterion) {
    let mut key = SessionKey::generate().expect("session key");
    let claims = Claims::from_json(token_claims().to_string()).expect("object");
    c.bench_function("resign_eddsa", |b| {
        b.iter(|| black_box(sign_claims(&mut key, black_box(&claims))))
    });
}

fn cold_start(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let key = TestKey::es256("never-seen");
    let server = runtime.block_on(JwksServer::with_keys(&[&key]));
    let text = format!(
        r#"
        [upstream]
        host = "127.0.0.1"
        [roles.authenticated]
        [[issuers]]
        issuer = "{iss}"
        jwks_url = "{url}"
        audience = "{AUD}"
        "#,
        iss = server.issuer(),
        url = server.url(),
    );
    let config = Config::parse(&text, &|_| None).expect("valid config");
    let tokens: Vec<String> = (0..1000)
        .map(|i| key.sign(&claims(&format!("user{i}"), &server.issuer(), AUD)))
        .collect();

    let mut group = c.benchmark_group("cold_start");
    group.sample_size(10);
    group.bench_function("1000_concurrent_new_kid", |b| {
        b.iter(|| {
            let before = server.fetch_count();
            let auth = Authenticator::new(&config).expect("authenticator");
            let results = runtime.block_on(join_all(
                tokens.iter().map(|t| auth.verify(t, "authenticated")),
            ));
            assert!(results.iter().all(Result::is_ok));
            assert_eq!(server.fetch_count(), before + 1, "exactly one fetch");
        })
    });
    group.finish();
}

criterion_group!(benches, cached_key, token_cache_hit, resign, cold_start);
criterion_main!(benches);
