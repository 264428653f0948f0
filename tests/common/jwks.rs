//! A loopback issuer: serves a JWKS (and an OIDC discovery document) whose
//! keys, status, latency and body a test can change while it runs, and
//! counts how often it was asked. Plain http, or https with a certificate
//! the test supplies.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::TestKey;
use rlsproxy::config::TlsConfig;

/// How the JWKS endpoint answers its next requests.
#[derive(Clone, Debug, Default)]
pub enum Behaviour {
    /// 200 with the current keys.
    #[default]
    Normal,
    /// This status with an empty body.
    Status(u16),
    /// Wait this long, then answer as `Normal`.
    Delay(Duration),
    /// 200 with this body verbatim (malformed JSON, odd keys).
    Body(String),
    /// 302 to this location.
    Redirect(String),
}

/// A JWKS server on `127.0.0.1:<random port>`; stops when dropped.
pub struct JwksServer {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    issuer: String,
    keys: Mutex<Vec<Value>>,
    behaviour: Mutex<Behaviour>,
    cache_control: Mutex<Option<String>>,
    /// `jwks_uri` of the discovery document; None: this server's own.
    jwks_uri: Mutex<Option<String>>,
    jwks_fetches: AtomicUsize,
    discovery_fetches: AtomicUsize,
}

impl JwksServer {
    /// Starts with an empty key set. Needs a tokio runtime; the server runs
    /// on the caller's runtime.
    pub async fn start() -> Self {
        let (listener, addr) = bind().await;
        let shared = Shared::new(format!("http://{addr}"));
        let router = router(&shared);
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("JWKS server");
        });
        Self { shared, task }
    }

    /// Like [`JwksServer::start`], over TLS with this PEM certificate
    /// chain and key; its URLs are `https://127.0.0.1:<port>/...`.
    pub async fn start_tls(cert: &Path, key: &Path) -> Self {
        let config = TlsConfig {
            cert: cert.to_owned(),
            key: key.to_owned(),
            require: None,
        };
        let acceptor = rlsproxy::tls::acceptor(&config).expect("TLS acceptor");
        let (tcp, addr) = bind().await;
        let shared = Shared::new(format!("https://{addr}"));
        let router = router(&shared);
        let listener = TlsListener { tcp, acceptor };
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.expect("JWKS server");
        });
        Self { shared, task }
    }

    /// Starts serving the public halves of `keys`.
    pub async fn with_keys(keys: &[&TestKey]) -> Self {
        let server = Self::start().await;
        server.set_keys(keys);
        server
    }

    /// The issuer's base URL (`http://127.0.0.1:<port>`), no trailing slash.
    pub fn issuer(&self) -> String {
        self.shared.issuer.clone()
    }

    /// The JWKS URL.
    pub fn url(&self) -> String {
        format!("{}/jwks.json", self.issuer())
    }

    /// Publishes the public JWKs of `keys`, replacing the previous set.
    pub fn set_keys(&self, keys: &[&TestKey]) {
        self.set_jwks(keys.iter().map(|k| k.jwk()).collect());
    }

    /// Publishes these JWKs verbatim (for keys a test crafts by hand).
    pub fn set_jwks(&self, jwks: Vec<Value>) {
        *self.shared.keys.lock().expect("keys lock") = jwks;
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.shared.behaviour.lock().expect("behaviour lock") = behaviour;
    }

    /// Sends this `Cache-Control` value on every JWKS answer (None: no header).
    pub fn set_cache_control(&self, value: Option<&str>) {
        *self
            .shared
            .cache_control
            .lock()
            .expect("cache-control lock") = value.map(str::to_owned);
    }

    /// Makes the discovery document name this `jwks_uri` (None: our own).
    pub fn set_discovery_jwks_uri(&self, uri: Option<&str>) {
        *self.shared.jwks_uri.lock().expect("jwks_uri lock") = uri.map(str::to_owned);
    }

    /// Requests to the JWKS URL so far, whatever was answered.
    pub fn fetch_count(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Requests to the discovery document so far.
    pub fn discovery_count(&self) -> usize {
        self.shared.discovery_fetches.load(Ordering::SeqCst)
    }
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind JWKS");
    let addr = listener.local_addr().expect("JWKS address");
    (listener, addr)
}

impl Shared {
    fn new(issuer: String) -> Arc<Shared> {
        Arc::new(Shared {
            issuer,
            keys: Mutex::default(),
            behaviour: Mutex::default(),
            cache_control: Mutex::default(),
            jwks_uri: Mutex::default(),
            jwks_fetches: AtomicUsize::default(),
            discovery_fetches: AtomicUsize::default(),
        })
    }
}

fn router(shared: &Arc<Shared>) -> Router {
    Router::new()
        .route("/jwks.json", get(jwks))
        .route("/.well-known/openid-configuration", get(discovery))
        .with_state(shared.clone())
}

/// Accepts TCP connections and completes the TLS handshake, one at a time
/// (enough for tests); a client that fails the handshake is dropped.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn jwks(State(shared): State<Arc<Shared>>) -> Response {
    shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);

    let behaviour = shared.behaviour.lock().expect("behaviour lock").clone();
    let (status, body) = match behaviour {
        Behaviour::Normal => (StatusCode::OK, current_jwks(&shared)),
        Behaviour::Delay(delay) => {
            tokio::time::sleep(delay).await;
            (StatusCode::OK, current_jwks(&shared))
        }
        Behaviour::Status(code) => {
            let status = StatusCode::from_u16(code).expect("valid HTTP status");
            (status, String::new())
        }
        Behaviour::Body(body) => (StatusCode::OK, body),
        Behaviour::Redirect(location) => {
            return (StatusCode::FOUND, [(header::LOCATION, location)]).into_response();
        }
    };

    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(value) = shared
        .cache_control
        .lock()
        .expect("cache-control lock")
        .as_deref()
    {
        let value = HeaderValue::from_str(value).expect("valid Cache-Control value");
        headers.insert(header::CACHE_CONTROL, value);
    }
    (status, headers, body).into_response()
}

fn current_jwks(shared: &Shared) -> String {
    let keys = shared.keys.lock().expect("keys lock").clone();
    json!({ "keys": keys }).to_string()
}

async fn discovery(State(shared): State<Arc<Shared>>) -> Response {
    shared.discovery_fetches.fetch_add(1, Ordering::SeqCst);

    let issuer = &shared.issuer;
    let jwks_uri = shared.jwks_uri.lock().expect("jwks_uri lock").clone();
    let jwks_uri = jwks_uri.unwrap_or_else(|| format!("{issuer}/jwks.json"));
    let body = json!({ "issuer": issuer, "jwks_uri": jwks_uri });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
