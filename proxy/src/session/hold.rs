//! Routing under the live map: a statement for a partition that is blocked
//! for a cutover waits (it does not fail), and so does a reference-table
//! write while a server is joining; the request's flight is released while
//! it waits so the cutover's (or the join's) acknowledgement is not stalled.
//! In degraded mode (etcd unreachable) single-server routes are served from
//! the cached map with an ownership check (`owner_check`); the rest wait.

use std::time::{Duration, Instant};

use shardmap::PartitionState;

use crate::residency;
use crate::route::{Route, RouteError};

use super::Session;

/// A write to a reference table: the only `Writes` route over no
/// partitions (a sharded write always names the partitions it writes).
/// While a server is joining, these are held: `shardctl server add` copies
/// the reference tables to it once every proxy acknowledged the map that
/// says so, so no write routed to the old servers alone can commit after
/// the copy, and the held writes then go to the new server too.
fn is_reference_write(route: &Route) -> bool {
    matches!(route, Route::Writes { partitions, .. } if partitions.is_empty())
}

/// Routes degraded mode serves with ownership checks: one server's
/// partitions, an unsharded table's home, or no partition at all. Reads
/// and writes over several servers wait for etcd: a scatter read would need
/// a check on every server, and reference-table writes could miss a server
/// joining unseen (and cross-server commits need etcd for their decision).
fn servable_degraded(route: &Route) -> bool {
    matches!(
        route,
        Route::Partitions { .. } | Route::Server(_) | Route::Any
    )
}

/// The error of a request that waited in degraded mode for etcd.
fn needs_etcd() -> RouteError {
    RouteError::new(
        "57P03",
        "this shardline proxy cannot reach etcd, and this statement spans servers (or writes a reference table): it needs the current map",
        "retry shortly, or connect to another proxy; statements on one server's keys are still served",
    )
}

/// The error of a proxy that cannot prove its map is current.
pub(super) fn not_serving() -> RouteError {
    RouteError::new(
        "57P03",
        "this shardline proxy lost its registration in etcd and is not serving until it re-syncs",
        "retry shortly, or connect to another proxy; check that etcd is reachable from this proxy",
    )
}

impl Session {
    /// A request starts: until it lands, this proxy does not acknowledge
    /// map versions newer than the one it starts under.
    pub(super) fn board(&mut self) {
        let flight = self.shared.liveness.board();
        *self.flight.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(flight);
    }

    pub(super) fn land(&mut self) {
        self.flight
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Releases the request's flight while it waits (held statements must not
    /// stall the acknowledgement the cutover waits for), and boards again after.
    pub(super) fn set_waiting(&self, waiting: bool) {
        let mut flight = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        if waiting {
            flight.take();
        } else if flight.is_none() {
            *flight = Some(self.shared.liveness.board());
        }
    }

    /// Counts a request that was held since `started` (if it was held).
    pub(super) fn record_held(&self, started: Option<Instant>) {
        if let Some(started) = started {
            self.shared
                .metrics
                .record_hold(started.elapsed().as_micros() as u64);
        }
    }

    /// Waits until the proxy serves normally (registered, map caught up),
    /// at most until `max_wait` after `started`; true if it does.
    async fn wait_for_normal(&self, started: &mut Option<Instant>, max_wait: Duration) -> bool {
        let liveness = &self.shared.liveness;
        let remaining = max_wait.saturating_sub(started.get_or_insert_with(Instant::now).elapsed());
        self.set_waiting(true);
        let mut changes = liveness.watch();
        let resumed = remaining > Duration::ZERO
            && tokio::time::timeout(remaining, async {
                while !liveness.serving() {
                    if changes.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await
            .is_ok()
            && liveness.serving();
        self.set_waiting(false);
        resumed
    }

    /// Routes with the current map, holding (not failing) while a partition
    /// it needs is blocked for a cutover, up to the configured wait.
    pub(super) async fn route_holding<F>(&self, mut compute: F) -> Result<Route, RouteError>
    where
        F: FnMut(&shardmap::ClusterMap) -> Result<Route, RouteError>,
    {
        // The clock is read only once a partition turns out to be blocked.
        let mut started: Option<Instant> = None;
        let max_wait = Duration::from_millis(self.shared.config.limits.blocked_wait_ms);
        let mut rx = self.shared.map.clone();
        let liveness = &self.shared.liveness;
        loop {
            let normal = liveness.serving();
            if !normal && !liveness.degraded() {
                // Not registered yet: hold like a blocked partition until
                // the registry has synced, up to the same wait.
                if !self.wait_for_normal(&mut started, max_wait).await {
                    return Err(not_serving());
                }
                continue;
            }
            let snapshot = rx.borrow_and_update().clone();
            let Some(versioned) = snapshot else {
                return Err(RouteError::new(
                    "57P03",
                    "the proxy has no shard map yet",
                    "check that etcd is reachable and the cluster is initialised (shardctl init)",
                ));
            };
            let route = compute(&versioned.map)?;
            let config = &self.shared.config;
            residency::check(
                residency::enforced(config.region.as_deref(), config.residency),
                &versioned.map,
                route.partitions(),
            )?;
            self.routed_degraded
                .store(!normal, std::sync::atomic::Ordering::Relaxed);
            if !normal {
                // Degraded: the cached map may be stale, and a partition it
                // shows blocked may have moved or been given back. The
                // ownership check on the server decides, not the map.
                if servable_degraded(&route) {
                    self.record_held(started);
                    return Ok(route);
                }
                if !self.wait_for_normal(&mut started, max_wait).await {
                    return Err(needs_etcd());
                }
                continue;
            }
            let blocked = route.partitions().iter().any(|p| {
                matches!(
                    versioned.map.assignments.get(*p as usize).map(|a| &a.state),
                    Some(PartitionState::Blocked { .. })
                )
            }) || (is_reference_write(&route)
                && versioned.map.joining_server().is_some());
            if !blocked {
                self.record_held(started);
                return Ok(route);
            }
            let remaining =
                max_wait.saturating_sub(started.get_or_insert_with(Instant::now).elapsed());
            self.set_waiting(true);
            let expired =
                remaining.is_zero() || tokio::time::timeout(remaining, rx.changed()).await.is_err();
            self.set_waiting(false);
            if expired {
                if let Some(joining) = versioned.map.joining_server() {
                    if is_reference_write(&route) {
                        return Err(RouteError::new(
                            "55006",
                            format!(
                                "server {} is joining (its reference tables are being copied), and reference-table writes waited for over {max_wait:?}",
                                joining.name
                            ),
                            "retry the statement once `shardctl server add` has finished",
                        ));
                    }
                }
                return Err(RouteError::new(
                    "55006",
                    format!("partition is being moved and stayed blocked for over {max_wait:?}"),
                    "retry the statement",
                ));
            }
        }
    }
}
