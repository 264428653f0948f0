//! JWT parsing and the claims policy: the token's structure, its algorithm
//! against the allow-list, and `exp`/`nbf`/`iat`/`iss`/`aud`/`sub` with the
//! issuer's leeway. Signature math happens in `jwks`; nothing here does I/O.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::Value;

use crate::auth::claims::Claims;

/// Why a token was refused; the message reaches the client as is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    #[error("token is {len} bytes, more than the {max} allowed")]
    TooLarge { len: usize, max: usize },
    #[error("password is not a JWT: {0}")]
    Malformed(&'static str),
    #[error("token algorithm \"{0}\" is not accepted")]
    AlgorithmNotAllowed(String),
    #[error("token header has a \"crit\" extension, which is not supported")]
    CriticalHeader,
    #[error("token has no \"iss\" claim")]
    MissingIssuer,
    #[error("token issuer \"{0}\" is not trusted")]
    UntrustedIssuer(String),
    #[error("no signing keys are available yet for issuer \"{0}\"")]
    NoKeys(String),
    #[error("unknown key id \"{kid}\" for issuer \"{issuer}\"")]
    UnknownKid { kid: String, issuer: String },
    #[error("no key of issuer \"{issuer}\" fits algorithm {alg:?}")]
    NoFittingKey { issuer: String, alg: Algorithm },
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has no \"{0}\" claim")]
    MissingClaim(&'static str),
    #[error("token claim \"{claim}\" must be {expected}")]
    ClaimType {
        claim: &'static str,
        expected: &'static str,
    },
    #[error("token expired at {}", rfc3339(*.0))]
    Expired(f64),
    #[error("token is not valid before {}", rfc3339(*.0))]
    NotYetValid(f64),
    #[error("token was issued in the future ({})", rfc3339(*.0))]
    IssuedInFuture(f64),
    #[error("token audience {got} is not accepted (expected one of {expected:?})")]
    WrongAudience { got: String, expected: Vec<String> },
    #[error("token has no \"aud\" claim, but audience {0:?} is required")]
    MissingAudience(Vec<String>),
    #[error("tokens of issuer \"{issuer}\" may not log in as role \"{role}\"")]
    RoleNotAllowed { issuer: String, role: String },
    #[error("tokens of anonymous users of issuer \"{0}\" are not accepted")]
    AnonymousUser(String),
    #[error(
        "token is ambiguous about being an anonymous user: \"is_anonymous\" is {is_anonymous} \
         but \"aud\" {aud}"
    )]
    AnonymousMarkersDisagree { is_anonymous: bool, aud: String },
}

impl TokenError {
    /// A short stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::TooLarge { .. } => "too_large",
            TokenError::Malformed(_) => "malformed",
            TokenError::AlgorithmNotAllowed(_) => "algorithm",
            TokenError::CriticalHeader => "crit",
            TokenError::MissingIssuer | TokenError::UntrustedIssuer(_) => "issuer",
            TokenError::NoKeys(_) => "no_keys",
            TokenError::UnknownKid { .. } => "unknown_kid",
            TokenError::NoFittingKey { .. } => "no_fitting_key",
            TokenError::BadSignature => "signature",
            TokenError::MissingClaim(_) | TokenError::ClaimType { .. } => "claims",
            TokenError::Expired(_) => "expired",
            TokenError::NotYetValid(_) | TokenError::IssuedInFuture(_) => "not_yet_valid",
            TokenError::WrongAudience { .. } | TokenError::MissingAudience(_) => "audience",
            TokenError::RoleNotAllowed { .. } => "role",
            TokenError::AnonymousUser(_) | TokenError::AnonymousMarkersDisagree { .. } => {
                "anonymous_user"
            }
        }
    }
}

fn rfc3339(t: f64) -> String {
    if !(0.0..=253_402_300_799.0).contains(&t) {
        return format!("{t}");
    }
    let at = UNIX_EPOCH + Duration::from_secs_f64(t);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The decoded header fields the proxy acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub alg: Algorithm,
    pub kid: Option<String>,
}

/// A structurally valid, not yet verified token.
#[derive(Debug)]
pub struct UnverifiedToken<'a> {
    pub header: Header,
    pub claims: Claims,
    /// `header.payload`, the bytes the signature covers.
    pub signing_input: &'a str,
    /// The signature bytes, decoded from base64url.
    pub signature: Vec<u8>,
}

/// Maps a JOSE `alg` to one we accept. `none` and HMAC are never accepted:
/// a JWKS holds public keys, and an HMAC "key" made of one is a known forgery.
pub fn allowed_algorithm(alg: &str) -> Option<Algorithm> {
    Some(match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" | "Ed25519" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Splits and decodes a compact JWS; checks structure only.
pub fn parse(token: &str) -> Result<UnverifiedToken<'_>, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    let signing_input = &token[..h.len() + 1 + p.len()];

    let header = decode_header(h)?;
    if header.crit.is_some() {
        return Err(TokenError::CriticalHeader);
    }
    let alg = match header.alg {
        Some(Value::String(alg)) => {
            allowed_algorithm(&alg).ok_or(TokenError::AlgorithmNotAllowed(alg))?
        }
        _ => return Err(TokenError::Malformed("header has no \"alg\" string")),
    };
    let kid = match header.kid {
        None => None,
        Some(Value::String(kid)) => Some(kid),
        Some(_) => return Err(TokenError::Malformed("header \"kid\" is not a string")),
    };
    let claims = decode_payload(p)?;
    let signature = match URL_SAFE_NO_PAD.decode(s) {
        Ok(sig) if !sig.is_empty() => sig,
        _ => return Err(TokenError::Malformed("signature is not base64url")),
    };
    Ok(UnverifiedToken {
        header: Header { alg, kid },
        claims,
        signing_input,
        signature,
    })
}

/// The header fields the proxy reads; every other member is ignored.
/// Typed rather than a map: the header is decoded on every verification.
#[derive(serde::Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    kid: Option<Value>,
    crit: Option<serde::de::IgnoredAny>,
}

/// Decodes the header, on the stack when it is of the usual size.
fn decode_header(part: &str) -> Result<RawHeader, TokenError> {
    const NOT_BASE64: TokenError = TokenError::Malformed("header is not base64url");
    const NOT_JSON: TokenError = TokenError::Malformed("header is not a JSON object");
    let mut stack = [0u8; 256];
    let heap;
    let bytes = match URL_SAFE_NO_PAD.decode_slice(part, &mut stack) {
        Ok(n) => &stack[..n],
        Err(base64::DecodeSliceError::OutputSliceTooSmall) => {
            heap = URL_SAFE_NO_PAD.decode(part).map_err(|_| NOT_BASE64)?;
            &heap[..]
        }
        Err(_) => return Err(NOT_BASE64),
    };
    serde_json::from_slice(bytes).map_err(|_| NOT_JSON)
}

fn decode_payload(part: &str) -> Result<Claims, TokenError> {
    const NOT_JSON: TokenError = TokenError::Malformed("payload is not a JSON object");
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
    let text = String::from_utf8(bytes).map_err(|_| NOT_JSON)?;
    Claims::from_json(text).map_err(|_| NOT_JSON)
}

/// What an issuer requires of a token's claims.
#[derive(Debug, Clone)]
pub struct ClaimsPolicy {
    pub issuer: String,
    pub audience: Vec<String>,
    pub leeway: Duration,
    pub require_exp: bool,
}

/// Seconds since the epoch, as a float like NumericDate.
pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The time checks alone; they run again on every verified-token cache hit.
pub fn check_times(claims: &Claims, policy: &ClaimsPolicy, now: f64) -> Result<(), TokenError> {
    let leeway = policy.leeway.as_secs_f64();
    match numeric_date(claims, "exp")? {
        Some(exp) if now > exp + leeway => return Err(TokenError::Expired(exp)),
        Some(_) => {}
        None if policy.require_exp => return Err(TokenError::MissingClaim("exp")),
        None => {}
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && now + leeway < nbf
    {
        return Err(TokenError::NotYetValid(nbf));
    }
    if let Some(iat) = numeric_date(claims, "iat")?
        && now + leeway < iat
    {
        return Err(TokenError::IssuedInFuture(iat));
    }
    Ok(())
}

/// Every claims check: times, issuer, audience, subject.
pub fn check_claims(claims: &Claims, policy: &ClaimsPolicy, now: f64) -> Result<(), TokenError> {
    check_times(claims, policy, now)?;

    match claims.get("iss") {
        Some(Value::String(iss)) if *iss == policy.issuer => {}
        Some(Value::String(iss)) => return Err(TokenError::UntrustedIssuer(iss.clone())),
        Some(_) => {
            return Err(TokenError::ClaimType {
                claim: "iss",
                expected: "a string",
            });
        }
        None => {}
    }

    if !policy.audience.is_empty() {
        let accepted = |a: &str| policy.audience.iter().any(|x| x == a);
        let ok = match claims.get("aud") {
            None | Some(Value::Null) => {
                return Err(TokenError::MissingAudience(policy.audience.clone()));
            }
            Some(Value::String(a)) => accepted(a),
            Some(Value::Array(items)) => items.iter().any(|v| v.as_str().is_some_and(accepted)),
            Some(_) => {
                return Err(TokenError::ClaimType {
                    claim: "aud",
                    expected: "a string or an array of strings",
                });
            }
        };
        if !ok {
            let got = claims.get("aud").map(Value::to_string).unwrap_or_default();
            return Err(TokenError::WrongAudience {
                got,
                expected: policy.audience.clone(),
            });
        }
    }

    match claims.get("sub") {
        // An empty subject would make every such token the same user.
        Some(Value::String(sub)) if sub.is_empty() => Err(TokenError::ClaimType {
            claim: "sub",
            expected: "a non-empty string",
        }),
        Some(Value::String(_)) => Ok(()),
        Some(_) => Err(TokenError::ClaimType {
            claim: "sub",
            expected: "a string",
        }),
        None => Err(TokenError::MissingClaim("sub")),
    }
}

/// Suffix Stack Auth gives the `aud` of its anonymous users' tokens.
const ANONYMOUS_AUD_SUFFIX: &str = ":anon";

/// Whether the token belongs to an anonymous user. Two markers exist:
/// `is_anonymous: true` and an `aud` ending in `:anon` (Stack Auth sets
/// both). When both are present they must agree, so that a token cannot
/// pass as a regular user's by carrying only one of them.
pub fn is_anonymous_user(claims: &Claims) -> Result<bool, TokenError> {
    let flag = match claims.get("is_anonymous") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(TokenError::ClaimType {
                claim: "is_anonymous",
                expected: "a boolean",
            });
        }
    };
    let anon_aud = |v: &Value| {
        v.as_str()
            .is_some_and(|a| a.ends_with(ANONYMOUS_AUD_SUFFIX))
    };
    let aud = match claims.get("aud") {
        Some(Value::String(a)) => Some(a.ends_with(ANONYMOUS_AUD_SUFFIX)),
        Some(Value::Array(items)) if !items.is_empty() => Some(items.iter().any(anon_aud)),
        _ => None,
    };
    match (flag, aud) {
        (Some(f), Some(a)) if f != a => Err(TokenError::AnonymousMarkersDisagree {
            is_anonymous: f,
            aud: if a {
                "marks an anonymous user".into()
            } else {
                "does not end in \":anon\"".into()
            },
        }),
        (Some(f), _) => Ok(f),
        (None, Some(a)) => Ok(a),
        (None, None) => Ok(false),
    }
}

/// A NumericDate claim: a JSON number (integer or float). Strings are refused,
/// not skipped, so a token cannot dodge `exp` by quoting it.
fn numeric_date(claims: &Claims, name: &'static str) -> Result<Option<f64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t.is_finite() => Ok(Some(t)),
            _ => Err(TokenError::ClaimType {
                claim: name,
                expected: "a number",
            }),
        },
        Some(_) => Err(TokenError::ClaimType {
            claim: name,
            expected: "a number",
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn policy() -> ClaimsPolicy {
        ClaimsPolicy {
            issuer: "https://iss".into(),
            audience: vec!["app".into()],
            leeway: Duration::from_secs(30),
            require_exp: true,
        }
    }

    fn claims(v: Value) -> Claims {
        Claims::from_json(v.to_string()).expect("object")
    }

    fn token(header: Value, payload: Value) -> String {
        let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.c2ln", enc(&header), enc(&payload))
    }

    const NOW: f64 = 1_800_000_000.0;

    fn good() -> Value {
        json!({"iss": "https://iss", "aud": "app", "sub": "alice", "exp": NOW + 60.0, "iat": NOW})
    }

    #[test]
    fn a_good_token_passes() {
        check_claims(&claims(good()), &policy(), NOW).expect("valid");
    }

    #[test]
    fn each_claim_failure_names_its_check() {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"exp": NOW - 31.0}), "token expired at"),
            (json!({"exp": "1900000000"}), "\"exp\" must be a number"),
            (json!({"nbf": NOW + 31.0}), "not valid before"),
            (json!({"iat": NOW + 31.0}), "issued in the future"),
            (
                json!({"iss": "https://evil"}),
                "issuer \"https://evil\" is not trusted",
            ),
            (
                json!({"aud": "other"}),
                "audience \"other\" is not accepted",
            ),
            (
                json!({"aud": ["x", "y"]}),
                "audience [\"x\",\"y\"] is not accepted",
            ),
            (json!({"aud": null}), "no \"aud\" claim"),
            (json!({"sub": 7}), "\"sub\" must be a string"),
            (json!({"sub": null}), "\"sub\" must be a string"),
            (json!({"sub": ""}), "\"sub\" must be a non-empty string"),
        ];
        for (patch, expected) in cases {
            let mut v = good();
            for (k, value) in patch.as_object().expect("object") {
                v[k] = value.clone();
            }
            let e = check_claims(&claims(v), &policy(), NOW)
                .expect_err(expected)
                .to_string();
            assert!(e.contains(expected), "{e} should contain {expected}");
        }
    }

    #[test]
    fn missing_exp_and_sub_are_refused() {
        for name in ["exp", "sub"] {
            let mut v = good();
            v.as_object_mut().expect("object").remove(name);
            assert_eq!(
                check_claims(&claims(v), &policy(), NOW),
                Err(TokenError::MissingClaim(name))
            );
        }
    }

    #[test]
    fn leeway_and_float_dates_are_accepted() {
        let mut v = good();
        v["exp"] = json!(NOW - 29.5);
        v["nbf"] = json!(NOW + 29.0);
        v["aud"] = json!(["other", "app"]);
        check_claims(&claims(v), &policy(), NOW).expect("within leeway");
    }

    #[test]
    fn parse_refuses_bad_structure() {
        let cases = [
            ("a.b", "three"),
            ("a.b.c.d", "three"),
            ("", "three"),
            ("!!.e30.c2ln", "header is not base64url"),
            (
                &token(json!({"alg": "none"}), good()),
                "\"none\" is not accepted",
            ),
            (
                &token(json!({"alg": "HS256"}), good()),
                "\"HS256\" is not accepted",
            ),
            (&token(json!({"typ": "JWT"}), good()), "no \"alg\""),
            (
                &token(json!({"alg": "ES256", "crit": ["b64"]}), good()),
                "crit",
            ),
            (
                &token(json!({"alg": "ES256", "kid": 5}), good()),
                "\"kid\" is not a string",
            ),
            (
                &token(json!({"alg": "ES256"}), json!([1])),
                "payload is not a JSON object",
            ),
        ];
        for (t, expected) in cases {
            let e = parse(t).expect_err(expected).to_string();
            assert!(e.contains(expected), "{e} should contain {expected}");
        }
    }

    #[test]
    fn padded_base64_is_refused() {
        let t = token(json!({"alg": "ES256"}), good());
        let mut parts: Vec<String> = t.split('.').map(str::to_owned).collect();
        parts[1].push('=');
        assert!(parse(&parts.join(".")).is_err());
    }

    #[test]
    fn parse_keeps_signing_input_and_kid() {
        let t = token(json!({"alg": "EdDSA", "kid": "k1"}), good());
        let u = parse(&t).expect("valid");
        assert_eq!(
            u.header,
            Header {
                alg: Algorithm::EdDSA,
                kid: Some("k1".into())
            }
        );
        let sig = URL_SAFE_NO_PAD.encode(&u.signature);
        assert_eq!(format!("{}.{sig}", u.signing_input), t);
        assert_eq!(u.claims.get("sub"), Some(&Value::from("alice")));
    }

    #[test]
    fn anonymous_user_markers() {
        let cases = [
            (json!({"is_anonymous": true, "aud": "proj:anon"}), Ok(true)),
            (json!({"aud": "proj:anon"}), Ok(true)),
            (json!({"aud": ["x", "proj:anon"]}), Ok(true)),
            (json!({"is_anonymous": true}), Ok(true)),
            (json!({"is_anonymous": false, "aud": "proj"}), Ok(false)),
            (json!({"aud": "proj"}), Ok(false)),
            (json!({}), Ok(false)),
            (
                json!({"is_anonymous": false, "aud": "proj:anon"}),
                Err("ambiguous"),
            ),
            (
                json!({"is_anonymous": true, "aud": "proj"}),
                Err("ambiguous"),
            ),
            (json!({"is_anonymous": "yes"}), Err("must be a boolean")),
        ];
        for (c, expected) in cases {
            match (is_anonymous_user(&claims(c.clone())), expected) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{c}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{c}: {e}"),
                (got, want) => panic!("{c}: got {got:?}, want {want:?}"),
            }
        }
    }
}
