//! The connections one server may have open, shared by the pools of all
//! serving threads ([`Budget`]), and the claims of the clients waiting for
//! one: room one thread gives up goes to a client waiting on another.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use shardmap::Endpoint;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::Pool;

/// The connections one server may have open, shared by the pools of all
/// serving threads: a permit is one open connection, idle or leased.
pub struct Budget {
    pub(super) permits: Arc<Semaphore>,
    /// Clients waiting for a connection to this server, on any thread.
    pub(super) waiting: AtomicUsize,
    /// The pools drawing on this budget (one per thread), whose idle
    /// connections a thread may close to open its own when the budget is
    /// spent.
    pub(super) members: Mutex<Vec<Weak<Pool>>>,
    /// Waiting clients by arrival, each with the pool it waits in: room a
    /// thread gives up for the others goes to the first of another pool.
    pub(super) rooms: Mutex<VecDeque<RoomWaiter>>,
    /// Rules created, replaced, altered or dropped through this proxy on the
    /// server, counted when their transaction ends: every connection to the
    /// server reads its rules again at its next checkout.
    pub(super) rule_changes: Arc<AtomicU64>,
    /// The proxy's count of catalog changes (`Budgets::catalog_changes`),
    /// which the server's connections follow; `None` for a read replica's
    /// pool, whose connections see a change only once it is replayed.
    pub(super) catalog_changes: Option<Arc<AtomicU64>>,
}

pub(super) struct RoomWaiter {
    /// The address of the pool the client waits in, to tell pools apart.
    pub(super) pool: usize,
    pub(super) claim: Arc<Claim>,
    pub(super) handoff: oneshot::Sender<OwnedSemaphorePermit>,
}

/// A waiting client's claim to be served once: by whoever settles it first,
/// a pool handing it a connection or room, or the client itself when it
/// stops waiting. Settling takes the client off the waiting counts, so
/// that a client already handed something no longer counts as waiting.
pub(super) struct Claim {
    settled: AtomicBool,
    /// The waiting count of the client's pool.
    pool_waiting: Arc<AtomicUsize>,
}

impl Claim {
    /// Counts the client as waiting in its pool and in `budget`.
    pub(super) fn new(pool_waiting: &Arc<AtomicUsize>, budget: &Budget) -> Arc<Claim> {
        pool_waiting.fetch_add(1, Ordering::SeqCst);
        budget.waiting.fetch_add(1, Ordering::SeqCst);
        Arc::new(Claim {
            settled: AtomicBool::new(false),
            pool_waiting: pool_waiting.clone(),
        })
    }

    /// Whether this call settled it (false: it was already).
    pub(super) fn settle(&self, budget: &Budget) -> bool {
        if self.settled.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.pool_waiting.fetch_sub(1, Ordering::SeqCst);
        budget.waiting.fetch_sub(1, Ordering::SeqCst);
        true
    }

    pub(super) fn is_settled(&self) -> bool {
        self.settled.load(Ordering::SeqCst)
    }
}

impl Budget {
    pub(super) fn new(size: usize, catalog_changes: Option<Arc<AtomicU64>>) -> Budget {
        Budget {
            permits: Arc::new(Semaphore::new(size)),
            waiting: AtomicUsize::new(0),
            members: Mutex::new(Vec::new()),
            rooms: Mutex::new(VecDeque::new()),
            rule_changes: Arc::default(),
            catalog_changes,
        }
    }

    /// Hands `room` to the longest-waiting client of another pool than
    /// `from`; with none, it goes back to the budget for anyone.
    pub(super) fn give_room_elsewhere(&self, from: &Pool, mut room: OwnedSemaphorePermit) {
        let from = from as *const Pool as usize;
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        forget_settled_front(&mut rooms, |waiter| &waiter.claim);
        let mut at = 0;
        while at < rooms.len() {
            let Some(waiter) = rooms.get(at) else { break };
            if waiter.pool == from || waiter.claim.is_settled() {
                at += 1;
                continue;
            }
            let Some(waiter) = rooms.remove(at) else {
                break;
            };
            if !waiter.claim.settle(self) {
                continue;
            }
            match waiter.handoff.send(room) {
                Ok(()) => return,
                // It stopped waiting meanwhile.
                Err(back) => room = back,
            }
        }
    }

    /// Closes the longest-idle connection of another thread's pool and
    /// hands over its permit.
    pub(super) fn take_idle_elsewhere(&self, from: &Pool) -> Option<OwnedSemaphorePermit> {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        for member in members.iter().filter_map(Weak::upgrade) {
            if std::ptr::eq(Arc::as_ptr(&member), from) {
                continue;
            }
            let mut idle = member.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.is_empty() {
                continue;
            }
            // Oldest first: the newest ones are the owner's to reuse.
            let taken = idle.remove(0);
            drop(idle);
            member.stats.closed_idle.fetch_add(1, Ordering::Relaxed);
            return Some(taken.permit);
        }
        None
    }
}

/// Drops the entries at the front of a waiter queue whose claims are
/// settled: served entries leave from the front, and the others reach it
/// within a checkout timeout, so the queue stays as long as the clients
/// waiting within one timeout.
pub(super) fn forget_settled_front<T>(queue: &mut VecDeque<T>, claim: impl Fn(&T) -> &Arc<Claim>) {
    while queue.front().is_some_and(|entry| claim(entry).is_settled()) {
        queue.pop_front();
    }
}

/// The budgets of every server, shared by the serving threads.
#[derive(Default)]
pub struct Budgets {
    /// By pool key and endpoint; held by the pools, so a budget no pool
    /// uses any more goes.
    budgets: Mutex<HashMap<String, Weak<Budget>>>,
    /// Statements that may change the columns a prepared statement returns
    /// (ALTER TABLE, views, types: `backend::StatementChanges`),
    /// counted when the proxy sends one (on any server, through any
    /// serving thread) and again when its transaction ends, and stale plans
    /// met: a statement kept prepared before the count last moved is
    /// prepared again before it runs inside a transaction
    /// (`PreparedStatements::has_current`).
    catalog_changes: Arc<AtomicU64>,
}

impl Budgets {
    /// Counts a catalog change (see `catalog_changes`).
    pub fn count_catalog_change(&self) {
        self.catalog_changes.fetch_add(1, Ordering::AcqRel);
    }

    /// The budget of the pool `key` at `endpoint`: one per endpoint, so
    /// that threads that see a server's address change at different times
    /// never draw on two budgets for one address. Its connections follow
    /// the catalog count if `follows_catalog` (a primary's pool).
    pub(super) fn for_pool(
        &self,
        key: &str,
        endpoint: &Endpoint,
        size: usize,
        follows_catalog: bool,
    ) -> Arc<Budget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let id = format!("{key} {endpoint:?}");
        if let Some(budget) = budgets.get(&id).and_then(Weak::upgrade) {
            return budget;
        }
        budgets.retain(|_, budget| budget.strong_count() > 0);
        let catalog = follows_catalog.then(|| self.catalog_changes.clone());
        let budget = Arc::new(Budget::new(size, catalog));
        budgets.insert(id, Arc::downgrade(&budget));
        budget
    }
}
