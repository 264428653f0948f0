//! A development token issuer: one Ed25519 key kept in a local file, its
//! JWKS served over loopback HTTP, and tokens minted on demand. For the
//! quickstart, scripts and tests only; it has no notion of users.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::auth::verify::now_unix;

/// The dev issuer's default address; its URL is also its `iss`.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9931";
/// The audience dev tokens carry unless told otherwise.
pub const DEFAULT_AUDIENCE: &str = "rlsproxy-demo";

/// An Ed25519 signing key with a stable `kid`.
pub struct DevIssuer {
    pair: Ed25519KeyPair,
    kid: String,
    /// The `iss` of minted tokens.
    pub issuer: String,
}

impl DevIssuer {
    /// Loads the key from `path`, or creates it (mode 0600) if absent.
    pub fn load_or_create(path: &Path, issuer: &str) -> anyhow::Result<DevIssuer> {
        let pair = if path.exists() {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let der = STANDARD
                .decode(text.trim())
                .context("key file is not base64")?;
            Ed25519KeyPair::from_pkcs8(&der).map_err(|e| anyhow::anyhow!("bad key file: {e}"))?
        } else {
            let pair = Ed25519KeyPair::generate().map_err(|_| anyhow::anyhow!("key generation"))?;
            let der = pair
                .to_pkcs8v1()
                .map_err(|_| anyhow::anyhow!("key export"))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            write_private(path, &STANDARD.encode(der.as_ref()))?;
            pair
        };
        let digest = Sha256::digest(pair.public_key().as_ref());
        let kid = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(DevIssuer {
            pair,
            kid,
            issuer: issuer.to_owned(),
        })
    }

    /// A fresh in-memory key (for tests and the demo).
    pub fn ephemeral(issuer: &str) -> anyhow::Result<DevIssuer> {
        let pair = Ed25519KeyPair::generate().map_err(|_| anyhow::anyhow!("key generation"))?;
        let digest = Sha256::digest(pair.public_key().as_ref());
        let kid = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(DevIssuer {
            pair,
            kid,
            issuer: issuer.to_owned(),
        })
    }

    /// The public key set.
    pub fn jwks(&self) -> Value {
        let x = URL_SAFE_NO_PAD.encode(self.pair.public_key().as_ref());
        json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "alg": "EdDSA", "use": "sig"
        }]})
    }

    /// Mints a token for `sub` with `audience`, valid for `ttl`; `extra`
    /// claims are added last and may override the defaults.
    pub fn mint(
        &self,
        sub: &str,
        audience: &str,
        ttl: Duration,
        extra: &Map<String, Value>,
    ) -> String {
        let now = now_unix().floor();
        let mut claims = Map::new();
        claims.insert("iss".into(), Value::from(self.issuer.clone()));
        claims.insert("sub".into(), Value::from(sub));
        claims.insert("aud".into(), Value::from(audience));
        claims.insert("iat".into(), json!(now as i64));
        claims.insert("exp".into(), json!((now + ttl.as_secs_f64()) as i64));
        claims.insert("role".into(), Value::from("authenticated"));
        claims.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));

        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": self.kid});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string())
        );
        let signature = self.pair.sign(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }

    /// Serves `/.well-known/jwks.json` and the OpenID discovery document.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let app = Router::new()
            .route("/.well-known/jwks.json", get(jwks))
            .route("/.well-known/openid-configuration", get(discovery))
            .with_state(self);
        axum::serve(listener, app).await
    }

    /// The JWKS URL when served at `addr`.
    pub fn jwks_url(addr: SocketAddr) -> String {
        format!("http://{addr}/.well-known/jwks.json")
    }
}

async fn jwks(State(issuer): State<Arc<DevIssuer>>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        axum::Json(issuer.jwks()),
    )
}

async fn discovery(State(issuer): State<Arc<DevIssuer>>) -> impl IntoResponse {
    let base = issuer.issuer.trim_end_matches('/');
    axum::Json(json!({
        "issuer": issuer.issuer,
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "id_token_signing_alg_values_supported": ["EdDSA"],
    }))
}

/// Parses `--claim key=value`: the value as JSON when it is valid JSON
/// (`true`, `42`, `["a"]`), otherwise as a string.
pub fn parse_claim(arg: &str) -> Result<(String, Value), String> {
    let (key, value) = arg
        .split_once('=')
        .ok_or_else(|| format!("{arg:?}: expected key=value"))?;
    if key.is_empty() {
        return Err(format!("{arg:?}: empty claim name"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::from(value));
    Ok((key.to_owned(), value))
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_with_the_served_jwks() {
        crate::auth::install_crypto_provider();
        let issuer = DevIssuer::ephemeral("http://127.0.0.1:9931").expect("key");
        let extra = Map::from_iter([parse_claim("is_admin=true").expect("claim")]);
        let token = issuer.mint("alice", DEFAULT_AUDIENCE, Duration::from_secs(60), &extra);
        let body = issuer.jwks().to_string();
        let (set, skipped) = crate::auth::keys::KeySet::parse(body.as_bytes()).expect("jwks");
        assert!(skipped.is_empty());
        let unverified = crate::auth::verify::parse(&token).expect("parse");
        set.verify(&unverified, "dev").expect("signature verifies");
        let claims: Value = serde_json::from_str(unverified.claims.json()).expect("json");
        assert_eq!(claims["is_admin"], Value::Bool(true));
        assert_eq!(claims["sub"], "alice");
    }

    #[test]
    fn key_file_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k/dev.key");
        let a = DevIssuer::load_or_create(&path, "i").expect("create");
        let b = DevIssuer::load_or_create(&path, "i").expect("load");
        assert_eq!(a.jwks(), b.jwks());
    }

    #[test]
    fn claims_parse_as_json_or_string() {
        assert_eq!(parse_claim("n=42").expect("ok"), ("n".into(), json!(42)));
        assert_eq!(
            parse_claim("org=acme").expect("ok"),
            ("org".into(), json!("acme"))
        );
        assert!(parse_claim("novalue").is_err());
    }
}
