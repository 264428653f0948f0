//! Opening an upstream connection: TCP, the StartupMessage carrying this
//! connection's public JWK, login as the target role itself (trust,
//! cleartext, md5 or SCRAM-SHA-256), then `auth.init()`.

use std::net::SocketAddr;
use std::time::Duration;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::ClaimsMode;
use crate::error::ClientError;
use crate::upstream::params::ServerParams;
use crate::upstream::stream::UpstreamStream;
use crate::wire::{self, ErrorFields, Reader, WireError};

/// Largest message accepted from the upstream during login and session set-up.
const MAX_SETUP_MESSAGE_BYTES: usize = 1 << 20;
/// Read size while the proxy itself talks to the server (login, set-up, reset).
const SETUP_READ_BYTES: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the upstream server: {0}")]
    Connect(std::io::Error),
    #[error("the upstream server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream server error: {}", .0.message)]
    Server(ErrorFields),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream asks for unsupported authentication method {0}")]
    UnsupportedAuth(i32),
    #[error("role has no upstream password configured, but the server asks for one")]
    NoPassword,
    #[error("upstream i/o: {0}")]
    Wire(#[from] WireError),
    #[error("key generation failed")]
    Crypto,
    #[error("the upstream server does not accept TLS (sslmode requires it)")]
    TlsRefused,
    #[error("TLS handshake with the upstream server failed: {0}")]
    Tls(std::io::Error),
}

impl UpstreamError {
    /// What the client is told; the proxy's own credentials stay out of it.
    pub fn to_client(&self, role: &str) -> ClientError {
        match self {
            UpstreamError::Server(f) if f.code.starts_with("28") => {
                ClientError::UpstreamUnavailable(format!(
                    "the upstream server refused the proxy's login for role \"{role}\""
                ))
            }
            UpstreamError::Server(f) if f.code.starts_with("57P") || f.code.starts_with("53") => {
                ClientError::UpstreamUnavailable(format!(
                    "upstream server unavailable: {}",
                    f.message
                ))
            }
            UpstreamError::Server(f) => ClientError::Upstream(f.clone()),
            UpstreamError::NoPassword => ClientError::UpstreamUnavailable(format!(
                "the upstream server wants a password for role \"{role}\" and none is configured"
            )),
            other => ClientError::UpstreamUnavailable(other.to_string()),
        }
    }
}

/// Where and how to log in upstream.
#[derive(Clone)]
pub struct LoginTarget {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub role: String,
    pub password: Option<String>,
    pub claims_mode: ClaimsMode,
    pub connect_timeout: Duration,
    /// TLS to the upstream (sslmode require or verify-full).
    pub tls: Option<tokio_rustls::TlsConnector>,
}

/// The per-connection signing key whose public half the backend trusts.
pub struct SessionKey {
    pair: Ed25519KeyPair,
    /// Last `jti` used; pg_session_jwt demands strictly increasing values.
    pub last_jti: i64,
}

impl SessionKey {
    pub fn generate() -> Result<SessionKey, UpstreamError> {
        let pair = Ed25519KeyPair::generate().map_err(|_| UpstreamError::Crypto)?;
        Ok(SessionKey { pair, last_jti: 0 })
    }

    /// The public key as compact JWK JSON (no spaces: `options` splits on them).
    pub fn public_jwk(&self) -> String {
        let x = URL_SAFE_NO_PAD.encode(self.pair.public_key().as_ref());
        format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#)
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

/// A logged-in upstream connection, idle at a message boundary.
pub struct UpstreamConn {
    pub stream: UpstreamStream,
    /// Bytes read past the last parsed message.
    pub buf: BytesMut,
    /// ParameterStatus values reported by the server.
    pub params: ServerParams,
    pub backend_pid: i32,
    pub backend_secret: i32,
    pub addr: SocketAddr,
    pub key: SessionKey,
    pub created_at: Instant,
    /// Transaction status from the last ReadyForQuery.
    pub tx_status: u8,
}

impl UpstreamConn {
    /// Connects and logs in within `target.connect_timeout`.
    pub async fn connect(target: &LoginTarget) -> Result<UpstreamConn, UpstreamError> {
        tokio::time::timeout(target.connect_timeout, Self::connect_inner(target))
            .await
            .map_err(|_| UpstreamError::Timeout(target.connect_timeout))?
    }

    async fn connect_inner(target: &LoginTarget) -> Result<UpstreamConn, UpstreamError> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(UpstreamError::Connect)?;
        tcp.set_nodelay(true).map_err(UpstreamError::Connect)?;
        let addr = tcp.peer_addr().map_err(UpstreamError::Connect)?;
        let stream = match &target.tls {
            None => UpstreamStream::Plain(tcp),
            Some(connector) => {
                UpstreamStream::Tls(Box::new(start_tls(tcp, connector, &target.host).await?))
            }
        };
        let key = SessionKey::generate()?;
        let mut conn = UpstreamConn {
            stream,
            buf: BytesMut::new(),
            params: ServerParams::default(),
            backend_pid: 0,
            backend_secret: 0,
            addr,
            key,
            created_at: Instant::now(),
            tx_status: b'I',
        };

        let mut out = BytesMut::new();
        startup_message(&mut out, target, &conn.key);
        conn.stream.write_all(&out).await.map_err(WireError::Io)?;
        conn.authenticate(target).await?;
        conn.read_until_ready().await?;

        if target.claims_mode == ClaimsMode::PgSessionJwt {
            let mut out = BytesMut::new();
            wire::query(&mut out, "SELECT auth.init()");
            conn.stream.write_all(&out).await.map_err(WireError::Io)?;
            conn.read_until_ready().await?;
        }
        Ok(conn)
    }

    async fn authenticate(&mut self, target: &LoginTarget) -> Result<(), UpstreamError> {
        let password = || target.password.as_deref().ok_or(UpstreamError::NoPassword);
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.read_message().await?;
            if tag == b'E' {
                return Err(UpstreamError::Server(ErrorFields::parse(&body)));
            }
            if tag != b'R' {
                return Err(UpstreamError::Protocol(format!(
                    "unexpected message {:?}",
                    tag as char
                )));
            }
            let mut r = Reader::new(&body);
            let mut out = BytesMut::new();
            match r.i32()? {
                0 => return Ok(()),
                3 => password_message(&mut out, password()?.as_bytes()),
                5 => {
                    let salt: [u8; 4] = r
                        .bytes(4)?
                        .try_into()
                        .map_err(|_| WireError::Malformed("salt"))?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        target.role.as_bytes(),
                        password()?.as_bytes(),
                        salt,
                    );
                    password_message(&mut out, hash.as_bytes());
                }
                10 => {
                    let mut offers_scram = false;
                    while let Ok(m) = r.cstr() {
                        offers_scram |= m == SCRAM_SHA_256;
                        if m.is_empty() {
                            break;
                        }
                    }
                    if !offers_scram {
                        return Err(UpstreamError::Protocol("no SCRAM-SHA-256 offered".into()));
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    sasl_initial_response(&mut out, s.message());
                    scram = Some(s);
                }
                11 => {
                    let s = scram
                        .as_mut()
                        .ok_or(UpstreamError::Protocol("SASL out of order".into()))?;
                    s.update(r.rest())
                        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                    let at = wire::begin(&mut out, b'p');
                    out.put_slice(s.message());
                    wire::finish(&mut out, at);
                }
                12 => {
                    let s = scram
                        .as_mut()
                        .ok_or(UpstreamError::Protocol("SASL out of order".into()))?;
                    s.finish(r.rest())
                        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                    continue;
                }
                other => return Err(UpstreamError::UnsupportedAuth(other)),
            }
            self.stream.write_all(&out).await.map_err(WireError::Io)?;
        }
    }

    /// Reads messages until ReadyForQuery, keeping ParameterStatus and
    /// BackendKeyData; the first ErrorResponse is returned after the
    /// ReadyForQuery that ends its command (or at once if the server closes).
    pub async fn read_until_ready(&mut self) -> Result<(), UpstreamError> {
        self.read_until_ready_n(1).await
    }

    /// As [`read_until_ready`](Self::read_until_ready), for `n` ReadyForQuery messages.
    pub async fn read_until_ready_n(&mut self, mut n: usize) -> Result<(), UpstreamError> {
        let mut first_error = None;
        while n > 0 {
            let (tag, body) = match self.read_message().await {
                Ok(m) => m,
                Err(e) => return Err(first_error.map_or(e, UpstreamError::Server)),
            };
            let mut r = Reader::new(&body);
            match tag {
                b'Z' => {
                    self.tx_status = r.u8()?;
                    n -= 1;
                }
                b'E' => {
                    first_error.get_or_insert(ErrorFields::parse(&body));
                }
                b'S' => {
                    let name = r.cstr()?;
                    let value = r.cstr()?;
                    self.params.set(name, value);
                }
                b'K' => {
                    self.backend_pid = r.i32()?;
                    self.backend_secret = r.i32()?;
                }
                // Command results and notices of set-up statements are not the client's.
                _ => {}
            }
        }
        first_error.map_or(Ok(()), |f| Err(UpstreamError::Server(f)))
    }

    pub async fn read_message(&mut self) -> Result<(u8, Bytes), UpstreamError> {
        loop {
            if let Some(m) = wire::split_typed(&mut self.buf, MAX_SETUP_MESSAGE_BYTES)? {
                return Ok(m);
            }
            // Room for a whole set-up reply in one read (it comes in one
            // segment), not just what an empty buffer happens to hold.
            self.buf.reserve(SETUP_READ_BYTES);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(WireError::Io)?;
            if n == 0 {
                return Err(WireError::Closed.into());
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| WireError::Io(e).into())
    }

    /// Whether the server has closed this idle connection (e.g. it restarted).
    pub fn is_closed(&self) -> bool {
        self.stream.is_closed()
    }
}

/// SSLRequest, then the TLS handshake if the server answers `S`.
async fn start_tls(
    mut tcp: TcpStream,
    connector: &tokio_rustls::TlsConnector,
    host: &str,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
    let mut request = BytesMut::with_capacity(8);
    request.put_i32(8);
    request.put_i32(wire::SSL_REQUEST_CODE);
    tcp.write_all(&request).await.map_err(WireError::Io)?;
    if tcp.read_u8().await.map_err(WireError::Io)? != b'S' {
        return Err(UpstreamError::TlsRefused);
    }
    let name = crate::tls::server_name(host).ok_or_else(|| {
        UpstreamError::Protocol(format!("{host:?} is not a valid TLS server name"))
    })?;
    connector
        .connect(name, tcp)
        .await
        .map_err(UpstreamError::Tls)
}

fn startup_message(out: &mut BytesMut, target: &LoginTarget, key: &SessionKey) {
    let at = out.len();
    out.put_i32(0);
    out.put_i32(wire::PROTOCOL_3_0);
    let mut pair = |k: &str, v: &str| {
        wire::put_cstr(out, k);
        wire::put_cstr(out, v);
    };
    pair("user", &target.role);
    pair("database", &target.database);
    pair("application_name", "rlsproxy");
    if target.claims_mode == ClaimsMode::PgSessionJwt {
        // Only the startup packet can set this: a client that runs SQL on
        // this connection later cannot swap in a key of its own.
        pair(
            "options",
            &format!("-c pg_session_jwt.jwk={}", key.public_jwk()),
        );
    }
    out.put_u8(0);
    let len = i32::try_from(out.len() - at).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn password_message(out: &mut BytesMut, password: &[u8]) {
    let at = wire::begin(out, b'p');
    out.put_slice(password);
    out.put_u8(0);
    wire::finish(out, at);
}

fn sasl_initial_response(out: &mut BytesMut, first: &[u8]) {
    let at = wire::begin(out, b'p');
    wire::put_cstr(out, SCRAM_SHA_256);
    out.put_i32(i32::try_from(first.len()).unwrap_or(i32::MAX));
    out.put_slice(first);
    wire::finish(out, at);
}
