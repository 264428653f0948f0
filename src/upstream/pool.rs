//! Session pooling of upstream connections per (database, role): at most
//! `max_per_role` connections in use, a client waits up to
//! `acquire_timeout` for one, idle ones are closed after `idle_timeout` and
//! none is reused past `max_lifetime`. The pool does not know who asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::PoolConfig;
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

struct Idle {
    conn: UpstreamConn,
    since: Instant,
}

/// One (database, role) pool.
struct RolePool {
    database: String,
    role: String,
    idle: Mutex<Vec<Idle>>,
    /// `rlsproxy_pool_{idle,in_use}_connections` for this pool, registered
    /// once its first connection logged in: a name nobody can log in to
    /// (a mistyped database) adds no series.
    gauges: std::sync::OnceLock<(metrics::Gauge, metrics::Gauge)>,
    /// One permit per connection in use; idle ones hold none.
    in_use: Arc<Semaphore>,
    /// The limit `in_use` was sized for; changed on reload.
    limit: Mutex<usize>,
}

impl RolePool {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new(target: &LoginTarget, limit: usize) -> RolePool {
        RolePool {
            database: target.database.clone(),
            role: target.role.clone(),
            idle: Mutex::default(),
            gauges: std::sync::OnceLock::new(),
            in_use: Arc::new(Semaphore::new(limit)),
            limit: Mutex::new(limit),
        }
    }

    fn limit(&self) -> usize {
        *self.limit.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Updates the gauges, registering them on a pool's first login.
    fn report(&self, logged_in: bool) {
        let gauges = if logged_in {
            Some(self.gauges.get_or_init(|| {
                let labels = [
                    ("database", self.database.clone()),
                    ("role", self.role.clone()),
                ];
                (
                    metrics::gauge!("rlsproxy_pool_idle_connections", &labels),
                    metrics::gauge!("rlsproxy_pool_in_use_connections", &labels),
                )
            }))
        } else {
            self.gauges.get()
        };
        if let Some((idle, in_use)) = gauges {
            idle.set(self.idle().len() as f64);
            in_use.set(self.limit().saturating_sub(self.in_use.available_permits()) as f64);
        }
    }

    /// Grows or shrinks the number of connections that may be in use.
    fn resize(self: &Arc<Self>, new_limit: usize) {
        let mut limit = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::replace(&mut *limit, new_limit);
        drop(limit);
        if new_limit > old {
            self.in_use.add_permits(new_limit - old);
        } else if new_limit < old {
            // Shrink as connections come back: take the surplus permits
            // when they free up and never return them.
            let surplus = u32::try_from(old - new_limit).unwrap_or(u32::MAX);
            let sem = self.in_use.clone();
            tokio::spawn(async move {
                if let Ok(p) = sem.acquire_many_owned(surplus).await {
                    p.forget();
                }
            });
        }
    }
}

/// A connection lent to one client session. Dropping it closes the
/// connection; [`Checkout::release`] returns it for reuse.
pub struct Checkout {
    pub conn: UpstreamConn,
    /// Whether the connection served an earlier session.
    pub reused: bool,
    pool: Arc<RolePool>,
    max_lifetime: Duration,
    _permit: OwnedSemaphorePermit,
}

impl Checkout {
    /// Puts a clean connection back for the next session, unless it is too old.
    pub fn release(self) {
        let Checkout {
            conn,
            pool,
            max_lifetime,
            _permit,
            ..
        } = self;
        if conn.created_at.elapsed() < max_lifetime {
            pool.idle().push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        drop(_permit);
        pool.report(false);
    }
}

/// Every (database, role) pool of the proxy.
pub struct Pool {
    pools: Mutex<HashMap<(String, String), Arc<RolePool>>>,
    settings: Mutex<PoolConfig>,
}

impl Pool {
    pub fn new(settings: &PoolConfig) -> Pool {
        Pool {
            pools: Mutex::default(),
            settings: Mutex::new(settings.clone()),
        }
    }

    fn settings(&self) -> PoolConfig {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies new limits (on reload); connections in use are not touched.
    pub fn reconfigure(&self, settings: &PoolConfig) {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings.clone();
        for pool in self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            pool.resize(settings.max_per_role);
        }
    }

    fn role_pool(&self, target: &LoginTarget, limit: usize) -> Arc<RolePool> {
        let key = (target.database.clone(), target.role.clone());
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .entry(key)
            .or_insert_with(|| Arc::new(RolePool::new(target, limit)))
            .clone()
    }

    /// Lends an idle connection or opens a new one, waiting for a free slot.
    pub async fn acquire(&self, target: &LoginTarget) -> Result<Checkout, PoolError> {
        let settings = self.settings();
        let pool = self.role_pool(target, settings.max_per_role);
        let started = Instant::now();
        let waited = tokio::time::timeout(
            settings.acquire_timeout,
            pool.in_use.clone().acquire_owned(),
        );
        let timeout = || PoolError::Timeout {
            waited: settings.acquire_timeout,
            limit: settings.max_per_role,
        };
        let permit = waited
            .await
            .map_err(|_| timeout())?
            .map_err(|_| timeout())?;
        metrics::histogram!("rlsproxy_pool_wait_seconds").record(started.elapsed());

        loop {
            let candidate = pool.idle().pop();
            let Some(Idle { conn, .. }) = candidate else {
                break;
            };
            // A server restart leaves closed sockets in the pool: never lend one.
            if conn.is_closed() || conn.created_at.elapsed() >= settings.max_lifetime {
                continue;
            }
            let checkout = Checkout {
                conn,
                reused: true,
                pool,
                max_lifetime: settings.max_lifetime,
                _permit: permit,
            };
            checkout.pool.report(true);
            return Ok(checkout);
        }
        let conn = match UpstreamConn::connect(target).await {
            Ok(conn) => conn,
            Err(e) => {
                drop(permit);
                self.forget_if_unused(pool);
                return Err(e.into());
            }
        };
        let checkout = Checkout {
            conn,
            reused: false,
            pool,
            max_lifetime: settings.max_lifetime,
            _permit: permit,
        };
        checkout.pool.report(true);
        Ok(checkout)
    }

    /// Drops a pool that holds nothing and that nobody else is using, so
    /// that names nobody can log in to do not accumulate.
    fn forget_if_unused(&self, pool: Arc<RolePool>) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let key = (pool.database.clone(), pool.role.clone());
        // Ours and the map's: no other client holds or waits on this pool.
        let unused =
            Arc::strong_count(&pool) == 2 && pool.idle().is_empty() && pool.gauges.get().is_none();
        if unused && pools.get(&key).is_some_and(|p| Arc::ptr_eq(p, &pool)) {
            pools.remove(&key);
        }
    }

    /// Pools kept.
    pub fn pool_count(&self) -> usize {
        self.pools.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Closes idle connections past `idle_timeout` or `max_lifetime`.
    pub fn reap(&self) {
        let settings = self.settings();
        let pools: Vec<_> = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for pool in pools {
            pool.idle().retain(|i| {
                i.since.elapsed() < settings.idle_timeout
                    && i.conn.created_at.elapsed() < settings.max_lifetime
                    && !i.conn.is_closed()
            });
            pool.report(false);
        }
    }

    /// Idle connections of one pool (for tests and metrics).
    pub fn idle_count(&self, database: &str, role: &str) -> usize {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .get(&(database.to_owned(), role.to_owned()))
            .map_or(0, |p| p.idle().len())
    }
}
