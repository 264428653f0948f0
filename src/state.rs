//! State shared by all connections: the reloadable part (config, issuers,
//! TLS) swapped as a whole on SIGHUP, and the parts that live as long as
//! the process (pool, cancel map, client count, shutdown signals).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::cancel::CancelMap;
use crate::config::Config;
use crate::upstream::pool::Pool;

/// How long a reload waits for new issuers' first JWKS fetch.
const RELOAD_KEY_WAIT: Duration = Duration::from_secs(5);

/// What a reload replaces. Connections keep the snapshot they started with.
pub struct State {
    pub config: Arc<Config>,
    pub auth: Arc<Authenticator>,
    /// Client-side TLS, when `[tls]` is configured.
    pub tls: Option<TlsAcceptor>,
    /// Upstream TLS, when `upstream.sslmode` is not disable.
    pub upstream_tls: Option<TlsConnector>,
}

impl State {
    /// Builds everything a config needs and starts its JWKS fetches.
    pub fn build(config: Config) -> anyhow::Result<State> {
        let auth = Authenticator::new(&config)?;
        let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        let upstream_tls = crate::tls::upstream_connector(
            config.upstream.sslmode,
            config.upstream.root_cert.as_deref(),
        )?;
        auth.start();
        Ok(State {
            config: Arc::new(config),
            auth: Arc::new(auth),
            tls,
            upstream_tls,
        })
    }

    /// Waits (bounded) until every issuer has keys, so a reload does not
    /// refuse tokens while the new key sources make their first fetch.
    pub async fn wait_for_keys(&self) {
        let deadline = tokio::time::Instant::now() + RELOAD_KEY_WAIT;
        while !self.auth.all_keys() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Everything connections share.
pub struct Shared {
    state: RwLock<Arc<State>>,
    pub pool: Pool,
    pub cancels: Arc<CancelMap>,
    /// Fired when the drain time after SIGTERM is over: open sessions close.
    pub close_sessions: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    clients: AtomicUsize,
    /// Unix seconds of the last time the upstream answered.
    upstream_ok_at: AtomicU64,
    /// The last upstream failure (unix seconds, reason), for readiness.
    upstream_failure: std::sync::Mutex<Option<(u64, String)>>,
}

impl Shared {
    pub fn new(state: State) -> Shared {
        Shared {
            pool: Pool::new(&state.config.pool),
            state: RwLock::new(Arc::new(state)),
            cancels: Arc::default(),
            close_sessions: CancellationToken::new(),
            tracker: TaskTracker::new(),
            clients: AtomicUsize::new(0),
            upstream_ok_at: AtomicU64::new(0),
            upstream_failure: std::sync::Mutex::new(None),
        }
    }

    /// The current snapshot.
    pub fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs a new snapshot; sessions already running keep theirs.
    pub fn replace(&self, state: State) {
        self.pool.reconfigure(&state.config.pool);
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
    }

    /// Counts a client in; `None` when `max_clients` are already served.
    pub fn admit(self: &Arc<Self>) -> Option<ClientSlot> {
        let max = self.state().config.listen.max_clients;
        let now = self.clients.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = ClientSlot(Arc::clone(self));
        (now <= max).then_some(slot)
    }

    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// Records that the upstream answered just now.
    pub fn upstream_answered(&self) {
        self.upstream_ok_at.store(unix_now(), Ordering::Release);
    }

    /// Records that logging in upstream failed (refused login, unreachable).
    pub fn upstream_failed(&self, why: &str) {
        let mut failure = self
            .upstream_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *failure = Some((unix_now(), why.to_owned()));
    }

    /// The last upstream failure, if it is more recent than the last success.
    pub fn upstream_failing(&self) -> Option<String> {
        let failure = self
            .upstream_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (at, why) = failure.as_ref()?;
        (*at >= self.upstream_ok_at.load(Ordering::Acquire)).then(|| why.clone())
    }

    /// Seconds since the upstream last answered (`None`: never).
    pub fn upstream_silence(&self) -> Option<u64> {
        match self.upstream_ok_at.load(Ordering::Acquire) {
            0 => None,
            at => Some(unix_now().saturating_sub(at)),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One admitted client; the count drops with it.
pub struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::AcqRel);
    }
}
