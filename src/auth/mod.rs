//! The token flow: pick the issuer by the token's `iss`, find its key in the
//! cached JWKS, check the signature and the claims, then decide the role the
//! session runs as under the issuer's rules (allowed roles, anonymous users).
//! Knows nothing of databases or relaying; a refusal says which check failed.

pub mod claims;
pub mod jwks;
pub mod keys;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::debug;

use crate::config::{AnonymousUsers, Config, IssuerConfig, JwksConfig};
use claims::Claims;
use jwks::{KeySource, Location};
use verify::{ClaimsPolicy, TokenError};

/// Longest a verified token is remembered, whatever its `exp`.
const MAX_TOKEN_CACHE_TTL: Duration = Duration::from_secs(3600);

/// The wall clock the claims checks read, in Unix seconds.
type WallClock = Arc<dyn Fn() -> f64 + Send + Sync>;

/// A token that passed every check, and the role its session runs as.
#[derive(Debug)]
pub struct VerifiedToken {
    pub claims: Claims,
    pub issuer: String,
    pub kid: Option<String>,
    pub sub: String,
    /// The role the upstream session logs in as: the one the client asked
    /// for, or the issuer's anonymous role for an anonymous user's token.
    pub role: String,
    /// Whether the token is an anonymous user's (see [`verify::is_anonymous_user`]).
    pub anonymous: bool,
    issuer_index: usize,
    key_id: [u8; 32],
    /// How long the token cache may keep this token: until its `exp`, at
    /// most [`MAX_TOKEN_CACHE_TTL`].
    cache_ttl: Duration,
    /// When that ends, on the monotonic clock (tokio's, so that tests on a
    /// paused clock see entries age).
    cached_until: tokio::time::Instant,
}

impl VerifiedToken {
    /// A short hash of `sub` for logs: the subject itself is personal data.
    pub fn sub_hash(&self) -> String {
        let digest = Sha256::digest(self.sub.as_bytes());
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

struct Issuer {
    policy: ClaimsPolicy,
    source: Arc<KeySource>,
    allow_missing_iss: bool,
    /// Roles its tokens may log into; `None` allows every token role.
    roles: Option<Vec<String>>,
    anonymous_users: AnonymousUsers,
    anonymous_role: String,
}

impl Issuer {
    /// The role a session runs as, or why this issuer's token may not have it.
    fn effective_role(&self, requested: &str, anonymous: bool) -> Result<String, TokenError> {
        if let Some(roles) = &self.roles
            && !roles.iter().any(|r| r == requested)
        {
            return Err(TokenError::RoleNotAllowed {
                issuer: self.policy.issuer.clone(),
                role: requested.to_owned(),
            });
        }
        if !anonymous {
            return Ok(requested.to_owned());
        }
        match self.anonymous_users {
            AnonymousUsers::Refuse => Err(TokenError::AnonymousUser(self.policy.issuer.clone())),
            AnonymousUsers::AnonymousRole => Ok(self.anonymous_role.clone()),
        }
    }
}

struct TokenTtl;

impl moka::Expiry<[u8; 32], Arc<VerifiedToken>> for TokenTtl {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<VerifiedToken>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.cache_ttl)
    }
}

/// Verifies client tokens against the configured issuers.
pub struct Authenticator {
    issuers: Vec<Issuer>,
    max_token_bytes: usize,
    /// Verified tokens by SHA-256 of the requested role and the whole
    /// token; a hit skips the signature but never the time checks. `None`
    /// when `token_cache_entries` is 0.
    cache: Option<moka::sync::Cache<[u8; 32], Arc<VerifiedToken>>>,
    wall_clock: WallClock,
    /// Background refresh tasks, stopped when this authenticator is dropped
    /// (a reload replaces it).
    refreshers: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Drop for Authenticator {
    fn drop(&mut self) {
        for task in self
            .refreshers
            .get_mut()
            .map(std::mem::take)
            .unwrap_or_default()
        {
            task.abort();
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("issuers[{index}]: {message}")]
pub struct AuthSetupError {
    index: usize,
    message: String,
}

impl Authenticator {
    /// Builds the key sources; nothing is fetched until [`Authenticator::start`].
    pub fn new(config: &Config) -> Result<Authenticator, AuthSetupError> {
        let mut issuers = Vec::new();
        for (index, ic) in config.issuers.iter().enumerate() {
            let err = |message: String| AuthSetupError { index, message };
            let location = location(ic, &config.jwks).map_err(err)?;
            let source = KeySource::new(&ic.issuer, location, &config.jwks)
                .map_err(|e| err(e.to_string()))?;
            issuers.push(Issuer {
                policy: ClaimsPolicy {
                    issuer: ic.issuer.clone(),
                    audience: ic.audience.clone(),
                    leeway: ic.leeway,
                    require_exp: true,
                },
                source: Arc::new(source),
                allow_missing_iss: ic.allow_missing_iss,
                roles: ic.roles.clone(),
                anonymous_users: ic.anonymous_users,
                anonymous_role: ic.anonymous_role.clone(),
            });
        }
        let entries = config.auth.token_cache_entries;
        let cache = (entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(entries)
                .expire_after(TokenTtl)
                .build()
        });
        Ok(Authenticator {
            issuers,
            max_token_bytes: config.auth.max_token_bytes,
            cache,
            wall_clock: Arc::new(verify::now_unix),
            refreshers: std::sync::Mutex::default(),
        })
    }

    /// Replaces the wall clock (Unix seconds) the claims checks read. Cache
    /// entries age on the monotonic clock instead, so tests use this to play
    /// a wall clock that steps ahead of it (an NTP correction, a resume from
    /// suspend), which only the time checks on a cache hit can catch.
    pub fn with_wall_clock(mut self, clock: impl Fn() -> f64 + Send + Sync + 'static) -> Self {
        self.wall_clock = Arc::new(clock);
        self
    }

    /// The key source of each issuer, in config order (for readiness, tests
    /// and benchmarks that drive a source directly).
    pub fn sources(&self) -> Vec<Arc<KeySource>> {
        self.issuers.iter().map(|i| i.source.clone()).collect()
    }

    /// Starts every issuer's background fetch; returns at once.
    pub fn start(&self) {
        let mut tasks = self.refreshers.lock().unwrap_or_else(|p| p.into_inner());
        for issuer in &self.issuers {
            tasks.push(issuer.source.spawn_refresh());
        }
    }

    /// Whether every issuer has keys (a reload waits for this, bounded).
    pub fn all_keys(&self) -> bool {
        self.issuers.iter().all(|i| i.source.has_keys())
    }

    /// Whether at least one issuer has keys.
    pub fn any_keys(&self) -> bool {
        self.issuers.iter().any(|i| i.source.has_keys())
    }

    /// Verifies `token` presented for a login as `role`; the error names
    /// the failed check. The returned token carries the effective role.
    pub async fn verify(&self, token: &str, role: &str) -> Result<Arc<VerifiedToken>, TokenError> {
        if token.len() > self.max_token_bytes {
            return Err(TokenError::TooLarge {
                len: token.len(),
                max: self.max_token_bytes,
            });
        }
        // The role is part of the key: the same token may be allowed one
        // role and refused another, and each entry holds its decided role.
        let cached = self.cache.as_ref().map(|cache| {
            let hash: [u8; 32] = Sha256::new()
                .chain_update(role.as_bytes())
                .chain_update([0])
                .chain_update(token.as_bytes())
                .finalize()
                .into();
            (cache, hash)
        });
        if let Some((cache, hash)) = &cached
            && let Some(hit) = cache.get(hash)
        {
            let issuer = &self.issuers[hit.issuer_index];
            let live = tokio::time::Instant::now() < hit.cached_until;
            if live && issuer.source.keys().contains(&hit.key_id) {
                metrics::counter!("rlsproxy_token_cache_total", "result" => "hit").increment(1);
                // The entry aged on the monotonic clock; the wall clock may
                // have moved further, so the token's own times still rule.
                verify::check_times(&hit.claims, &issuer.policy, (self.wall_clock)())?;
                return Ok(hit);
            }
            cache.invalidate(hash);
        }
        metrics::counter!("rlsproxy_token_cache_total", "result" => "miss").increment(1);

        // Refusals are timed too: a refetch for a forged or rotated key
        // makes them the slow ones.
        let started = std::time::Instant::now();
        let outcome = self.verify_uncached(token, role).await;
        let result = if outcome.is_ok() { "ok" } else { "refused" };
        metrics::histogram!("rlsproxy_token_verify_seconds", "result" => result)
            .record(started.elapsed());
        let verified = Arc::new(outcome?);
        if let Some((cache, hash)) = cached
            && !verified.cache_ttl.is_zero()
        {
            cache.insert(hash, verified.clone());
        }
        Ok(verified)
    }

    async fn verify_uncached(&self, token: &str, role: &str) -> Result<VerifiedToken, TokenError> {
        let unverified = verify::parse(token)?;
        let issuer_index = self.pick_issuer(&unverified.claims)?;
        let issuer = &self.issuers[issuer_index];
        let name = &issuer.policy.issuer;

        let generation = issuer.source.generation();
        let keys = issuer.source.keys();
        // Any "no key verifies this" may be a rotation we have not seen: a
        // new kid, or a new key under an old kid or for a token without one.
        let key_id = match keys.verify(&unverified, name) {
            Ok(key) => key.id,
            Err(
                e @ (TokenError::UnknownKid { .. }
                | TokenError::NoKeys(_)
                | TokenError::NoFittingKey { .. }
                | TokenError::BadSignature),
            ) if issuer
                .source
                .refetch_missing_key(generation, e.reason())
                .await =>
            {
                debug!(
                    kid = unverified.header.kid.as_deref(),
                    "retrying after jwks refetch"
                );
                issuer.source.keys().verify(&unverified, name)?.id
            }
            Err(e) => return Err(e),
        };

        let now = (self.wall_clock)();
        verify::check_claims(&unverified.claims, &issuer.policy, now)?;
        let sub = match unverified.claims.get("sub") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(TokenError::MissingClaim("sub")),
        };
        let anonymous = verify::is_anonymous_user(&unverified.claims)?;
        let role = issuer.effective_role(role, anonymous)?;
        let exp = unverified
            .claims
            .get("exp")
            .and_then(Value::as_f64)
            .unwrap_or(now);
        let cache_ttl =
            Duration::from_secs_f64((exp - now).clamp(0.0, 1e9)).min(MAX_TOKEN_CACHE_TTL);
        Ok(VerifiedToken {
            issuer: name.clone(),
            kid: unverified.header.kid.clone(),
            sub,
            role,
            anonymous,
            claims: unverified.claims,
            issuer_index,
            key_id,
            cache_ttl,
            cached_until: tokio::time::Instant::now() + cache_ttl,
        })
    }

    fn pick_issuer(&self, claims: &Claims) -> Result<usize, TokenError> {
        match claims.get("iss") {
            Some(Value::String(iss)) => self
                .issuers
                .iter()
                .position(|i| i.policy.issuer == *iss)
                .ok_or_else(|| TokenError::UntrustedIssuer(iss.clone())),
            None if self.issuers.len() == 1 && self.issuers[0].allow_missing_iss => Ok(0),
            None => Err(TokenError::MissingIssuer),
            Some(_) => Err(TokenError::ClaimType {
                claim: "iss",
                expected: "a string",
            }),
        }
    }
}

/// Where an issuer's keys come from, with the URL rules applied.
fn location(ic: &IssuerConfig, jwks: &JwksConfig) -> Result<Location, String> {
    let url = |name: &str, text: &str| {
        let url = reqwest::Url::parse(text).map_err(|e| format!("{name}: {e}"))?;
        jwks::check_url(&url, jwks.allow_http).map_err(|e| format!("{name}: {e}"))?;
        Ok::<_, String>(url)
    };
    if let Some(text) = &ic.jwks_url {
        return Ok(Location::Url(url("jwks_url", text)?));
    }
    if let Some(path) = &ic.jwks_file {
        return Ok(Location::File(path.clone()));
    }
    let name = match ic.discovery_url {
        Some(_) => "discovery_url",
        None => "discover",
    };
    match ic.discovery_document() {
        Some(text) => Ok(Location::Discovery(url(name, &text)?)),
        None => Err("no key source".into()),
    }
}

/// Selects aws-lc-rs as jsonwebtoken's crypto backend. Signatures are
/// checked with aws-lc-rs directly (see `keys`), but jsonwebtoken 12 panics
/// on its first crypto call without a provider, so this stays for any
/// caller of it; a second call is harmless.
pub fn install_crypto_provider() {
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSED: &str = "http is allowed only to loopback hosts (set jwks.allow_http)";

    /// Builds the key sources of one issuer; fetches nothing.
    fn setup(issuer: &str, source: &str, jwks: &str) -> Result<(), String> {
        let text = format!(
            r#"
            [upstream]
            host = "127.0.0.1"
            [roles.authenticated]
            [[issuers]]
            issuer = "{issuer}"
            {source}
            [jwks]
            {jwks}
            "#
        );
        let config = Config::parse(&text, &|_| None).map_err(|e| e.to_string())?;
        Authenticator::new(&config)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn plain_http_key_source_beyond_loopback_is_refused_unless_allowed() {
        let iss = "http://issuer.example";
        let cases = [
            (
                r#"jwks_url = "http://issuer.example/jwks.json""#,
                "jwks_url",
            ),
            (
                r#"jwks_url = "http://localhost.issuer.example/k""#,
                "jwks_url",
            ),
            (r#"jwks_url = "http://10.0.0.7:8080/jwks.json""#, "jwks_url"),
            (r#"jwks_url = "http://[fd00::1]/jwks.json""#, "jwks_url"),
            (
                r#"discovery_url = "http://issuer.example/.well-known/openid-configuration""#,
                "discovery_url",
            ),
            ("discover = true", "discover"),
        ];
        for (source, key) in cases {
            let e = setup(iss, source, "").expect_err(source);
            assert!(e.starts_with(&format!("issuers[0]: {key}: http://")), "{e}");
            assert!(e.ends_with(REFUSED), "{e}");
            setup(iss, source, "allow_http = true").expect("allowed with allow_http");
        }
    }

    #[test]
    fn plain_http_to_loopback_and_https_anywhere_are_allowed() {
        for url in [
            "http://127.0.0.1:8080/jwks.json",
            "http://127.3.2.1/jwks.json",
            "http://localhost/jwks.json",
            "http://LOCALHOST:9/jwks.json",
            "http://[::1]:8080/jwks.json",
            "https://issuer.example/jwks.json",
        ] {
            let source = format!("jwks_url = \"{url}\"");
            setup("https://issuer.example", &source, "").unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn key_source_schemes_other_than_http_and_https_are_refused() {
        let source = r#"jwks_url = "ftp://issuer.example/jwks.json""#;
        let e = setup("https://issuer.example", source, "allow_http = true").expect_err("ftp");
        assert!(e.ends_with("scheme \"ftp\" is not supported"), "{e}");
    }
}
