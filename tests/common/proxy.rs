//! The proxy in process for the hostile-input and fault tests: a config
//! built from a few knobs, bound on port 0, and raw-protocol helpers for
//! clients that misbehave on purpose (no real client would send these bytes).

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use rlsproxy::cancel::CancelMap;
use rlsproxy::config::Config;
use rlsproxy::listener::Proxy;
use rlsproxy::wire::{self, ErrorFields, WireError};

use super::{ANONYMOUS_PASSWORD, AUTHENTICATED_PASSWORD, DATABASE, JwksServer};

/// The audience every test issuer requires.
pub const AUDIENCE: &str = "app";

/// What a test may change in the proxy's config.
pub struct ProxyOptions {
    pub upstream_port: u16,
    pub max_per_role: usize,
    pub acquire_timeout: &'static str,
    pub connect_timeout: &'static str,
    /// Long by default: the hostile-startup test holds silent connections
    /// for its whole run and checks that the proxy still waits on them.
    pub startup_timeout: &'static str,
}

impl ProxyOptions {
    pub fn new(upstream_port: u16) -> ProxyOptions {
        ProxyOptions {
            upstream_port,
            max_per_role: 5,
            acquire_timeout: "5s",
            connect_timeout: "5s",
            startup_timeout: "120s",
        }
    }
}

/// A running proxy: its port and its cancel map (to count live keys).
pub struct TestProxy {
    pub port: u16,
    pub cancels: std::sync::Arc<CancelMap>,
}

impl TestProxy {
    /// Binds on port 0, waits until the issuer's keys are in, serves in a task.
    pub async fn start(jwks: &JwksServer, opts: ProxyOptions) -> TestProxy {
        let text = format!(
            r#"
            [listen]
            addr = "127.0.0.1:0"
            startup_timeout = "{startup}"
            [upstream]
            host = "127.0.0.1"
            port = {port}
            connect_timeout = "{connect}"
            [roles.authenticated]
            password = "{auth_pw}"
            [roles.anonymous]
            password = "{anon_pw}"
            requires_token = false
            [[issuers]]
            issuer = "{iss}"
            jwks_url = "{url}"
            audience = "{AUDIENCE}"
            [pool]
            max_per_role = {max}
            acquire_timeout = "{acquire}"
            "#,
            port = opts.upstream_port,
            connect = opts.connect_timeout,
            startup = opts.startup_timeout,
            auth_pw = AUTHENTICATED_PASSWORD,
            anon_pw = ANONYMOUS_PASSWORD,
            iss = jwks.issuer(),
            url = jwks.url(),
            max = opts.max_per_role,
            acquire = opts.acquire_timeout,
        );
        let config = Config::parse(&text, &|_| None).expect("valid test config");
        let proxy = Proxy::bind(config).await.expect("proxy binds");
        let port = proxy.local_addr().port();
        let cancels = proxy.cancels();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !proxy.has_keys() {
            assert!(
                Instant::now() < deadline,
                "the proxy never fetched the JWKS"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::spawn(proxy.run(std::future::pending()));
        TestProxy { port, cancels }
    }

    /// A tokio-postgres config for `role` through the proxy.
    pub fn config(&self, role: &str, password: Option<&str>) -> tokio_postgres::Config {
        super::client_config(self.port, role, password)
    }

    pub async fn connect(
        &self,
        role: &str,
        password: Option<&str>,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        super::connect(&self.config(role, password)).await
    }

    /// A raw TCP connection to the proxy.
    pub async fn raw(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to the proxy")
    }
}

/// A length-prefixed untyped packet (startup phase).
pub fn packet(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_i32(i32::try_from(body.len() + 4).expect("small packet"));
    out.extend_from_slice(body);
    out
}

/// A StartupMessage body with this version and parameters.
pub fn startup_body(version: i32, pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.put_i32(version);
    for (k, v) in pairs {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    body
}

/// A protocol 3.0 StartupMessage for `user` on the test database.
pub fn startup(user: &str) -> Vec<u8> {
    packet(&startup_body(
        wire::PROTOCOL_3_0,
        &[("user", user), ("database", DATABASE)],
    ))
}

/// A typed message.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.put_i32(i32::try_from(body.len() + 4).expect("small message"));
    out.extend_from_slice(body);
    out
}

/// A PasswordMessage carrying `token`.
pub fn password(token: &str) -> Vec<u8> {
    let mut body = token.as_bytes().to_vec();
    body.push(0);
    message(b'p', &body)
}

/// A simple Query.
pub fn query(sql: &str) -> Vec<u8> {
    let mut out = BytesMut::new();
    wire::query(&mut out, sql);
    out.to_vec()
}

/// What the proxy did with a connection within a deadline.
#[derive(Debug)]
pub enum Reply {
    /// An ErrorResponse (the first one seen).
    Error(ErrorFields),
    /// Another message, by tag.
    Message(u8, Vec<u8>),
    /// The proxy closed the connection (EOF or reset) without a message.
    Closed,
    /// Nothing arrived within the deadline and the connection is open.
    Silent,
}

/// Reads the next typed message, with a deadline.
pub async fn next_reply(stream: &mut TcpStream, within: Duration) -> Reply {
    match tokio::time::timeout(within, wire::read_typed(stream, 1 << 20)).await {
        Err(_) => Reply::Silent,
        Ok(Ok((b'E', body))) => Reply::Error(ErrorFields::parse(&body)),
        Ok(Ok((tag, body))) => Reply::Message(tag, body.to_vec()),
        Ok(Err(WireError::Closed | WireError::Io(_))) => Reply::Closed,
        Ok(Err(e)) => panic!("the proxy sent a malformed message: {e}"),
    }
}

/// Whether the proxy closes the connection within `within` (EOF or reset).
pub async fn closes_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Logs in with raw bytes: startup, then the token; returns at the
/// ReadyForQuery that ends the hand-over, with the BackendKeyData seen.
pub async fn raw_login(stream: &mut TcpStream, token: &str) -> (i32, i32) {
    stream
        .write_all(&startup("authenticated"))
        .await
        .expect("send startup");
    match next_reply(stream, Duration::from_secs(10)).await {
        Reply::Message(b'R', body) if body == 3i32.to_be_bytes() => {}
        other => panic!("expected a cleartext password request, got {other:?}"),
    }
    stream
        .write_all(&password(token))
        .await
        .expect("send token");
    let mut key = None;
    loop {
        match next_reply(stream, Duration::from_secs(10)).await {
            Reply::Message(b'K', body) => {
                let pid = i32::from_be_bytes(body[..4].try_into().expect("4 bytes"));
                let secret = i32::from_be_bytes(body[4..8].try_into().expect("4 bytes"));
                key = Some((pid, secret));
            }
            Reply::Message(b'Z', _) => return key.expect("BackendKeyData before ReadyForQuery"),
            Reply::Message(_, _) => {}
            other => panic!("login failed: {other:?}"),
        }
    }
}

/// Sends a CancelRequest for (pid, secret) and waits for the proxy to close.
pub async fn send_cancel(port: u16, pid: i32, secret: i32) {
    let mut body = Vec::new();
    body.put_i32(wire::CANCEL_REQUEST_CODE);
    body.put_i32(pid);
    body.put_i32(secret);
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect for cancel");
    stream.write_all(&packet(&body)).await.expect("send cancel");
    assert!(
        closes_within(&mut stream, Duration::from_secs(10)).await,
        "the proxy closes a cancel connection once it is forwarded"
    );
}

/// A real client logging in and querying in a loop while a test misbehaves
/// elsewhere; [`Steady::finish`] stops it and reports what went wrong.
pub struct Steady {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

/// Upper bound on the steady client's rounds, so it cannot run away.
const STEADY_MAX_ROUNDS: usize = 10_000;

impl Steady {
    /// Starts the loop: connect with `token`, check `auth.user_id()` is
    /// `sub`, disconnect, again.
    pub fn start(config: tokio_postgres::Config, sub: &str) -> Steady {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let sub = sub.to_owned();
        let task = tokio::spawn(async move {
            let (mut rounds, mut failures) = (0, Vec::new());
            while !flag.load(Ordering::SeqCst) && rounds < STEADY_MAX_ROUNDS {
                rounds += 1;
                let result = async {
                    let client = super::connect(&config).await?;
                    client.query_one("SELECT auth.user_id()", &[]).await
                };
                let outcome = tokio::time::timeout(Duration::from_secs(10), result).await;
                match outcome {
                    Ok(Ok(row)) if row.get::<_, String>(0) == sub => {}
                    Ok(Ok(row)) => failures.push(format!("wrong sub {}", row.get::<_, String>(0))),
                    Ok(Err(e)) => failures.push(super::describe(&e)),
                    Err(_) => failures.push("a valid client hung for 10 s".into()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (rounds, failures)
        });
        Steady { stop, task }
    }

    /// Stops the loop; panics unless it served at least once and never failed.
    pub async fn finish(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (rounds, failures) = self.task.await.expect("steady client task");
        assert!(
            failures.is_empty(),
            "a valid client failed meanwhile: {failures:?}"
        );
        assert!(rounds > 0, "the valid client never ran");
        rounds
    }
}

/// Panics anywhere in this test process since [`watch_panics`] was first
/// called. A panicking connection task only closes its socket (tokio
/// catches it), which a test would otherwise take for a deliberate close.
static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Installs (once) a panic hook that counts panics and keeps printing them.
pub fn watch_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// Panics counted so far (see [`watch_panics`]).
pub fn panics() -> usize {
    PANICS.load(std::sync::atomic::Ordering::SeqCst)
}
