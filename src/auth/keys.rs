//! JWKS documents turned into verification-ready keys: each key is parsed
//! once into aws-lc-rs form, so the hot path does signature math only.
//! Unusable keys are skipped one by one; a body that is not a key set is
//! an error for that fetch, never an empty set.

use aws_lc_rs::signature::{self, ParsedPublicKey, RsaPublicKeyComponents, VerificationAlgorithm};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::auth::jwks::JwksError;
use crate::auth::verify::{TokenError, UnverifiedToken, allowed_algorithm};

/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted, in bits (aws-lc-rs verifies up to 8192).
const MAX_RSA_BITS: usize = 8192;

/// Every RSA algorithm a JWKS key of type RSA may serve.
const RSA_ALGORITHMS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The curve or family a key belongs to; decides which `alg` may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyType {
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        matches!(
            (self, alg),
            (KeyType::Rsa, RS256 | RS384 | RS512 | PS256 | PS384 | PS512)
                | (KeyType::P256, ES256)
                | (KeyType::P384, ES384)
                | (KeyType::Ed25519, EdDSA)
        )
    }
}

/// The aws-lc-rs verification parameters for a JOSE algorithm we accept.
pub fn aws_algorithm(alg: Algorithm) -> Option<&'static dyn VerificationAlgorithm> {
    if let Some(rsa) = rsa_parameters(alg) {
        return Some(rsa);
    }
    Some(match alg {
        Algorithm::ES256 => &signature::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &signature::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &signature::ED25519,
        _ => return None,
    })
}

/// One public key, parsed once into the form the signature check needs.
pub struct VerifyKey {
    pub kid: Option<String>,
    /// The key's declared `alg`; `None` allows every algorithm of its type.
    pub alg: Option<Algorithm>,
    pub kind: KeyType,
    /// SHA-256 of the key material: identifies the key across refetches.
    pub id: [u8; 32],
    /// One parsed key per algorithm it may serve: aws-lc-rs binds a parsed
    /// key to its padding and digest, and an RSA key without `alg` serves six.
    parsed: Vec<(Algorithm, ParsedPublicKey)>,
}

impl VerifyKey {
    /// Whether a token signed with `alg` may be checked with this key.
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.parsed.iter().any(|(a, _)| *a == alg)
    }

    /// Checks the token's signature with this key, if the key fits its `alg`.
    pub fn verify(&self, token: &UnverifiedToken<'_>) -> bool {
        let alg = token.header.alg;
        self.parsed.iter().any(|(a, key)| {
            *a == alg
                && key
                    .verify_sig(token.signing_input.as_bytes(), &token.signature)
                    .is_ok()
        })
    }
}

/// A parsed JWKS document.
#[derive(Default)]
pub struct KeySet {
    pub keys: Vec<VerifyKey>,
}

impl KeySet {
    /// Parses a JWKS body. Keys that cannot be used are skipped and their
    /// reasons returned; a body without a `keys` array is an error.
    pub fn parse(body: &[u8]) -> Result<(KeySet, Vec<String>), JwksError> {
        let doc: Value = serde_json::from_slice(body).map_err(|_| JwksError::NotAKeySet)?;
        let Some(Value::Array(raw)) = doc.get("keys") else {
            return Err(JwksError::NotAKeySet);
        };
        let mut set = KeySet::default();
        let mut skipped = Vec::new();
        for (i, jwk) in raw.iter().enumerate() {
            match parse_key(jwk) {
                Ok(key) => set.keys.push(key),
                Err(why) => {
                    let kid = jwk.get("kid").and_then(Value::as_str).unwrap_or("-");
                    skipped.push(format!("key {i} (kid {kid}): {why}"));
                }
            }
        }
        Ok((set, skipped))
    }

    /// Finds the key that signed `token`: every key with its `kid` (or, with
    /// no `kid`, every key) whose type fits the token's `alg` is tried.
    pub fn verify(
        &self,
        token: &UnverifiedToken<'_>,
        issuer: &str,
    ) -> Result<&VerifyKey, TokenError> {
        if self.keys.is_empty() {
            return Err(TokenError::NoKeys(issuer.to_owned()));
        }
        let alg = token.header.alg;
        let kid = token.header.kid.as_deref();
        let mut named = self
            .keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.as_deref() == kid);
        let mut candidates = named.by_ref().peekable();
        if candidates.peek().is_none() {
            return Err(TokenError::UnknownKid {
                kid: kid.unwrap_or_default().to_owned(),
                issuer: issuer.to_owned(),
            });
        }
        let mut fitting = candidates.filter(|k| k.fits(alg)).peekable();
        if fitting.peek().is_none() {
            return Err(TokenError::NoFittingKey {
                issuer: issuer.to_owned(),
                alg,
            });
        }
        fitting
            .find(|k| k.verify(token))
            .ok_or(TokenError::BadSignature)
    }

    pub fn contains(&self, id: &[u8; 32]) -> bool {
        self.keys.iter().any(|k| &k.id == id)
    }
}

fn parse_key(jwk: &Value) -> Result<VerifyKey, String> {
    let Value::Object(jwk) = jwk else {
        return Err("not a JSON object".into());
    };
    if let Some(usage) = jwk.get("use").and_then(Value::as_str)
        && usage != "sig"
    {
        return Err(format!("use \"{usage}\" is not \"sig\""));
    }
    if let Some(Value::Array(ops)) = jwk.get("key_ops")
        && !ops.iter().any(|op| op == "verify")
    {
        return Err("key_ops does not include \"verify\"".into());
    }
    let declared = match jwk.get("alg") {
        None | Some(Value::Null) => None,
        Some(Value::String(a)) => Some(
            allowed_algorithm(a).ok_or_else(|| format!("algorithm \"{a}\" is not supported"))?,
        ),
        Some(_) => return Err("\"alg\" is not a string".into()),
    };
    let kty = field(jwk, "kty")?;
    let (kind, material) = match kty {
        "RSA" => {
            let n = b64_field(jwk, "n")?;
            let e = b64_field(jwk, "e")?;
            // Some issuers pad `n` with a zero byte (a DER habit); the value is the same.
            let n = strip_leading_zeros(&n);
            let bits =
                (n.len() * 8).saturating_sub(n.first().map_or(8, |b| b.leading_zeros() as usize));
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA modulus of {bits} bits is under {MIN_RSA_BITS}"
                ));
            }
            if bits > MAX_RSA_BITS {
                return Err(format!("RSA modulus of {bits} bits is over {MAX_RSA_BITS}"));
            }
            let e = strip_leading_zeros(&e);
            (
                KeyType::Rsa,
                Material::Rsa {
                    n: n.to_vec(),
                    e: e.to_vec(),
                },
            )
        }
        "EC" => {
            let (kind, size) = match field(jwk, "crv")? {
                "P-256" => (KeyType::P256, 32),
                "P-384" => (KeyType::P384, 48),
                crv => return Err(format!("curve \"{crv}\" is not supported")),
            };
            let x = b64_field(jwk, "x")?;
            let y = b64_field(jwk, "y")?;
            if x.len() != size || y.len() != size {
                return Err(format!("EC coordinates must be {size} bytes"));
            }
            (kind, Material::Raw([&[4u8][..], &x, &y].concat()))
        }
        "OKP" => {
            match field(jwk, "crv")? {
                "Ed25519" => {}
                crv => return Err(format!("curve \"{crv}\" is not supported")),
            }
            let x = b64_field(jwk, "x")?;
            if x.len() != 32 {
                return Err("Ed25519 key must be 32 bytes".into());
            }
            (KeyType::Ed25519, Material::Raw(x))
        }
        other => return Err(format!("key type \"{other}\" is not supported")),
    };
    if let Some(alg) = declared
        && !kind.fits(alg)
    {
        return Err(format!("algorithm {alg:?} does not fit a {kind:?} key"));
    }

    // A key without `alg` gets every algorithm its type allows.
    let algorithms: Vec<Algorithm> = match (declared, kind) {
        (Some(alg), _) => vec![alg],
        (None, KeyType::Rsa) => RSA_ALGORITHMS.to_vec(),
        (None, KeyType::P256) => vec![Algorithm::ES256],
        (None, KeyType::P384) => vec![Algorithm::ES384],
        (None, KeyType::Ed25519) => vec![Algorithm::EdDSA],
    };
    let mut parsed = Vec::with_capacity(algorithms.len());
    for alg in algorithms {
        let key = parse_public(&material, alg)
            .ok_or_else(|| format!("key material is not a valid {kind:?} public key"))?;
        parsed.push((alg, key));
    }

    let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
    let mut hasher = Sha256::new().chain_update(kty);
    match &material {
        // Length-prefixed, so no (n, e) pair hashes like another.
        Material::Rsa { n, e } => {
            hasher.update((n.len() as u64).to_be_bytes());
            hasher.update(n);
            hasher.update(e);
        }
        Material::Raw(bytes) => hasher.update(bytes),
    }
    let id: [u8; 32] = hasher.finalize().into();
    Ok(VerifyKey {
        kid,
        alg: declared,
        kind,
        id,
        parsed,
    })
}

/// Public key bytes as the JWK gives them, leading zeros stripped.
enum Material {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// SEC1 uncompressed point for EC, the 32 raw bytes for Ed25519.
    Raw(Vec<u8>),
}

/// Parses key material for one algorithm; `None` if aws-lc-rs rejects it
/// (a point not on the curve, an RSA modulus that is not a modulus).
fn parse_public(material: &Material, alg: Algorithm) -> Option<ParsedPublicKey> {
    match material {
        Material::Rsa { n, e } => {
            let components = RsaPublicKeyComponents { n, e };
            components.to_parsed_public_key(rsa_parameters(alg)?).ok()
        }
        Material::Raw(bytes) => ParsedPublicKey::new(aws_algorithm(alg)?, bytes).ok(),
    }
}

fn rsa_parameters(alg: Algorithm) -> Option<&'static signature::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &signature::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &signature::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &signature::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

fn field<'a>(jwk: &'a Map<String, Value>, name: &str) -> Result<&'a str, String> {
    jwk.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no \"{name}\" string"))
}

fn b64_field(jwk: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let text = field(jwk, name)?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("\"{name}\" is not base64url"))
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}
