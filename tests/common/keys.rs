//! Signing keys generated at run time, their public JWKs, and JWTs signed
//! with them — including the forged tokens that attacks are made of.
//! Tokens are signed with aws-lc-rs directly, so the bytes are exactly what
//! JWS prescribes (ECDSA as fixed-size `r || s`, PSS salt = digest length).

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaEncoding};
use aws_lc_rs::{hmac, rsa};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// A private signing key with a `kid`, as an issuer would hold it.
pub struct TestKey {
    kid: String,
    alg: &'static str,
    signer: Signer,
}

enum Signer {
    Ecdsa(EcdsaKeyPair),
    Rsa(rsa::KeyPair, &'static dyn RsaEncoding),
    Ed25519(Ed25519KeyPair),
}

impl TestKey {
    pub fn es256(kid: &str) -> Self {
        Self::ecdsa(kid, "ES256", &signature::ECDSA_P256_SHA256_FIXED_SIGNING)
    }

    pub fn es384(kid: &str) -> Self {
        Self::ecdsa(kid, "ES384", &signature::ECDSA_P384_SHA384_FIXED_SIGNING)
    }

    /// RSA 2048 with PKCS#1 v1.5 padding.
    pub fn rs256(kid: &str) -> Self {
        Self::rsa(kid, "RS256", &signature::RSA_PKCS1_SHA256)
    }

    /// RSA 2048 with PSS padding.
    pub fn ps256(kid: &str) -> Self {
        Self::rsa(kid, "PS256", &signature::RSA_PSS_SHA256)
    }

    pub fn ed25519(kid: &str) -> Self {
        let pair = Ed25519KeyPair::generate().expect("generate Ed25519 key");
        Self::new(kid, "EdDSA", Signer::Ed25519(pair))
    }

    fn ecdsa(
        kid: &str,
        alg: &'static str,
        curve: &'static signature::EcdsaSigningAlgorithm,
    ) -> Self {
        let pair = EcdsaKeyPair::generate(curve).expect("generate ECDSA key");
        Self::new(kid, alg, Signer::Ecdsa(pair))
    }

    fn rsa(kid: &str, alg: &'static str, padding: &'static dyn RsaEncoding) -> Self {
        let pair = rsa::KeyPair::generate(rsa::KeySize::Rsa2048).expect("generate RSA key");
        Self::new(kid, alg, Signer::Rsa(pair, padding))
    }

    fn new(kid: &str, alg: &'static str, signer: Signer) -> Self {
        let kid = kid.to_owned();
        Self { kid, alg, signer }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWS `alg` this key signs with.
    pub fn alg(&self) -> &'static str {
        self.alg
    }

    /// The public JWK, as the issuer's JWKS publishes it.
    pub fn jwk(&self) -> Value {
        let mut jwk = match &self.signer {
            Signer::Ecdsa(pair) => {
                // Uncompressed SEC1 point: 0x04 || x || y.
                let point = pair.public_key().as_ref();
                let (x, y) = point[1..].split_at((point.len() - 1) / 2);
                let crv = if self.alg == "ES256" {
                    "P-256"
                } else {
                    "P-384"
                };
                json!({ "kty": "EC", "crv": crv, "x": b64(x), "y": b64(y) })
            }
            Signer::Rsa(pair, _) => {
                let public = pair.public_key();
                let n = public.modulus().big_endian_without_leading_zero();
                let e = public.exponent().big_endian_without_leading_zero();
                json!({ "kty": "RSA", "n": b64(n), "e": b64(e) })
            }
            Signer::Ed25519(pair) => {
                let x = pair.public_key().as_ref();
                json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(x) })
            }
        };
        jwk["kid"] = json!(self.kid);
        jwk["alg"] = json!(self.alg);
        jwk["use"] = json!("sig");
        jwk
    }

    /// The public key as a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) block.
    pub fn public_key_pem(&self) -> String {
        let der = match &self.signer {
            Signer::Ecdsa(pair) => pair.public_key().as_der().map(|d| d.as_ref().to_vec()),
            Signer::Rsa(pair, _) => pair.public_key().as_der().map(|d| d.as_ref().to_vec()),
            Signer::Ed25519(pair) => pair.public_key().as_der().map(|d| d.as_ref().to_vec()),
        };
        let der = der.expect("encode public key");
        let body = STANDARD.encode(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).expect("base64 is ascii"))
            .collect();
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            lines.join("\n")
        )
    }

    /// A compact JWT with header `{alg, kid, typ: "JWT"}`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({ "alg": self.alg, "kid": self.kid, "typ": "JWT" });
        self.sign_with_header(&header, claims)
    }

    /// A compact JWT with any header, signed with this key's own algorithm
    /// whatever the header says (for forged-header tests).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let signature = self.raw_signature(input.as_bytes());
        format!("{input}.{}", b64(&signature))
    }

    fn raw_signature(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.signer {
            Signer::Ecdsa(pair) => {
                let sig = pair.sign(&rng, message).expect("ECDSA sign");
                sig.as_ref().to_vec()
            }
            Signer::Rsa(pair, padding) => {
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(*padding, &rng, message, &mut sig)
                    .expect("RSA sign");
                sig
            }
            Signer::Ed25519(pair) => pair.sign(message).as_ref().to_vec(),
        }
    }
}

/// The classic algorithm-confusion attack: an HS256 token whose HMAC secret
/// is the RSA key's public PEM, which a naive verifier would feed to HMAC.
pub fn alg_confusion_token(rsa_key: &TestKey, claims: &Value) -> String {
    let header = json!({ "alg": "HS256", "kid": rsa_key.kid(), "typ": "JWT" });
    hs256_token(rsa_key.public_key_pem().as_bytes(), &header, claims)
}

/// An HS256 token with the given secret and header.
pub fn hs256_token(secret: &[u8], header: &Value, claims: &Value) -> String {
    let input = signing_input(header, claims);
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let tag = hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

/// An unsecured JWT (`alg: none`, empty signature) naming a real `kid`.
pub fn alg_none_token(kid: &str, claims: &Value) -> String {
    let header = json!({ "alg": "none", "kid": kid, "typ": "JWT" });
    format!("{}.", signing_input(&header, claims))
}

/// base64url without padding, as JOSE uses everywhere.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn signing_input(header: &Value, claims: &Value) -> String {
    let header = serde_json::to_vec(header).expect("serialize header");
    let claims = serde_json::to_vec(claims).expect("serialize claims");
    format!("{}.{}", b64(&header), b64(&claims))
}
