//! The accept loop: binds the listen address, builds the shared state
//! (issuer key sources, pool, cancel map) and serves each client in a task
//! of its own until told to shut down.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::auth::{self, Authenticator};
use crate::cancel::CancelMap;
use crate::config::{ClaimsMode, Config};
use crate::connection::{self, Shared};
use crate::upstream::pool::Pool;

/// A bound, not yet running proxy.
pub struct Proxy {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Validates what needs more than parsing, binds, and starts the JWKS
    /// fetches in the background (the proxy serves even if an issuer is down).
    pub async fn bind(config: Config) -> anyhow::Result<Proxy> {
        auth::install_crypto_provider();
        let auth = Authenticator::new(&config)?;
        let listener = TcpListener::bind(config.listen.addr).await?;
        auth.start();
        if config.claims.mode == ClaimsMode::Guc {
            warn!(
                "claims mode \"guc\": request.jwt.claims can be overwritten by any client \
                 that runs SQL; use pg_session_jwt where that matters"
            );
        }
        let pool = Pool::new(config.pool.max_per_role, config.pool.acquire_timeout);
        let shared = Arc::new(Shared {
            config: Arc::new(config),
            auth,
            pool,
            cancels: Arc::default(),
        });
        Ok(Proxy { listener, shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.shared.config.listen.addr)
    }

    pub fn cancels(&self) -> Arc<CancelMap> {
        self.shared.cancels.clone()
    }

    /// Whether at least one issuer has signing keys.
    pub fn has_keys(&self) -> bool {
        self.shared.auth.any_keys()
    }

    /// Serves clients until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        info!(addr = %self.local_addr(), "listening");
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(connection::handle(stream, peer, self.shared.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        info!("stopped accepting");
    }
}
