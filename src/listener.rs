//! The accept loop and the process lifecycle: bind, serve each client in
//! its own task (within `max_clients`), reload on request, and on shutdown
//! stop accepting, let sessions drain for `shutdown_timeout`, then close
//! the rest with SQLSTATE 57P01.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::auth;
use crate::config::{ClaimsMode, Config};
use crate::connection;
use crate::state::{Shared, State};

/// How often idle upstream connections are checked for expiry.
const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// After the drain time, how long closing sessions may take.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// /readyz probes the upstream when it has not answered for this long.
const UPSTREAM_FRESHNESS: Duration = Duration::from_secs(10);

/// A bound, not yet running proxy.
pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

/// A cheap handle for reloads, readiness and tests.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl Proxy {
    /// Builds the shared state, binds, and starts the JWKS fetches in the
    /// background (the proxy serves even if an issuer is down, and says so).
    pub async fn bind(config: Config) -> anyhow::Result<Proxy> {
        auth::install_crypto_provider();
        let addr = config.listen.addr;
        warn_about(&config);
        let state = State::build(config)?;
        let listener = TcpListener::bind(addr).await?;
        let shared = Arc::new(Shared::new(state));
        tokio::spawn(reap(Arc::downgrade(&shared)));
        Ok(Proxy { listener, shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.shared.state().config.listen.addr)
    }

    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            shared: self.shared.clone(),
        }
    }

    /// The cancel-key map (tests inspect it).
    pub fn cancels(&self) -> Arc<crate::cancel::CancelMap> {
        self.shared.cancels.clone()
    }

    /// Whether at least one issuer has signing keys.
    pub fn has_keys(&self) -> bool {
        self.shared.state().auth.any_keys()
    }

    /// Serves clients until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        info!(addr = %self.local_addr(), "listening");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        let slot = self.shared.admit();
                        let task = connection::handle(stream, peer, self.shared.clone(), slot);
                        self.shared.tracker.spawn(task);
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        drop(self.listener);
        self.shared.tracker.close();
        let drain = self.shared.state().config.listen.shutdown_timeout;
        info!(sessions = self.shared.clients(), drain = ?drain, "stopped accepting; draining");
        if tokio::time::timeout(drain, self.shared.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = self.shared.clients(),
                "drain time over; closing open sessions"
            );
            self.shared.close_sessions.cancel();
            let _ = tokio::time::timeout(CLOSE_GRACE, self.shared.tracker.wait()).await;
        }
        info!("stopped");
    }
}

impl ProxyHandle {
    /// Replaces config, issuers, TLS certificates and pool limits; running
    /// sessions keep going. On error the old configuration stays.
    pub async fn reload(&self, config: Config) -> anyhow::Result<()> {
        let old = self.shared.state();
        if config.listen.addr != old.config.listen.addr {
            warn!("listen.addr changes take effect only after a restart");
        }
        warn_about(&config);
        let state = State::build(config)?;
        state.wait_for_keys().await;
        self.shared.replace(state);
        info!("configuration reloaded");
        Ok(())
    }

    /// Ready when an issuer has keys and the upstream answered recently
    /// (probed with a TCP connect when it has been quiet). The error says why not.
    pub async fn ready(&self) -> Result<(), String> {
        let state = self.shared.state();
        if !state.auth.any_keys() {
            return Err("no issuer has signing keys yet".into());
        }
        // A reachable server that refuses our logins cannot serve anyone.
        if let Some(why) = self.shared.upstream_failing() {
            return Err(format!("the last upstream login failed: {why}"));
        }
        let fresh = self
            .shared
            .upstream_silence()
            .is_some_and(|s| s < UPSTREAM_FRESHNESS.as_secs());
        if fresh {
            return Ok(());
        }
        let upstream = &state.config.upstream;
        let probe = tokio::net::TcpStream::connect((upstream.host.as_str(), upstream.port));
        match tokio::time::timeout(Duration::from_secs(1), probe).await {
            Ok(Ok(_)) => {
                self.shared.upstream_answered();
                Ok(())
            }
            _ => Err(format!(
                "upstream {}:{} is not answering",
                upstream.host, upstream.port
            )),
        }
    }

    /// Client connections now being served.
    pub fn clients(&self) -> usize {
        self.shared.clients()
    }

    /// Upstream pools kept, one per (database, role) logged in to.
    pub fn upstream_pools(&self) -> usize {
        self.shared.pool.pool_count()
    }
}

fn warn_about(config: &Config) {
    if config.claims.mode == ClaimsMode::Guc {
        warn!(
            "claims mode \"guc\": request.jwt.claims can be overwritten by any client \
             that runs SQL; use pg_session_jwt where that matters"
        );
    }
    if config.tls.is_none() && !config.listen.addr.ip().is_loopback() {
        warn!("listening beyond loopback without TLS: tokens would travel in clear text");
    }
}

/// Closes expired idle upstream connections until the proxy is gone.
async fn reap(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(REAP_INTERVAL).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.pool.reap();
    }
}
