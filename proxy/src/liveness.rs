//! What this proxy promises the rebalancer's cutover, shared by every serving
//! thread and the registry task:
//! - the map version it *acknowledges*: the newest version such that no
//!   request that started under an older map is still running (a request
//!   "boards" when it starts and "lands" when its replies are relayed);
//! - whether it serves normally: only while its etcd registration lease is
//!   provably alive. A proxy cut off from etcd leaves normal mode before its
//!   lease can expire, and enters *degraded mode*: it keeps routing from its
//!   cached map, but every request that touches partitions first proves on
//!   its server that the server still owns them (`session::owner_check`),
//!   so a cutover that did not wait for this proxy cannot make it read a
//!   stale copy or write to a detached one;
//! - the generator of two-phase commit ids of the current registration: its
//!   lease is the ids' incarnation (see [`twophase::gid`]), so a new
//!   registration brings a new generator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use twophase::GidGenerator;

#[derive(Debug, Default)]
struct State {
    /// The newest map version the registry has seen applied.
    applied: u64,
    /// Requests in flight, by the `applied` version when they boarded:
    /// `(version, count)`, oldest first (versions only grow, so boarding
    /// appends or bumps the last entry; the vector keeps its capacity).
    flights: Vec<(u64, usize)>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct Liveness {
    state: Mutex<State>,
    serving: AtomicBool,
    /// Set before `serving` is cleared (so a request never sees neither)
    /// and cleared after it is set again.
    degraded: AtomicBool,
    /// Time spent in degraded mode: finished spells, and the current one's start.
    degraded_time: Mutex<(Duration, Option<Instant>)>,
    /// Bumped when the acknowledged version may have changed, or serving flipped.
    changed: watch::Sender<u64>,
    /// Set while registered (the registry replaces it with each new lease).
    gids: RwLock<Option<Arc<GidGenerator>>>,
}

impl Liveness {
    /// `serving`: whether to serve before any registration (true for proxies
    /// that run without a registry, as in unit tests).
    pub fn new(serving: bool) -> Arc<Liveness> {
        Arc::new(Liveness {
            state: Mutex::new(State::default()),
            serving: AtomicBool::new(serving),
            degraded: AtomicBool::new(false),
            degraded_time: Mutex::new((Duration::ZERO, None)),
            changed: watch::Sender::new(0),
            gids: RwLock::new(None),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the counts stay usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the start of a request; it lands when the returned value drops.
    pub fn board(self: &Arc<Self>) -> Flight {
        let mut state = self.lock();
        let version = state.applied;
        match state.flights.last_mut() {
            Some((last, count)) if *last == version => *count += 1,
            _ => state.flights.push((version, 1)),
        }
        Flight {
            liveness: self.clone(),
            version,
        }
    }

    /// Records that the map cache applied `version` (called after the new
    /// map is visible to sessions, so a request boarding later routes with a
    /// map at least this new).
    pub fn set_applied(&self, version: u64) {
        let mut state = self.lock();
        if version > state.applied {
            state.applied = version;
            drop(state);
            self.bump();
        }
    }

    /// The acknowledged version: the applied one, or the oldest version a
    /// request still in flight boarded with.
    pub fn acked(&self) -> u64 {
        let state = self.lock();
        match state.flights.first() {
            Some(&(oldest, _)) => oldest.min(state.applied),
            None => state.applied,
        }
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    pub fn set_serving(&self, serving: bool) {
        if self.serving.swap(serving, Ordering::AcqRel) != serving {
            self.bump();
        }
    }

    /// Whether requests are served with ownership checks (the lease is not
    /// provably alive, but this proxy served before with the cached map).
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Enters or leaves degraded mode, logging the change and its length.
    pub fn set_degraded(&self, degraded: bool) {
        if self.degraded.swap(degraded, Ordering::AcqRel) == degraded {
            return;
        }
        let mut time = self.degraded_time.lock().unwrap_or_else(|e| e.into_inner());
        if degraded {
            time.1 = Some(Instant::now());
            tracing::warn!("entering degraded mode: serving from the cached map, each request proving on its server that the server owns its partitions");
        } else {
            let lasted = time
                .1
                .take()
                .map_or(Duration::ZERO, |since| since.elapsed());
            time.0 += lasted;
            tracing::info!(
                lasted_s = lasted.as_secs_f64(),
                "leaving degraded mode: the map is known again"
            );
        }
        drop(time);
        self.bump();
    }

    /// Total time spent in degraded mode, the current spell included.
    pub fn degraded_time(&self) -> Duration {
        let time = self.degraded_time.lock().unwrap_or_else(|e| e.into_inner());
        time.0 + time.1.map_or(Duration::ZERO, |since| since.elapsed())
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The generator of global transaction ids for two-phase commit; `None`
    /// while the proxy holds no registration (it cannot commit across
    /// servers then: its commit record could not be written).
    pub fn gids(&self) -> Option<Arc<GidGenerator>> {
        self.gids.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Called by the registry with each registration's generator, and with
    /// `None` when a registration is lost.
    pub fn set_gids(&self, gids: Option<GidGenerator>) {
        *self.gids.write().unwrap_or_else(|e| e.into_inner()) = gids.map(Arc::new);
    }

    /// A receiver that sees every change after it was made.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// A request in flight (see [`Liveness::board`]).
#[derive(Debug)]
pub struct Flight {
    liveness: Arc<Liveness>,
    version: u64,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let mut state = self.liveness.lock();
        let Some(index) = state.flights.iter().rposition(|(v, _)| *v == self.version) else {
            return;
        };
        state.flights[index].1 -= 1;
        if state.flights[index].1 == 0 {
            state.flights.remove(index);
            // The ack advances only when the last request of the oldest
            // version in flight lands, and that version is older than the
            // applied one. Requests of the applied version come and go all
            // the time; waking the registry's task (on another thread) for
            // each of them cost a cross-thread wake-up per few transactions.
            let ack_moved = index == 0 && self.version < state.applied;
            drop(state);
            if ack_moved {
                self.liveness.bump();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledges_only_once_older_requests_land() {
        let liveness = Liveness::new(true);
        liveness.set_applied(3);
        let old = liveness.board();
        liveness.set_applied(4);
        assert_eq!(liveness.acked(), 3, "a request boarded at 3 is in flight");
        let new = liveness.board();
        assert_eq!(liveness.acked(), 3);
        drop(old);
        assert_eq!(liveness.acked(), 4);
        liveness.set_applied(5);
        assert_eq!(liveness.acked(), 4, "the request boarded at 4 still runs");
        drop(new);
        assert_eq!(liveness.acked(), 5);
    }

    #[test]
    fn versions_never_go_back() {
        let liveness = Liveness::new(false);
        liveness.set_applied(7);
        liveness.set_applied(6);
        assert_eq!(liveness.acked(), 7);
        assert!(!liveness.serving());
        liveness.set_serving(true);
        assert!(liveness.serving());
    }

    #[test]
    fn degraded_time_adds_up_over_spells() {
        let liveness = Liveness::new(true);
        assert_eq!(liveness.degraded_time(), Duration::ZERO);
        liveness.set_degraded(true);
        std::thread::sleep(Duration::from_millis(20));
        liveness.set_degraded(false);
        let first = liveness.degraded_time();
        assert!(first >= Duration::from_millis(20), "{first:?}");
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(liveness.degraded_time(), first, "not counted while normal");
        liveness.set_degraded(true);
        assert!(liveness.degraded());
        std::thread::sleep(Duration::from_millis(20));
        assert!(liveness.degraded_time() >= first + Duration::from_millis(20));
    }

    #[test]
    fn requests_of_the_applied_version_land_without_a_change() {
        let liveness = Liveness::new(true);
        liveness.set_applied(2);
        let mut changes = liveness.watch();
        drop(liveness.board());
        let (first, second) = (liveness.board(), liveness.board());
        drop(first);
        drop(second);
        assert!(
            !changes.has_changed().expect("sender alive"),
            "the ack stayed at 2"
        );
        assert_eq!(liveness.acked(), 2);

        let old = liveness.board();
        liveness.set_applied(3);
        changes.borrow_and_update();
        drop(old);
        assert!(
            changes.has_changed().expect("sender alive"),
            "the ack moved to 3"
        );
        assert_eq!(liveness.acked(), 3);
    }

    #[tokio::test]
    async fn landing_the_oldest_request_wakes_the_registry() {
        let liveness = Liveness::new(true);
        let flight = liveness.board();
        liveness.set_applied(2);
        let waiter = {
            let liveness = liveness.clone();
            let mut changes = liveness.watch();
            tokio::spawn(async move {
                while liveness.acked() < 2 {
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            })
        };
        tokio::task::yield_now().await;
        drop(flight);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
    }
}
