//! A client transaction that spans servers. Its first server's backend is
//! the session's `lease`; each statement that routes to another server opens
//! a transaction there too (a *leg*, begun the way the client began its
//! transaction) and the backend it leaves is parked in `legs`. The end
//! comes for all legs together: ROLLBACK everywhere, or a two-phase commit
//! (PREPARE TRANSACTION on every leg, the decision recorded in etcd — the
//! commit point — then COMMIT PREPARED), so that no client ever sees a
//! transaction committed on one server and not on another.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::context::Shared;
use crate::failpoint;
use crate::metrics::Metrics;
use crate::pool::{Lease, Pool};
use crate::two_phase::TwoPhase;
use crate::wire::frame::Frame;
use crate::wire::messages;
use twophase::Gid;

use super::client::SessionError;
use super::extended::{Item, PortalUse, Portals};
use super::settings::{backend_settings_sql, replayed_settings};
use super::spans_servers;
use super::tx::is_tx_control;
use super::tx::Tx;
use super::Session;
use crate::wire::rows;

/// What a server answered to a statement the proxy sent on its own.
#[derive(Debug, Clone)]
pub(super) enum Reply {
    /// The CommandComplete tag of the last statement.
    Done(String),
    /// The first ErrorResponse: SQLSTATE and message.
    Failed { code: String, message: String },
}

/// Sends `sql` as one simple Query on a backend and hands every reply
/// message before ReadyForQuery to `each`; records the transaction status.
/// A connection that fails is marked broken.
pub(super) async fn query_replies(
    lease: &mut Lease,
    sql: &str,
    each: impl FnMut(Frame),
) -> io::Result<()> {
    let mut out = BytesMut::new();
    messages::query(sql, &mut out);
    send_replies(lease, &out, each).await
}

/// Sends `out` (a Query, or extended-protocol messages ending in Sync) on a
/// backend and hands every reply message before ReadyForQuery to `each`;
/// records the transaction status. A connection that fails is marked broken.
pub(super) async fn send_replies(
    lease: &mut Lease,
    out: &[u8],
    each: impl FnMut(Frame),
) -> io::Result<()> {
    lease.backend().exchange(out, each).await
}

/// Runs `sql` as one simple Query on a backend: its last CommandComplete
/// tag or its first error (notices are dropped: the client did not send it).
pub(super) async fn run_simple(lease: &mut Lease, sql: &str) -> io::Result<Reply> {
    let mut reply = Reply::Done(String::new());
    query_replies(lease, sql, |frame| match frame.tag {
        b'C' if matches!(reply, Reply::Done(_)) => {
            let body = frame.body();
            let end = body.iter().position(|b| *b == 0).unwrap_or(body.len());
            reply = Reply::Done(String::from_utf8_lossy(&body[..end]).into_owned());
        }
        b'E' if matches!(reply, Reply::Done(_)) => {
            let (code, message) = messages::error_summary(&frame.body());
            reply = Reply::Failed { code, message };
        }
        _ => {}
    })
    .await?;
    Ok(reply)
}

/// The first column of the first row `sql` returns, as text.
async fn first_value(lease: &mut Lease, sql: &str) -> io::Result<Option<String>> {
    let mut value = None;
    query_replies(lease, sql, |frame| {
        if frame.tag == b'D' && value.is_none() {
            value = rows::data_row_values(&frame.body())
                .ok()
                .and_then(|values| values.into_iter().next().flatten())
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        }
    })
    .await?;
    Ok(value)
}

/// Runs a statement on every lease at once (`sql` gets the lease's index);
/// gives the leases back in their order with what each answered.
pub(super) async fn run_on_all(
    leases: Vec<Lease>,
    sql: impl Fn(usize) -> String,
) -> Vec<(Lease, io::Result<Reply>)> {
    let count = leases.len();
    let mut tasks = JoinSet::new();
    for (index, mut lease) in leases.into_iter().enumerate() {
        let sql = sql(index);
        tasks.spawn(async move {
            let reply = run_simple(&mut lease, &sql).await;
            (index, lease, reply)
        });
    }
    let mut done: Vec<Option<(Lease, io::Result<Reply>)>> = (0..count).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        // A task that panicked dropped its lease, which closes the
        // connection and so rolls back what it held open.
        if let Ok((index, lease, reply)) = joined {
            if let Some(slot) = done.get_mut(index) {
                *slot = Some((lease, reply));
            }
        }
    }
    done.into_iter().flatten().collect()
}

/// COMMIT PREPARED on servers where it failed after the decision (a lost
/// connection, a server restarting), retried until it is done; then the
/// decision record goes. Recovery by other processes leaves a live proxy's
/// transactions alone, so finishing them is this proxy's job; if the proxy
/// dies first, they are no longer alive's and recovery finishes them.
async fn finish_commit(two_phase: Arc<TwoPhase>, gid: Gid, mut pools: Vec<Arc<Pool>>) {
    let sql = format!("COMMIT PREPARED '{gid}'");
    let mut delay = Duration::from_millis(200);
    while !pools.is_empty() {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
        let mut left = Vec::new();
        for pool in pools {
            let done = match pool.acquire().await {
                Ok(mut lease) => match run_simple(&mut lease, &sql).await {
                    Ok(Reply::Done(_)) => true,
                    // Already committed (by an earlier try whose reply was lost).
                    Ok(Reply::Failed { code, .. }) if code == "42704" => true,
                    Ok(Reply::Failed { code, message }) => {
                        warn!(%gid, server = %pool.server, %code, %message, "COMMIT PREPARED still failing");
                        false
                    }
                    Err(_) => false,
                },
                Err(_) => false,
            };
            if done {
                // What it committed may have changed a rule: its leg's
                // lease ended before the commit.
                pool.count_committed_changes();
            } else {
                left.push(pool);
            }
        }
        pools = left;
    }
    info!(%gid, "two-phase commit finished in the background");
    two_phase.forget(&gid).await;
}

/// Refuses a leg on a server that cannot PREPARE TRANSACTION (its
/// `max_prepared_transactions` is 0): better now, with a clear reason,
/// than at COMMIT. A server that can is remembered; one that cannot is
/// asked again next time (it may have been reconfigured and restarted).
async fn check_prepares(shared: &Shared, lease: &mut Lease) -> Result<(), Failure> {
    let server = lease.server().to_string();
    let known = shared
        .prepares
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains(&server);
    if known {
        return Ok(());
    }
    let value = first_value(lease, "SHOW max_prepared_transactions")
        .await
        .map_err(|e| {
            Failure::new(
                "08006",
                format!("connection to server {server} was lost: {e}"),
                "retry the transaction",
            )
        })?;
    match value.as_deref().map(str::parse::<u64>) {
        Some(Ok(n)) if n > 0 => {
            shared
                .prepares
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(server);
            Ok(())
        }
        _ => Err(Failure::new(
            "0A000",
            format!("this transaction would span servers, but server {server} has max_prepared_transactions = 0, so it cannot take part in a two-phase commit"),
            "set max_prepared_transactions > 0 on every server (it needs a restart), or keep each transaction's statements on one server",
        )),
    }
}

/// The statements that begin a leg, if the client's transaction opening can
/// be repeated on another server: BEGIN and what came with it before the
/// first statement (isolation level, SET), but not a SAVEPOINT, which would
/// exist on one server only.
pub(super) fn leg_prelude(prelude: &[String]) -> Option<String> {
    let replayable = prelude.iter().skip(1).all(|statement| {
        let first = statement
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        first == "set"
    });
    (replayable && !prelude.is_empty()).then(|| prelude.join("; "))
}

/// An error for the client: SQLSTATE (the proxy's own or a server's),
/// message and what to do.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub(super) code: String,
    pub(super) message: String,
    pub(super) hint: &'static str,
}

impl Failure {
    pub(super) fn new(
        code: impl Into<String>,
        message: impl Into<String>,
        hint: &'static str,
    ) -> Failure {
        Failure {
            code: code.into(),
            message: message.into(),
            hint,
        }
    }
}

/// How a transaction over several servers ended, for the client.
pub(super) enum Ended {
    Committed,
    RolledBack,
    Failed(Failure),
}

impl Session {
    /// Whether a transaction may extend to a second server in this session.
    pub(super) fn cross_server_allowed(&self) -> bool {
        self.cross_server
            .unwrap_or(self.shared.config.transactions.two_phase())
    }

    /// Makes `server`'s leg the active one inside the client's transaction:
    /// parks the active backend, takes the leg already open there or opens
    /// one (settings, then the client's BEGIN). On failure the transaction
    /// is left as it was; the caller reports the error and fails it.
    pub(super) async fn switch_leg(&mut self, server: &str) -> Result<(), Failure> {
        let active = self
            .lease
            .as_ref()
            .map(|l| l.server().to_string())
            .unwrap_or_default();
        let refused = |why: &str, hint: &'static str| {
            Failure::new(
                "0A000",
                format!("this statement runs on server {server}, but the transaction is on server {active}; {why}"),
                hint,
            )
        };
        if !self.cross_server_allowed() {
            return Err(refused(
                "transactions across servers are off (shardline.cross_server = refuse)",
                "start a new transaction for the other key, or SET shardline.cross_server = '2pc'",
            ));
        }
        if self.tx != Tx::Bound || self.unsynced {
            return Err(refused(
                "a request still in flight on it (no Sync yet) cannot move to another server",
                "send Sync before statements for keys on other servers",
            ));
        }
        if self.lease.as_ref().is_some_and(|l| l.status() == b'E') {
            return Err(Failure::new(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
                "ROLLBACK",
            ));
        }
        let Some(prelude) = self.leg_prelude.clone() else {
            return Err(refused(
                "it began in a way shardline cannot repeat on another server (BEGIN sent together with other statements, or a SAVEPOINT or SET LOCAL already ran)",
                "send BEGIN on its own and no SAVEPOINT before the transaction's statements reach a second server",
            ));
        };
        if let Some(index) = self.legs.iter().position(|l| &**l.server() == server) {
            // A leg is there already (the servers were checked then).
            let leg = self.legs.swap_remove(index);
            if let Some(parked) = self.lease.replace(leg) {
                self.legs.push(parked);
            }
            return Ok(());
        }
        if self.legs.is_empty() {
            if let Some(active) = self.lease.as_mut() {
                let shared = self.shared.clone();
                check_prepares(&shared, active).await?;
            }
        }
        let leg = self.open_leg(server, &prelude).await?;
        if self.legs.is_empty() {
            Metrics::add(&self.shared.metrics.cross_server_transactions, 1);
        }
        if let Some(parked) = self.lease.replace(leg) {
            self.legs.push(parked);
        }
        Ok(())
    }

    /// A backend of `server` in a new transaction of this session: the
    /// session's settings, then `prelude` (the client's BEGIN and what came
    /// with it); refused if the server cannot take part in a two-phase commit.
    pub(super) async fn open_leg(&mut self, server: &str, prelude: &str) -> Result<Lease, Failure> {
        let mut leg = self
            .acquire(server, false)
            .await
            .map_err(|(code, message)| Failure::new(code, message, "retry the transaction"))?;
        check_prepares(&self.shared.clone(), &mut leg).await?;
        let lost = |e: io::Error| {
            Failure::new(
                "08006",
                format!("connection to server {server} was lost: {e}"),
                "retry the transaction",
            )
        };
        if let Some(sql) = backend_settings_sql(&self.settings, leg.backend()) {
            // Before BEGIN: settings made inside a transaction are undone
            // by its rollback, and the pool would not know.
            if let Reply::Failed { code, message } =
                run_simple(&mut leg, &sql).await.map_err(lost)?
            {
                leg.backend().broken = true;
                return Err(Failure::new(code, message, "check the session's settings"));
            }
            leg.backend()
                .record_settings(replayed_settings(&self.settings));
        }
        match run_simple(&mut leg, prelude).await.map_err(lost)? {
            Reply::Done(_) => {}
            Reply::Failed { code, message } => {
                leg.backend().broken = true;
                return Err(Failure::new(code, message, "retry the transaction"));
            }
        }
        if prelude.contains(';') {
            leg.backend().mark_settings_unknown();
        }
        Ok(leg)
    }

    /// Rolls back and releases the parked legs (the active one is the
    /// caller's: the transaction failed or ended there).
    pub(super) async fn roll_back_legs(&mut self) {
        if self.legs.is_empty() {
            return;
        }
        let legs = std::mem::take(&mut self.legs);
        for (mut leg, reply) in run_on_all(legs, |_| "ROLLBACK".into()).await {
            if !matches!(reply, Ok(Reply::Done(_))) {
                leg.backend().broken = true;
            }
        }
    }

    /// COMMIT or ROLLBACK of a transaction with legs on several servers:
    /// writes CommandComplete (or the error) for the client and leaves the
    /// session outside any transaction. The caller sends ReadyForQuery.
    pub(super) async fn end_legs(&mut self, commit: bool) -> bool {
        match self.finish_legs(commit).await {
            Ended::Committed => messages::command_complete("COMMIT", &mut self.client.out),
            Ended::RolledBack => messages::command_complete("ROLLBACK", &mut self.client.out),
            Ended::Failed(failure) => {
                self.client
                    .error(&failure.code, &failure.message, Some(failure.hint));
                return false;
            }
        }
        true
    }

    /// Ends the transaction on every leg (two-phase commit, or ROLLBACK when
    /// `commit` is false or a leg had failed) and leaves the session outside
    /// any transaction; the caller answers the client.
    pub(super) async fn finish_legs(&mut self, commit: bool) -> Ended {
        let mut all = std::mem::take(&mut self.legs);
        all.extend(self.lease.take());
        self.set_cancel_target(None);
        let aborted = all.iter().any(|l| l.status() == b'E');
        let ended = if commit && !aborted {
            self.two_phase_commit(all).await
        } else {
            for (mut leg, reply) in run_on_all(all, |_| "ROLLBACK".into()).await {
                if !matches!(reply, Ok(Reply::Done(_))) {
                    leg.backend().broken = true;
                }
            }
            Ended::RolledBack
        };
        self.tx = Tx::Idle;
        self.leg_prelude = None;
        self.apply_tx_settings(matches!(ended, Ended::Committed));
        ended
    }

    /// PREPARE TRANSACTION on every leg, the decision in etcd, COMMIT
    /// PREPARED on every leg. Presumed abort: until the decision record is
    /// written, any failure rolls everything back; once it is written, the
    /// transaction is committed, whatever happens to the COMMIT PREPAREDs
    /// (what fails is finished by recovery).
    async fn two_phase_commit(&mut self, legs: Vec<Lease>) -> Ended {
        let two_phase = self.shared.two_phase.clone();
        let Some(gid) = two_phase.next_gid(&self.shared.liveness) else {
            for (mut leg, reply) in run_on_all(legs, |_| "ROLLBACK".into()).await {
                if !matches!(reply, Ok(Reply::Done(_))) {
                    leg.backend().broken = true;
                }
            }
            return Ended::Failed(Failure::new(
                "57P03",
                "this shardline proxy is not registered in etcd, so it cannot record a commit over several servers; the transaction was rolled back",
                "retry shortly, or connect to another proxy; check that etcd is reachable from this proxy",
            ));
        };
        let servers: Vec<String> = legs.iter().map(|l| l.server().to_string()).collect();
        let prepare = format!("PREPARE TRANSACTION '{gid}'");
        let prepared = if failpoint::armed("2pc:after_first_prepare") {
            let mut legs = legs.into_iter();
            let mut prepared =
                run_on_all(legs.next().into_iter().collect(), |_| prepare.clone()).await;
            failpoint::hit("2pc:after_first_prepare");
            prepared.extend(run_on_all(legs.collect(), |_| prepare.clone()).await);
            prepared
        } else {
            run_on_all(legs, |_| prepare.clone()).await
        };
        failpoint::hit("2pc:after_prepares");
        let mut failure: Option<Failure> = None;
        let mut holding = Vec::new();
        let mut unprepared = Vec::new();
        for ((mut leg, reply), server) in prepared.into_iter().zip(&servers) {
            tracing::debug!(%gid, %server, leg = %leg.server(), ?reply, "PREPARE TRANSACTION");
            match reply {
                Ok(Reply::Done(tag)) if tag == "PREPARE TRANSACTION" => holding.push(leg),
                Ok(Reply::Done(_)) => {
                    // PREPARE of an aborted transaction answers ROLLBACK.
                    failure.get_or_insert_with(|| {
                        Failure::new(
                            "40P01",
                            format!("the transaction was rolled back on server {server} before it could commit"),
                            "retry the transaction",
                        )
                    });
                    unprepared.push(leg);
                }
                Ok(Reply::Failed { code, message }) => {
                    failure.get_or_insert_with(|| {
                        Failure::new(
                            code,
                            format!("{message} (on server {server}; the transaction was rolled back on every server)"),
                            "retry the transaction",
                        )
                    });
                    unprepared.push(leg);
                }
                Err(e) => {
                    leg.backend().broken = true;
                    failure.get_or_insert_with(|| {
                        Failure::new(
                            "08006",
                            format!("connection to server {server} was lost while preparing to commit: {e}; the transaction was rolled back"),
                            "retry the transaction",
                        )
                    });
                }
            }
        }
        if failure.is_none() {
            match two_phase.record_commit(&gid, &servers).await {
                Ok(()) => {}
                Err(e) if e.outcome_unknown() => {
                    // The record may or may not exist: only recovery, which
                    // reads it, may finish these prepared transactions.
                    Metrics::add(&self.shared.metrics.two_phase_unknown, 1);
                    error!(%gid, error = %e, "two-phase commit: the decision's write has an unknown outcome; recovery will finish it");
                    return Ended::Failed(Failure::new(
                        "08007",
                        format!("the commit's outcome is unknown: etcd did not confirm the decision ({e}); the transaction is either committed on every server or on none"),
                        "check whether the transaction's rows are there before retrying it",
                    ));
                }
                Err(e) => {
                    failure = Some(Failure::new(
                        "57P03",
                        format!("the commit could not be recorded in etcd ({e}); the transaction was rolled back on every server"),
                        "retry the transaction; check that etcd is reachable from this proxy",
                    ));
                }
            }
        }
        if let Some(failure) = failure {
            Metrics::add(&self.shared.metrics.two_phase_rollbacks, 1);
            let rollback = format!("ROLLBACK PREPARED '{gid}'");
            let mut rolled = run_on_all(holding, |_| rollback.clone()).await;
            rolled.extend(run_on_all(unprepared, |_| "ROLLBACK".into()).await);
            for (mut leg, reply) in rolled {
                if !matches!(reply, Ok(Reply::Done(_))) {
                    // Left prepared without a decision: recovery rolls it back.
                    warn!(%gid, server = %leg.server(), "two-phase commit: could not roll back a leg; recovery will");
                    leg.backend().broken = true;
                }
            }
            return Ended::Failed(failure);
        }
        failpoint::hit("2pc:after_decision");
        let commit = format!("COMMIT PREPARED '{gid}'");
        let committed = if failpoint::armed("2pc:after_first_commit") {
            let mut legs = holding.into_iter();
            let mut committed =
                run_on_all(legs.next().into_iter().collect(), |_| commit.clone()).await;
            failpoint::hit("2pc:after_first_commit");
            committed.extend(run_on_all(legs.collect(), |_| commit.clone()).await);
            committed
        } else {
            run_on_all(holding, |_| commit.clone()).await
        };
        let mut unfinished = Vec::new();
        for (mut leg, reply) in committed {
            if !matches!(reply, Ok(Reply::Done(_))) {
                leg.backend().broken = true;
                warn!(%gid, server = %leg.server(), ?reply, "two-phase commit: COMMIT PREPARED failed after the decision; retrying in the background");
                if let Ok(pool) = self.pool_for(leg.server()) {
                    unfinished.push(pool);
                }
            }
        }
        Metrics::add(&self.shared.metrics.two_phase_commits, 1);
        if unfinished.is_empty() {
            // The record is no longer needed once every leg committed; its
            // delete (an etcd round trip) need not delay the client's reply.
            let gid = gid.clone();
            tokio::spawn(async move { two_phase.forget(&gid).await });
        } else {
            tokio::spawn(finish_commit(two_phase, gid.clone(), unfinished));
        }
        info!(%gid, servers = ?servers, "two-phase commit");
        Ended::Committed
    }
}

impl Session {
    /// An extended-protocol COMMIT or ROLLBACK of a transaction that spans
    /// servers (as pgjdbc sends them: Parse/Bind/Execute/Sync). Everything
    /// in the request must be transaction control the proxy answers.
    pub(super) async fn end_legs_extended(
        &mut self,
        items: &[Item],
        portals: &Portals,
        synced: bool,
    ) -> Result<(), SessionError> {
        let forwards = portals.values().any(|u| matches!(u, PortalUse::Forward));
        let describes_data = items.iter().any(|item| {
            matches!(item, Item::Describe(_, target, Some(statement))
                if target.kind == b'S' && !is_tx_control(statement.command()))
        });
        if forwards || describes_data {
            let error =
                spans_servers("COMMIT or ROLLBACK sent in one request with other statements");
            return self.refuse_extended(&error, synced).await;
        }
        let mut cursor = portals.cursor();
        let mut failed = false;
        for item in items {
            let usage = cursor.step(item);
            if failed {
                // Postgres skips to Sync after an error.
                continue;
            }
            match item {
                Item::Parse(..) => messages::empty(b'1', &mut self.client.out),
                Item::Bind(..) => messages::empty(b'2', &mut self.client.out),
                Item::Close(..) => messages::empty(b'3', &mut self.client.out),
                Item::Describe(_, target, _) => {
                    if target.kind == b'S' {
                        rows::no_parameters(&mut self.client.out);
                    }
                    messages::empty(b'n', &mut self.client.out);
                }
                Item::Execute(..) => match usage {
                    Some(PortalUse::EndLegs(commit)) => {
                        let commit = *commit;
                        if self.legs.is_empty() && self.lease.is_none() {
                            // Ended by an earlier Execute of this request.
                            messages::command_complete(
                                if commit { "COMMIT" } else { "ROLLBACK" },
                                &mut self.client.out,
                            );
                        } else {
                            failed = !self.end_legs(commit).await;
                        }
                    }
                    Some(PortalUse::Answer(tag)) => {
                        messages::command_complete(tag, &mut self.client.out)
                    }
                    _ => {}
                },
                Item::Sync(_) | Item::Flush(_) => {}
            }
        }
        if synced {
            self.ready().await
        } else {
            if failed {
                self.skipping = true;
            }
            self.client.flush().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prelude_repeats_only_without_savepoints() {
        let begin = |rest: &[&str]| {
            let mut all = vec!["BEGIN ISOLATION LEVEL REPEATABLE READ".to_string()];
            all.extend(rest.iter().map(|s| s.to_string()));
            all
        };
        assert_eq!(
            leg_prelude(&begin(&[])).as_deref(),
            Some("BEGIN ISOLATION LEVEL REPEATABLE READ")
        );
        assert_eq!(
            leg_prelude(&begin(&["SET LOCAL statement_timeout = 5"])).as_deref(),
            Some("BEGIN ISOLATION LEVEL REPEATABLE READ; SET LOCAL statement_timeout = 5")
        );
        assert_eq!(leg_prelude(&begin(&["SAVEPOINT a"])), None);
        assert_eq!(leg_prelude(&[]), None);
    }
}
