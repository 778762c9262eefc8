//! Backend connection pools, one per server, for transaction pooling: a
//! client holds a connection only for the duration of a transaction (or a
//! single statement outside one), then it goes back for others to use.
//!
//! Each serving thread has its own pools, since a socket belongs to the
//! event loop that opened it; the threads' pools of one server draw on one
//! [`Budget`] of `pool.size` connections, so that a thread that happens to
//! get more clients than the others can use the whole pool.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use shardmap::{Endpoint, Server};
use std::collections::VecDeque;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tracing::debug;

use crate::backend::{Backend, BackendError};

mod budget;
use budget::{forget_settled_front, Claim, RoomWaiter};
pub use budget::{Budget, Budgets};

/// Pool settings (see `config::PoolSettings` for the TOML side).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Most connections open to one server, over all serving threads.
    pub size: usize,
    pub connect_timeout: Duration,
    /// How long a client waits for a free connection before an error.
    pub checkout_timeout: Duration,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// Connections are replaced after this long, even if busy-ish.
    pub max_lifetime: Duration,
    /// By server name: the directory of the Unix-domain socket through which
    /// this proxy reaches that server's primary, on the same host.
    pub socket_dirs: Arc<BTreeMap<String, PathBuf>>,
    /// Whether connections send through their thread's gather (`outbox`).
    pub gather_sends: bool,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            size: 20,
            connect_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            max_lifetime: Duration::from_secs(3600),
            socket_dirs: Arc::default(),
            gather_sends: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no connection to server {server} became free within {timeout:?}: all {size} connections of the pool stayed in use; look for long or blocked transactions on {server} (pg_stat_activity), or raise [pool] size or checkout_timeout_ms")]
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
    /// Idle connections closed: past their idle timeout or lifetime (see
    /// `prune`), or to make room for a client of another serving thread.
    pub closed_idle: AtomicU64,
}

/// An idle connection, with the budget permit it holds while open.
struct Idle {
    backend: Box<Backend>,
    permit: OwnedSemaphorePermit,
}

pub struct Pool {
    pub server: Arc<str>,
    pub endpoint: Endpoint,
    /// Set when the server is reached through its Unix-domain socket.
    socket_dir: Option<PathBuf>,
    password: Option<String>,
    /// Built once per pool (it reads the certificate files); an error is
    /// reported to every client that needs this server.
    tls: Result<pgtls::Connector, String>,
    /// Boxed, so that a lease (held in every session's state) is small
    /// and moving a connection in and out of the pool copies a pointer.
    idle: Mutex<Vec<Idle>>,
    budget: Arc<Budget>,
    /// Clients of this thread waiting for a connection, first come first:
    /// a returned lease is handed to the first of them.
    waiters: Mutex<VecDeque<LocalWaiter>>,
    /// How many of `waiters` still wait (their claims not settled).
    waiting: Arc<AtomicUsize>,
    leased: AtomicUsize,
    config: PoolConfig,
    pub stats: PoolStats,
}

/// A connection checked out of a pool; it goes back when dropped, unless it
/// is broken or still inside a transaction.
pub struct Lease {
    backend: Option<Box<Backend>>,
    pool: Arc<Pool>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Lease {
    /// Whether statements that return rows may run kept prepared on this
    /// connection inside a transaction: it follows the catalog count (a
    /// primary's; see `PreparedStatements::has_current`) and is not broken
    /// (a stale plan met on it).
    pub fn keeps_rows(&self) -> bool {
        self.backend
            .as_ref()
            .is_some_and(|backend| !backend.broken && backend.prepared.follows_catalog())
    }

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
        let pool = &self.pool;
        pool.leased.fetch_sub(1, Ordering::Relaxed);
        let (Some(mut backend), Some(permit)) = (self.backend.take(), self.permit.take()) else {
            return;
        };
        backend.publish_changes();
        let reusable = !backend.broken
            && !backend.pending_sync
            && backend.status == b'I'
            && backend.created.elapsed() < pool.config.max_lifetime;
        if !reusable {
            pool.stats.closed_unhealthy.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let others_wait =
            pool.budget.waiting.load(Ordering::SeqCst) > pool.waiting.load(Ordering::SeqCst);
        if others_wait && pool.holds_more_than_its_share() {
            // Clients of another thread wait too: without this, a thread that
            // got the whole budget first would keep it while its own clients
            // queue, and the other thread's clients would time out.
            drop(backend);
            pool.stats.closed_idle.fetch_add(1, Ordering::Relaxed);
            pool.budget.give_room_elsewhere(pool, permit);
            return;
        }
        backend.last_used = Instant::now();
        let mut idle = Idle { backend, permit };
        if pool.waiting.load(Ordering::SeqCst) > 0 {
            let mut waiters = pool.waiters.lock().unwrap_or_else(|e| e.into_inner());
            while let Some(waiter) = waiters.pop_front() {
                if !waiter.claim.settle(&pool.budget) {
                    continue;
                }
                match waiter.handoff.send(idle) {
                    Ok(()) => return,
                    // That client stopped waiting meanwhile.
                    Err(back) => idle = back,
                }
            }
        }
        let mut list = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock that a waiter of another thread takes to
        // look for idle connections after counting itself: either it sees
        // this connection or this sees it waiting.
        if pool.budget.waiting.load(Ordering::SeqCst) > 0 {
            // The connection cannot move to that thread's event loop; its
            // room in the budget can.
            drop(list);
            let Idle { backend, permit } = idle;
            drop(backend);
            pool.stats.closed_idle.fetch_add(1, Ordering::Relaxed);
            pool.budget.give_room_elsewhere(pool, permit);
            return;
        }
        list.push(idle);
    }
}

struct LocalWaiter {
    claim: Arc<Claim>,
    handoff: oneshot::Sender<Idle>,
}

/// How `Pool::take` found a connection: an idle one, or room to open one.
enum Found {
    Idle(Idle),
    Room(OwnedSemaphorePermit),
}

/// Settles a waiting client's claim when it stops waiting, served or
/// not, or when its `acquire` is dropped.
struct Settle<'a> {
    claim: Arc<Claim>,
    budget: &'a Budget,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.claim.settle(self.budget);
    }
}

impl Pool {
    fn in_budget(
        server: Arc<str>,
        endpoint: Endpoint,
        socket_dir: Option<PathBuf>,
        password: Option<String>,
        tls: Result<pgtls::Connector, String>,
        config: PoolConfig,
        budget: Arc<Budget>,
    ) -> Arc<Pool> {
        if let Err(e) = &tls {
            tracing::error!(server = %server, error = %e, "no connection to this server can be made");
        }
        let pool = Arc::new(Pool {
            server,
            endpoint,
            socket_dir,
            password,
            tls,
            idle: Mutex::new(Vec::new()),
            budget,
            waiters: Mutex::new(VecDeque::new()),
            waiting: Arc::new(AtomicUsize::new(0)),
            leased: AtomicUsize::new(0),
            config,
            stats: PoolStats::default(),
        });
        let mut members = pool
            .budget
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        members.retain(|m| m.strong_count() > 0);
        members.push(Arc::downgrade(&pool));
        drop(members);
        pool
    }

    /// A connection: an idle one if a healthy one exists, else a new one.
    /// A client waits (up to the checkout timeout) only when the budget is
    /// spent and no thread has an idle connection.
    pub async fn acquire(self: &Arc<Self>) -> Result<Lease, PoolError> {
        // Clients already waiting here go first.
        let found = match self.waiting.load(Ordering::SeqCst) {
            0 => self.take(),
            _ => None,
        };
        let found = match found {
            Some(found) => found,
            None => self.wait().await?,
        };
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        let permit = match found {
            Found::Idle(Idle {
                mut backend,
                permit,
            }) => match backend.refresh_rules(self.config.connect_timeout).await {
                Ok(()) => return Ok(self.lease(backend, permit)),
                Err(e) => {
                    // Its room opens a new connection, which reads the rules.
                    debug!(server = %self.server, error = %e, "a pooled connection failed reading the rules again; opening another");
                    self.stats.closed_unhealthy.fetch_add(1, Ordering::Relaxed);
                    permit
                }
            },
            Found::Room(permit) => permit,
        };
        let tls = self
            .tls
            .as_ref()
            .map_err(|e| PoolError::TlsSettings(e.clone()))?;
        let mut backend = Backend::connect(
            self.server.clone(),
            &self.endpoint,
            self.socket_dir.as_deref(),
            self.password.as_deref(),
            tls,
            self.config.connect_timeout,
        )
        .await?;
        if self.config.gather_sends {
            backend.gather_sends();
        }
        let rules = self.budget.rule_changes.clone();
        let catalog = self.budget.catalog_changes.clone();
        backend.prepared.follow_changes(rules, catalog);
        let limit = self.config.connect_timeout;
        backend
            .refresh_rules(limit)
            .await
            .map_err(|source| BackendError::Io {
                server: self.server.to_string(),
                source,
            })?;
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        Ok(self.lease(Box::new(backend), permit))
    }

    fn lease(self: &Arc<Self>, backend: Box<Backend>, permit: OwnedSemaphorePermit) -> Lease {
        self.leased.fetch_add(1, Ordering::Relaxed);
        Lease {
            backend: Some(backend),
            pool: self.clone(),
            permit: Some(permit),
        }
    }

    /// An idle connection of this pool, else room in the budget, else the
    /// room of another thread's idle connection.
    fn take(&self) -> Option<Found> {
        let mut room = None;
        loop {
            let newest = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(mut idle) = newest else { break };
            let idle_for = idle.backend.last_used.elapsed();
            // Probing the socket costs a syscall; a connection used within the
            // last second is trusted (a failure then surfaces as an I/O error).
            let stale = idle_for > self.config.idle_timeout
                || (idle_for > Duration::from_secs(1) && idle.backend.closed_while_idle());
            if !stale {
                return Some(Found::Idle(idle));
            }
            self.stats.closed_unhealthy.fetch_add(1, Ordering::Relaxed);
            debug!(server = %self.server, "dropping a stale idle connection");
            room.get_or_insert(idle.permit);
        }
        if let Some(permit) = room {
            return Some(Found::Room(permit));
        }
        if let Ok(permit) = self.budget.permits.clone().try_acquire_owned() {
            return Some(Found::Room(permit));
        }
        self.budget.take_idle_elsewhere(self).map(Found::Room)
    }

    /// Waits, first come first served, for a lease returned to this pool,
    /// for room another thread gives up, or for room freed in the budget.
    async fn wait(&self) -> Result<Found, PoolError> {
        let claim = Claim::new(&self.waiting, &self.budget);
        let (handoff, mut handed) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(LocalWaiter {
                claim: claim.clone(),
                handoff,
            });
        let (handoff, mut given) = oneshot::channel();
        self.budget
            .rooms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(RoomWaiter {
                pool: self as *const Pool as usize,
                claim: claim.clone(),
                handoff,
            });
        // Dropped first of the locals: settled before the receivers go.
        let settle = Settle {
            claim,
            budget: &self.budget,
        };
        // Counted as waiting now, so an idle connection another thread
        // returns from here on is closed for this client (see `Lease::drop`);
        // one returned before is found here.
        let found = match self.budget.take_idle_elsewhere(self) {
            Some(permit) => Some(Found::Room(permit)),
            None => {
                let deadline = tokio::time::Instant::now() + self.config.checkout_timeout;
                // A channel whose sender is gone only disables its branch:
                // a pool drops this client's entry in one queue once its
                // claim is settled, possibly by room handed over through
                // the other queue that this task has not read yet.
                tokio::select! {
                    biased;
                    Ok(idle) = &mut handed => Some(Found::Idle(idle)),
                    Ok(room) = &mut given => Some(Found::Room(room)),
                    Ok(room) = self.budget.permits.clone().acquire_owned() => Some(Found::Room(room)),
                    _ = tokio::time::sleep_until(deadline) => None,
                }
            }
        };
        drop(settle);
        // Whatever was handed over in the meantime goes back: a connection
        // closes, its room returns to the budget.
        handed.close();
        given.close();
        let late = (handed.try_recv().ok(), given.try_recv().ok());
        drop(late);
        self.forget_settled_waiters();
        found.ok_or_else(|| PoolError::Exhausted {
            server: self.server.to_string(),
            timeout: self.config.checkout_timeout,
            size: self.config.size,
        })
    }

    /// Whether this pool's open connections (the one being returned
    /// included) are more than its share of the budget: an even split
    /// between the threads, or nothing when the budget is smaller than the
    /// number of threads (then connections go round the threads).
    fn holds_more_than_its_share(&self) -> bool {
        // A pool that was dropped (its server left the map) stays in the
        // list until the next pool joins: it holds no share.
        let threads = self
            .budget
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|member| member.strong_count() > 0)
            .count()
            .max(1);
        let size = self.config.size;
        let share = if size >= threads {
            size.div_ceil(threads)
        } else {
            0
        };
        let open = self.leased.load(Ordering::Relaxed) + self.idle_count() + 1;
        open > share
    }

    fn forget_settled_waiters(&self) {
        forget_settled_front(
            &mut self.waiters.lock().unwrap_or_else(|e| e.into_inner()),
            |waiter| &waiter.claim,
        );
        forget_settled_front(
            &mut self.budget.rooms.lock().unwrap_or_else(|e| e.into_inner()),
            |waiter| &waiter.claim,
        );
    }

    /// Closes idle connections past their idle timeout or their lifetime.
    /// Idle connections are reused newest first, so under steady load the
    /// older ones are never taken again: only this closes them.
    pub fn prune(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let before = idle.len();
        idle.retain(|i| {
            i.backend.last_used.elapsed() < self.config.idle_timeout
                && i.backend.created.elapsed() < self.config.max_lifetime
        });
        let closed = (before - idle.len()) as u64;
        self.stats.closed_idle.fetch_add(closed, Ordering::Relaxed);
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Clients of this pool's thread waiting for a connection.
    pub fn waiting_here(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Clients of every serving thread waiting for a connection to this
    /// pool's server.
    pub fn waiting_in_all_threads(&self) -> usize {
        self.budget.waiting.load(Ordering::SeqCst)
    }

    /// Each thread's pool of this server: connections in use, idle,
    /// clients waiting, idle connections closed, connections opened.
    pub fn threads_summary(&self) -> String {
        let members = self
            .budget
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let pools: Vec<String> = members
            .iter()
            .filter_map(Weak::upgrade)
            .map(|pool| {
                format!(
                    "{}in use {}, idle {}, waiting {}, closed idle {}, opened {}",
                    if std::ptr::eq(Arc::as_ptr(&pool), self) {
                        "this thread: "
                    } else {
                        ""
                    },
                    pool.in_use(),
                    pool.idle_count(),
                    pool.waiting_here(),
                    pool.stats.closed_idle.load(Ordering::Relaxed),
                    pool.stats.connects.load(Ordering::Relaxed)
                )
            })
            .collect();
        format!("{} serving threads: {}", pools.len(), pools.join("; "))
    }

    /// Has every connection to the server read its rules again, and counts
    /// a catalog change: what a COMMIT PREPARED finished in the background
    /// committed became visible without a lease ending.
    pub fn count_committed_changes(&self) {
        self.budget.rule_changes.fetch_add(1, Ordering::AcqRel);
        if let Some(catalog) = &self.budget.catalog_changes {
            catalog.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Connections of this pool leased to clients.
    pub fn in_use(&self) -> usize {
        self.leased.load(Ordering::Relaxed)
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
    budgets: Arc<Budgets>,
}

impl Pools {
    /// The pools of a proxy with one serving thread.
    pub fn new(config: PoolConfig, secrets: Arc<dyn Secrets>) -> Pools {
        Pools::sharing(config, secrets, Arc::default())
    }

    /// The pools of one serving thread; `budgets` is shared by all threads.
    pub fn sharing(config: PoolConfig, secrets: Arc<dyn Secrets>, budgets: Arc<Budgets>) -> Pools {
        Pools {
            pools: RwLock::new(HashMap::new()),
            config,
            secrets,
            budgets,
        }
    }

    /// Counts a catalog change, for every server's connections (see
    /// `Budgets::count_catalog_change`).
    pub fn count_catalog_change(&self) {
        self.budgets.count_catalog_change();
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
                let pool = Pool::in_budget(
                    server.name.as_str().into(),
                    server.primary.clone(),
                    self.config.socket_dirs.get(&server.name).cloned(),
                    self.secrets
                        .password_for(&server.name, &server.primary.user),
                    self.secrets.tls_for(&server.name),
                    self.config.clone(),
                    self.budgets
                        .for_pool(&server.name, &server.primary, self.config.size, true),
                );
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
                let pool = Pool::in_budget(
                    server.name.as_str().into(),
                    endpoint.clone(),
                    // A replica is another host's server: TCP.
                    None,
                    self.secrets.password_for(&server.name, &endpoint.user),
                    self.secrets.tls_for(&server.name),
                    self.config.clone(),
                    self.budgets
                        .for_pool(&key, endpoint, self.config.size, false),
                );
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

#[cfg(test)]
mod tests;
