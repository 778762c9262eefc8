//! Binding a request to a backend: the server its route names (or the
//! transaction's), a connection from that server's pool or a replica's,
//! the cancel target, the session's settings and held-back BEGIN, then
//! sending the request and retrying once a stale kept statement is dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::PreparedStatements;
use bytes::{Bytes, BytesMut};
use tracing::{debug, warn};

use crate::cancel::CancelTarget;
use crate::metrics::Metrics;
use crate::pool::{Lease, Pool, PoolError};
use crate::route::{Route, RouteError};
use crate::wire::messages;

use super::begin::place_begin;
use super::client::SessionError;
use super::hold::not_serving;
use super::owner_check;
use super::plan::{End, Outcome, Plan};
use super::relay::RelayError;
use super::settings::{backend_settings_sql, replayed_settings};
use super::tx::Tx;
use super::{Request, Session};

/// Writes a request into the plan, given the backend's prepared statements.
pub(super) type BuildRequest<'a> =
    dyn FnMut(&Session, &Request, &mut Plan, &mut PreparedStatements) + Send + 'a;

/// `build`, then degraded mode's ownership check for `checks` (if any) in
/// front of what it wrote.
fn build_checked(
    build: &mut BuildRequest<'_>,
    session: &Session,
    request: &Request,
    plan: &mut Plan,
    prepared: &mut PreparedStatements,
    checks: &[(String, String)],
) -> Result<(), owner_check::Unplaceable> {
    let (out_mark, expects_mark) = (plan.out.len(), plan.expects.len());
    build(session, request, plan, prepared);
    owner_check::place(plan, out_mark, expects_mark, checks, prepared)
}

impl Session {
    /// Sends a simple Query message as it came from the client.
    pub(super) async fn dispatch_query(
        &mut self,
        route: Route,
        request: Request,
        query: &Bytes,
        outcome: &mut Outcome,
    ) -> Result<bool, SessionError> {
        let mut build = |_: &Session, _: &Request, plan: &mut Plan, _: &mut PreparedStatements| {
            plan.send(query, End::Query);
        };
        self.dispatch(route, request, &mut build, outcome).await
    }

    /// Binds a backend for `route`, brings it in line with the session
    /// (settings; the held-back BEGIN when the request `binds_tx`), sends the
    /// request `build` produces and relays the replies. Returns false if no
    /// backend could be used (an error went to the client instead). A request
    /// that is not `synced` (it ended in Flush) keeps the backend for the Sync.
    ///
    /// In degraded mode the request proves ownership first (`owner_check`);
    /// if the server no longer owns a partition and nothing reached the
    /// client, the request is held and sent again (the partition may come
    /// back, as when a move is undone) until `blocked_wait_ms`.
    pub(super) async fn dispatch(
        &mut self,
        route: Route,
        mut request: Request,
        build: &mut BuildRequest<'_>,
        outcome: &mut Outcome,
    ) -> Result<bool, SessionError> {
        let checking = self.checks_ownership(&route);
        request.retry_check = checking && request.synced && self.can_resend();
        // What a failed check must undo: the held-back transaction it began.
        let saved = request
            .retry_check
            .then(|| (self.tx.clone(), self.leg_prelude.clone()));
        let mut held: Option<Instant> = None;
        loop {
            let reached = self.dispatch_once(&route, request, build, outcome).await?;
            if !outcome.recheck {
                self.record_held(held);
                return Ok(reached);
            }
            if let Some((tx, leg_prelude)) = &saved {
                self.tx = tx.clone();
                self.leg_prelude = leg_prelude.clone();
            }
            let started = *held.get_or_insert_with(Instant::now);
            let max_wait = Duration::from_millis(self.shared.config.limits.blocked_wait_ms);
            let remaining = max_wait.saturating_sub(started.elapsed());
            if !remaining.is_zero() && !self.shared.liveness.serving() {
                // Still cut off: look again shortly, or as soon as etcd is back.
                self.set_waiting(true);
                let mut changes = self.shared.liveness.watch();
                let _ = tokio::time::timeout(
                    remaining.min(Duration::from_millis(100)),
                    changes.changed(),
                )
                .await;
                self.set_waiting(false);
            }
            let still_cut_off = !self.shared.liveness.serving();
            if !still_cut_off || started.elapsed() >= max_wait {
                let said = outcome.check_detail.take().unwrap_or_default();
                let message = if still_cut_off {
                    format!("a partition this statement needs is not on the server this proxy's cached map names (the server said: {said}), and this proxy has been cut off from etcd for over {max_wait:?}: it cannot learn where the partition went")
                } else {
                    format!("a partition this statement needs moved while this proxy was cut off from etcd (the server said: {said}); the proxy now has the current map")
                };
                self.client.error(
                    "55006",
                    &message,
                    Some("retry the statement (or connect to another proxy); nothing of it ran"),
                );
                Metrics::add(&self.shared.metrics.route_errors, 1);
                self.fail_transaction().await;
                self.end_failed_request(request.synced && !request.flush_as_sync)
                    .await?;
                return Ok(false);
            }
            *outcome = Outcome::default();
        }
    }

    /// Whether a request on `route` must prove ownership: it touches
    /// partitions, and its route came from a map that may be stale.
    fn checks_ownership(&self, route: &Route) -> bool {
        !route.partitions().is_empty()
            && (self.routed_degraded.load(Ordering::Relaxed) || !self.shared.liveness.serving())
    }

    /// The `(parent, leaf)` pairs to check for `route` and the partitions
    /// they stand for: those the open transaction has not checked yet.
    fn owner_checks(&mut self, route: &Route) -> (Vec<(String, String)>, Vec<u32>) {
        if self.tx != Tx::Bound {
            self.owner_checked.clear();
        }
        if !self.checks_ownership(route) {
            return (Vec::new(), Vec::new());
        }
        let fresh: Vec<u32> = route
            .partitions()
            .iter()
            .copied()
            .filter(|p| !self.owner_checked.contains(p))
            .collect();
        let snapshot = self.shared.map.borrow().clone();
        let pairs =
            snapshot.map_or_else(Vec::new, |s| owner_check::leaves_to_check(&s.map, &fresh));
        (pairs, fresh)
    }

    async fn dispatch_once(
        &mut self,
        route: &Route,
        mut request: Request,
        build: &mut BuildRequest<'_>,
        outcome: &mut Outcome,
    ) -> Result<bool, SessionError> {
        let Request {
            binds_tx,
            synced,
            read_only,
            ..
        } = request;
        let client_synced = synced && !request.flush_as_sync;
        if matches!(route, &Route::Scatter { .. }) {
            // Scatter reads have their own path (`scatter`); never let one
            // fall through to "any server".
            self.client.error(
                "XX000",
                "internal error: a read across servers reached the single-server path",
                Some("report this to the shardline developers"),
            );
            self.end_failed_request(client_synced).await?;
            return Ok(false);
        }
        if let Route::Writes { servers, .. } = route {
            // Writes across servers need their own path (one transaction
            // over the servers, two-phase commit), not wired yet: refuse
            // them as the router refuses other cross-server statements,
            // never fall through to "any server".
            let error = RouteError::new(
                "0A000",
                format!(
                    "this statement writes rows on servers {}; writes across servers are not supported yet",
                    servers.join(", ")
                ),
                "send one statement per server's keys",
            );
            self.route_error(&error);
            self.fail_transaction().await;
            self.end_failed_request(client_synced).await?;
            return Ok(false);
        }
        let held = self.lease.as_ref().map(|l| l.server().to_string());
        let target = match (route.server(), &held) {
            (Some(server), Some(held)) if server != held => {
                // The transaction extends to another server (or is refused).
                if let Err(failure) = self.switch_leg(server).await {
                    self.client
                        .error(&failure.code, &failure.message, Some(failure.hint));
                    Metrics::add(&self.shared.metrics.route_errors, 1);
                    self.fail_transaction().await;
                    self.end_failed_request(client_synced).await?;
                    return Ok(false);
                }
                server.to_string()
            }
            (Some(server), _) => server.to_string(),
            (None, Some(held)) => held.clone(),
            (None, None) => match self.any_server() {
                Some(server) => server,
                None => {
                    self.client
                        .error("57P03", "the shard map has no servers", None);
                    self.end_failed_request(client_synced).await?;
                    return Ok(false);
                }
            },
        };
        // Reads may go to a replica when the client asked for it (session
        // setting, or a READ ONLY transaction); writes never do.
        let replica = read_only
            && match &self.tx {
                Tx::Idle => self.read_replica,
                Tx::Deferred {
                    read_only: true, ..
                } => binds_tx,
                _ => false,
            };
        let mut lease = match self.lease.take() {
            Some(lease) => lease,
            None => match self.acquire(&target, replica).await {
                Ok(lease) => lease,
                Err((code, message)) => {
                    self.client.error(
                        code,
                        &message,
                        Some("retry later; keys on other servers are unaffected"),
                    );
                    self.fail_transaction().await;
                    self.end_failed_request(client_synced).await?;
                    return Ok(false);
                }
            },
        };
        let liveness = &self.shared.liveness;
        if !liveness.serving() && !liveness.degraded() && !matches!(route, &Route::Any) {
            // Not registered (yet): the route may be stale. (Requests that
            // touch no partition, such as a Parse/Describe or a catalog
            // query, do not depend on the map; in degraded mode the
            // ownership check below covers the rest.)
            if self.tx == Tx::Bound {
                self.lease = Some(lease);
            }
            self.route_error(&not_serving());
            self.fail_transaction().await;
            self.end_failed_request(client_synced).await?;
            return Ok(false);
        }
        {
            let backend = lease.backend();
            self.set_cancel_target(Some(CancelTarget {
                addr: backend.addr.clone(),
                process_id: backend.process_id,
                secret_key: backend.secret_key,
            }));
        }
        // Prefix: settings the backend lacks, then a held-back BEGIN.
        let mut plan = self.plan_buffers.take().unwrap_or_default();
        plan.out.clear();
        plan.expects.clear();
        if let Some(sql) = backend_settings_sql(&self.settings, lease.backend()) {
            let mut out = BytesMut::new();
            messages::query(&sql, &mut out);
            plan.inject(&out, End::Query);
            lease
                .backend()
                .record_settings(replayed_settings(&self.settings));
        }
        // The held-back transaction this request begins on the server, to
        // begin again should a stale kept statement have aborted it.
        let mut began: Option<String> = None;
        let mut began_alone = false;
        if binds_tx {
            if let Tx::Deferred { prelude, .. } = &self.tx {
                self.leg_prelude = super::legs::leg_prelude(prelude);
                // Put in front of the request once it is written (`place_begin`).
                began = Some(prelude.join("; "));
                began_alone = prelude.len() == 1;
                if !began_alone {
                    // SET/SAVEPOINT sent with the BEGIN: not tracked exactly.
                    lease.backend().mark_settings_unknown();
                }
                self.tx = Tx::Bound;
            }
        }
        if request.changes_session_state {
            lease.backend().mark_settings_unknown();
        }
        if !synced {
            lease.backend().pending_sync = true;
        }
        let (checks, checked) = self.owner_checks(route);
        if !checks.is_empty() {
            Metrics::add(&self.shared.metrics.owner_checks, 1);
        }
        let mut prepared = lease.backend().take_prepared();
        let request_at = (plan.out.len(), plan.expects.len());
        let built = build_checked(build, self, &request, &mut plan, &mut prepared, &checks);
        if let Some(sql) = &began {
            let max_kept = self.shared.config.pool.max_prepared_unnamed;
            place_begin(
                &mut plan,
                request_at,
                sql,
                began_alone,
                &mut prepared,
                max_kept,
            );
        }
        lease.backend().prepared = prepared;
        if built.is_err() {
            // Never send a degraded-mode request unchecked.
            lease.backend().broken = true;
            self.client.error(
                "XX000",
                "internal error: the ownership check could not be placed in this request",
                Some("report this to the shardline developers; retry once the proxy reaches etcd"),
            );
            self.fail_transaction().await;
            self.end_failed_request(client_synced).await?;
            return Ok(false);
        }
        let mut result = self.relay(&mut lease, &mut plan, &request, outcome).await;
        if let (Ok(()), Some(stale)) = (&result, outcome.stale.take()) {
            // A table under a kept-prepared statement changed its columns:
            // drop the statement and run the request as the client sent it.
            debug!(statement = %stale, "kept-prepared statement went stale; sending the request again");
            Metrics::add(&self.shared.metrics.stale_plan_retries, 1);
            // A change behind the proxy's back: other connections prepare
            // their statements again before they run in a transaction.
            lease.backend().prepared.count_catalog_change();
            lease.backend().prepared.remove(&stale);
            plan.out.clear();
            plan.expects.clear();
            if let Some(sql) = &began {
                // The failed Bind aborted the transaction the request
                // began: roll it back and begin it again.
                let mut out = BytesMut::new();
                messages::query("ROLLBACK", &mut out);
                plan.inject(&out, End::Query);
                out.clear();
                messages::query(sql, &mut out);
                plan.inject(&out, End::Query);
            }
            plan.close_statement(&stale);
            request.keep_unnamed = false;
            let mut prepared = lease.backend().take_prepared();
            let built = build_checked(build, self, &request, &mut plan, &mut prepared, &checks);
            lease.backend().prepared = prepared;
            result = match built {
                Ok(()) => self.relay(&mut lease, &mut plan, &request, outcome).await,
                Err(_) => Err(RelayError::Backend(std::io::Error::other(
                    "the ownership check could not be placed in the request sent again",
                ))),
            };
        }
        if request.drops_statements {
            // DISCARD/DEALLOCATE on a shared connection: its prepared
            // statements are no longer known; do not reuse it.
            lease.backend().broken = true;
        }
        // Keep the buffers for the next request (bounded, so one huge request
        // does not pin memory for the session's life).
        if plan.out.capacity() <= 64 * 1024 {
            self.plan_buffers = Some(plan);
        }
        match result {
            Ok(()) => {}
            Err(RelayError::Client(e)) => {
                lease.backend().broken = true;
                return Err(e);
            }
            Err(RelayError::Backend(e)) => {
                lease.backend().broken = true;
                Metrics::add(&self.shared.metrics.backend_errors, 1);
                warn!(server = %target, error = %e, "backend connection lost");
                let was_in_tx = !matches!(self.tx, Tx::Idle);
                self.client.error(
                    "08006",
                    &format!("connection to server {target} was lost: {e}"),
                    Some(if was_in_tx {
                        "the transaction was rolled back; retry it"
                    } else {
                        "retry the statement"
                    }),
                );
                self.tx = if was_in_tx { Tx::Aborted } else { Tx::Idle };
                self.tx_settings.clear();
                self.roll_back_legs().await;
                self.set_cancel_target(None);
                drop(lease);
                self.end_failed_request(client_synced).await?;
                return Ok(true);
            }
        }
        if outcome.recheck {
            // The server undid the request; a transaction it began there is
            // aborted: that connection is not reused.
            if lease.status() != b'I' {
                lease.backend().broken = true;
            }
            self.set_cancel_target(None);
            return Ok(true);
        }
        let status = lease.status();
        if status != b'I' {
            self.owner_checked.extend(checked);
        }
        if status == b'I' && !self.legs.is_empty() {
            // The transaction ended on one server only: the proxy stops
            // every statement that could do this before it is sent, so
            // this is a bug; the other legs roll back rather than commit.
            tracing::error!(server = %target, "a transaction over several servers ended on one of them; rolling back the others");
            self.roll_back_legs().await;
        }
        if status == b'I' {
            if self.tx == Tx::Bound {
                self.apply_tx_settings(outcome.committed);
                self.tx = Tx::Idle;
                self.leg_prelude = None;
            }
        } else {
            self.tx = Tx::Bound;
        }
        self.unsynced = !synced;
        if status == b'I' && synced {
            self.set_cancel_target(None);
            drop(lease);
        } else {
            self.lease = Some(lease);
        }
        Ok(true)
    }

    pub(super) async fn acquire(
        &mut self,
        target: &str,
        replica: bool,
    ) -> Result<Lease, (&'static str, String)> {
        let pool = if replica {
            self.replica_pool_for(target)?
        } else {
            self.pool_for(target)?
        };
        pool.acquire().await.map_err(|e| match e {
            // The server is reachable: every connection is busy. Not a
            // connection failure, so that drivers do not reconnect for it.
            PoolError::Exhausted { .. } => {
                let stats = &pool.stats;
                warn!(
                    server = %target,
                    idle = pool.idle_count(),
                    waiting_in_all_threads = pool.waiting_in_all_threads(),
                    pools = %pool.threads_summary(),
                    checkouts = stats.checkouts.load(Ordering::Relaxed),
                    connects = stats.connects.load(Ordering::Relaxed),
                    closed_unhealthy = stats.closed_unhealthy.load(Ordering::Relaxed),
                    error = %e,
                    "pool exhausted"
                );
                ("53300", e.to_string())
            }
            e => {
                warn!(server = %target, error = %e, "no backend connection");
                ("08006", format!("cannot reach server {target}: {e}"))
            }
        })
    }

    /// The pool of `target`, remembered per map version so the common case
    /// (same server, same map) costs no lookups.
    pub(super) fn pool_for(&mut self, target: &str) -> Result<Arc<Pool>, (&'static str, String)> {
        let snapshot = self.shared.map.borrow();
        let version = snapshot.as_ref().map_or(0, |v| v.revision);
        if let Some((cached_version, name, pool)) = self.last_pool.as_deref() {
            if *cached_version == version && name.as_str() == target {
                return Ok(pool.clone());
            }
        }
        let server = snapshot
            .as_ref()
            .and_then(|v| v.map.servers.get(target))
            .ok_or_else(|| ("57P03", format!("server {target} is not in the shard map")))?;
        let pool = self.shared.pools.for_server(server);
        drop(snapshot);
        self.last_pool = Some(Box::new((version, target.to_string(), pool.clone())));
        Ok(pool)
    }

    /// A pool of one of `target`'s read replicas (round robin), or of the
    /// primary if it has none.
    pub(super) fn replica_pool_for(
        &mut self,
        target: &str,
    ) -> Result<Arc<Pool>, (&'static str, String)> {
        let snapshot = self.shared.map.borrow();
        let server = snapshot
            .as_ref()
            .and_then(|v| v.map.servers.get(target))
            .ok_or_else(|| ("57P03", format!("server {target} is not in the shard map")))?;
        if server.replicas.is_empty() {
            let pool = self.shared.pools.for_server(server);
            return Ok(pool);
        }
        let index = self.replica_turn % server.replicas.len();
        self.replica_turn = self.replica_turn.wrapping_add(1);
        Ok(self.shared.pools.for_replica(server, index))
    }

    /// The server for statements any server could run (catalog queries,
    /// statements without tables): always the same one — the first by name —
    /// so that a client sees one consistent catalog.
    pub(super) fn any_server(&self) -> Option<String> {
        let snapshot = self.shared.map.borrow().clone()?;
        // A serving server (a joining one may not have its reference
        // tables' rows yet): the first of the proxy's region by name, else
        // the first by name.
        let region = self.shared.config.region.as_deref();
        let mut serving = snapshot.map.serving_servers();
        let first = serving.next()?;
        let local = std::iter::once(first)
            .chain(serving)
            .find(|s| region.is_some() && s.region.as_deref() == region);
        Some(local.unwrap_or(first).name.clone())
    }

    pub(super) fn set_cancel_target(&self, target: Option<CancelTarget>) {
        *self.cancel_slot.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }
}
