//! The context of a serving thread (`Shared`): configuration, users, the
//! statement analyser, the live map, backend pools, cancel keys, counters
//! and liveness, shared by every session the thread serves. The listener
//! (`server`) and the sessions read it; the metrics endpoint (`scrape`)
//! reads it from above. It depends on none of them.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use rustc_hash::FxHashMap;
use shardmap::cache::Snapshot;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::analyze::Analyzer;
use crate::auth::Users;
use crate::cancel::CancelRegistry;
use crate::config::ProxyConfig;
use crate::liveness::Liveness;
use crate::login_limits::LoginLimits;
use crate::metrics::Metrics;
use crate::pool::Pools;
use crate::two_phase::TwoPhase;

/// The context of one serving thread: everything its sessions share.
pub struct Shared {
    pub config: ProxyConfig,
    pub users: Users,
    pub analyzer: Analyzer,
    /// Uses of statements that could be kept prepared on the servers.
    pub statement_uses: StatementUses,
    /// Statements this thread's clients parsed lately, by text.
    pub parsed: crate::analyze::prepared::ParseCache,
    /// The map, as the watch cache last applied it.
    pub map: watch::Receiver<Snapshot>,
    pub pools: Pools,
    /// Shared by every serving thread: a cancel request may reach any of them.
    pub cancels: Arc<CancelRegistry>,
    /// ParameterStatus values reported to clients at login, learned from a
    /// backend (the first login that reaches one).
    pub server_parameters: Mutex<Option<Vec<(String, String)>>>,
    /// Each server's database collation (`lc_collate`), learned by the
    /// first sorted scatter read that needed it.
    pub server_collations: Mutex<FxHashMap<String, String>>,
    pub active_clients: AtomicUsize,
    /// Clients in total and per user, failed logins per address: shared by
    /// every serving thread, so the limits hold for the whole proxy.
    pub logins: Arc<LoginLimits>,
    /// Set when TLS is configured.
    pub tls: Option<TlsAcceptor>,
    pub metrics: Metrics,
    /// Acknowledged map version and lease-based permission to serve, shared
    /// by every serving thread and the registry.
    pub liveness: Arc<Liveness>,
    /// Decisions and ids of this process's two-phase commits (shared by
    /// every serving thread).
    pub two_phase: Arc<TwoPhase>,
    /// Servers known to accept PREPARE TRANSACTION.
    pub prepares: Mutex<rustc_hash::FxHashSet<String>>,
    /// The map in etcd, for the changes the proxy itself makes (a table's
    /// column list after DDL through the proxy); connected on first use.
    pub map_store: tokio::sync::OnceCell<shardmap::MapStore>,
}

impl Shared {
    pub fn new(
        config: ProxyConfig,
        users: Users,
        map: watch::Receiver<Snapshot>,
        pools: Pools,
    ) -> Shared {
        Shared::with_cancels(
            config,
            users,
            map,
            pools,
            Arc::new(CancelRegistry::default()),
        )
    }

    /// Like `new`, sharing a cancel registry with other serving threads.
    pub fn with_cancels(
        config: ProxyConfig,
        users: Users,
        map: watch::Receiver<Snapshot>,
        pools: Pools,
        cancels: Arc<CancelRegistry>,
    ) -> Shared {
        let logins = Arc::new(LoginLimits::new(&config));
        Shared {
            config,
            users,
            analyzer: Analyzer::new(10_000),
            statement_uses: Default::default(),
            parsed: Default::default(),
            map,
            pools,
            cancels,
            server_parameters: Mutex::new(None),
            server_collations: Mutex::new(FxHashMap::default()),
            active_clients: AtomicUsize::new(0),
            logins,
            tls: None,
            metrics: Metrics::default(),
            liveness: Liveness::new(true),
            two_phase: Arc::new(TwoPhase::unconfigured()),
            prepares: Mutex::new(Default::default()),
            map_store: tokio::sync::OnceCell::new(),
        }
    }
}

/// How often clients of this serving thread sent each statement that could
/// be kept prepared (by backend name): a repeated one is worth keeping.
/// Counted across clients, so clients that connect for one query each
/// benefit too. Bounded: when full it starts over.
#[derive(Default)]
pub struct StatementUses {
    counts: std::sync::Mutex<FxHashMap<Arc<str>, u32>>,
}

/// Bound on `StatementUses`.
const STATEMENT_USES_TRACKED: usize = 4096;

impl StatementUses {
    /// Counts one more use of `name`; returns how many there were.
    pub fn count(&self, name: &Arc<str>) -> u32 {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(name) {
            *count = count.saturating_add(1);
            return *count;
        }
        if counts.len() >= STATEMENT_USES_TRACKED {
            counts.clear();
        }
        counts.insert(name.clone(), 1);
        1
    }

    pub fn get(&self, name: &str) -> u32 {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(name).copied().unwrap_or(0)
    }
}
