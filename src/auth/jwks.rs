//! JWKS key sets: parsing a JWKS document into verification-ready keys (bad
//! keys are skipped one by one), and a per-issuer [`KeySource`] that fetches
//! it, refreshes it in the background and refetches once on an unknown `kid`,
//! so that in steady state no connection waits on the network.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::verify::{TokenError, UnverifiedToken};
use crate::config::JwksConfig;

/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;
/// First retry delay after a failed fetch; doubles up to `min_ttl`.
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How often a `jwks_file` is checked for changes.
const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("request failed: {0}")]
    Http(String),
    #[error("server answered HTTP {0}")]
    Status(u16),
    #[error("body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("body is not a JSON object with a \"keys\" array")]
    NotAKeySet,
    #[error("cannot read key file: {0}")]
    File(String),
}

impl JwksError {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            JwksError::Http(_) => "http",
            JwksError::Status(_) => "status",
            JwksError::TooLarge(_) => "too_large",
            JwksError::NotAKeySet => "invalid",
            JwksError::File(_) => "file",
        }
    }
}

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

/// One public key, parsed once into the form the signature check needs.
pub struct VerifyKey {
    pub kid: Option<String>,
    /// The key's declared `alg`; `None` allows every algorithm of its type.
    pub alg: Option<Algorithm>,
    pub kind: KeyType,
    /// SHA-256 of the key material: identifies the key across refetches.
    pub id: [u8; 32],
    key: DecodingKey,
}

impl VerifyKey {
    /// Whether a token signed with `alg` may be checked with this key.
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }

    fn verify(&self, token: &UnverifiedToken<'_>) -> bool {
        jsonwebtoken::crypto::verify(
            token.signature,
            token.signing_input.as_bytes(),
            &self.key,
            token.header.alg,
        )
        .unwrap_or(false)
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
            crate::auth::verify::allowed_algorithm(a)
                .ok_or_else(|| format!("algorithm \"{a}\" is not supported"))?,
        ),
        Some(_) => return Err("\"alg\" is not a string".into()),
    };
    let kty = field(jwk, "kty")?;
    let (kind, material, key) = match kty {
        "RSA" => {
            let n = b64_field(jwk, "n")?;
            let e = b64_field(jwk, "e")?;
            let n = strip_leading_zeros(&n);
            let bits =
                (n.len() * 8).saturating_sub(n.first().map_or(8, |b| b.leading_zeros() as usize));
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA modulus of {bits} bits is under {MIN_RSA_BITS}"
                ));
            }
            let material = [n, b".", strip_leading_zeros(&e)].concat();
            (
                KeyType::Rsa,
                material,
                DecodingKey::from_rsa_raw_components(n, &e),
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
            let point = [&[4u8][..], &x, &y].concat();
            (kind, point.clone(), DecodingKey::from_ec_der(&point))
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
            (KeyType::Ed25519, x.clone(), DecodingKey::from_ed_der(&x))
        }
        other => return Err(format!("key type \"{other}\" is not supported")),
    };
    if let Some(alg) = declared
        && !kind.fits(alg)
    {
        return Err(format!("algorithm {alg:?} does not fit a {kind:?} key"));
    }
    let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
    let id: [u8; 32] = Sha256::new()
        .chain_update(kty)
        .chain_update(&material)
        .finalize()
        .into();
    Ok(VerifyKey {
        kid,
        alg: declared,
        kind,
        id,
        key,
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

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum Location {
    Url(reqwest::Url),
    File(PathBuf),
}

struct Cached {
    keys: Arc<KeySet>,
    /// When these keys were last fetched successfully.
    fetched_at: Option<Instant>,
}

/// One issuer's keys, kept current by a background task.
pub struct KeySource {
    issuer: String,
    location: Location,
    config: JwksConfig,
    client: reqwest::Client,
    current: RwLock<Cached>,
    /// Bumped on every install, so waiters can tell a refetch happened.
    generation: AtomicU64,
    /// Serialises unknown-kid refetches; holds the time of the last one.
    refetch_gate: tokio::sync::Mutex<Option<Instant>>,
}

impl KeySource {
    pub fn new(
        issuer: &str,
        location: Location,
        config: &JwksConfig,
    ) -> Result<KeySource, JwksError> {
        let client = http_client(config)?;
        Ok(KeySource {
            issuer: issuer.to_owned(),
            location,
            config: config.clone(),
            client,
            current: RwLock::new(Cached {
                keys: Arc::default(),
                fetched_at: None,
            }),
            generation: AtomicU64::new(0),
            refetch_gate: tokio::sync::Mutex::new(None),
        })
    }

    /// The keys as they are now (possibly empty); never waits on the network.
    pub fn keys(&self) -> Arc<KeySet> {
        match self.current.read() {
            Ok(c) => c.keys.clone(),
            Err(poisoned) => poisoned.into_inner().keys.clone(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether keys are available (for readiness).
    pub fn has_keys(&self) -> bool {
        !self.keys().keys.is_empty()
    }

    /// Starts the background fetch-and-refresh loop.
    pub fn spawn_refresh(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let source = Arc::clone(self);
        let span = info_span!("jwks", issuer = %self.issuer);
        tokio::spawn(async move { source.refresh_loop().await }.instrument(span))
    }

    /// Called when a token names a key we do not have: refetch once, shared by
    /// every connection waiting, then not again within the cooldown. Returns
    /// whether the key set may have changed since `seen_generation`.
    pub async fn refetch_unknown_kid(&self, seen_generation: u64) -> bool {
        let mut last = self.refetch_gate.lock().await;
        if self.generation() != seen_generation {
            return true;
        }
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.config.unknown_kid_cooldown) {
            return false;
        }
        *last = Some(now);
        metrics::counter!("rlsproxy_jwks_unknown_kid_refetches_total").increment(1);
        match self.fetch().await {
            Ok((set, _)) => {
                self.install(set);
                true
            }
            Err(e) => {
                self.record_failure(&e);
                false
            }
        }
    }

    async fn refresh_loop(&self) {
        let mut failures: u32 = 0;
        let mut file_stamp = None;
        loop {
            if let Location::File(path) = &self.location {
                let stamp = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if failures == 0 && stamp.is_some() && stamp == file_stamp {
                    tokio::time::sleep(FILE_POLL_INTERVAL).await;
                    continue;
                }
                file_stamp = stamp;
            }
            // Under the refetch gate: a connection that finds no key waits
            // for this fetch instead of starting one of its own.
            let gate = self.refetch_gate.lock().await;
            let fetched = self.fetch().await;
            drop(gate);
            let wait = match fetched {
                Ok((set, ttl)) => {
                    failures = 0;
                    self.install(set);
                    if matches!(self.location, Location::File(_)) {
                        FILE_POLL_INTERVAL
                    } else {
                        // Refresh ahead of expiry so no connection ever waits.
                        ttl.mul_f64(0.75)
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    self.record_failure(&e);
                    self.expire_if_stale();
                    let backoff = FIRST_RETRY_DELAY.saturating_mul(1 << failures.min(16));
                    backoff.min(self.config.min_ttl)
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn install(&self, set: KeySet) {
        let count = set.keys.len();
        let fresh = Cached {
            keys: Arc::new(set),
            fetched_at: Some(Instant::now()),
        };
        match self.current.write() {
            Ok(mut c) => *c = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        metrics::counter!("rlsproxy_jwks_fetches_total", "result" => "ok").increment(1);
        debug!(keys = count, "jwks installed");
    }

    fn record_failure(&self, e: &JwksError) {
        metrics::counter!("rlsproxy_jwks_fetches_total", "result" => e.reason()).increment(1);
        if self.has_keys() {
            warn!(error = %e, "jwks refresh failed; keeping the last good keys");
        } else {
            warn!(error = %e, "jwks fetch failed; this issuer has no keys yet");
        }
    }

    /// Stale-if-error is bounded: keys older than `max_stale` are dropped.
    fn expire_if_stale(&self) {
        let Ok(mut c) = self.current.write() else {
            return;
        };
        if let Some(at) = c.fetched_at
            && at.elapsed() > self.config.max_stale
            && !c.keys.keys.is_empty()
        {
            warn!("jwks keys are older than max_stale and are dropped");
            c.keys = Arc::default();
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// One fetch: the parsed set and how long it may be cached.
    async fn fetch(&self) -> Result<(KeySet, Duration), JwksError> {
        let (body, ttl) = match &self.location {
            Location::File(path) => {
                let body = tokio::fs::read(path)
                    .await
                    .map_err(|e| JwksError::File(e.to_string()))?;
                (body, self.config.default_ttl)
            }
            Location::Url(url) => self.fetch_url(url).await?,
        };
        let (set, skipped) = KeySet::parse(&body)?;
        for why in &skipped {
            debug!(reason = %why, "jwks key skipped");
        }
        if !skipped.is_empty() {
            info!(
                skipped = skipped.len(),
                kept = set.keys.len(),
                "jwks has unusable keys"
            );
        }
        Ok((set, ttl))
    }

    async fn fetch_url(&self, url: &reqwest::Url) -> Result<(Vec<u8>, Duration), JwksError> {
        let http = |e: reqwest::Error| JwksError::Http(format!("{e:#}"));
        let mut resp = self
            .client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(http)?;
        if !resp.status().is_success() {
            return Err(JwksError::Status(resp.status().as_u16()));
        }
        let ttl = cache_ttl(
            resp.headers().get(reqwest::header::CACHE_CONTROL),
            &self.config,
        );
        let max = self.config.max_body;
        if resp.content_length().is_some_and(|n| n > max as u64) {
            return Err(JwksError::TooLarge(max));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(http)? {
            if body.len() + chunk.len() > max {
                return Err(JwksError::TooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, ttl))
    }
}

/// Cache lifetime from `Cache-Control`, clamped to `min_ttl..=max_ttl`;
/// `no-cache`, `no-store` and `max-age=0` mean `min_ttl`, never "fetch each time".
pub fn cache_ttl(header: Option<&reqwest::header::HeaderValue>, config: &JwksConfig) -> Duration {
    let Some(value) = header.and_then(|h| h.to_str().ok()) else {
        return config.default_ttl;
    };
    let mut ttl = None;
    for directive in value.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-cache" || lower == "no-store" {
            return config.min_ttl;
        }
        if let Some(secs) = lower.strip_prefix("max-age=") {
            ttl = secs
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    ttl.map_or(config.default_ttl, |t| {
        t.clamp(config.min_ttl, config.max_ttl)
    })
}

/// Whether `url` may be fetched over plain http: only to loopback, unless allowed.
pub fn check_url(url: &reqwest::Url, allow_http: bool) -> Result<(), String> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_http || is_loopback(url) => Ok(()),
        "http" => Err(format!(
            "{url}: http is allowed only to loopback hosts (set jwks.allow_http)"
        )),
        other => Err(format!("{url}: scheme \"{other}\" is not supported")),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn http_client(config: &JwksConfig) -> Result<reqwest::Client, JwksError> {
    let allow_http = config.allow_http;
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > 3 {
            return attempt.error("more than 3 redirects");
        }
        let downgrade = attempt.previous().iter().any(|u| u.scheme() == "https")
            && attempt.url().scheme() != "https";
        if downgrade {
            return attempt.error("redirect from https to http");
        }
        if let Err(e) = check_url(attempt.url(), allow_http) {
            return attempt.error(e);
        }
        attempt.follow()
    });
    reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .timeout(config.timeout)
        .redirect(redirects)
        .user_agent(concat!("rlsproxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| JwksError::Http(e.to_string()))
}
