//! One client connection from first byte to close: startup (and TLS),
//! role and token, upstream checkout and session set-up, hand-over, relay,
//! release.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use crate::auth::verify::TokenError;
use crate::auth::{Authenticator, VerifiedToken};
use crate::cancel::{self, BackendKey, Registration};
use crate::error::ClientError;
use crate::prefetch::Prefetched;
use crate::relay::{self, End};
use crate::session::{self, SessionSpec};
use crate::startup::{self, Encryption, Startup, StartupError, StartupParams};
use crate::state::{ClientSlot, Shared, State};
use crate::upstream::connect::{LoginTarget, UpstreamError};
use crate::upstream::pool::Checkout;
use crate::wire::{self, WireError};

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

/// What one connection works with.
struct Ctx<'a> {
    shared: &'a Shared,
    state: &'a State,
    /// Start-up and authentication must be over by then.
    deadline: Instant,
    /// Counted under `max_clients`; if not, refuse once we can speak.
    admitted: bool,
}

/// Serves one client connection to its end; never panics on client input.
pub async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: Option<ClientSlot>,
) {
    let id = SESSION_IDS.fetch_add(1, Ordering::Relaxed);
    let span =
        info_span!("conn", %peer, session = id, role = field::Empty, sub_hash = field::Empty);
    async move {
        metrics::counter!("rlsproxy_client_connections_total").increment(1);
        metrics::gauge!("rlsproxy_client_connections_active").increment(1.0);
        // Boxed: start-up, authentication and set-up are over before the
        // relay, and an idle session's task should not keep room for them.
        let established = Box::pin(establish(tcp, &shared, slot.is_some())).await;
        if let Some(session) = established {
            relay_session(session, &shared).await;
        }
        drop(slot);
        metrics::gauge!("rlsproxy_client_connections_active").decrement(1.0);
    }
    .instrument(span)
    .await
}

/// The client's socket, plain or TLS, once start-up is over.
type ClientStream = Either<Prefetched<TcpStream>, Box<Prefetched<TlsStream<TcpStream>>>>;

/// A client handed over to its upstream session, ready to relay.
struct Established {
    stream: ClientStream,
    checkout: Checkout,
    registration: Registration,
    database: String,
}

/// From the first byte to the hand-over. `None`: the connection ended
/// (refused, cancel request, client gone), and the client was told why.
/// Boxed, so the caller keeps a pointer rather than a second copy of it.
async fn establish(tcp: TcpStream, shared: &Shared, admitted: bool) -> Option<Box<Established>> {
    let state = shared.state();
    let deadline = Instant::now() + state.config.listen.startup_timeout;
    let ctx = Ctx {
        shared,
        state: &state,
        deadline,
        admitted,
    };
    accept(tcp, ctx).await.map(Box::new)
}

/// The plaintext start: answers SSLRequest, upgrades to TLS if asked.
async fn accept(tcp: TcpStream, ctx: Ctx<'_>) -> Option<Established> {
    let mut tcp = Prefetched::new(tcp);
    let encryption = if ctx.state.tls.is_some() {
        Encryption::Offered
    } else {
        Encryption::Unavailable
    };
    let Ok(first) = timeout_at(ctx.deadline, startup::negotiate(&mut tcp, encryption)).await else {
        debug!("client did not finish start-up in time");
        return None;
    };
    match first {
        Ok(Startup::TlsRequested) => {
            // Bytes already waiting were sent before our answer, in clear
            // text: taking them as part of the TLS session would let an
            // attacker inject them (CVE-2021-3935 in PgBouncer).
            if tcp.has_buffered() || has_unread_bytes(tcp.get_ref()) {
                let e = ClientError::Protocol("received unencrypted data after SSLRequest".into());
                report(&mut tcp, Failure::Refuse(e)).await;
                return None;
            }
            let acceptor = ctx.state.tls.clone()?;
            tcp.write_all(b"S").await.ok()?;
            // Boxed: the handshake and TLS state would otherwise size the
            // future of every connection, plaintext ones included.
            Box::pin(accept_tls(tcp.into_inner(), acceptor, ctx)).await
        }
        Ok(Startup::Session(params)) => {
            if ctx.state.config.tls_required() {
                // Refused before the password is asked for: the token
                // would otherwise cross the network in clear text.
                report(&mut tcp, Failure::Refuse(ClientError::TlsRequired)).await;
                return None;
            }
            let (checkout, registration) = finish(&mut tcp, &params, ctx).await?;
            Some(Established {
                stream: Either::Left(tcp),
                checkout,
                registration,
                database: params.database,
            })
        }
        Ok(Startup::Cancel { pid, secret }) => {
            ctx.shared.cancels.cancel(pid, secret).await;
            None
        }
        Err(e) => {
            report(&mut tcp, e.into()).await;
            None
        }
    }
}

async fn accept_tls(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    ctx: Ctx<'_>,
) -> Option<Established> {
    // A failed handshake is closed silently: there is no channel left to
    // speak to the client on.
    let tls = match timeout_at(ctx.deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(error = %e, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            debug!("TLS handshake timed out");
            return None;
        }
    };
    let mut tls = Box::new(Prefetched::new(tls));
    match timeout_at(
        ctx.deadline,
        startup::negotiate(&mut tls, Encryption::Established),
    )
    .await
    {
        Ok(Ok(Startup::Session(params))) => {
            let (checkout, registration) = finish(&mut tls, &params, ctx).await?;
            Some(Established {
                stream: Either::Right(tls),
                checkout,
                registration,
                database: params.database,
            })
        }
        Ok(Ok(Startup::Cancel { pid, secret })) => {
            ctx.shared.cancels.cancel(pid, secret).await;
            None
        }
        Ok(Ok(Startup::TlsRequested)) => None,
        Ok(Err(e)) => {
            report(&mut tls, e.into()).await;
            None
        }
        Err(_) => {
            debug!("client did not finish start-up in time");
            None
        }
    }
}

fn has_unread_bytes(tcp: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut probe);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    matches!(tcp.poll_peek(&mut cx, &mut buf), std::task::Poll::Ready(Ok(n)) if n > 0)
}

/// Serves the start-up to the hand-over; a refusal is reported and the
/// connection closed here.
async fn finish<S>(
    stream: &mut S,
    params: &StartupParams,
    ctx: Ctx<'_>,
) -> Option<(Checkout, Registration)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match serve(stream, params, &ctx).await {
        Ok(session) => Some(session),
        Err(failure) => {
            report(stream, failure).await;
            let _ = stream.shutdown().await;
            None
        }
    }
}

async fn report<S: AsyncWrite + Unpin>(stream: &mut S, failure: Failure) {
    match failure {
        Failure::Refuse(e) => {
            metrics::counter!("rlsproxy_client_refusals_total", "reason" => e.kind()).increment(1);
            // Debug-formatted: the message may quote client input (a role
            // name), and escaping keeps it from forging log lines.
            warn!(error = ?e.to_string(), kind = e.kind(), "client refused");
            let _ = send_error(stream, &e).await;
        }
        Failure::Silent(e) => debug!(error = %e, "client connection ended"),
    }
}

async fn send_error<S: AsyncWrite + Unpin>(stream: &mut S, e: &ClientError) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    e.fields().encode(&mut out);
    stream.write_all(&out).await?;
    stream.flush().await
}

async fn serve<S>(
    stream: &mut S,
    params: &StartupParams,
    ctx: &Ctx<'_>,
) -> Result<(Checkout, Registration), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = &ctx.state.config;
    if !ctx.admitted {
        return Err(ClientError::TooManyClients(config.listen.max_clients).into());
    }
    Span::current().record("role", params.user.as_str());

    // Refuse unknown roles before any token work.
    let role = config
        .roles
        .get(&params.user)
        .ok_or_else(|| ClientError::UnknownRole(params.user.clone()))?;
    let settings = session::client_settings(&params.params)?;
    let token = if role.requires_token {
        let max = config.auth.max_token_bytes;
        // Boxed, like the session set-up below: a state that ends before
        // the relay should not size the future an idle session keeps.
        let auth = Box::pin(authenticate(stream, &ctx.state.auth, max, &params.user));
        let verified = timeout_at(ctx.deadline, auth)
            .await
            .map_err(|_| ClientError::StartupTimeout(config.listen.startup_timeout))??;
        Span::current().record("sub_hash", verified.sub_hash());
        let (kid, role) = (verified.kid.as_deref(), verified.role.as_str());
        debug!(kid, iss = %verified.issuer, role, "token accepted");
        Some(verified)
    } else {
        None
    };
    // The issuer's rules may serve the token as another role (anonymous users).
    let role_name = token
        .as_ref()
        .map_or(params.user.as_str(), |t| t.role.as_str());
    let role = match config.roles.get(role_name) {
        Some(r) => r,
        None => return Err(ClientError::UnknownRole(role_name.to_owned()).into()),
    };

    let target = LoginTarget {
        host: config.upstream.host.clone(),
        port: config.upstream.port,
        database: params.database.clone(),
        role: role_name.to_owned(),
        password: role.password.clone(),
        claims_mode: config.claims.mode,
        connect_timeout: config.upstream.connect_timeout,
        tls: ctx.state.upstream_tls.clone(),
    };
    let spec = SessionSpec {
        role: role_name,
        claims: token.as_ref().map(|t| &t.claims),
        mode: config.claims.mode,
        params: &params.params,
    };
    let start = SessionStart {
        shared: ctx.shared,
        target,
        spec,
        settings: &settings,
    };
    let (checkout, pending) = start.noted(Box::pin(start.open(true)).await)?;
    Box::pin(hand_over(stream, &start, checkout, pending)).await
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
            return Err(refuse_token(TokenError::TooLarge {
                len,
                max: max_token_bytes,
            }));
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

fn refuse_token(e: TokenError) -> Failure {
    metrics::counter!("rlsproxy_tokens_refused_total", "reason" => e.reason()).increment(1);
    Failure::Refuse(ClientError::InvalidToken(e.to_string()))
}

/// Where and how one client's session is set up upstream.
struct SessionStart<'a> {
    shared: &'a Shared,
    target: LoginTarget,
    spec: SessionSpec<'a>,
    settings: &'a [(String, String)],
}

impl SessionStart<'_> {
    /// Checks out an upstream connection and sends the session set-up. If
    /// `allow_early` and the settings allow it, the reply is left for
    /// [`confirm`](Self::confirm) (the `bool` says so), otherwise awaited
    /// here. A reused connection that fails at the transport level is
    /// replaced once.
    async fn open(&self, allow_early: bool) -> Result<(Checkout, bool), Failure> {
        for attempt in 0..2 {
            let mut checkout = self
                .shared
                .pool
                .acquire(&self.target)
                .await
                .map_err(|e| e.to_client(&self.target.role))?;
            let early =
                allow_early && session::can_hand_over_early(&checkout.conn.params, self.settings);
            let result =
                match session::send_setup(&mut checkout.conn, &self.spec, self.settings).await {
                    Ok(()) if early => return Ok((checkout, true)),
                    Ok(()) => checkout.conn.read_until_ready().await,
                    Err(e) => Err(e),
                };
            match result {
                Ok(()) => return Ok((checkout, false)),
                Err(e) if checkout.reused && attempt == 0 && !is_server_error(&e) => {
                    debug!(error = %e, "pooled connection failed at set-up; opening a new one");
                }
                // The connection is dropped (closed): its claims state is unknown.
                Err(e) => return Err(self.failure(e)),
            }
        }
        Err(ClientError::UpstreamUnavailable("could not set up an upstream session".into()).into())
    }

    /// Reads the reply to a set-up [`open`](Self::open) sent early. Nothing
    /// of the client's is relayed before it is in and clean.
    async fn confirm(&self, mut checkout: Checkout) -> Result<Checkout, Failure> {
        match checkout.conn.read_until_ready().await {
            Ok(()) => Ok(checkout),
            Err(e) if checkout.reused && !is_server_error(&e) => {
                debug!(error = %e, "pooled connection failed at set-up; opening a new one");
                drop(checkout);
                Ok(self.open(false).await?.0)
            }
            Err(e) => Err(self.failure(e)),
        }
    }

    fn failure(&self, e: UpstreamError) -> Failure {
        match e {
            UpstreamError::Server(f) => session_error(f).into(),
            e => e.to_client(&self.target.role).into(),
        }
    }

    /// Keeps the proxy's view of upstream health current.
    fn noted<T>(&self, result: Result<T, Failure>) -> Result<T, Failure> {
        match &result {
            Ok(_) => self.shared.upstream_answered(),
            Err(Failure::Refuse(e @ ClientError::UpstreamUnavailable(_))) => {
                self.shared.upstream_failed(&e.to_string());
            }
            Err(_) => {}
        }
        result
    }
}

fn is_server_error(e: &UpstreamError) -> bool {
    matches!(e, UpstreamError::Server(_))
}

fn backend_of(checkout: &Checkout) -> BackendKey {
    BackendKey {
        addr: checkout.conn.addr,
        pid: checkout.conn.backend_pid,
        secret: checkout.conn.backend_secret,
    }
}

/// A setting the client asked for that Postgres refused keeps its own
/// SQLSTATE; anything else failed in the claims set-up.
fn session_error(f: wire::ErrorFields) -> ClientError {
    const SETTING_ERRORS: &[&str] = &["42704", "42602", "22023", "42501", "55P02", "22P02"];
    if SETTING_ERRORS.contains(&f.code.as_str()) {
        ClientError::Upstream(f)
    } else {
        ClientError::SessionSetup(format!(
            "the session's claims were refused upstream: {}",
            f.message
        ))
    }
}

/// Hands the session over: `AuthenticationOk`, the server's parameters, a
/// cancel key of the proxy's, `ReadyForQuery`. With `pending` the set-up
/// reply is still to come: the client's first query waits in its socket
/// until that reply is in and clean.
async fn hand_over<S>(
    stream: &mut S,
    start: &SessionStart<'_>,
    mut checkout: Checkout,
    pending: bool,
) -> Result<(Checkout, Registration), Failure>
where
    S: AsyncWrite + Unpin,
{
    let first_backend = backend_of(&checkout);
    let registration = start.shared.cancels.register(first_backend);

    let mut out = BytesMut::with_capacity(512);
    wire::authentication(&mut out, wire::AUTH_OK);
    if pending {
        // What the set-up reply will report (see `can_hand_over_early`).
        for (name, value) in start.settings {
            checkout.conn.params.set(name, value);
        }
    }
    checkout.conn.params.encode(&mut out);
    wire::backend_key_data(&mut out, registration.pid, registration.secret);
    wire::ready_for_query(&mut out, checkout.conn.tx_status);
    if let Err(e) = stream.write_all(&out).await {
        registration.detach().await;
        return Err(Failure::Silent(e.into()));
    }
    if pending {
        checkout = match start.noted(start.confirm(checkout).await) {
            Ok(c) => c,
            Err(f) => {
                registration.detach().await;
                return Err(f);
            }
        };
        let backend = backend_of(&checkout);
        if (backend.addr, backend.pid) != (first_backend.addr, first_backend.pid) {
            registration.retarget(backend).await;
        }
    }
    Ok((checkout, registration))
}

/// Relays a handed-over session to its end, then resets the upstream
/// connection for reuse if it ended clean.
async fn relay_session(session: Box<Established>, shared: &Shared) {
    let Established {
        mut stream,
        mut checkout,
        registration,
        database,
    } = *session;
    let stream = &mut stream;
    let started = std::time::Instant::now();
    let conn = &mut checkout.conn;
    let closing = shared.close_sessions.cancelled();
    let outcome = relay::relay(stream, &mut conn.stream, &mut conn.buf, closing).await;
    registration.detach().await;
    checkout.conn.tx_status = outcome.tx_status;
    if !outcome.idle && outcome.end != End::UpstreamClosed {
        cancel::cancel_abandoned(backend_of(&checkout));
    }
    metrics::counter!("rlsproxy_bytes_relayed_total", "direction" => "client_to_upstream")
        .increment(outcome.bytes_from_client);
    metrics::counter!("rlsproxy_bytes_relayed_total", "direction" => "upstream_to_client")
        .increment(outcome.bytes_from_upstream);
    metrics::histogram!("rlsproxy_session_duration_seconds").record(started.elapsed());
    info!(
        database = %database,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_in = outcome.bytes_from_client,
        bytes_out = outcome.bytes_from_upstream,
        end = ?outcome.end,
        "session ended"
    );

    // An error message may only follow whole messages, or it would corrupt
    // the client's view of the stream.
    let notice = match outcome.end {
        End::UpstreamClosed => Some(ClientError::UpstreamUnavailable(
            "the upstream connection was lost".into(),
        )),
        End::Shutdown => Some(ClientError::ShuttingDown),
        _ => None,
    };
    if let Some(e) = notice.filter(|_| outcome.client_at_boundary) {
        let _ = send_error(stream, &e).await;
    }
    let _ = stream.shutdown().await;
    if outcome.idle {
        match session::reset(&mut checkout.conn).await {
            Ok(()) => checkout.release(),
            Err(e) => debug!(error = %e, "reset failed; upstream connection closed"),
        }
    }
}
