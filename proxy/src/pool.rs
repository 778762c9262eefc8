//! Backend connection pools, one per server, for transaction pooling: a
//! client holds a connection only for the duration of a transaction (or a
//! single statement outside one), then it goes back for others to use.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use shardmap::{Endpoint, Server};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::backend::{Backend, BackendError};

/// Pool settings (see `config::PoolSettings` for the TOML side).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Most connections open to one server.
    pub size: usize,
    pub connect_timeout: Duration,
    /// How long a client waits for a free connection before an error.
    pub checkout_timeout: Duration,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// Connections are replaced after this long, even if busy-ish.
    pub max_lifetime: Duration,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            size: 20,
            connect_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no connection to server {server} became free within {timeout:?}: all {size} connections of this serving thread's share of the pool stayed in use; look for long or blocked transactions on {server} (pg_stat_activity), or raise [pool] size or checkout_timeout_ms")]
    Exhausted {
        server: String,
        timeout: Duration,
        size: usize,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The server's TLS settings cannot be used (a file missing, a mode
    /// without its root certificate): fix the proxy's `[backend]` config.
    #[error("{0}")]
    TlsSettings(String),
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct PoolStats {
    pub connects: AtomicU64,
    pub checkouts: AtomicU64,
    pub closed_unhealthy: AtomicU64,
    /// Idle connections closed by `prune` (idle timeout or lifetime).
    pub closed_idle: AtomicU64,
}

pub struct Pool {
    pub server: Arc<str>,
    pub endpoint: Endpoint,
    password: Option<String>,
    /// Built once per pool (it reads the certificate files); an error is
    /// reported to every client that needs this server.
    tls: Result<pgtls::Connector, String>,
    /// Boxed, so that a lease (held in every session's state) is small
    /// and moving a connection in and out of the pool copies a pointer.
    idle: Mutex<Vec<Box<Backend>>>,
    permits: Arc<Semaphore>,
    config: PoolConfig,
    pub stats: PoolStats,
}

/// A connection checked out of a pool; it goes back when dropped, unless it
/// is broken or still inside a transaction.
pub struct Lease {
    backend: Option<Box<Backend>>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    pub fn backend(&mut self) -> &mut Backend {
        // Present from acquire until drop.
        self.backend
            .as_mut()
            .expect("lease holds a backend until dropped")
    }

    pub fn server(&self) -> &Arc<str> {
        &self.pool.server
    }

    /// Transaction status of the connection's last ReadyForQuery.
    pub fn status(&self) -> u8 {
        self.backend.as_ref().map_or(b'I', |b| b.status)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(mut backend) = self.backend.take() {
            let reusable = !backend.broken
                && !backend.pending_sync
                && backend.status == b'I'
                && backend.created.elapsed() < self.pool.config.max_lifetime;
            if reusable {
                backend.last_used = Instant::now();
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(backend);
            } else {
                self.pool
                    .stats
                    .closed_unhealthy
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Pool {
    pub fn new(
        server: Arc<str>,
        endpoint: Endpoint,
        password: Option<String>,
        tls: Result<pgtls::Connector, String>,
        config: PoolConfig,
    ) -> Pool {
        if let Err(e) = &tls {
            tracing::error!(server = %server, error = %e, "no connection to this server can be made");
        }
        Pool {
            server,
            endpoint,
            password,
            tls,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(config.size)),
            config,
            stats: PoolStats::default(),
        }
    }

    /// A connection: an idle one if a healthy one exists, else a new one.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, PoolError> {
        // Fast path without a timer; wait (bounded) only when the pool is full.
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => match tokio::time::timeout(
                self.config.checkout_timeout,
                self.permits.clone().acquire_owned(),
            )
            .await
            {
                Ok(Ok(permit)) => permit,
                _ => {
                    return Err(PoolError::Exhausted {
                        server: self.server.to_string(),
                        timeout: self.config.checkout_timeout,
                        size: self.config.size,
                    })
                }
            },
        };
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        loop {
            let candidate = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(mut backend) = candidate else { break };
            let idle_for = backend.last_used.elapsed();
            // Probing the socket costs a syscall; a connection used within the
            // last second is trusted (a failure then surfaces as an I/O error).
            let stale = idle_for > self.config.idle_timeout
                || (idle_for > Duration::from_secs(1) && backend.closed_while_idle());
            if stale {
                self.stats.closed_unhealthy.fetch_add(1, Ordering::Relaxed);
                debug!(server = %self.server, "dropping a stale idle connection");
                continue;
            }
            return Ok(Lease {
                backend: Some(backend),
                pool: self.clone(),
                _permit: permit,
            });
        }
        let tls = self
            .tls
            .as_ref()
            .map_err(|e| PoolError::TlsSettings(e.clone()))?;
        let backend = Backend::connect(
            self.server.clone(),
            &self.endpoint,
            self.password.as_deref(),
            tls,
            self.config.connect_timeout,
        )
        .await?;
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            backend: Some(Box::new(backend)),
            pool: self.clone(),
            _permit: permit,
        })
    }

    /// Closes idle connections past their idle timeout or their lifetime.
    /// Idle connections are reused newest first, so under steady load the
    /// older ones are never taken again: only this closes them.
    pub fn prune(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let before = idle.len();
        idle.retain(|b| {
            b.last_used.elapsed() < self.config.idle_timeout
                && b.created.elapsed() < self.config.max_lifetime
        });
        let closed = (before - idle.len()) as u64;
        self.stats.closed_idle.fetch_add(closed, Ordering::Relaxed);
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn in_use(&self) -> usize {
        self.config.size - self.permits.available_permits()
    }
}

/// Where backend passwords and TLS settings come from: never from etcd.
pub trait Secrets: Send + Sync {
    fn password_for(&self, server: &str, user: &str) -> Option<String>;

    /// How to secure connections to `server` (libpq's default, `prefer`,
    /// unless configured).
    fn tls_for(&self, server: &str) -> Result<pgtls::Connector, String> {
        let _ = server;
        pgtls::Connector::new(&settings::BackendTls::default())
    }
}

/// The pools of every server in the map, created on first use and replaced
/// when a server's address changes.
pub struct Pools {
    pools: RwLock<HashMap<String, Arc<Pool>>>,
    config: PoolConfig,
    secrets: Arc<dyn Secrets>,
}

impl Pools {
    pub fn new(config: PoolConfig, secrets: Arc<dyn Secrets>) -> Pools {
        Pools {
            pools: RwLock::new(HashMap::new()),
            config,
            secrets,
        }
    }

    /// The pool for `server` (its primary).
    pub fn for_server(&self, server: &Server) -> Arc<Pool> {
        if let Some(pool) = self
            .pools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&server.name)
        {
            if pool.endpoint == server.primary {
                return pool.clone();
            }
        }
        let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
        match pools.get(&server.name) {
            Some(pool) if pool.endpoint == server.primary => pool.clone(),
            _ => {
                let pool = Arc::new(Pool::new(
                    server.name.as_str().into(),
                    server.primary.clone(),
                    self.secrets
                        .password_for(&server.name, &server.primary.user),
                    self.secrets.tls_for(&server.name),
                    self.config.clone(),
                ));
                pools.insert(server.name.clone(), pool.clone());
                pool
            }
        }
    }

    /// The pool for read replica `index` of `server` (named after the server,
    /// so a transaction on it is still "on" that server).
    pub fn for_replica(&self, server: &Server, index: usize) -> Arc<Pool> {
        let Some(endpoint) = server.replicas.get(index) else {
            return self.for_server(server);
        };
        let key = format!("{}/replica{index}", server.name);
        if let Some(pool) = self
            .pools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            if pool.endpoint == *endpoint {
                return pool.clone();
            }
        }
        let mut pools = self.pools.write().unwrap_or_else(|e| e.into_inner());
        match pools.get(&key) {
            Some(pool) if pool.endpoint == *endpoint => pool.clone(),
            _ => {
                let pool = Arc::new(Pool::new(
                    server.name.as_str().into(),
                    endpoint.clone(),
                    self.secrets.password_for(&server.name, &endpoint.user),
                    self.secrets.tls_for(&server.name),
                    self.config.clone(),
                ));
                pools.insert(key, pool.clone());
                pool
            }
        }
    }

    /// How often to prune: a connection then outlives its idle timeout by
    /// at most half of it.
    pub fn prune_every(&self) -> Duration {
        (self.config.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// Prunes every pool (see `Pool::prune`).
    pub fn prune_all(&self) {
        for pool in self.all() {
            pool.prune();
        }
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.pools
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
