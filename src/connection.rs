//! One client connection from first byte to close: startup, role and token,
//! upstream checkout and session set-up, hand-over, relay, release.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::auth::{Authenticator, VerifiedToken};
use crate::cancel::{BackendKey, CancelMap};
use crate::config::Config;
use crate::error::ClientError;
use crate::relay::{self, End};
use crate::session::{self, SessionSpec};
use crate::startup::{self, Startup, StartupError, StartupParams};
use crate::upstream::connect::{LoginTarget, UpstreamError};
use crate::upstream::pool::{Checkout, Pool};
use crate::wire::{self, WireError};

/// State shared by every connection.
pub struct Shared {
    pub config: Arc<Config>,
    pub auth: Authenticator,
    pub pool: Pool,
    pub cancels: Arc<CancelMap>,
}

static SESSION_IDS: AtomicU64 = AtomicU64::new(1);

/// Why a connection ended before or instead of relaying.
#[derive(Debug)]
enum Failure {
    /// Tell the client, then close.
    Refuse(ClientError),
    /// The client went away or sent bytes that merit no answer.
    Silent(WireError),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Refuse(e)
    }
}

impl From<StartupError> for Failure {
    fn from(e: StartupError) -> Self {
        match e {
            StartupError::Refused(e) => Failure::Refuse(e),
            StartupError::Wire(e) => wire_failure(e),
        }
    }
}

fn wire_failure(e: WireError) -> Failure {
    match e {
        WireError::Closed | WireError::Io(_) => Failure::Silent(e),
        WireError::BadLength { .. } | WireError::Malformed(_) => {
            Failure::Refuse(ClientError::Protocol(e.to_string()))
        }
    }
}

/// Serves one client connection to its end; never panics on client input.
pub async fn handle<S>(mut stream: S, peer: std::net::SocketAddr, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
    let span =
        info_span!("conn", %peer, session = id, role = field::Empty, sub_hash = field::Empty);
    async move {
        metrics::counter!("rlsproxy_client_connections_total").increment(1);
        metrics::gauge!("rlsproxy_client_connections_active").increment(1.0);
        if let Err(failure) = serve(&mut stream, &shared).await {
            match failure {
                Failure::Refuse(e) => {
                    metrics::counter!("rlsproxy_client_refusals_total", "reason" => e.kind())
                        .increment(1);
                    warn!(error = %e, kind = e.kind(), "client refused");
                    let _ = send_error(&mut stream, &e).await;
                }
                Failure::Silent(e) => debug!(error = %e, "client connection ended"),
            }
        }
        let _ = stream.shutdown().await;
        metrics::gauge!("rlsproxy_client_connections_active").decrement(1.0);
    }
    .instrument(span)
    .await
}

async fn send_error<S: AsyncWrite + Unpin>(stream: &mut S, e: &ClientError) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    e.fields().encode(&mut out);
    stream.write_all(&out).await?;
    stream.flush().await
}

async fn serve<S>(stream: &mut S, shared: &Shared) -> Result<(), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let params = match startup::negotiate(stream).await? {
        Startup::Cancel { pid, secret } => {
            shared.cancels.cancel(pid, secret).await;
            return Ok(());
        }
        Startup::Session(params) => params,
    };
    Span::current().record("role", params.user.as_str());

    // Refuse unknown roles before any token work.
    let role = shared
        .config
        .roles
        .get(&params.user)
        .ok_or_else(|| ClientError::UnknownRole(params.user.clone()))?;
    let settings = session::client_settings(&params.params)?;
    let token = if role.requires_token {
        let max = shared.config.auth.max_token_bytes;
        Some(authenticate(stream, &shared.auth, max, &params.user).await?)
    } else {
        None
    };
    if let Some(t) = &token {
        Span::current().record("sub_hash", t.sub_hash());
        debug!(kid = t.kid.as_deref(), iss = %t.issuer, role = %t.role, "token accepted");
    }
    // The issuer's rules may serve the token as another role (anonymous users).
    let role_name = token
        .as_ref()
        .map_or(params.user.as_str(), |t| t.role.as_str());
    let role = match shared.config.roles.get(role_name) {
        Some(r) => r,
        None => return Err(ClientError::UnknownRole(role_name.to_owned()).into()),
    };

    let target = LoginTarget {
        host: shared.config.upstream.host.clone(),
        port: shared.config.upstream.port,
        database: params.database.clone(),
        role: role_name.to_owned(),
        password: role.password.clone(),
        claims_mode: shared.config.claims.mode,
        connect_timeout: shared.config.upstream.connect_timeout,
    };
    let spec = SessionSpec {
        role: role_name,
        claims: token.as_ref().map(|t| &t.claims),
        mode: shared.config.claims.mode,
        params: &params.params,
    };
    let checkout = start_session(shared, &target, &spec, &settings).await?;
    relay_session(stream, shared, checkout, &params).await
}

/// Asks for the password and verifies it as a JWT.
async fn authenticate<S>(
    stream: &mut S,
    auth: &Authenticator,
    max_token_bytes: usize,
    role: &str,
) -> Result<Arc<VerifiedToken>, Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::new();
    wire::authentication(&mut out, wire::AUTH_CLEARTEXT_PASSWORD);
    stream
        .write_all(&out)
        .await
        .map_err(|e| Failure::Silent(e.into()))?;

    // Room for the token, its NUL and the length word; a longer message is
    // refused from its length alone, before the body is read.
    let limit = max_token_bytes + 5;
    let (tag, body) = match wire::read_typed(stream, limit).await {
        Ok(m) => m,
        Err(WireError::BadLength { len, .. }) if len > limit as i64 => {
            let len = usize::try_from(len - 5).unwrap_or(usize::MAX);
            let e = crate::auth::verify::TokenError::TooLarge {
                len,
                max: max_token_bytes,
            };
            return Err(refuse_token(e));
        }
        Err(e) => return Err(wire_failure(e)),
    };
    if tag != b'p' {
        return Err(ClientError::Protocol(format!(
            "expected a password message, got message type {:?}",
            tag as char
        ))
        .into());
    }
    let token = wire::Reader::new(&body).cstr().map_err(wire_failure)?;
    if token.is_empty() {
        return Err(ClientError::MissingToken(
            "no token: this role needs a JWT as the password".into(),
        )
        .into());
    }
    auth.verify(token.trim(), role).await.map_err(refuse_token)
}

fn refuse_token(e: crate::auth::verify::TokenError) -> Failure {
    metrics::counter!("rlsproxy_tokens_refused_total", "reason" => e.reason()).increment(1);
    Failure::Refuse(ClientError::InvalidToken(e.to_string()))
}

/// Checks out an upstream connection and sets the session up on it. A
/// reused connection that fails at the transport level is replaced once.
async fn start_session(
    shared: &Shared,
    target: &LoginTarget,
    spec: &SessionSpec<'_>,
    settings: &[(String, String)],
) -> Result<Checkout, Failure> {
    for attempt in 0..2 {
        let mut checkout = shared
            .pool
            .acquire(target)
            .await
            .map_err(|e| e.to_client(&target.role))?;
        match session::begin(&mut checkout.conn, spec, settings).await {
            Ok(()) => return Ok(checkout),
            Err(UpstreamError::Server(f)) => {
                // The connection is dropped (closed): its claims state is unknown.
                return Err(session_error(f).into());
            }
            Err(e) if checkout.reused && attempt == 0 => {
                debug!(error = %e, "pooled connection failed at set-up; opening a new one");
            }
            Err(e) => return Err(e.to_client(&target.role).into()),
        }
    }
    Err(ClientError::UpstreamUnavailable("could not set up an upstream session".into()).into())
}

/// A setting the client asked for that Postgres refused keeps its own
/// SQLSTATE; anything else failed in the claims set-up.
fn session_error(f: wire::ErrorFields) -> ClientError {
    const SETTING_ERRORS: &[&str] = &["42704", "22023", "42501", "55P02", "22P02"];
    if SETTING_ERRORS.contains(&f.code.as_str()) {
        ClientError::Upstream(f)
    } else {
        ClientError::SessionSetup(format!(
            "the session's claims were refused upstream: {}",
            f.message
        ))
    }
}

async fn relay_session<S>(
    stream: &mut S,
    shared: &Shared,
    mut checkout: Checkout,
    params: &StartupParams,
) -> Result<(), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let conn = &mut checkout.conn;
    let registration = shared.cancels.register(BackendKey {
        addr: conn.addr,
        pid: conn.backend_pid,
        secret: conn.backend_secret,
    });

    let mut out = BytesMut::with_capacity(512);
    wire::authentication(&mut out, wire::AUTH_OK);
    for (name, value) in &conn.params {
        wire::parameter_status(&mut out, name, value);
    }
    wire::backend_key_data(&mut out, registration.pid, registration.secret);
    wire::ready_for_query(&mut out, conn.tx_status);
    if let Err(e) = stream.write_all(&out).await {
        registration.detach().await;
        return Err(Failure::Silent(e.into()));
    }

    let outcome = relay::relay(stream, &mut conn.stream, &mut conn.buf).await;
    registration.detach().await;
    conn.tx_status = outcome.tx_status;
    metrics::counter!("rlsproxy_bytes_relayed_total", "direction" => "client_to_upstream")
        .increment(outcome.bytes_from_client);
    metrics::counter!("rlsproxy_bytes_relayed_total", "direction" => "upstream_to_client")
        .increment(outcome.bytes_from_upstream);
    metrics::histogram!("rlsproxy_session_duration_seconds").record(started.elapsed());
    info!(
        database = %params.database,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_in = outcome.bytes_from_client,
        bytes_out = outcome.bytes_from_upstream,
        end = ?outcome.end,
        "session ended"
    );

    if outcome.end == End::UpstreamClosed && outcome.client_at_boundary {
        let e = ClientError::UpstreamUnavailable("the upstream connection was lost".into());
        let _ = send_error(stream, &e).await;
    }
    if outcome.idle {
        match session::reset(&mut checkout.conn).await {
            Ok(()) => checkout.release(),
            Err(e) => debug!(error = %e, "reset failed; upstream connection closed"),
        }
    }
    Ok(())
}
