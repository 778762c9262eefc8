//! Scatter reads, the merging part: from the servers' rows to the reply a
//! single Postgres would send. Three ways, as the planner decided:
//! - concatenation: rows go to the client as they arrive;
//! - sorted: a k-way merge of the servers' sorted streams on hidden binary
//!   sort keys, compared as Postgres compares them (`merge::sortkey`), or
//!   refused when the proxy cannot compare exactly (a type it does not know,
//!   a collation that is not byte order);
//! - combined: the partial rows (per-server aggregates, groups, distinct
//!   rows) become parameters of a final query that one server runs, so
//!   types, formats, rounding and collation are Postgres's own.
//!
//! LIMIT/OFFSET are applied once here (the servers got LIMIT n+m).

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::analyze::scatter::{plan, Bound, Merge, Refusal, ScatterPlan, SortKey, TableInfo};
use crate::merge::{collation_is_bytewise, KWayMerge, KeyKind, SortSpec};
use crate::metrics::Metrics;
use crate::route::RouteError;
use crate::wire::messages;
use crate::wire::rows::{self, format_of, Field};

use super::client::SessionError;
use super::combine::Partials;
use super::hold::not_serving;
use super::scatter::{param_types, Event, ScatterStatement};
use super::Session;

/// Written to the client when this much is buffered.
const FLUSH_AT: usize = 64 * 1024;

/// The shard map as the scatter planner sees it.
pub(super) struct MapTables<'a>(pub(super) &'a shardmap::ClusterMap);

impl TableInfo for MapTables<'_> {
    fn sharded(&self, name: &str) -> Option<(&str, &str)> {
        match &self.0.tables.get(name)?.kind {
            shardmap::TableKind::Sharded {
                group, key_column, ..
            } => Some((key_column.as_str(), group.as_str())),
            _ => None,
        }
    }

    fn is_reference(&self, name: &str) -> bool {
        matches!(
            self.0.tables.get(name).map(|t| &t.kind),
            Some(shardmap::TableKind::Reference)
        )
    }
}

/// How a merge ended, when it did not end well.
pub(super) enum Stop {
    /// An error was written for the client.
    Failed,
    Client(SessionError),
}

impl From<SessionError> for Stop {
    fn from(e: SessionError) -> Stop {
        Stop::Client(e)
    }
}

/// What is left of LIMIT/OFFSET while rows go out, and of the client's
/// Execute row limit.
pub(super) struct Window {
    pub(super) skip: u64,
    pub(super) left: Option<u64>,
    pub(super) sent: u64,
    /// The Execute's row limit (extended protocol), if any.
    fetch: Option<u64>,
    /// A row came past the Execute's row limit: the reply ends with
    /// PortalSuspended instead of CommandComplete.
    suspended: bool,
}

impl Window {
    /// Whether the next row goes out (and counts it).
    fn admit(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        if self.left == Some(0) || self.suspended {
            return false;
        }
        if self.fetch == Some(self.sent) {
            self.suspended = true;
            return false;
        }
        if let Some(left) = &mut self.left {
            *left -= 1;
        }
        self.sent += 1;
        true
    }

    fn full(&self) -> bool {
        self.left == Some(0) || self.suspended
    }

    /// The end of a reply that sent its rows: CommandComplete, or
    /// PortalSuspended when the Execute's row limit cut it short.
    fn finish(&self, out: &mut BytesMut) {
        if self.suspended {
            messages::empty(b's', out);
        } else {
            messages::command_complete(&format!("SELECT {}", self.sent), out);
        }
    }
}

impl Session {
    /// Plans a read the router sent to several servers and runs it, or
    /// refuses a shape the proxy cannot merge exactly. Writes the reply (or
    /// the error) for the client, but not the ReadyForQuery.
    pub(super) async fn scatter_request(
        &mut self,
        servers: &[String],
        sql: &str,
        statement: ScatterStatement,
    ) -> Result<bool, SessionError> {
        let planned = {
            let snapshot = self.shared.map.borrow().clone();
            match snapshot {
                Some(versioned) => plan(sql, &MapTables(&versioned.map)),
                None => Err(Refusal {
                    message: "the proxy has no shard map yet".into(),
                    hint: "check that etcd is reachable".into(),
                }),
            }
        };
        match planned {
            Ok(plan) => self.scatter_read(servers, &plan, sql, statement).await,
            Err(refusal) => {
                self.route_error(&RouteError::new("0A000", refusal.message, refusal.hint));
                Ok(false)
            }
        }
    }

    /// Runs a scatter read and writes its reply for the client (everything
    /// but the ReadyForQuery). Returns whether it succeeded (else an error
    /// went to the client).
    pub(super) async fn scatter_read(
        &mut self,
        servers: &[String],
        plan: &ScatterPlan,
        sql: &str,
        statement: ScatterStatement,
    ) -> Result<bool, SessionError> {
        let window = match self.window(plan, &statement) {
            Ok(window) => window,
            Err(error) => {
                self.route_error(&error);
                return Ok(false);
            }
        };
        let Ok(mut backends) = self.scatter_backends(servers).await else {
            return Ok(false);
        };
        if !self.shared.liveness.serving() {
            self.route_error(&not_serving());
            self.return_backends(backends);
            return Ok(false);
        }
        Metrics::add(&self.shared.metrics.scatter_reads, 1);
        let (receivers, tasks) =
            self.start_scatter(servers, &mut backends, plan, sql, statement.clone());
        let result = match &plan.merge {
            Merge::Concat => {
                self.gather_concat(receivers, servers, &statement, window)
                    .await
            }
            Merge::Sorted { keys } => {
                self.gather_sorted(receivers, servers, plan, keys, &statement, window)
                    .await
            }
            Merge::Combine { .. } => match self.gather_partials(receivers, servers).await {
                Ok(partials) => {
                    self.finish_scatter(&mut backends, tasks).await;
                    let result = self
                        .combine(&mut backends, plan, &statement, partials, window)
                        .await;
                    self.return_backends(backends);
                    return match result {
                        Ok(()) => Ok(true),
                        Err(Stop::Failed) => Ok(false),
                        Err(Stop::Client(e)) => Err(e),
                    };
                }
                Err(stop) => Err(stop),
            },
        };
        self.finish_scatter(&mut backends, tasks).await;
        self.return_backends(backends);
        match result {
            Ok(()) => Ok(true),
            Err(Stop::Failed) => Ok(false),
            Err(Stop::Client(e)) => Err(e),
        }
    }

    /// LIMIT and OFFSET with their parameters' values.
    fn window(
        &self,
        plan: &ScatterPlan,
        statement: &ScatterStatement,
    ) -> Result<Window, RouteError> {
        Ok(Window {
            skip: bound_value(plan.offset, statement)?.unwrap_or(0),
            left: bound_value(plan.limit, statement)?,
            sent: 0,
            fetch: statement.fetch,
            suspended: false,
        })
    }

    /// Writes the RowDescription of the first `visible` fields, with the
    /// formats the client asked for.
    fn describe_for_client(
        &mut self,
        fields: &[Field],
        visible: usize,
        statement: &ScatterStatement,
    ) {
        if !statement.describe {
            return;
        }
        let shown: Vec<Field> = fields
            .iter()
            .take(visible)
            .enumerate()
            .map(|(i, f)| Field {
                format: format_of(&statement.result_formats, i),
                ..f.clone()
            })
            .collect();
        rows::row_description(&shown, &mut self.client.out);
    }

    pub(super) async fn maybe_flush(&mut self) -> Result<(), SessionError> {
        if self.client.out.len() >= FLUSH_AT {
            self.client.flush().await?;
        }
        Ok(())
    }

    /// Writes a server's failure for the client.
    fn server_failed(&mut self, event: Event, servers: &[String]) {
        match event {
            Event::Failed(error) => self.client.out.extend_from_slice(&error),
            Event::Lost { server, error } => {
                let name = servers.get(server).map_or("?", String::as_str);
                self.client.error(
                    "08006",
                    &format!("connection to server {name} was lost during a read across servers: {error}"),
                    Some("retry the statement"),
                );
            }
            _ => {}
        }
    }

    async fn gather_concat(
        &mut self,
        mut receivers: Vec<mpsc::Receiver<Event>>,
        servers: &[String],
        statement: &ScatterStatement,
        mut window: Window,
    ) -> Result<(), Stop> {
        let Some(mut events) = receivers.pop() else {
            return Ok(());
        };
        let mut described = false;
        let mut done = 0;
        while done < servers.len() && !window.full() {
            let Some(event) = events.recv().await else {
                break;
            };
            match event {
                Event::Described { fields, .. } => {
                    if !described {
                        described = true;
                        if let Some(fields) = fields {
                            self.describe_for_client(&fields, fields.len(), statement);
                        }
                    }
                }
                Event::Rows(rows) => {
                    for row in rows {
                        if window.admit() {
                            put_message(b'D', &row, &mut self.client.out);
                        }
                    }
                    self.maybe_flush().await?;
                }
                Event::Done => done += 1,
                Event::Notice(notice) => self.client.out.extend_from_slice(&notice),
                failure => {
                    self.server_failed(failure, servers);
                    return Err(Stop::Failed);
                }
            }
        }
        window.finish(&mut self.client.out);
        Ok(())
    }

    async fn gather_sorted(
        &mut self,
        receivers: Vec<mpsc::Receiver<Event>>,
        servers: &[String],
        plan: &ScatterPlan,
        keys: &[SortKey],
        statement: &ScatterStatement,
        mut window: Window,
    ) -> Result<(), Stop> {
        let mut streams: Vec<Stream> = Vec::with_capacity(receivers.len());
        let mut fields: Option<Vec<Field>> = None;
        for events in receivers {
            let mut stream = Stream {
                events,
                rows: VecDeque::new(),
                done: false,
                server: 0,
                visible: 0,
                head: None,
                collate: None,
            };
            loop {
                match stream.events.recv().await {
                    Some(Event::Described {
                        server,
                        fields: described,
                        collate,
                        ..
                    }) => {
                        stream.server = server;
                        stream.collate = collate;
                        if fields.is_none() {
                            fields = described;
                        }
                        break;
                    }
                    Some(Event::Notice(notice)) => self.client.out.extend_from_slice(&notice),
                    Some(failure) => {
                        self.server_failed(failure, servers);
                        return Err(Stop::Failed);
                    }
                    None => {
                        stream.done = true;
                        break;
                    }
                }
            }
            if let Some(collate) = &stream.collate {
                if let Some(name) = servers.get(stream.server) {
                    self.remember_collate(name, collate.clone());
                }
            }
            if stream.collate.is_none() {
                stream.collate = servers
                    .get(stream.server)
                    .and_then(|s| self.server_collate(s));
            }
            streams.push(stream);
        }
        let fields = fields.unwrap_or_default();
        // With `*` the planner cannot count the client's columns: they are
        // whatever precedes the hidden ones.
        let visible = fields.len().saturating_sub(plan.hidden);
        for stream in &mut streams {
            stream.visible = visible;
        }
        let mut specs = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            let Some(field) = fields.get(visible + 2 * i) else {
                return self.refuse_merge(
                    "the servers returned fewer columns than the plan expects".into(),
                );
            };
            let Some(kind) = KeyKind::from_oid(field.type_oid) else {
                return self.refuse_merge(format!(
                    "ORDER BY key {} has a type (oid {}) whose order the proxy cannot reproduce across servers",
                    i + 1,
                    field.type_oid
                ));
            };
            specs.push(SortSpec {
                kind,
                descending: key.descending,
                nulls_first: key.nulls_first,
            });
        }
        let encoding = self.settings.get("client_encoding").map(|e| {
            // Kept as SQL text: `UTF8`, `'utf-8'` or `E'UTF8'`.
            let e = e
                .strip_prefix(['E', 'e'])
                .filter(|r| r.starts_with('\''))
                .unwrap_or(e);
            e.trim_matches('\'')
                .to_ascii_uppercase()
                .replace(['-', '_'], "")
        });
        if specs.iter().any(|s| s.kind.collatable()) && encoding.is_some_and(|e| e != "UTF8") {
            return self.refuse_merge(
                "text keys are compared as UTF-8 bytes, and this session's client_encoding is not UTF8".into(),
            );
        }
        self.describe_for_client(&fields, visible, statement);
        let merge = KWayMerge::new(specs);
        for stream in streams.iter_mut() {
            if let Err(failure) = stream.advance().await {
                self.server_failed(failure, servers);
                return Err(Stop::Failed);
            }
            if let Some(problem) = stream.collation_problem(merge.specs()) {
                return self.refuse_merge(problem);
            }
        }
        let mut out_row = BytesMut::new();
        while !window.full() {
            let keys: Vec<Option<Vec<Option<&[u8]>>>> = streams
                .iter()
                .map(|s| {
                    s.head
                        .as_ref()
                        .map(|h| h.keys.iter().map(|k| k.as_deref()).collect())
                })
                .collect();
            let heads: Vec<Option<&[Option<&[u8]>]>> = keys.iter().map(|k| k.as_deref()).collect();
            let first = match merge.first(&heads) {
                Ok(first) => first,
                Err(e) => {
                    return self.refuse_merge(format!("a sort key could not be decoded: {}", e.0))
                }
            };
            let Some(index) = first else {
                break;
            };
            if let Some(head) = streams[index].head.take() {
                if window.admit() {
                    out_row.clear();
                    if rows::data_row_prefix(&head.row, visible, &mut out_row).is_err() {
                        return self.refuse_merge("a server sent a malformed row".into());
                    }
                    self.client.out.extend_from_slice(&out_row);
                    self.maybe_flush().await?;
                }
            }
            if let Err(failure) = streams[index].advance().await {
                self.server_failed(failure, servers);
                return Err(Stop::Failed);
            }
        }
        window.finish(&mut self.client.out);
        Ok(())
    }

    pub(super) fn refuse_merge(&mut self, problem: String) -> Result<(), Stop> {
        Metrics::add(&self.shared.metrics.route_errors, 1);
        self.client.error(
            "0A000",
            &format!("shardline cannot merge this read across servers exactly: {problem}"),
            Some("order by columns of built-in types under the \"C\" collation, or read one key's rows at a time"),
        );
        Err(Stop::Failed)
    }

    pub(super) async fn gather_partials(
        &mut self,
        mut receivers: Vec<mpsc::Receiver<Event>>,
        servers: &[String],
    ) -> Result<Partials, Stop> {
        let mut partials = Partials {
            fields: Vec::new(),
            param_types: Vec::new(),
            rows: Vec::new(),
            collations: Vec::new(),
        };
        let Some(mut events) = receivers.pop() else {
            return Ok(partials);
        };
        let max_rows = self.shared.config.scatter.max_combine_rows;
        let mut done = 0;
        let mut described = false;
        while done < servers.len() {
            let Some(event) = events.recv().await else {
                break;
            };
            match event {
                Event::Described { fields, params, .. } => {
                    if !described {
                        described = true;
                        let mut fields = fields.unwrap_or_default();
                        // The second half: each column's collation name.
                        fields.truncate(fields.len() / 2);
                        partials.fields = fields;
                        partials.param_types = param_types(&params);
                    }
                }
                Event::Rows(rows) => {
                    if partials.collations.is_empty() {
                        if let Some(first) = rows.first() {
                            partials.collations = collation_names(first, partials.fields.len());
                        }
                    }
                    partials.rows.extend(rows);
                    if partials.rows.len() > max_rows {
                        let message = format!(
                            "this read across servers gathers over {max_rows} partial rows (groups or distinct rows) to combine"
                        );
                        self.client.error(
                            "54000",
                            &message,
                            Some("narrow the query, group by the sharding key, or raise [scatter] max_combine_rows"),
                        );
                        return Err(Stop::Failed);
                    }
                }
                Event::Done => done += 1,
                Event::Notice(notice) => self.client.out.extend_from_slice(&notice),
                failure => {
                    self.server_failed(failure, servers);
                    return Err(Stop::Failed);
                }
            }
        }
        Ok(partials)
    }
}

/// One server's rows in a sorted merge.
struct Stream {
    events: mpsc::Receiver<Event>,
    rows: VecDeque<Bytes>,
    done: bool,
    server: usize,
    /// Columns the client sees; the sort keys follow them.
    visible: usize,
    head: Option<Head>,
    collate: Option<String>,
}

/// The next row of a stream with its decoded sort keys.
struct Head {
    row: Bytes,
    /// Per key: the binary value.
    keys: Vec<Option<Bytes>>,
    /// Per key: the name of the collation it sorts under (or NULL).
    collations: Vec<Option<Bytes>>,
}

impl Stream {
    /// Moves to the next row; a failure event is returned as the error.
    async fn advance(&mut self) -> Result<(), Event> {
        self.head = None;
        loop {
            if let Some(row) = self.rows.pop_front() {
                let Some((keys, collations)) = key_values(&row, self.visible) else {
                    return Err(Event::Lost {
                        server: self.server,
                        error: "malformed row".into(),
                    });
                };
                self.head = Some(Head {
                    row,
                    keys,
                    collations,
                });
                return Ok(());
            }
            if self.done {
                return Ok(());
            }
            match self.events.recv().await {
                Some(Event::Rows(rows)) => self.rows.extend(rows),
                Some(Event::Done) | None => self.done = true,
                Some(Event::Notice(_)) | Some(Event::Described { .. }) => {}
                Some(failure) => return Err(failure),
            }
        }
    }

    /// Why this stream's text keys cannot be compared byte by byte, if so.
    fn collation_problem(&self, specs: &[SortSpec]) -> Option<String> {
        let head = self.head.as_ref()?;
        for (i, spec) in specs.iter().enumerate() {
            if !spec.kind.collatable() {
                continue;
            }
            let Some(Some(collation)) = head.collations.get(i) else {
                continue;
            };
            let collation = String::from_utf8_lossy(collation);
            let database = self.collate.as_deref().unwrap_or("");
            if !collation_is_bytewise(&collation, database) {
                return Some(format!(
                    "ORDER BY key {} sorts text under collation {collation} (database collation {database:?}), which the proxy cannot reproduce",
                    i + 1
                ));
            }
        }
        None
    }
}

/// The collation names at the end of a partial row (after `columns`).
fn collation_names(row: &Bytes, columns: usize) -> Vec<Option<String>> {
    let Ok(values) = rows::data_row_values(row) else {
        return Vec::new();
    };
    values
        .iter()
        .skip(columns)
        .map(|v| v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()))
        .collect()
}

/// Column values of a DataRow, `None` for NULL.
type Values = Vec<Option<Bytes>>;

/// The hidden columns of a sorted row: after the `visible` ones, per key
/// its value and its collation's name.
fn key_values(row: &Bytes, visible: usize) -> Option<(Values, Values)> {
    let values = rows::data_row_values(row).ok()?;
    let hidden = values.get(visible..)?;
    let keys = hidden.iter().step_by(2).cloned().collect();
    let collations = hidden.iter().skip(1).step_by(2).cloned().collect();
    Some((keys, collations))
}

fn put_message(tag: u8, body: &[u8], out: &mut BytesMut) {
    out.put_u8(tag);
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
}

/// The value of LIMIT/OFFSET: a constant, or a parameter (text or binary
/// integer); `None` for no bound (absent, or a NULL parameter).
fn bound_value(
    bound: Option<Bound>,
    statement: &ScatterStatement,
) -> Result<Option<u64>, RouteError> {
    let invalid = |what: &str| {
        RouteError::new(
            "22023",
            format!("LIMIT/OFFSET parameter is not a valid count: {what}"),
            "pass a non-negative integer",
        )
    };
    match bound {
        None => Ok(None),
        Some(Bound::Const(n)) => Ok(Some(n)),
        Some(Bound::Param(i)) => {
            let Some(value) = statement.params.get(i) else {
                return Err(invalid("not bound"));
            };
            let Some(bytes) = value else {
                return Ok(None);
            };
            let n: i64 = if format_of(&statement.param_formats, i) == 1 {
                match bytes.len() {
                    8 => i64::from_be_bytes([
                        bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6],
                        bytes[7],
                    ]),
                    4 => i64::from(i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
                    2 => i64::from(i16::from_be_bytes([bytes[0], bytes[1]])),
                    _ => return Err(invalid("binary value of unexpected width")),
                }
            } else {
                std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .ok_or_else(|| invalid("not an integer"))?
            };
            u64::try_from(n).map(Some).map_err(|_| invalid("negative"))
        }
    }
}
