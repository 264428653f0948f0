//! Session pooling of upstream connections per (database, role): at most
//! `max_per_role` connections, idle and in use together; a client waits up
//! to `acquire_timeout` for one. The pool does not know who asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ClientError;
use crate::upstream::connect::{LoginTarget, UpstreamConn, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no upstream connection became free within {waited:?} ({limit} per database and role)")]
    Timeout { waited: Duration, limit: usize },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl PoolError {
    pub fn to_client(&self, role: &str) -> ClientError {
        match self {
            PoolError::Timeout { .. } => ClientError::PoolTimeout(self.to_string()),
            PoolError::Upstream(e) => e.to_client(role),
        }
    }
}

/// One (database, role) pool.
struct RolePool {
    idle: Mutex<Vec<UpstreamConn>>,
    /// One permit per connection in use; idle ones hold none.
    in_use: Arc<Semaphore>,
}

/// A connection lent to one client session. Dropping it closes the
/// connection; [`Checkout::release`] returns it for reuse.
pub struct Checkout {
    pub conn: UpstreamConn,
    /// Whether the connection served an earlier session.
    pub reused: bool,
    pool: Arc<RolePool>,
    _permit: OwnedSemaphorePermit,
}

impl Checkout {
    /// Puts a clean connection back for the next session.
    pub fn release(self) {
        let Checkout {
            conn,
            pool,
            _permit,
            ..
        } = self;
        match pool.idle.lock() {
            Ok(mut idle) => idle.push(conn),
            Err(poisoned) => poisoned.into_inner().push(conn),
        }
    }
}

/// Every (database, role) pool of the proxy.
pub struct Pool {
    pools: Mutex<HashMap<(String, String), Arc<RolePool>>>,
    max_per_role: usize,
    acquire_timeout: Duration,
}

impl Pool {
    pub fn new(max_per_role: usize, acquire_timeout: Duration) -> Pool {
        Pool {
            pools: Mutex::default(),
            max_per_role,
            acquire_timeout,
        }
    }

    fn role_pool(&self, target: &LoginTarget) -> Arc<RolePool> {
        let key = (target.database.clone(), target.role.clone());
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(key)
            .or_insert_with(|| {
                Arc::new(RolePool {
                    idle: Mutex::default(),
                    in_use: Arc::new(Semaphore::new(self.max_per_role)),
                })
            })
            .clone()
    }

    /// Lends an idle connection or opens a new one, waiting for a free slot.
    pub async fn acquire(&self, target: &LoginTarget) -> Result<Checkout, PoolError> {
        let pool = self.role_pool(target);
        let permit =
            tokio::time::timeout(self.acquire_timeout, pool.in_use.clone().acquire_owned())
                .await
                .map_err(|_| PoolError::Timeout {
                    waited: self.acquire_timeout,
                    limit: self.max_per_role,
                })?
                .map_err(|_| PoolError::Timeout {
                    waited: Duration::ZERO,
                    limit: self.max_per_role,
                })?;

        loop {
            let candidate = pool.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(conn) = candidate else { break };
            // A server restart leaves closed sockets in the pool: never lend one.
            if conn.is_closed() {
                continue;
            }
            return Ok(Checkout {
                conn,
                reused: true,
                pool,
                _permit: permit,
            });
        }
        let conn = UpstreamConn::connect(target).await?;
        Ok(Checkout {
            conn,
            reused: false,
            pool,
            _permit: permit,
        })
    }

    /// Idle connections of one pool (for tests and metrics).
    pub fn idle_count(&self, database: &str, role: &str) -> usize {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .get(&(database.to_owned(), role.to_owned()))
            .map_or(0, |p| p.idle.lock().map_or(0, |i| i.len()))
    }
}
