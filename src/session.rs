//! Per-session set-up on checkout and reset on release. Set-up applies the
//! client's startup parameters and the verified claims in one round trip;
//! any failure there closes the upstream connection, because a failed
//! `auth.jwt_session_init` would leave the previous session's claims.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::BytesMut;
use serde_json::{Map, Value};

use crate::auth::claims::Claims;
use crate::config::ClaimsMode;
use crate::error::ClientError;
use crate::upstream::connect::{SessionKey, UpstreamConn, UpstreamError};
use crate::upstream::params::ServerParams;
use crate::wire;

/// base64url of `{"alg":"EdDSA"}`, the header of every re-signed token.
const EDDSA_HEADER_B64: &str = "eyJhbGciOiJFZERTQSJ9";

/// Startup parameters a client may not set: they carry identity or claims.
const FORBIDDEN_PARAMS: &[&str] = &["role", "session_authorization", "request.jwt.claims"];

/// What one client session needs upstream.
pub struct SessionSpec<'a> {
    pub role: &'a str,
    /// Verified claims; `None` for a role that needs no token.
    pub claims: Option<&'a Claims>,
    pub mode: ClaimsMode,
    /// Client startup parameters other than user and database.
    pub params: &'a [(String, String)],
}

/// Turns the client's startup parameters (and `-c` / `--` settings in
/// `options`) into (name, value) settings, refusing the forbidden ones.
pub fn client_settings(params: &[(String, String)]) -> Result<Vec<(String, String)>, ClientError> {
    let mut settings = Vec::new();
    for (name, value) in params {
        if name == "options" {
            settings.extend(parse_options(value)?);
        } else {
            settings.push((name.clone(), value.clone()));
        }
    }
    for (name, _) in &settings {
        let lower = name.to_ascii_lowercase();
        // `request.jwt.claim.*` is PostgREST's older per-claim form.
        let claims_setting =
            lower.starts_with("pg_session_jwt.") || lower.starts_with("request.jwt.");
        if FORBIDDEN_PARAMS.contains(&lower.as_str()) || claims_setting {
            return Err(ClientError::ForbiddenParameter(format!(
                "startup parameter \"{name}\" may not be set through this proxy"
            )));
        }
    }
    Ok(settings)
}

/// Parses libpq `options`: `-c name=value` or `--name=value`, split on
/// unescaped whitespace with backslash escapes, as Postgres does.
fn parse_options(options: &str) -> Result<Vec<(String, String)>, ClientError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }

    let bad =
        |w: &str| ClientError::Unsupported(format!("startup option \"{w}\" (use -c name=value)"));
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let setting = if w == "-c" {
            words.next().ok_or_else(|| bad(&w))?
        } else if let Some(rest) = w.strip_prefix("-c").or_else(|| w.strip_prefix("--")) {
            rest.to_owned()
        } else {
            return Err(bad(&w));
        };
        let (name, value) = setting.split_once('=').ok_or_else(|| bad(&setting))?;
        settings.push((name.replace('-', "_"), value.to_owned()));
    }
    Ok(settings)
}

/// Re-signs `claims` with the connection's key, `jti` set to its next value.
pub fn resign(conn: &mut UpstreamConn, claims: &Claims) -> String {
    sign_claims(&mut conn.key, claims)
}

/// The signing half of [`resign`], apart from any connection (benchmarks).
pub fn sign_claims(key: &mut SessionKey, claims: &Claims) -> String {
    key.last_jti += 1;
    // The payload is the issuer's members, values copied as raw JSON text,
    // with our `jti` first and the token's own `jti` left out.
    let mut json = Vec::with_capacity(claims.json().len() + 32);
    json.extend_from_slice(format!("{{\"jti\":{}", key.last_jti).as_bytes());
    for (name, value) in claims.members().iter().filter(|(name, _)| name != "jti") {
        json.push(b',');
        // Serializing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut json, name);
        json.push(b':');
        json.extend_from_slice(value.get().as_bytes());
    }
    json.push(b'}');

    let mut token = String::with_capacity(EDDSA_HEADER_B64.len() + json.len() * 4 / 3 + 96);
    token.push_str(EDDSA_HEADER_B64);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&json, &mut token);
    let signature = key.sign(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    token
}

/// Writes the set-up (settings, then claims, one Sync: one round trip)
/// without waiting for its reply; [`UpstreamConn::read_until_ready`] reads
/// that.
pub async fn send_setup(
    conn: &mut UpstreamConn,
    spec: &SessionSpec<'_>,
    settings: &[(String, String)],
) -> Result<(), UpstreamError> {
    let mut out = BytesMut::with_capacity(1024);
    for (name, value) in settings {
        if already_reported(&conn.params, name, value) {
            continue;
        }
        wire::extended_query(
            &mut out,
            "SELECT pg_catalog.set_config($1, $2, false)",
            &[name, value],
        );
    }
    match spec.mode {
        ClaimsMode::PgSessionJwt => {
            // Tokenless sessions still get claims of their own, so nothing
            // of an earlier session on this backend can linger.
            let fallback;
            let claims = match spec.claims {
                Some(c) => c,
                None => {
                    fallback = tokenless_claims(spec.role);
                    &fallback
                }
            };
            let token = resign(conn, claims);
            wire::extended_query(&mut out, "SELECT auth.jwt_session_init($1)", &[&token]);
        }
        ClaimsMode::Guc => {
            if let Some(claims) = spec.claims {
                wire::extended_query(
                    &mut out,
                    "SELECT pg_catalog.set_config('request.jwt.claims', $1, false)",
                    &[claims.json()],
                );
            }
        }
    }
    wire::sync(&mut out);
    conn.send(&out).await
}

/// Whether the server already reported `name` as exactly `value`: the
/// reported settings are the current ones, so setting it again is a no-op.
fn already_reported(params: &ServerParams, name: &str, value: &str) -> bool {
    params.get(name) == Some(value)
}

/// Whether the client may be handed the session before the set-up reply is
/// in. Only settings Postgres accepts whatever their value qualify, so an
/// error the client caused still reaches it at connect time; what the
/// reply then brings is known in advance: `application_name` is reported
/// back unchanged when it is short printable ASCII.
pub fn can_hand_over_early(params: &ServerParams, settings: &[(String, String)]) -> bool {
    settings.iter().all(|(name, value)| {
        already_reported(params, name, value)
            || (name == "application_name"
                && value.len() < APPLICATION_NAME_MAX
                && value.bytes().all(|b| (b' '..=b'~').contains(&b)))
    })
}

/// Postgres keeps `application_name` below NAMEDATALEN (64) bytes.
const APPLICATION_NAME_MAX: usize = 64;

fn tokenless_claims(role: &str) -> Claims {
    let mut claims = Map::new();
    claims.insert("role".to_owned(), Value::from(role));
    Claims::from_map(claims)
}

/// Returns the connection to a fresh state: rollback if a transaction is
/// open, then `DISCARD ALL` (settings, prepared statements, cursors, LISTEN,
/// advisory locks, temp tables and sequences).
pub async fn reset(conn: &mut UpstreamConn) -> Result<(), UpstreamError> {
    let mut out = BytesMut::with_capacity(64);
    let mut replies = 1;
    if conn.tx_status != b'I' {
        wire::query(&mut out, "ROLLBACK");
        replies += 1;
    }
    wire::query(&mut out, "DISCARD ALL");
    conn.send(&out).await?;
    conn.read_until_ready_n(replies).await?;
    if conn.tx_status != b'I' {
        return Err(UpstreamError::Protocol(
            "connection not idle after reset".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn resigned_claims_carry_an_increasing_jti_and_nothing_else_changes() {
        let mut key = SessionKey::generate().expect("key");
        let text =
            r#"{"sub":"alice","jti":"from-the-issuer","aud":["a","b"],"n":1.5,"s":"q\"uote"}"#;
        let claims = Claims::from_json(text.to_owned()).expect("claims");
        let original: Map<String, Value> = serde_json::from_str(text).expect("json");
        for expected in 1..=2 {
            let token = sign_claims(&mut key, &claims);
            let parts: Vec<&str> = token.split('.').collect();
            assert_eq!(parts.len(), 3);
            assert_eq!(parts[0], EDDSA_HEADER_B64);
            let payload: Map<String, Value> =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64"))
                    .expect("json");
            let mut want = original.clone();
            want.insert("jti".into(), Value::from(expected));
            assert_eq!(payload, want);
        }
    }

    #[test]
    fn header_constant_matches() {
        assert_eq!(
            URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA"}"#),
            EDDSA_HEADER_B64
        );
    }

    #[test]
    fn options_are_split_like_postgres() {
        let got = client_settings(&pairs(&[
            ("application_name", "psql"),
            (
                "options",
                r"-c search_path=a,b --statement-timeout=5s -cwork_mem=1MB -c x.y=a\ b",
            ),
        ]))
        .expect("valid");
        assert_eq!(
            got,
            pairs(&[
                ("application_name", "psql"),
                ("search_path", "a,b"),
                ("statement_timeout", "5s"),
                ("work_mem", "1MB"),
                ("x.y", "a b"),
            ])
        );
    }

    #[test]
    fn identity_settings_are_refused() {
        for bad in [
            ("options", "-c pg_session_jwt.jwk={}"),
            ("role", "postgres"),
            ("options", "-c request.jwt.claims={}"),
            ("options", "-c session-authorization=postgres"),
            ("options", "-c request.jwt.claim.sub=bob"),
        ] {
            let e = client_settings(&pairs(&[bad])).expect_err("refused");
            assert!(
                matches!(e, ClientError::ForbiddenParameter(_)),
                "{bad:?}: {e:?}"
            );
        }
        assert!(client_settings(&pairs(&[("options", "-x")])).is_err());
    }

    #[test]
    fn only_settings_that_cannot_fail_allow_an_early_hand_over() {
        let mut params = ServerParams::default();
        params.set("client_encoding", "UTF8");
        let early = |settings: &[(&str, &str)]| can_hand_over_early(&params, &pairs(settings));
        assert!(early(&[]));
        assert!(early(&[("application_name", "pgbench")]));
        assert!(early(&[
            ("client_encoding", "UTF8"),
            ("application_name", "x")
        ]));
        assert!(!early(&[("client_encoding", "LATIN1")]));
        let long = "x".repeat(64);
        for refused in [
            ("application_name", "caf\u{e9}"),
            ("application_name", long.as_str()),
            ("application_name", "tab\there"),
            ("statement_timeout", "5s"),
            ("search_path", "public"),
        ] {
            assert!(!early(&[refused]), "{refused:?}");
        }
    }
}
