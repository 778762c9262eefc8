//! Scatter reads, the running part: one statement on several servers at
//! once. Each server gets a task of its own that owns that server's backend
//! for the request, prepares the server's statement (the planner's
//! `partial_sql`), binds the client's parameters with the result formats the
//! merge needs, and sends the rows to the session through a bounded channel
//! (so a slow client slows the servers down instead of filling memory).
//! How the rows are merged is `gather`'s business.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;
use tracing::warn;

use crate::analyze::scatter::{Merge, ScatterPlan};
use crate::pool::Lease;
use crate::wire::messages;
use crate::wire::rows::{self, format_of, Field};

use super::client::SessionError;
use super::extended::{Item, PortalUse, Portals};
use super::settings::{backend_settings_sql, replayed_settings};
use super::statements::Prepared;
use super::tx::is_tx_control;
use super::tx::Tx;
use super::Session;
use crate::route::{array_param_by_server, RouteError};
use crate::wire::messages::Bind;

/// Rows a server task sends in one message, at most.
const ROWS_PER_BATCH: usize = 256;
/// Batches a server may have in flight before it waits for the session.
const BATCHES_IN_FLIGHT: usize = 4;

/// The client's statement as the scatter runs it.
#[derive(Debug, Clone)]
pub(super) struct ScatterStatement {
    /// Parameter types the client declared (may be shorter than `params`).
    pub(super) param_types: Vec<u32>,
    pub(super) param_formats: Vec<i16>,
    pub(super) params: Vec<Option<Bytes>>,
    /// Result format codes as the client's Bind gave them (none: text).
    pub(super) result_formats: Vec<i16>,
    /// Send a RowDescription (a simple Query, or a Describe of the portal).
    pub(super) describe: bool,
    /// `key = ANY($n)`: parameter n's value per server, only that server's keys.
    pub(super) keys_by_server: Option<(usize, BTreeMap<String, Bytes>)>,
    /// The Execute's row limit: past it the reply ends in PortalSuspended.
    pub(super) fetch: Option<u64>,
}

/// What a server's task reports, in order: `Described` (or `Failed`), then
/// rows, then `Done` or `Failed`.
#[derive(Debug)]
pub(super) enum Event {
    Described {
        server: usize,
        /// ParameterDescription body.
        params: Bytes,
        /// `None`: the statement returns no rows (NoData).
        fields: Option<Vec<Field>>,
        /// The database's lc_collate, when it was asked for.
        collate: Option<String>,
    },
    Rows(Vec<Bytes>),
    Done,
    /// The server refused or failed the statement: its ErrorResponse.
    Failed(Bytes),
    /// The connection to the server broke.
    Lost {
        server: usize,
        error: String,
    },
    Notice(Bytes),
}

/// Everything a server's task needs, shared by all of them.
struct Job {
    sql: String,
    /// The client's statement, prepared first when parameter types are open.
    original_sql: String,
    statement: ScatterStatement,
    /// Columns after the client's: hidden sort keys and their collations.
    hidden: usize,
    merge_kind: MergeKind,
    /// The server stops early only when a LIMIT was pushed down: the rest of
    /// its rows is then bounded and read away, keeping the connection.
    drain_ok: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MergeKind {
    Concat,
    Sorted,
    Combine,
}

impl Job {
    /// Whether a parameter has no declared type.
    fn types_open(&self) -> bool {
        let declared = &self.statement.param_types;
        (0..self.statement.params.len()).any(|i| declared.get(i).copied().unwrap_or(0) == 0)
    }

    /// Result formats for `columns` columns: the client's for the columns it
    /// sees; binary sort keys and text collation names for a sorted merge;
    /// text partial rows for a combine (they become text parameters).
    // `is_multiple_of` is newer than the workspace's rust-version (1.80).
    #[allow(clippy::manual_is_multiple_of)]
    fn result_formats(&self, columns: usize) -> Vec<i16> {
        match self.merge_kind {
            MergeKind::Concat => self.statement.result_formats.clone(),
            MergeKind::Combine => Vec::new(),
            MergeKind::Sorted => (0..columns)
                .map(|i| {
                    let visible = columns.saturating_sub(self.hidden);
                    if i < visible {
                        format_of(&self.statement.result_formats, i)
                    } else if (i - visible) % 2 == 0 {
                        1
                    } else {
                        0
                    }
                })
                .collect(),
        }
    }
}

/// The backends of one scatter request, by server index; the one that
/// belongs to the client's transaction is marked.
pub(super) struct Backends {
    pub(super) leases: Vec<Option<Lease>>,
    pub(super) tx_index: Option<usize>,
    /// Indexes of backends that are parked legs of the client's
    /// transaction (it spans servers): they go back to the legs after.
    pub(super) from_legs: Vec<usize>,
}

impl Session {
    /// An extended-protocol request whose Bind reads across servers. The
    /// read must be its only portal the proxy does not answer itself (it may
    /// follow a BEGIN the proxy holds back, as pgjdbc sends it); Parse,
    /// Bind, Close and the answered portals get the proxy's replies in
    /// order, the read's Describe and Execute get the scatter's (with
    /// PortalSuspended when an Execute row limit cuts it short).
    pub(super) async fn scatter_extended(
        &mut self,
        items: &[Item],
        portals: &Portals,
        tx_state: Tx,
        servers: &[String],
        synced: bool,
    ) -> Result<(), SessionError> {
        let uses: Vec<Option<&PortalUse>> = {
            let mut cursor = portals.cursor();
            items.iter().map(|item| cursor.step(item)).collect()
        };
        let scatters = |item: &Item, usage: &Option<&PortalUse>| {
            matches!(usage, Some(PortalUse::Forward)) && matches!(item, Item::Bind(..))
        };
        let forwarded: Vec<(&Bind, &Arc<Prepared>)> = items
            .iter()
            .zip(&uses)
            .filter(|(item, usage)| scatters(item, usage))
            .filter_map(|(item, _)| match item {
                Item::Bind(_, bind, Some(statement)) => Some((bind, statement)),
                _ => None,
            })
            .collect();
        let refusal = match forwarded.as_slice() {
            [_] => items.iter().find_map(|item| match item {
                Item::Describe(_, target, Some(statement))
                    if target.kind == b'S' && !is_tx_control(statement.command()) =>
                {
                    Some("describing a statement that reads across servers in the same request as running it is not supported")
                }
                _ => None,
            }).or_else(|| {
                let executes = items
                    .iter()
                    .zip(&uses)
                    .filter(|(item, usage)| {
                        matches!(item, Item::Execute(..)) && matches!(usage, Some(PortalUse::Forward))
                    })
                    .count();
                (executes != 1).then_some("a read across servers must be executed once in the request that binds it")
            }),
            _ => Some("a read across servers must be the only statement of its request that runs on a server (no pipelining with other statements)"),
        };
        let (Some((bind, statement)), None) = (forwarded.first(), refusal) else {
            let error = RouteError::new(
                "0A000",
                refusal.unwrap_or("a read across servers must be bound and executed in the same request"),
                "send it as Parse/Bind/Describe/Execute/Sync on its own, or through the simple protocol",
            );
            return self.refuse_extended(&error, synced).await;
        };
        let result_formats = match rows::decode_result_formats(bind.result_formats.clone()) {
            Ok(formats) => formats,
            Err(e) => return Err(SessionError::ClientProtocol(e.to_string())),
        };
        self.enter_answered_state(tx_state, portals);
        let mut describe = false;
        let mut failed = false;
        for (item, usage) in items.iter().zip(&uses) {
            let scatter_portal = matches!(usage, Some(PortalUse::Forward));
            match item {
                Item::Parse(..) => messages::empty(b'1', &mut self.client.out),
                Item::Bind(..) => messages::empty(b'2', &mut self.client.out),
                Item::Close(..) => messages::empty(b'3', &mut self.client.out),
                Item::Describe(_, target, _) if target.kind == b'P' => {
                    if scatter_portal {
                        // Its RowDescription comes with the rows.
                        describe = true;
                    } else {
                        messages::empty(b'n', &mut self.client.out);
                    }
                }
                Item::Describe(..) => {
                    // Transaction control: no parameters, no rows.
                    rows::no_parameters(&mut self.client.out);
                    messages::empty(b'n', &mut self.client.out);
                }
                Item::Execute(frame, _) if scatter_portal => {
                    let limit = execute_row_limit(&frame.body());
                    let scatter = ScatterStatement {
                        param_types: statement.param_types.clone(),
                        param_formats: bind.param_formats.clone(),
                        params: bind.params.clone(),
                        result_formats: result_formats.clone(),
                        describe,
                        keys_by_server: self.keys_by_server(statement, bind),
                        fetch: u64::try_from(limit).ok().filter(|n| *n > 0),
                    };
                    if !self
                        .scatter_request(servers, &statement.query, scatter)
                        .await?
                    {
                        failed = true;
                        break;
                    }
                }
                Item::Execute(..) => {
                    if let Some(PortalUse::Answer(tag)) = usage {
                        messages::command_complete(tag, &mut self.client.out);
                    }
                }
                Item::Sync(_) | Item::Flush(_) => {}
            }
        }
        self.end_request(synced, failed).await
    }

    /// `key = ANY($n)`: the parameter's value for each server.
    fn keys_by_server(
        &self,
        statement: &Prepared,
        bind: &Bind,
    ) -> Option<(usize, BTreeMap<String, Bytes>)> {
        let Some(crate::analyze::Command::Data(data)) = statement.command() else {
            return None;
        };
        let snapshot = self.shared.map.borrow().clone()?;
        array_param_by_server(data, &snapshot.map, bind)
    }

    /// Takes a backend on every server of the scatter: the transaction's own
    /// for its server (so the read sees the transaction's writes), pooled
    /// ones (or replicas, under the same rules as single-server reads) for
    /// the others. On failure the error is written for the client.
    pub(super) async fn scatter_backends(&mut self, servers: &[String]) -> Result<Backends, ()> {
        let replica = match &self.tx {
            Tx::Idle => self.read_replica,
            Tx::Deferred { read_only, .. } => *read_only,
            _ => false,
        };
        let mut backends = Backends {
            leases: Vec::with_capacity(servers.len()),
            tx_index: None,
            from_legs: Vec::new(),
        };
        for (index, server) in servers.iter().enumerate() {
            let held = self
                .lease
                .as_ref()
                .is_some_and(|l| l.server().as_ref() == server.as_str());
            if held {
                backends.leases.push(self.lease.take());
                backends.tx_index = Some(index);
                continue;
            }
            if let Some(leg) = self
                .legs
                .iter()
                .position(|l| l.server().as_ref() == server.as_str())
            {
                backends.leases.push(Some(self.legs.swap_remove(leg)));
                backends.from_legs.push(index);
                continue;
            }
            match self.acquire(server, replica).await {
                Ok(lease) => backends.leases.push(Some(lease)),
                Err((code, message)) => {
                    self.client.error(
                        code,
                        &message,
                        Some("retry later; reads that need only other servers are unaffected"),
                    );
                    self.return_backends(backends);
                    return Err(());
                }
            }
        }
        Ok(backends)
    }

    /// Gives the transaction's backend back to the session; the others go
    /// back to their pools.
    pub(super) fn return_backends(&mut self, mut backends: Backends) {
        if let Some(index) = backends.tx_index {
            if let Some(lease) = backends.leases.get_mut(index).and_then(Option::take) {
                self.lease = Some(lease);
            }
        }
        for index in std::mem::take(&mut backends.from_legs) {
            if let Some(lease) = backends.leases.get_mut(index).and_then(Option::take) {
                self.legs.push(lease);
            }
        }
    }

    /// The Query that brings `lease`'s session settings in line with the
    /// client's, if they differ (and records them as applied).
    pub(super) fn settings_query(&self, lease: &mut Lease) -> Option<BytesMut> {
        let backend = lease.backend();
        let sql = backend_settings_sql(&self.settings, backend)?;
        let mut out = BytesMut::new();
        messages::query(&sql, &mut out);
        backend.record_settings(replayed_settings(&self.settings));
        Some(out)
    }

    /// Starts the server tasks of a scatter read. Returns one receiver per
    /// server for a sorted merge, else a single shared one.
    pub(super) fn start_scatter(
        &mut self,
        servers: &[String],
        backends: &mut Backends,
        plan: &ScatterPlan,
        original_sql: &str,
        statement: ScatterStatement,
    ) -> (Vec<mpsc::Receiver<Event>>, Vec<ServerTask>) {
        let merge_kind = match plan.merge {
            Merge::Concat => MergeKind::Concat,
            Merge::Sorted { .. } => MergeKind::Sorted,
            Merge::Combine { .. } => MergeKind::Combine,
        };
        let job = Arc::new(Job {
            sql: plan.partial_sql.clone(),
            original_sql: original_sql.to_string(),
            statement,
            hidden: plan.hidden,
            merge_kind,
            drain_ok: plan.limit.is_some() && merge_kind != MergeKind::Combine,
        });
        let per_server = merge_kind == MergeKind::Sorted;
        let mut receivers = Vec::new();
        let shared_sender = if per_server {
            None
        } else {
            let (sender, receiver) = mpsc::channel(BATCHES_IN_FLIGHT * servers.len());
            receivers.push(receiver);
            Some(sender)
        };
        let mut tasks = Vec::with_capacity(servers.len());
        for (index, server) in servers.iter().enumerate() {
            let Some(mut lease) = backends.leases.get_mut(index).and_then(Option::take) else {
                continue;
            };
            let sender = match &shared_sender {
                Some(sender) => sender.clone(),
                None => {
                    let (sender, receiver) = mpsc::channel(BATCHES_IN_FLIGHT);
                    receivers.push(receiver);
                    sender
                }
            };
            let ask_collate = per_server && self.server_collate(server).is_none();
            let settings = self.settings_query(&mut lease);
            let job = job.clone();
            let own_keys = job
                .statement
                .keys_by_server
                .as_ref()
                .map(|(param, values)| (*param, values.get(server).cloned()));
            tasks.push(ServerTask {
                index,
                handle: tokio::spawn(async move {
                    let call = Call {
                        server: index,
                        settings,
                        ask_collate,
                        own_keys,
                    };
                    run_on_server(lease, job, sender, call).await
                }),
            });
        }
        (receivers, tasks)
    }

    /// The database collation of `server`, once a scatter learned it.
    pub(super) fn server_collate(&self, server: &str) -> Option<String> {
        self.shared
            .server_collations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(server)
            .cloned()
    }

    pub(super) fn remember_collate(&self, server: &str, collate: String) {
        self.shared
            .server_collations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(server.to_string(), collate);
    }

    /// Waits for the server tasks and takes their backends back.
    pub(super) async fn finish_scatter(&mut self, backends: &mut Backends, tasks: Vec<ServerTask>) {
        for task in tasks {
            match task.handle.await {
                Ok(lease) => {
                    if let Some(slot) = backends.leases.get_mut(task.index) {
                        *slot = Some(lease);
                    }
                }
                Err(e) => warn!(error = %e, "scatter task ended abnormally"),
            }
        }
    }
}

/// The types of a ParameterDescription body.
pub(super) fn param_types(body: &[u8]) -> Vec<u32> {
    let count = body
        .get(..2)
        .map_or(0, |b| i16::from_be_bytes([b[0], b[1]]).max(0) as usize);
    (0..count)
        .map_while(|i| {
            body.get(2 + 4 * i..6 + 4 * i)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        })
        .collect()
}

/// An empty array in the parameter's format, of the original's element
/// type (Postgres checks it even for an empty array).
fn empty_array(original: Option<&[u8]>, formats: &[i16], index: usize) -> Bytes {
    if format_of(formats, index) == 1 {
        let mut empty = vec![0u8; 8];
        empty.extend_from_slice(original.and_then(|o| o.get(8..12)).unwrap_or(&[0; 4]));
        Bytes::from(empty)
    } else {
        Bytes::from_static(b"{}")
    }
}

/// The row limit of an Execute body (portal name, then the limit).
pub(super) fn execute_row_limit(body: &[u8]) -> i32 {
    let Some(end) = body.iter().position(|&b| b == 0) else {
        return 0;
    };
    body.get(end + 1..end + 5)
        .map_or(0, |b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// A running server task and the index of its server.
pub(super) struct ServerTask {
    index: usize,
    handle: tokio::task::JoinHandle<Lease>,
}

/// What differs between the servers of one scatter read.
struct Call {
    server: usize,
    /// The Query bringing the backend's settings in line, if needed.
    settings: Option<BytesMut>,
    /// Ask for the database collation too.
    ask_collate: bool,
    /// The array parameter holding only this server's keys (`None`: it owns
    /// none of them, so an empty array).
    own_keys: Option<(usize, Option<Bytes>)>,
}

/// A server's part of a scatter read; returns its backend (marked broken if
/// the connection cannot be reused).
async fn run_on_server(
    mut lease: Lease,
    job: Arc<Job>,
    events: mpsc::Sender<Event>,
    call: Call,
) -> Lease {
    let server = call.server;
    match serve(&mut lease, &job, &events, call).await {
        Ok(()) => {}
        Err(error) => {
            lease.backend().broken = true;
            let _ = events.send(Event::Lost { server, error }).await;
        }
    }
    lease
}

async fn serve(
    lease: &mut Lease,
    job: &Job,
    events: &mpsc::Sender<Event>,
    call: Call,
) -> Result<(), String> {
    let Call {
        server,
        settings,
        ask_collate,
        own_keys,
    } = call;
    let backend = lease.backend();
    let mut out = BytesMut::new();
    let mut skip_ready = 0usize;
    if let Some(settings) = settings {
        out.extend_from_slice(&settings);
        skip_ready += 1;
    }
    if ask_collate {
        // An ICU database's default collation is ICU's whatever lc_collate
        // says: name it so that it is refused.
        messages::query(
            "SELECT CASE WHEN datlocprovider = 'c' THEN datcollate ELSE 'icu:' || coalesce(daticulocale, '') END \
             FROM pg_database WHERE datname = current_database()",
            &mut out,
        );
        skip_ready += 1;
    }
    let statement = &job.statement;
    // The server's statement may not mention every parameter (a HAVING
    // moves to the final query): it is prepared with the types Postgres
    // gives the client's own statement, learned from preparing that first
    // when the client left any type open.
    let mut inferring = job.types_open();
    if inferring {
        messages::parse("", &job.original_sql, &statement.param_types, &mut out);
    } else {
        messages::parse("", &job.sql, &statement.param_types, &mut out);
    }
    rows::describe(b'S', &mut out);
    rows::flush(&mut out);
    backend.pending_sync = true;
    backend.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut collate = None;
    let mut param_description = Bytes::new();
    let fields = loop {
        let frame = backend.read_frame().await.map_err(|e| e.to_string())?;
        match frame.tag {
            b'Z' if skip_ready > 0 => {
                skip_ready -= 1;
                backend.status = frame.raw.get(5).copied().unwrap_or(b'I');
            }
            b'D' if skip_ready > 0 && ask_collate => {
                if let Ok(values) = rows::data_row_values(&frame.body()) {
                    if let Some(Some(value)) = values.first() {
                        collate = Some(String::from_utf8_lossy(value).into_owned());
                    }
                }
            }
            b'E' if skip_ready > 0 => {
                // The settings replay failed: report it as the statement's failure.
                let _ = events.send(Event::Failed(frame.raw.clone())).await;
                return finish_after_error(backend, skip_ready).await;
            }
            _ if skip_ready > 0 => {}
            b'1' => {}
            b't' => param_description = frame.body(),
            b'T' | b'n' if inferring => {
                inferring = false;
                let types = param_types(&param_description);
                let mut out = BytesMut::new();
                messages::parse("", &job.sql, &types, &mut out);
                rows::describe(b'S', &mut out);
                rows::flush(&mut out);
                backend.write_all(&out).await.map_err(|e| e.to_string())?;
            }
            b'T' => {
                let fields = rows::decode_row_description(frame.body())
                    .map_err(|e| format!("malformed {}: {}", e.message, e.problem))?;
                break Some(fields);
            }
            b'n' => break None,
            b'E' => {
                let _ = events.send(Event::Failed(frame.raw.clone())).await;
                return finish_after_error(backend, 0).await;
            }
            b'N' => {
                let _ = events.send(Event::Notice(frame.raw.clone())).await;
            }
            _ => {}
        }
    };
    let columns = fields.as_ref().map_or(0, Vec::len);
    let described = Event::Described {
        server,
        params: param_description,
        fields,
        collate,
    };
    let mut receiving = events.send(described).await.is_ok();
    let mut out = BytesMut::new();
    let own_params;
    let params = match own_keys {
        Some((index, value)) if index < statement.params.len() => {
            let mut params = statement.params.clone();
            let empty = || empty_array(params[index].as_deref(), &statement.param_formats, index);
            params[index] = Some(value.unwrap_or_else(empty));
            own_params = params;
            &own_params
        }
        _ => &statement.params,
    };
    rows::bind(
        &statement.param_formats,
        params,
        &job.result_formats(columns),
        &mut out,
    );
    rows::execute(0, &mut out);
    rows::sync(&mut out);
    backend.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut batch: Vec<Bytes> = Vec::new();
    loop {
        let frame = backend.read_frame().await.map_err(|e| e.to_string())?;
        match frame.tag {
            b'D' if receiving => {
                batch.push(frame.body());
                if batch.len() >= ROWS_PER_BATCH || backend.buffered().is_empty() {
                    let rows = std::mem::take(&mut batch);
                    receiving = events.send(Event::Rows(rows)).await.is_ok();
                    if !receiving && !job.drain_ok {
                        // Nobody reads the rows any more (the client went
                        // away): the rest may be endless, so close.
                        return Err("the scatter read was abandoned".into());
                    }
                }
            }
            b'C' => {
                if receiving && !batch.is_empty() {
                    let rows = std::mem::take(&mut batch);
                    receiving = events.send(Event::Rows(rows)).await.is_ok();
                }
                if receiving {
                    receiving = events.send(Event::Done).await.is_ok();
                }
            }
            b'E' if receiving => {
                let _ = events.send(Event::Failed(frame.raw.clone())).await;
                receiving = false;
            }
            b'N' if receiving => {
                let _ = events.send(Event::Notice(frame.raw.clone())).await;
            }
            b'Z' => {
                backend.status = frame.raw.get(5).copied().unwrap_or(b'I');
                backend.pending_sync = false;
                return Ok(());
            }
            _ => {}
        }
    }
}

/// After an error in the Parse/Describe part: the Sync that ends the
/// sequence, then reads up to its ReadyForQuery (after `ready_left` others
/// still due for the Queries sent before it).
async fn finish_after_error(
    backend: &mut crate::backend::Backend,
    mut ready_left: usize,
) -> Result<(), String> {
    let mut out = BytesMut::new();
    rows::sync(&mut out);
    backend.write_all(&out).await.map_err(|e| e.to_string())?;
    // The Sync's own ReadyForQuery comes after any still pending.
    ready_left += 1;
    while ready_left > 0 {
        let frame = backend.read_frame().await.map_err(|e| e.to_string())?;
        if frame.tag == b'Z' {
            ready_left -= 1;
            backend.status = frame.raw.get(5).copied().unwrap_or(b'I');
        }
    }
    backend.pending_sync = false;
    Ok(())
}
