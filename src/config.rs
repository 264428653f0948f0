//! The TOML configuration: `${VAR}` substitution from the environment, then
//! parsing into typed sections with defaults and validation. A bad value is
//! reported with its key path; secrets never appear in error messages.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid TOML: {0}")]
    Syntax(String),
    #[error("`{path}`: environment variable {var} is not set")]
    MissingEnv { path: String, var: String },
    #[error("`{path}`: unterminated ${{...}} reference")]
    BadReference { path: String },
    #[error("`{path}`: {message}")]
    Invalid { path: String, message: String },
}

/// The whole validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: ListenConfig,
    pub upstream: UpstreamConfig,
    pub roles: BTreeMap<String, RoleConfig>,
    #[serde(default)]
    pub claims: ClaimsConfig,
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    #[serde(default)]
    pub jwks: JwksConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Address the proxy accepts clients on.
    pub addr: SocketAddr,
    /// Client connections served at once; the next one is refused.
    pub max_clients: usize,
    /// Time a client has to finish start-up and authentication.
    #[serde(deserialize_with = "duration")]
    pub startup_timeout: Duration,
    /// On SIGTERM, time running sessions get to finish before they are closed.
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Duration,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            addr: default_listen_addr(),
            max_clients: 1000,
            startup_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// TLS for client connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Refuse clients that do not ask for TLS; default: true unless
    /// `listen.addr` is loopback.
    #[serde(default)]
    pub require: Option<bool>,
}

/// TLS to the upstream server, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    #[default]
    Disable,
    /// Encrypt without checking the certificate.
    Require,
    /// Encrypt and check the certificate chain and host name.
    VerifyFull,
}

/// The HTTP endpoint for metrics and health checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub addr: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 9930)),
        }
    }
}

fn default_listen_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 6432))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub host: String,
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Time allowed for TCP connect plus login to the upstream server.
    #[serde(default = "default_connect_timeout", deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub sslmode: SslMode,
    /// CA certificates (PEM) for `verify-full`; the platform's roots when unset.
    #[serde(default)]
    pub root_cert: Option<PathBuf>,
}

fn default_pg_port() -> u16 {
    5432
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

/// A role clients may ask for as their startup `user`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    /// Upstream login password of this role (the proxy logs in as the role itself).
    #[serde(default)]
    pub password: Option<String>,
    /// Whether a client must present a JWT as its password.
    #[serde(default = "yes")]
    pub requires_token: bool,
}

// Hand-written so the password never reaches a log line through `{:?}`.
impl std::fmt::Debug for RoleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoleConfig")
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("requires_token", &self.requires_token)
            .finish()
    }
}

fn yes() -> bool {
    true
}

/// How the verified claims reach Postgres.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimsMode {
    /// Re-signed with a per-connection key and set with `auth.jwt_session_init`.
    #[default]
    PgSessionJwt,
    /// `request.jwt.claims` setting (PostgREST style); spoofable by clients.
    Guc,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimsConfig {
    #[serde(default)]
    pub mode: ClaimsMode,
}

/// One trusted token issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Expected `iss` claim.
    pub issuer: String,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// An OIDC discovery document whose `jwks_uri` names the key set.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Discover the key set at `<issuer>/.well-known/openid-configuration`.
    #[serde(default)]
    pub discover: bool,
    /// Roles this issuer's tokens may log into; unset means every token role.
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// What to do with tokens of anonymous users (`is_anonymous: true`,
    /// `aud` ending in `:anon`).
    #[serde(default)]
    pub anonymous_users: AnonymousUsers,
    /// The role anonymous users' sessions run as with `anonymous_role`.
    #[serde(default = "default_anonymous_role")]
    pub anonymous_role: String,
    /// Accepted `aud` values; when set, a token must carry one of them.
    #[serde(default, deserialize_with = "string_or_list")]
    pub audience: Vec<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway", deserialize_with = "duration")]
    pub leeway: Duration,
    /// Accept tokens that carry no `iss` at all (only with a single issuer).
    #[serde(default)]
    pub allow_missing_iss: bool,
}

/// The rule for tokens of anonymous users.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnonymousUsers {
    /// Refuse them: they name no real user.
    #[default]
    Refuse,
    /// Serve them as the issuer's `anonymous_role`, claims included.
    AnonymousRole,
}

fn default_anonymous_role() -> String {
    "anonymous".to_owned()
}

impl IssuerConfig {
    /// The discovery document to read, if discovery is configured.
    pub fn discovery_document(&self) -> Option<String> {
        if let Some(url) = &self.discovery_url {
            return Some(url.clone());
        }
        self.discover.then(|| {
            let base = self.issuer.trim_end_matches('/');
            format!("{base}/.well-known/openid-configuration")
        })
    }
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

/// How JWKS documents are fetched and cached.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwksConfig {
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    #[serde(deserialize_with = "byte_size")]
    pub max_body: usize,
    #[serde(deserialize_with = "duration")]
    pub min_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub default_ttl: Duration,
    #[serde(deserialize_with = "duration")]
    pub unknown_kid_cooldown: Duration,
    #[serde(deserialize_with = "duration")]
    pub max_stale: Duration,
    /// Allow `http://` JWKS URLs to hosts other than loopback.
    pub allow_http: bool,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            max_body: 256 * 1024,
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(3600),
            default_ttl: Duration::from_secs(300),
            unknown_kid_cooldown: Duration::from_secs(10),
            max_stale: Duration::from_secs(24 * 3600),
            allow_http: false,
        }
    }
}

/// Limits on the token a client presents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Tokens longer than this are refused before any parsing.
    #[serde(deserialize_with = "byte_size")]
    pub max_token_bytes: usize,
    /// Entries in the verified-token cache.
    pub token_cache_entries: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            max_token_bytes: 16 * 1024,
            token_cache_entries: 10_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Upstream connections per (database, role), idle and in use together.
    pub max_per_role: usize,
    /// How long a client waits for a free upstream connection.
    #[serde(deserialize_with = "duration")]
    pub acquire_timeout: Duration,
    /// An idle upstream connection is closed after this long unused.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// An upstream connection is not reused once this old.
    #[serde(deserialize_with = "duration")]
    pub max_lifetime: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_per_role: 20,
            acquire_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
        }
    }
}

impl Config {
    /// Whether clients must use TLS: `tls.require`, by default true when
    /// TLS is configured and the proxy listens beyond loopback.
    pub fn tls_required(&self) -> bool {
        match &self.tls {
            Some(t) => t.require.unwrap_or(!self.listen.addr.ip().is_loopback()),
            None => false,
        }
    }

    /// Reads and validates a config file, taking `${VAR}` from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, &|var| std::env::var(var).ok())
    }

    /// Parses config text, resolving `${VAR}` with `env` (tests pass their own).
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
            ConfigError::Syntax(format!("{at}{}", e.message()))
        })?;
        substitute(&mut value, String::new(), env)?;

        let config: Config =
            serde_path_to_error::deserialize(value).map_err(|e| ConfigError::Invalid {
                path: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |path: &str, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            message: message.to_owned(),
        };
        if self.roles.is_empty() {
            return Err(invalid("roles", "at least one role must be configured"));
        }
        let token_roles = self.roles.values().filter(|r| r.requires_token).count();
        if token_roles > 0 && self.issuers.is_empty() {
            return Err(invalid(
                "issuers",
                "roles require tokens but no [[issuers]] is set",
            ));
        }
        for (i, issuer) in self.issuers.iter().enumerate() {
            let path = format!("issuers[{i}]");
            if issuer.discover && issuer.discovery_url.is_some() {
                return Err(invalid(&path, "set discovery_url or discover, not both"));
            }
            let sources = [
                issuer.jwks_url.is_some(),
                issuer.jwks_file.is_some(),
                issuer.discovery_document().is_some(),
            ];
            match sources.iter().filter(|s| **s).count() {
                0 => {
                    return Err(invalid(
                        &path,
                        "set one of jwks_url, jwks_file, discovery_url or discover = true",
                    ));
                }
                1 => {}
                _ => {
                    return Err(invalid(
                        &path,
                        "set only one of jwks_url, jwks_file and discovery",
                    ));
                }
            }
            for (j, role) in issuer.roles.iter().flatten().enumerate() {
                if !self.roles.contains_key(role) {
                    return Err(invalid(
                        &format!("{path}.roles[{j}]"),
                        &format!("role \"{role}\" is not in [roles]"),
                    ));
                }
            }
            if issuer.anonymous_users == AnonymousUsers::AnonymousRole
                && !self.roles.contains_key(&issuer.anonymous_role)
            {
                return Err(invalid(
                    &format!("{path}.anonymous_role"),
                    &format!(
                        "anonymous_users = \"anonymous_role\" needs role \"{}\" in [roles]",
                        issuer.anonymous_role
                    ),
                ));
            }
            if issuer.allow_missing_iss && self.issuers.len() > 1 {
                return Err(invalid(&path, "allow_missing_iss needs a single issuer"));
            }
        }
        if self.pool.max_per_role == 0 {
            return Err(invalid("pool.max_per_role", "must be at least 1"));
        }
        if self.listen.max_clients == 0 {
            return Err(invalid("listen.max_clients", "must be at least 1"));
        }
        if self.upstream.root_cert.is_some() && self.upstream.sslmode != SslMode::VerifyFull {
            return Err(invalid(
                "upstream.root_cert",
                "only used with sslmode = \"verify-full\"",
            ));
        }
        if self.jwks.min_ttl > self.jwks.max_ttl {
            return Err(invalid("jwks.min_ttl", "must not exceed jwks.max_ttl"));
        }
        Ok(())
    }
}

/// Replaces `${VAR}` in every string value, in place.
fn substitute(
    value: &mut toml::Value,
    path: String,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains("${") => *s = expand(s, &path, env)?,
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute(item, format!("{path}[{i}]"), env)?;
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                substitute(item, child, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(
    s: &str,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(ConfigError::BadReference {
            path: path.to_owned(),
        })?;
        let var = &after[..end];
        let value = env(var).ok_or_else(|| ConfigError::MissingEnv {
            path: path.to_owned(),
            var: var.to_owned(),
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses a humantime duration such as `"30s"` or `"5m"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// A byte count: an integer, or a string like `"256KiB"`, `"1MiB"`, `"512"`.
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Text(String),
    }
    let n = match Raw::deserialize(d)? {
        Raw::Int(n) => n,
        Raw::Text(s) => parse_byte_size(&s).map_err(serde::de::Error::custom)?,
    };
    usize::try_from(n).map_err(serde::de::Error::custom)
}

fn parse_byte_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1024,
        "MiB" | "M" | "MB" => 1024 * 1024,
        _ => return Err(format!("invalid size unit in {s:?} (use B, KiB or MiB)")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(s) => vec![s],
        Raw::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [upstream]
        host = "127.0.0.1"
        [roles.authenticated]
        password = "${PW}"
        [roles.anonymous]
        requires_token = false
        [[issuers]]
        issuer = "https://issuer.example"
        jwks_url = "https://issuer.example/jwks.json"
        audience = "app"
    "#;

    fn env(var: &str) -> Option<String> {
        (var == "PW").then(|| "s3cret".to_owned())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, &env).expect("valid");
        assert_eq!(c.listen.addr.to_string(), "127.0.0.1:6432");
        assert_eq!(c.upstream.port, 5432);
        assert_eq!(c.roles["authenticated"].password.as_deref(), Some("s3cret"));
        assert!(c.roles["authenticated"].requires_token);
        assert!(!c.roles["anonymous"].requires_token);
        assert_eq!(c.claims.mode, ClaimsMode::PgSessionJwt);
        assert_eq!(c.issuers[0].audience, vec!["app".to_owned()]);
        assert_eq!(c.issuers[0].leeway, Duration::from_secs(30));
        assert_eq!(c.jwks.max_body, 256 * 1024);
    }

    /// Each default as the README's configuration reference gives it.
    #[test]
    fn every_default_is_the_documented_one() {
        let c = Config::parse(MINIMAL, &env).expect("valid");
        let secs = Duration::from_secs;

        let j = &c.jwks;
        assert_eq!(j.min_ttl, secs(60));
        assert_eq!(j.max_ttl, secs(3600));
        assert_eq!(j.default_ttl, secs(300));
        assert_eq!(j.unknown_kid_cooldown, secs(10));
        assert_eq!(j.max_stale, secs(24 * 3600));
        assert_eq!(j.connect_timeout, secs(2));
        assert_eq!(j.timeout, secs(5));
        assert_eq!(j.max_body, 256 * 1024);
        assert!(!j.allow_http);

        assert_eq!(c.auth.max_token_bytes, 16 * 1024);
        assert_eq!(c.auth.token_cache_entries, 10_000);

        let i = &c.issuers[0];
        assert_eq!(i.leeway, secs(30));
        assert!(!i.allow_missing_iss && !i.discover);
        assert_eq!(i.roles, None);
        assert_eq!(i.anonymous_users, AnonymousUsers::Refuse);
        assert_eq!(i.anonymous_role, "anonymous");

        assert_eq!(c.listen.addr.to_string(), "127.0.0.1:6432");
        assert_eq!(c.listen.max_clients, 1000);
        assert_eq!(c.listen.startup_timeout, secs(10));
        assert_eq!(c.listen.shutdown_timeout, secs(30));
        assert_eq!(c.upstream.port, 5432);
        assert_eq!(c.upstream.connect_timeout, secs(5));
        assert_eq!(c.upstream.sslmode, SslMode::Disable);
        assert_eq!(c.upstream.root_cert, None);
        assert_eq!(c.claims.mode, ClaimsMode::PgSessionJwt);
        assert_eq!(c.pool.max_per_role, 20);
        assert_eq!(c.pool.acquire_timeout, secs(10));
        assert_eq!(c.pool.idle_timeout, secs(600));
        assert_eq!(c.pool.max_lifetime, secs(3600));
        assert_eq!(c.admin.addr.to_string(), "127.0.0.1:9930");
        assert!(c.tls.is_none());
    }

    #[test]
    fn unset_variable_is_an_error_naming_key_and_variable() {
        let e = Config::parse(MINIMAL, &|_| None).expect_err("must fail");
        assert_eq!(
            e.to_string(),
            "`roles.authenticated.password`: environment variable PW is not set"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let text = MINIMAL.replace(
            "[upstream]",
            "[pool]\nacquire_timeout = \"soon\"\n[upstream]",
        );
        let e = Config::parse(&text, &env)
            .expect_err("must fail")
            .to_string();
        assert!(
            e.starts_with("`pool.acquire_timeout`: invalid duration"),
            "{e}"
        );

        let text = MINIMAL.replace("[upstream]", "[upstream]\nhots = 1");
        let e = Config::parse(&text, &env)
            .expect_err("must fail")
            .to_string();
        assert!(e.contains("upstream") && e.contains("hots"), "{e}");
    }

    #[test]
    fn issuer_needs_exactly_one_key_source() {
        let text = MINIMAL.replace("jwks_url = \"https://issuer.example/jwks.json\"", "");
        let e = Config::parse(&text, &env)
            .expect_err("must fail")
            .to_string();
        assert_eq!(
            e,
            "`issuers[0]`: set one of jwks_url, jwks_file, discovery_url or discover = true"
        );

        let both = MINIMAL.replace("audience = \"app\"", "audience = \"app\"\ndiscover = true");
        let e = Config::parse(&both, &env)
            .expect_err("must fail")
            .to_string();
        assert_eq!(
            e,
            "`issuers[0]`: set only one of jwks_url, jwks_file and discovery"
        );

        let discover = text.replace("audience = \"app\"", "audience = \"app\"\ndiscover = true");
        let c = Config::parse(&discover, &env).expect("valid");
        assert_eq!(
            c.issuers[0].discovery_document().as_deref(),
            Some("https://issuer.example/.well-known/openid-configuration")
        );
    }

    #[test]
    fn issuer_roles_and_anonymous_role_must_be_configured_roles() {
        let text = MINIMAL.replace(
            "audience = \"app\"",
            "audience = \"app\"\nroles = [\"authenticated\", \"admin\"]",
        );
        let e = Config::parse(&text, &env)
            .expect_err("must fail")
            .to_string();
        assert_eq!(e, "`issuers[0].roles[1]`: role \"admin\" is not in [roles]");

        let text = MINIMAL.replace(
            "audience = \"app\"",
            "audience = \"app\"\nanonymous_users = \"anonymous_role\"\nanonymous_role = \"guest\"",
        );
        let e = Config::parse(&text, &env)
            .expect_err("must fail")
            .to_string();
        assert!(e.starts_with("`issuers[0].anonymous_role`"), "{e}");

        let text = MINIMAL.replace(
            "audience = \"app\"",
            "audience = \"app\"\nanonymous_users = \"anonymous_role\"",
        );
        let c = Config::parse(&text, &env).expect("valid");
        assert_eq!(c.issuers[0].anonymous_users, AnonymousUsers::AnonymousRole);
        assert_eq!(c.issuers[0].anonymous_role, "anonymous");
        assert_eq!(c.issuers[0].roles, None);
    }

    #[test]
    fn allow_missing_iss_needs_a_single_issuer() {
        let one = MINIMAL.replace(
            "audience = \"app\"",
            "audience = \"app\"\nallow_missing_iss = true",
        );
        let c = Config::parse(&one, &env).expect("valid with one issuer");
        assert!(c.issuers[0].allow_missing_iss);

        let second = "[[issuers]]\nissuer = \"https://other.example\"\ndiscover = true\n";
        let e = Config::parse(&format!("{one}\n{second}"), &env)
            .expect_err("two issuers")
            .to_string();
        assert_eq!(e, "`issuers[0]`: allow_missing_iss needs a single issuer");
        let e = Config::parse(
            &format!("{MINIMAL}\n{second}allow_missing_iss = true\n"),
            &env,
        )
        .expect_err("set on the second")
        .to_string();
        assert_eq!(e, "`issuers[1]`: allow_missing_iss needs a single issuer");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let e = Config::parse("[upstream]\nhost = \"a\"\nhost = \"b\"\n", &env).expect_err("dup");
        assert!(e.to_string().starts_with("invalid TOML: line 3: "), "{e}");
    }

    #[test]
    fn tls_is_required_by_default_beyond_loopback() {
        let tls = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let local = Config::parse(&format!("{MINIMAL}\n{tls}"), &env).expect("valid");
        assert!(!local.tls_required());
        let text = format!("[listen]\naddr = \"0.0.0.0:6432\"\n{MINIMAL}\n{tls}");
        assert!(Config::parse(&text, &env).expect("valid").tls_required());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("256KiB"), Ok(256 * 1024));
        assert_eq!(parse_byte_size("512"), Ok(512));
        assert!(parse_byte_size("12 parsecs").is_err());
    }

    #[test]
    fn password_is_redacted_in_debug() {
        let c = Config::parse(MINIMAL, &env).expect("valid");
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
