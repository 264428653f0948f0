//! A per-issuer [`KeySource`]: fetches the issuer's JWKS (from a URL, a
//! file, or the URL an OIDC discovery document names), refreshes it in the
//! background before it expires and refetches once when no cached key
//! verifies a token (unknown `kid`, rotated key), so that in steady state no
//! connection waits on the network. A failed fetch keeps the last good keys
//! for up to `max_stale`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::keys::KeySet;
use crate::config::JwksConfig;

/// Wait after the first failed fetch before retrying; doubles with each
/// further failure, up to `min_ttl`.
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(2);
/// How often a `jwks_file` is checked for changes.
const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Redirects followed per fetch.
const MAX_REDIRECTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("request failed: {0}")]
    Http(String),
    #[error("request timed out")]
    Timeout,
    #[error("redirect refused: {0}")]
    Redirect(String),
    #[error("server answered HTTP {0}")]
    Status(u16),
    #[error("body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("body is not a JSON object with a \"keys\" array")]
    NotAKeySet,
    #[error("discovery document: {0}")]
    Discovery(String),
    #[error("cannot read key file: {0}")]
    File(String),
}

impl JwksError {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            JwksError::Http(_) => "http",
            JwksError::Timeout => "timeout",
            JwksError::Redirect(_) => "redirect",
            JwksError::Status(_) => "status",
            JwksError::TooLarge(_) => "too_large",
            JwksError::NotAKeySet => "invalid",
            JwksError::Discovery(_) => "discovery",
            JwksError::File(_) => "file",
        }
    }
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum Location {
    Url(reqwest::Url),
    File(PathBuf),
    /// An OIDC discovery document (`.../.well-known/openid-configuration`)
    /// whose `jwks_uri` names the key set.
    Discovery(reqwest::Url),
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
    /// The `jwks_uri` of the discovery document, once read.
    discovered: Mutex<Option<reqwest::Url>>,
    /// Fetches started, finished (either way) and failed, for readiness and tests.
    started: AtomicU64,
    attempts: AtomicU64,
    failures: AtomicU64,
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
            discovered: Mutex::new(None),
            started: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            failures: AtomicU64::new(0),
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

    /// Fetch attempts finished so far, successful or not.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    /// Whether a fetch has started and not finished.
    pub fn in_flight(&self) -> bool {
        self.started.load(Ordering::Acquire) > self.attempts()
    }

    /// Fetch attempts that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }

    /// Starts the background fetch-and-refresh loop.
    pub fn spawn_refresh(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let source = Arc::clone(self);
        let span = info_span!("jwks", issuer = %self.issuer);
        tokio::spawn(async move { source.refresh_loop().await }.instrument(span))
    }

    /// Fetches now, in turn with every other fetch (a reload signal, tests).
    /// Returns how many keys were installed; a failure keeps the old keys.
    pub async fn reload(&self) -> Result<usize, JwksError> {
        let _gate = self.refetch_gate.lock().await;
        match self.fetch().await {
            Ok((set, _)) => {
                let count = set.keys.len();
                self.install(set);
                Ok(count)
            }
            Err(e) => {
                self.record_failure(&e);
                Err(e)
            }
        }
    }

    /// Called when no cached key verifies a token: its `kid` is unknown, or
    /// the key under its `kid` (or, without a `kid`, every key) has another
    /// type or another signature, as after a rotation that reused a `kid`.
    /// Refetches once, shared by every connection waiting, then not again
    /// within `unknown_kid_cooldown`, so a flood of forged tokens costs one
    /// fetch per cooldown. `reason` labels the metric. Returns whether the
    /// key set may have changed since `seen_generation`.
    pub async fn refetch_missing_key(&self, seen_generation: u64, reason: &'static str) -> bool {
        let mut last = self.refetch_gate.lock().await;
        if self.generation() != seen_generation {
            return true;
        }
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < self.config.unknown_kid_cooldown) {
            return false;
        }
        *last = Some(now);
        metrics::counter!(
            "rlsproxy_jwks_unknown_kid_refetches_total",
            "issuer" => self.issuer.clone(),
            "reason" => reason
        )
        .increment(1);
        let span = info_span!("jwks", issuer = %self.issuer);
        match self.fetch().instrument(span).await {
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
                    retry_delay(failures, self.config.min_ttl)
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
        self.attempts.fetch_add(1, Ordering::AcqRel);
        let issuer = self.issuer.clone();
        metrics::counter!("rlsproxy_jwks_fetches_total", "issuer" => issuer.clone(), "result" => "ok")
            .increment(1);
        metrics::gauge!("rlsproxy_jwks_keys", "issuer" => issuer).set(count as f64);
        debug!(keys = count, "jwks installed");
    }

    fn record_failure(&self, e: &JwksError) {
        self.failures.fetch_add(1, Ordering::AcqRel);
        self.attempts.fetch_add(1, Ordering::AcqRel);
        metrics::counter!(
            "rlsproxy_jwks_fetches_total",
            "issuer" => self.issuer.clone(),
            "result" => e.reason()
        )
        .increment(1);
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
            metrics::counter!("rlsproxy_jwks_stale_drops_total", "issuer" => self.issuer.clone())
                .increment(1);
            metrics::gauge!("rlsproxy_jwks_keys", "issuer" => self.issuer.clone()).set(0.0);
        }
    }

    /// One fetch: the parsed set and how long it may be cached.
    async fn fetch(&self) -> Result<(KeySet, Duration), JwksError> {
        self.started.fetch_add(1, Ordering::AcqRel);
        let (body, ttl) = match &self.location {
            Location::File(path) => {
                let body = tokio::fs::read(path)
                    .await
                    .map_err(|e| JwksError::File(e.to_string()))?;
                (body, self.config.default_ttl)
            }
            Location::Url(url) => self.fetch_url(url).await?,
            Location::Discovery(doc) => self.fetch_discovered(doc).await?,
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

    /// Fetches the key set a discovery document names. The `jwks_uri` is
    /// kept; a 404 from it means the issuer moved its keys, so the
    /// document is read again and a new `jwks_uri` tried at once.
    async fn fetch_discovered(&self, doc: &reqwest::Url) -> Result<(Vec<u8>, Duration), JwksError> {
        let known = self.discovered.lock().map(|d| d.clone()).unwrap_or(None);
        let jwks_uri = match known {
            Some(url) => url,
            None => self.discover(doc).await?,
        };
        match self.fetch_url(&jwks_uri).await {
            Err(JwksError::Status(404)) => {
                let fresh = self.discover(doc).await?;
                if fresh == jwks_uri {
                    return Err(JwksError::Status(404));
                }
                info!(jwks_uri = %fresh, "jwks_uri changed; fetching the new one");
                self.fetch_url(&fresh).await
            }
            other => other,
        }
    }

    /// Reads the discovery document for its `jwks_uri`, under the same
    /// limits and URL rules as the key set itself.
    async fn discover(&self, doc: &reqwest::Url) -> Result<reqwest::Url, JwksError> {
        let result = self.read_discovery(doc).await;
        let label = match &result {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        };
        metrics::counter!(
            "rlsproxy_jwks_discoveries_total",
            "issuer" => self.issuer.clone(),
            "result" => label
        )
        .increment(1);
        let url = result?;
        if let Ok(mut d) = self.discovered.lock() {
            *d = Some(url.clone());
        }
        debug!(jwks_uri = %url, "discovered jwks_uri");
        Ok(url)
    }

    async fn read_discovery(&self, doc: &reqwest::Url) -> Result<reqwest::Url, JwksError> {
        let (body, _) = self.fetch_url(doc).await?;
        let value: Value = serde_json::from_slice(&body)
            .map_err(|_| JwksError::Discovery("not a JSON object".into()))?;
        let Some(uri) = value.get("jwks_uri").and_then(Value::as_str) else {
            return Err(JwksError::Discovery("no \"jwks_uri\" string".into()));
        };
        if let Some(iss) = value.get("issuer").and_then(Value::as_str)
            && iss.trim_end_matches('/') != self.issuer.trim_end_matches('/')
        {
            // Some providers (multi-tenant endpoints) publish a templated
            // issuer; the operator chose this document, so warn only.
            warn!(
                document_issuer = iss,
                "discovery document names another issuer"
            );
        }
        let url = reqwest::Url::parse(uri)
            .map_err(|e| JwksError::Discovery(format!("jwks_uri {uri:?}: {e}")))?;
        check_url(&url, self.config.allow_http).map_err(JwksError::Discovery)?;
        Ok(url)
    }

    async fn fetch_url(&self, url: &reqwest::Url) -> Result<(Vec<u8>, Duration), JwksError> {
        let mut resp = self
            .client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(http_error)?;
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
        while let Some(chunk) = resp.chunk().await.map_err(http_error)? {
            if body.len() + chunk.len() > max {
                return Err(JwksError::TooLarge(max));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, ttl))
    }
}

/// How long to wait after `failures` fetches in a row have failed (at
/// least one): 2 s, 4 s, 8 s, ... up to `cap`.
fn retry_delay(failures: u32, cap: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY_DELAY.saturating_mul(1 << doublings).min(cap)
}

fn http_error(e: reqwest::Error) -> JwksError {
    if e.is_timeout() {
        JwksError::Timeout
    } else if e.is_redirect() {
        JwksError::Redirect(with_causes(&e))
    } else {
        JwksError::Http(with_causes(&e))
    }
}

/// The error and its causes: reqwest's own message leaves out why (the
/// redirect rule that refused, the TLS or connect failure).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let next = c.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
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

/// Whether a fetch may follow a redirect to `next` after visiting
/// `previous`: at most three hops, never from https down to http (not even
/// to loopback), and `next` must pass the same URL rules as a configured one.
fn redirect_verdict(
    previous: &[reqwest::Url],
    next: &reqwest::Url,
    allow_http: bool,
) -> Result<(), String> {
    if previous.len() > MAX_REDIRECTS {
        return Err("more than 3 redirects".into());
    }
    if previous.iter().any(|u| u.scheme() == "https") && next.scheme() != "https" {
        return Err("redirect from https to http".into());
    }
    check_url(next, allow_http)
}

fn http_client(config: &JwksConfig) -> Result<reqwest::Client, JwksError> {
    let allow_http = config.allow_http;
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        match redirect_verdict(attempt.previous(), attempt.url(), allow_http) {
            Ok(()) => attempt.follow(),
            Err(e) => attempt.error(e),
        }
    });
    reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .timeout(config.timeout)
        .redirect(redirects)
        .user_agent(concat!("rlsproxy/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| JwksError::Http(e.to_string()))
}

#[cfg(test)]
mod retry_tests {
    use std::time::Duration;

    use super::retry_delay;

    #[test]
    fn retries_start_at_two_seconds_and_double_up_to_the_cap() {
        let minute = Duration::from_secs(60);
        let delays: Vec<u64> = (1..=8).map(|n| retry_delay(n, minute).as_secs()).collect();
        assert_eq!(delays, [2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_delay(u32::MAX, minute), minute);
        assert_eq!(
            retry_delay(1, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }
}

#[cfg(test)]
mod redirect_tests {
    use super::redirect_verdict;

    fn urls(list: &[&str]) -> Vec<reqwest::Url> {
        list.iter()
            .map(|u| reqwest::Url::parse(u).expect("url"))
            .collect()
    }

    #[test]
    fn https_never_redirects_down_to_http() {
        let next = &urls(&["http://127.0.0.1/jwks.json"])[0];
        let from_https = urls(&["https://issuer.example/jwks.json"]);
        let e = redirect_verdict(&from_https, next, true).expect_err("downgrade");
        assert_eq!(e, "redirect from https to http");
        let from_loopback = urls(&["http://localhost/jwks.json"]);
        redirect_verdict(&from_loopback, next, false).expect("loopback to loopback");
    }

    #[test]
    fn redirect_targets_follow_the_url_rules_and_the_hop_limit() {
        let from = urls(&["http://127.0.0.1/a"]);
        let outside = &urls(&["http://issuer.example/jwks.json"])[0];
        assert!(redirect_verdict(&from, outside, false).is_err());
        redirect_verdict(&from, outside, true).expect("allowed with allow_http");
        let four = urls(&["https://a/1", "https://a/2", "https://a/3", "https://a/4"]);
        let next = &urls(&["https://a/5"])[0];
        assert_eq!(
            redirect_verdict(&four, next, false),
            Err("more than 3 redirects".into())
        );
        redirect_verdict(&four[..3], next, false).expect("three hops are fine");
    }
}
