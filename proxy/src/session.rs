//! One client session after login: read the client's messages, group them
//! into requests (a simple Query, or extended-protocol messages up to Sync or
//! Flush), route each request once, bind it to a backend connection, forward
//! it and relay the replies.
//!
//! Transaction pooling: a backend is held only while a transaction is open
//! (or a request is in flight) and goes back to its pool at ReadyForQuery
//! `I`. What a client expects to outlive a transaction is re-established on
//! whichever backend it lands on:
//! - named prepared statements are prepared on that backend under a name
//!   derived from their text (shared by all clients), before first use;
//! - session settings (`SET name = value`) are replayed when the backend's
//!   settings differ from the client's;
//! - `BEGIN` is held back until the first statement that has a route, and
//!   then sent to that statement's server.
//!
//! Replies are matched to requests with a queue of expected replies, so the
//! proxy can insert its own messages (swallowing their replies) and answer
//! some messages itself (synthetic replies) while keeping the client's reply
//! order exactly as Postgres would produce it.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tls::ClientStream;
use bytes::{Bytes, BytesMut};
use shardmap::PartitionState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

use rustc_hash::{FxHashMap, FxHashSet};

use crate::analyze::lexer::LITERAL_MARKER_BASE;
use crate::analyze::{Analyzed, Command, DataStatement, Literal};
use crate::cancel::{CancelTarget, TargetSlot};
use crate::liveness::Flight;
use crate::metrics::Metrics;
use crate::pool::{Lease, Pool};
use crate::route::{route_data, Params, Resolution, Route, RouteError};
use crate::server::Shared;
use crate::wire::frame::{next_frame, Frame};
use crate::wire::messages::{self, Bind, Parse, Target};

/// The client side of a session: a socket with a read and a write buffer.
pub struct ClientIo {
    stream: ClientStream,
    read_buf: BytesMut,
    pub out: BytesMut,
    max_message: usize,
    /// How many times `out` was written: a request whose replies are to be
    /// taken back must not have been flushed in part.
    flushes: u64,
}

impl ClientIo {
    pub fn new(stream: ClientStream, read_buf: BytesMut, max_message: usize) -> ClientIo {
        ClientIo {
            stream,
            read_buf,
            // Allocated on first use: idle clients cost only their task and socket.
            out: BytesMut::new(),
            max_message,
            flushes: 0,
        }
    }

    /// The next message, or `None` when the client closed the connection.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, SessionError> {
        loop {
            match next_frame(&mut self.read_buf, self.max_message) {
                Ok(Some(frame)) => return Ok(Some(frame)),
                Ok(None) => {}
                Err(e) => return Err(SessionError::ClientProtocol(e.to_string())),
            }
            let n = self
                .stream
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|_| SessionError::ClientGone)?;
            if n == 0 {
                if self.read_buf.is_empty() {
                    return Ok(None);
                }
                return Err(SessionError::ClientGone);
            }
        }
    }

    /// Puts a message back in front of the unread input.
    pub fn unread(&mut self, frame: &Frame) {
        let mut buf = BytesMut::with_capacity(frame.raw.len() + self.read_buf.len());
        buf.extend_from_slice(&frame.raw);
        buf.extend_from_slice(&self.read_buf);
        self.read_buf = buf;
    }

    /// Writes everything buffered for the client.
    pub async fn flush(&mut self) -> Result<(), SessionError> {
        if self.out.is_empty() {
            return Ok(());
        }
        self.flushes += 1;
        let result = self.stream.write_all(&self.out).await;
        self.out.clear();
        if self.out.capacity() > 64 * 1024 {
            // Do not keep a large result's buffer for the session's life.
            self.out = BytesMut::new();
        }
        result.map_err(|_| SessionError::ClientGone)
    }

    pub fn error(&mut self, code: &str, message: &str, hint: Option<&str>) {
        messages::error_fields(b'E', "ERROR", code, message, hint, &mut self.out);
    }

    pub fn fatal(&mut self, code: &str, message: &str) {
        messages::error_fields(b'E', "FATAL", code, message, None, &mut self.out);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client disconnected")]
    ClientGone,
    #[error("protocol violation: {0}")]
    ClientProtocol(String),
}

/// A statement the client prepared (extended protocol Parse).
#[derive(Debug)]
pub struct Prepared {
    pub query: String,
    pub param_types: Vec<u32>,
    /// Name on the backends: the same for every client preparing the same text
    /// with the same parameter types.
    pub backend_name: Arc<str>,
    pub analyzed: Analyzed,
    /// As the unnamed statement, it may be kept prepared on the servers: it
    /// reads or writes tables, and has no quoted constant (those are valued
    /// when parsed: 'now', time zones).
    pub keepable: bool,
}

impl Prepared {
    fn command(&self) -> Option<&Command> {
        match self.analyzed.analysis.commands.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

const INT4_OID: u32 = 23;

/// The settings Postgres reads while parsing a quoted constant
/// (`TIMESTAMPTZ '2024-06-01 00:00'`, `DATE '01/02/2024'`, `'a\\b'`).
const PARSE_SETTINGS: [&str; 4] = [
    "timezone",
    "datestyle",
    "intervalstyle",
    "standard_conforming_strings",
];

/// Whether `query` has a quoted constant (a string or a dollar-quoted
/// string): Postgres turns those into values when it parses the statement.
fn has_quoted_constant(query: &str) -> bool {
    let bytes = query.as_bytes();
    memchr::memchr(b'\'', bytes).is_some()
        || memchr::memchr_iter(b'$', bytes)
            .any(|at| !bytes.get(at + 1).is_some_and(u8::is_ascii_digit))
}

/// The name of a statement on the backends: the same for every client
/// preparing the same text with the same parameter types, so they share it.
/// A text with quoted constants also depends on the settings that shape
/// their values; one that may hold `'now'`, `'today'`, `'tomorrow'` or
/// `'yesterday'` (fixed when parsed) is never shared.
fn backend_statement_name(
    query: &str,
    param_types: &[u32],
    settings: &BTreeMap<String, String>,
) -> Arc<str> {
    use std::hash::{Hash, Hasher};
    static UNSHARED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    query.hash(&mut hasher);
    param_types.hash(&mut hasher);
    if has_quoted_constant(query) {
        for name in PARSE_SETTINGS {
            settings.get(name).hash(&mut hasher);
        }
        let lowered = query.to_ascii_lowercase();
        if ["now", "today", "tomorrow", "yesterday"]
            .iter()
            .any(|word| lowered.contains(word))
        {
            UNSHARED
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .hash(&mut hasher);
        }
    }
    format!("sl_{:016x}_{}", hasher.finish(), query.len()).into()
}

/// The client's transaction, as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tx {
    Idle,
    /// BEGIN was acknowledged but not sent yet: it goes to the server of the
    /// first statement that has a route, followed by `prelude`'s other parts.
    Deferred {
        prelude: Vec<String>,
        /// BEGIN READ ONLY: may run on a read replica.
        read_only: bool,
    },
    /// Open on the held backend.
    Bound,
    /// Failed without a backend holding it (a routing error): everything
    /// but COMMIT/ROLLBACK fails until the client ends it.
    Aborted,
}

/// Which reply ends the replies to one forwarded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    ParseComplete,
    BindComplete,
    CloseComplete,
    Describe,
    /// Parse, Bind and Describe sent for a simple Query: their
    /// ParseComplete, BindComplete and NoData are not forwarded (a Query has
    /// none of those), but notices on the way are.
    ParseForQuery,
    BindForQuery,
    DescribeForQuery,
    Execute,
    Sync,
    Query,
}

impl End {
    fn ends_on(self, tag: u8) -> bool {
        match self {
            End::ParseComplete => tag == b'1',
            End::BindComplete => tag == b'2',
            End::CloseComplete => tag == b'3',
            End::Describe | End::DescribeForQuery => tag == b'T' || tag == b'n',
            End::ParseForQuery => tag == b'1',
            End::BindForQuery => tag == b'2',
            End::Execute => matches!(tag, b'C' | b'I' | b's'),
            End::Sync | End::Query => tag == b'Z',
        }
    }

    /// Whether the reply `tag` is kept from the client.
    fn hides(self, tag: u8) -> bool {
        matches!(
            (self, tag),
            (End::ParseForQuery, b'1') | (End::BindForQuery, b'2') | (End::DescribeForQuery, b'n')
        )
    }
}

/// One expected reply (or synthetic reply) in client order.
#[derive(Debug)]
enum Expect {
    /// Replies to a message sent to the backend, up to `end`.
    Reply {
        end: End,
        /// False for messages the proxy injected: their replies are dropped.
        forward: bool,
        /// A statement to forget on the backend if this message fails.
        unprepare: Option<Arc<str>>,
        /// A Bind of a client's unnamed statement that the proxy keeps
        /// prepared under this name: if the server's cached plan went stale
        /// (a table's columns changed), the request is sent again unprepared.
        stale_retry: Option<Arc<str>>,
    },
    /// Bytes the proxy answers itself, at this point of the reply stream.
    Synthetic(Bytes),
}

/// A simple Query to run as a statement kept prepared on the server.
struct KeptSimple {
    name: Arc<str>,
    parameterized: Arc<crate::analyze::Parameterized>,
    types: Vec<u32>,
    literals: Arc<Vec<Literal>>,
}

/// What the backend said while relaying one request.
#[derive(Debug, Default)]
struct Outcome {
    errored: bool,
    /// Whether the last CommandComplete was a COMMIT.
    committed: bool,
    /// The kept-prepared statement whose plan went stale: its replies were
    /// taken back, and the request must be sent again without it.
    stale: Option<Arc<str>>,
}

/// A client's prepared statements. The unnamed one, which most drivers
/// parse on every request, lives outside the map: no hashing, no compare.
#[derive(Default)]
struct Statements {
    unnamed: Option<Arc<Prepared>>,
    named: FxHashMap<String, Arc<Prepared>>,
}

impl Statements {
    fn get(&self, name: &str) -> Option<&Arc<Prepared>> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    fn insert(&mut self, name: String, statement: Arc<Prepared>) {
        if name.is_empty() {
            self.unnamed = Some(statement);
        } else {
            self.named.insert(name, statement);
        }
    }

    fn remove(&mut self, name: &str) -> Option<Arc<Prepared>> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.named.remove(name)
        }
    }

    fn clear(&mut self) {
        self.unnamed = None;
        self.named.clear();
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

/// A request ready to send: bytes for the backend and the replies expected.
#[derive(Default)]
struct Plan {
    out: BytesMut,
    expects: VecDeque<Expect>,
}

impl Plan {
    fn send(&mut self, bytes: &[u8], end: End) {
        self.out.extend_from_slice(bytes);
        self.expect(end, None);
    }

    fn inject(&mut self, bytes: &[u8], end: End) {
        self.out.extend_from_slice(bytes);
        self.expects.push_back(Expect::Reply {
            end,
            forward: false,
            unprepare: None,
            stale_retry: None,
        });
    }

    /// Expects the forwarded replies of a message already in `out`, up to
    /// `end`; `stale_retry` as in `Expect::Reply`.
    fn expect(&mut self, end: End, stale_retry: Option<Arc<str>>) {
        self.expects.push_back(Expect::Reply {
            end,
            forward: true,
            unprepare: None,
            stale_retry,
        });
    }

    fn synthetic(&mut self, bytes: BytesMut) {
        self.expects.push_back(Expect::Synthetic(bytes.freeze()));
    }
}

/// An extended-protocol message of a request.
enum Item {
    Parse(Frame, Parse),
    Bind(Frame, Bind),
    Describe(Frame, Target),
    Execute(Frame, String),
    Close(Frame, Target),
    Sync(Frame),
    Flush(Frame),
}

/// What `decide_binds` found out about a request's Binds.
struct BindPlan {
    portals: Portals,
    route: Route,
    /// The transaction state the first forwarded statement runs in.
    tx_before_forward: Tx,
    /// The state after the request, as far as the proxy answers it.
    tx_after: Tx,
    /// `SET shardline.*` to apply.
    settings: Vec<ProxySetting>,
    changes_session_state: bool,
    drops_statements: bool,
    /// Every Bind is of a read-only statement (and there is at least one).
    read_only: bool,
}

/// The portals a request binds, in order (usually one: a map would cost
/// more than it saves).
#[derive(Default)]
struct Portals(Vec<(String, PortalUse)>);

impl Portals {
    fn get(&self, name: &str) -> Option<&PortalUse> {
        self.0.iter().rev().find(|(n, _)| n == name).map(|(_, u)| u)
    }

    fn insert(&mut self, name: String, usage: PortalUse) {
        self.0.push((name, usage));
    }

    fn values(&self) -> impl Iterator<Item = &PortalUse> {
        self.0.iter().map(|(_, u)| u)
    }
}

/// How the proxy handles a bound portal.
#[derive(Clone)]
enum PortalUse {
    Forward,
    /// Transaction control answered by the proxy: CommandComplete tag.
    Answer(&'static str),
}

pub struct Session {
    shared: Arc<Shared>,
    client: ClientIo,
    statements: Statements,
    /// Session settings from startup parameters and SET (name → value as SQL text).
    settings: BTreeMap<String, String>,
    /// SETs made inside the open transaction: kept only if it commits.
    tx_settings: Vec<(String, Option<String>)>,
    tx: Tx,
    lease: Option<Lease>,
    /// Set when a request ended with Flush: the backend is kept until Sync.
    unsynced: bool,
    /// The pool used last, with the map revision it was looked up in.
    last_pool: Option<(i64, String, Arc<Pool>)>,
    /// Buffers of the request being sent, reused from one request to the next.
    request: Plan,
    /// Set by a request that changes session state in ways the settings
    /// record cannot follow (SET/RESET/DISCARD inside a multi-statement
    /// Query or through the extended protocol, SET in a transaction).
    changes_session_state: bool,
    /// Set by a request that runs DISCARD or DEALLOCATE on the backend.
    drops_statements: bool,
    /// True while an extended-protocol request is being relayed.
    in_extended: bool,
    /// This request's unnamed statement runs as a statement kept prepared
    /// on the server (see `keeps_unnamed_prepared`).
    keep_unnamed: bool,
    /// `SET shardline.read_replica = on`: reads outside transactions go to replicas.
    read_replica: bool,
    replica_turn: usize,
    cancel_slot: TargetSlot,
    /// The request being served, for the map acknowledgement (released while
    /// a statement is held for a blocked partition).
    flight: std::sync::Mutex<Option<Flight>>,
}

const SETTING_NOT_REPLAYED: &[&str] = &["application_name"];
/// Marker in a backend's settings: its state is unknown, reset it first.
const RESET_ALL: &str = "\u{0}reset all";

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        client: ClientIo,
        settings: BTreeMap<String, String>,
        cancel_slot: TargetSlot,
    ) -> Session {
        Session {
            shared,
            client,
            statements: Statements::default(),
            settings,
            tx_settings: Vec::new(),
            tx: Tx::Idle,
            lease: None,
            unsynced: false,
            last_pool: None,
            request: Plan::default(),
            changes_session_state: false,
            drops_statements: false,
            in_extended: false,
            keep_unnamed: false,
            read_replica: false,
            replica_turn: 0,
            cancel_slot,
            flight: std::sync::Mutex::new(None),
        }
    }

    /// The transaction status to report in ReadyForQuery.
    fn status(&self) -> u8 {
        match self.tx {
            Tx::Idle => b'I',
            Tx::Deferred { .. } => b'T',
            Tx::Aborted => b'E',
            Tx::Bound => self.lease.as_ref().map_or(b'I', |l| l.status()),
        }
    }

    pub async fn run(&mut self) -> Result<(), SessionError> {
        let mut batch: Vec<Frame> = Vec::new();
        let mut batch_bytes = 0usize;
        loop {
            let Some(frame) = self.client.read_frame().await? else {
                return Ok(());
            };
            match frame.tag {
                b'Q' => {
                    self.board();
                    if !batch.is_empty() {
                        // A Query ends any unsynced extended messages, as in Postgres.
                        batch_bytes = 0;
                        self.extended(&mut batch).await?;
                    }
                    self.simple_query(frame).await?;
                    self.land();
                }
                b'P' | b'B' | b'D' | b'E' | b'C' => {
                    batch_bytes += frame.raw.len();
                    batch.push(frame);
                    if batch_bytes > self.client.max_message {
                        return Err(SessionError::ClientProtocol(
                            "too many extended-protocol messages without Sync".into(),
                        ));
                    }
                }
                b'S' | b'H' => {
                    batch.push(frame);
                    batch_bytes = 0;
                    self.board();
                    self.extended(&mut batch).await?;
                    self.land();
                }
                b'X' => return Ok(()),
                b'd' | b'c' | b'f' => {
                    // Stray COPY messages outside a COPY: Postgres ignores them.
                }
                other => {
                    return Err(SessionError::ClientProtocol(format!(
                        "invalid frontend message type {}",
                        other
                    )))
                }
            }
        }
    }

    /// A request starts: until it lands, this proxy does not acknowledge
    /// map versions newer than the one it starts under.
    fn board(&mut self) {
        let flight = self.shared.liveness.board();
        *self.flight.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(flight);
    }

    fn land(&mut self) {
        self.flight
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    /// Releases the request's flight while it waits (held statements must not
    /// stall the acknowledgement the cutover waits for), and boards again after.
    fn set_waiting(&self, waiting: bool) {
        let mut flight = self.flight.lock().unwrap_or_else(|e| e.into_inner());
        if waiting {
            flight.take();
        } else if flight.is_none() {
            *flight = Some(self.shared.liveness.board());
        }
    }

    /// Tells the client why the connection closes (a protocol violation).
    pub async fn fatal_and_close(&mut self, message: &str) {
        self.client.fatal("08P01", message);
        let _ = self.client.flush().await;
    }

    /// Closes the session: a transaction still open on a backend is rolled back
    /// by dropping the connection (never returned to the pool mid-transaction).
    pub fn finish(&mut self) {
        if let Some(mut lease) = self.lease.take() {
            if lease.status() != b'I' || lease.backend().pending_sync {
                lease.backend().broken = true;
            }
        }
        self.set_cancel_target(None);
    }

    // ------------------------------------------------------------ routing

    /// Routes with the current map, holding (not failing) while a partition
    /// it needs is blocked for a cutover, up to the configured wait.
    async fn route_holding<F>(&self, mut compute: F) -> Result<Route, RouteError>
    where
        F: FnMut(&shardmap::ClusterMap) -> Result<Route, RouteError>,
    {
        // The clock is read only once a partition turns out to be blocked.
        let mut started: Option<Instant> = None;
        let max_wait = Duration::from_millis(self.shared.config.limits.blocked_wait_ms);
        let mut rx = self.shared.map.clone();
        let liveness = &self.shared.liveness;
        loop {
            if !liveness.serving() {
                // Cut off from etcd: the map may be stale. Hold like a blocked
                // partition until the registry re-syncs, up to the same wait.
                let remaining =
                    max_wait.saturating_sub(started.get_or_insert_with(Instant::now).elapsed());
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
                if !resumed {
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
            let blocked = route.partitions().iter().any(|p| {
                matches!(
                    versioned.map.assignments.get(*p as usize).map(|a| &a.state),
                    Some(PartitionState::Blocked { .. })
                )
            });
            if !blocked {
                if let Some(started) = started {
                    self.shared
                        .metrics
                        .record_hold(started.elapsed().as_micros() as u64);
                }
                return Ok(route);
            }
            let remaining =
                max_wait.saturating_sub(started.get_or_insert_with(Instant::now).elapsed());
            self.set_waiting(true);
            let expired =
                remaining.is_zero() || tokio::time::timeout(remaining, rx.changed()).await.is_err();
            self.set_waiting(false);
            if expired {
                return Err(RouteError::new(
                    "55006",
                    format!("partition is being moved and stayed blocked for over {max_wait:?}"),
                    "retry the statement",
                ));
            }
        }
    }

    fn route_error(&mut self, error: &RouteError) {
        Metrics::add(&self.shared.metrics.route_errors, 1);
        self.client
            .error(error.code, &error.message, error.hint.as_deref());
    }

    /// Answers a simple-protocol request with `error`: a failure inside a
    /// transaction aborts it, as in Postgres.
    async fn refuse(&mut self, error: &RouteError) -> Result<(), SessionError> {
        self.route_error(error);
        self.fail_transaction().await;
        self.ready().await
    }

    /// A routing failure inside a transaction aborts it, as any error would in Postgres.
    async fn fail_transaction(&mut self) {
        match self.tx {
            Tx::Idle => {}
            Tx::Deferred { .. } | Tx::Aborted => self.tx = Tx::Aborted,
            Tx::Bound => {
                // Roll the backend back now, so nothing of it can be committed.
                if let Some(mut lease) = self.lease.take() {
                    if lease.backend().pending_sync {
                        // Mid extended-protocol sequence: closing the connection
                        // rolls the transaction back.
                        lease.backend().broken = true;
                        self.set_cancel_target(None);
                        self.tx = Tx::Aborted;
                        self.tx_settings.clear();
                        return;
                    }
                    let mut out = BytesMut::new();
                    messages::query("ROLLBACK", &mut out);
                    let ok = async {
                        let backend = lease.backend();
                        backend.write_all(&out).await?;
                        loop {
                            let frame = backend.read_frame().await?;
                            if frame.tag == b'Z' {
                                backend.status = frame.body().first().copied().unwrap_or(b'I');
                                return Ok::<_, io::Error>(());
                            }
                        }
                    }
                    .await;
                    if ok.is_err() {
                        lease.backend().broken = true;
                    }
                }
                self.set_cancel_target(None);
                self.tx = Tx::Aborted;
                self.tx_settings.clear();
            }
        }
    }

    // ------------------------------------------------------------ simple query

    async fn simple_query(&mut self, frame: Frame) -> Result<(), SessionError> {
        Metrics::add(&self.shared.metrics.requests, 1);
        let body = frame.body();
        let text = match messages::query_text(&body) {
            Ok(text) => text,
            Err(e) => return Err(SessionError::ClientProtocol(e.to_string())),
        };
        let analyzed = self.shared.analyzer.analyze(text);
        let analysis = analyzed.analysis.clone();
        let commands = &analysis.commands;
        if commands.is_empty() {
            messages::empty(b'I', &mut self.client.out);
            return self.ready().await;
        }
        if commands.len() == 1 {
            return self.single_statement(frame, &analyzed, &commands[0]).await;
        }
        // Several statements in one Query run as one unit on one server.
        // In a failed transaction Postgres rejects the first statement and
        // skips the rest of the string: nothing of it may run.
        if self.tx == Tx::Aborted {
            return self.aborted_error().await;
        }
        self.changes_session_state = commands.iter().any(changes_session);
        self.drops_statements = commands
            .iter()
            .any(|c| matches!(c, Command::Discard | Command::Deallocate { .. }));
        let literals = analyzed.literals.clone();
        let route = self
            .route_holding(|map| {
                let mut route = Route::Any;
                for command in commands {
                    if let Command::Data(data) = command {
                        if let Resolution::Route(r) = route_data(data, map, &literals, None)? {
                            route = route.merge(r).map_err(|(a, b)| cross_server(&a, &b))?;
                        }
                    } else if let Command::Unsupported(what) = command {
                        return Err(unsupported(what));
                    }
                }
                Ok(route)
            })
            .await;
        match route {
            Ok(route) => {
                let read_only = commands
                    .iter()
                    .all(|c| matches!(c, Command::Data(d) if d.read_only));
                let mut outcome = Outcome::default();
                self.dispatch_query(route, true, read_only, &frame.raw, &mut outcome)
                    .await
                    .map(|_| ())
            }
            Err(e) => self.refuse(&e).await,
        }
    }

    async fn single_statement(
        &mut self,
        frame: Frame,
        analyzed: &Analyzed,
        command: &Command,
    ) -> Result<(), SessionError> {
        if self.tx == Tx::Aborted && !matches!(command, Command::Commit | Command::Rollback) {
            return self.aborted_error().await;
        }
        match command {
            Command::Empty => {
                messages::empty(b'I', &mut self.client.out);
                self.ready().await
            }
            Command::Begin { read_only } => match self.tx {
                Tx::Idle => {
                    let statement = render(&analyzed_text(analyzed, &frame), &analyzed.literals);
                    self.tx = Tx::Deferred {
                        prelude: vec![statement],
                        read_only: *read_only,
                    };
                    messages::command_complete("BEGIN", &mut self.client.out);
                    self.ready().await
                }
                Tx::Deferred { .. } => {
                    messages::error_fields(
                        b'N',
                        "WARNING",
                        "25001",
                        "there is already a transaction in progress",
                        None,
                        &mut self.client.out,
                    );
                    messages::command_complete("BEGIN", &mut self.client.out);
                    self.ready().await
                }
                _ => self.forward_simple(frame, Route::Any, false).await,
            },
            Command::Commit | Command::Rollback => match self.tx {
                Tx::Idle => {
                    messages::error_fields(
                        b'N',
                        "WARNING",
                        "25P01",
                        "there is no transaction in progress",
                        None,
                        &mut self.client.out,
                    );
                    let tag = if *command == Command::Commit {
                        "COMMIT"
                    } else {
                        "ROLLBACK"
                    };
                    messages::command_complete(tag, &mut self.client.out);
                    self.ready().await
                }
                Tx::Deferred { .. } => {
                    self.tx = Tx::Idle;
                    self.apply_tx_settings(*command == Command::Commit);
                    let tag = if *command == Command::Commit {
                        "COMMIT"
                    } else {
                        "ROLLBACK"
                    };
                    messages::command_complete(tag, &mut self.client.out);
                    self.ready().await
                }
                Tx::Aborted => {
                    self.tx = Tx::Idle;
                    self.tx_settings.clear();
                    messages::command_complete("ROLLBACK", &mut self.client.out);
                    self.ready().await
                }
                Tx::Bound => self.forward_simple(frame, Route::Any, false).await,
            },
            Command::TransactionScoped => match &mut self.tx {
                Tx::Deferred { prelude, .. } => {
                    // Runs with the BEGIN, once the transaction has a server.
                    prelude.push(render(&analyzed_text(analyzed, &frame), &analyzed.literals));
                    let tag = transaction_scoped_tag(&analyzed_text(analyzed, &frame));
                    messages::command_complete(&tag, &mut self.client.out);
                    self.ready().await
                }
                _ => self.forward_simple(frame, Route::Any, false).await,
            },
            Command::Set { name, value } => {
                let value = render(value, &analyzed.literals);
                if let Some(setting) = name.strip_prefix("shardline.") {
                    return self.proxy_setting(setting, &value).await;
                }
                if let Tx::Deferred { prelude, .. } = &mut self.tx {
                    // Runs with the BEGIN, once the transaction has a server.
                    prelude.push(render(&analyzed_text(analyzed, &frame), &analyzed.literals));
                    self.tx_settings.push((name.clone(), Some(value)));
                    messages::command_complete("SET", &mut self.client.out);
                    return self.ready().await;
                }
                self.changes_session_state = true;
                let outcome = self
                    .forward_simple_outcome(frame, Route::Any, true, false)
                    .await?;
                if outcome.is_some_and(|o| !o.errored) {
                    self.record_setting(name.clone(), Some(value));
                }
                Ok(())
            }
            Command::Reset { name } => {
                if let Tx::Deferred { prelude, .. } = &mut self.tx {
                    prelude.push(render(&analyzed_text(analyzed, &frame), &analyzed.literals));
                    match &name {
                        Some(name) => self.tx_settings.push((name.clone(), None)),
                        None => {
                            let names: Vec<String> = self.settings.keys().cloned().collect();
                            self.tx_settings
                                .extend(names.into_iter().map(|n| (n, None)));
                        }
                    }
                    messages::command_complete("RESET", &mut self.client.out);
                    return self.ready().await;
                }
                self.changes_session_state = true;
                let outcome = self
                    .forward_simple_outcome(frame, Route::Any, true, false)
                    .await?;
                if outcome.is_some_and(|o| !o.errored) {
                    match name {
                        Some(name) => self.record_setting(name.clone(), None),
                        None => {
                            let names: Vec<String> = self.settings.keys().cloned().collect();
                            for name in names {
                                self.record_setting(name, None);
                            }
                        }
                    }
                }
                Ok(())
            }
            Command::Show { name } if name.starts_with("shardline.") => {
                self.show_proxy_setting(name).await
            }
            // SHOW reads a setting: it need not open a held-back transaction.
            Command::Show { .. } => self
                .forward_simple_outcome(frame, Route::Any, false, true)
                .await
                .map(|_| ()),
            Command::Discard => {
                // The backend's prepared statements are shared: forget only this
                // client's, and its settings.
                self.statements.clear();
                let names: Vec<String> = self.settings.keys().cloned().collect();
                for name in names {
                    self.record_setting(name, None);
                }
                let tag = format!(
                    "DISCARD {}",
                    analyzed_text(analyzed, &frame)
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("ALL")
                        .to_uppercase()
                );
                messages::command_complete(&tag, &mut self.client.out);
                self.ready().await
            }
            Command::Deallocate { name } => {
                match name {
                    None => self.statements.clear(),
                    Some(name) => {
                        if self.statements.remove(name).is_none() {
                            self.client.error(
                                "26000",
                                &format!("prepared statement \"{name}\" does not exist"),
                                None,
                            );
                            return self.ready().await;
                        }
                    }
                }
                messages::command_complete("DEALLOCATE", &mut self.client.out);
                self.ready().await
            }
            Command::Unsupported(what) => {
                let e = unsupported(what);
                self.refuse(&e).await
            }
            Command::Data(data) => {
                let literals = analyzed.literals.clone();
                let route = self
                    .route_holding(|map| match route_data(data, map, &literals, None)? {
                        Resolution::Route(route) => Ok(route),
                        Resolution::NeedsParams => Err(RouteError::new(
                            "42P02",
                            "there is no parameter $1",
                            "a simple Query cannot have parameters",
                        )),
                    })
                    .await;
                match route {
                    Ok(route) => match self.kept_simple(&frame, analyzed, data, &route) {
                        Some(kept) => {
                            self.forward_kept_simple(frame, route, data.read_only, kept)
                                .await
                        }
                        None => self.forward_simple(frame, route, data.read_only).await,
                    },
                    Err(e) => self.refuse(&e).await,
                }
            }
        }
    }

    /// Whether a simple Query runs as a statement kept prepared on the server,
    /// its integer literals sent as parameters: it is exactly equivalent (see
    /// `Parameterized`), the client sent it often enough, and it runs in an
    /// implicit transaction, so that a stale plan can be retried unseen.
    fn kept_simple(
        &mut self,
        frame: &Frame,
        analyzed: &Analyzed,
        data: &DataStatement,
        route: &Route,
    ) -> Option<KeptSimple> {
        let after = self.shared.config.pool.prepare_simple_after;
        if after == 0
            || !self.in_implicit_transaction()
            || route.server().is_none()
            || data.copy.is_some()
            || data.unparsed.is_some()
            // The shape has no comments: keep planner hints (pg_hint_plan's
            // `/*+ ... */`) by sending such queries as they are.
            || memchr::memchr_iter(b'/', &frame.raw).any(|at| frame.raw.get(at + 1) == Some(&b'*'))
        {
            return None;
        }
        let parameterized = analyzed.analysis.parameterized()?.clone();
        if parameterized.params != analyzed.literals.len() {
            return None;
        }
        let mut types = Vec::with_capacity(parameterized.params);
        for literal in analyzed.literals.iter() {
            types.push(crate::analyze::integer_literal_type(literal)?);
        }
        // The text has no quoted constant: its name does not depend on settings.
        let name = if types.iter().all(|&t| t == INT4_OID) {
            parameterized
                .int4_name
                .get_or_init(|| backend_statement_name(&parameterized.text, &types, &self.settings))
                .clone()
        } else {
            backend_statement_name(&parameterized.text, &types, &self.settings)
        };
        if self.shared.statement_uses.count(&name) < after {
            return None;
        }
        Some(KeptSimple {
            name,
            parameterized,
            types,
            literals: analyzed.literals.clone(),
        })
    }

    /// Sends a simple Query as Bind/Describe/Execute/Sync of a statement kept
    /// prepared on the backend, and relays the replies as the Query's would
    /// be (no BindComplete, no NoData).
    async fn forward_kept_simple(
        &mut self,
        frame: Frame,
        route: Route,
        read_only: bool,
        kept: KeptSimple,
    ) -> Result<(), SessionError> {
        let max_kept = self.shared.config.pool.max_prepared_unnamed;
        let shared = self.shared.clone();
        let mut build = |session: &mut Session, plan: &mut Plan, set: &mut FxHashSet<Arc<str>>| {
            if !session.keep_unnamed || !can_keep(set, &kept.name, max_kept) {
                plan.send(&frame.raw, End::Query);
                return;
            }
            Metrics::add(&shared.metrics.kept_prepared_runs, 1);
            if !set.contains(&kept.name) {
                let text = &kept.parameterized.text;
                prepare_on_backend(
                    plan,
                    set,
                    &kept.name,
                    text,
                    &kept.types,
                    End::ParseForQuery,
                    true,
                );
            }
            let values: Vec<&str> = kept.literals.iter().map(Literal::text).collect();
            messages::bind_text(&kept.name, &values, &mut plan.out);
            plan.expect(End::BindForQuery, Some(kept.name.clone()));
            messages::describe_execute_sync(&mut plan.out);
            plan.expect(End::DescribeForQuery, None);
            plan.expect(End::Execute, None);
            plan.expect(End::Sync, None);
        };
        let flags = DispatchFlags {
            binds_tx: true,
            synced: true,
            read_only,
        };
        let mut outcome = Outcome::default();
        self.keep_unnamed = true;
        let result = self.dispatch(route, flags, &mut build, &mut outcome).await;
        self.keep_unnamed = false;
        result.map(|_| ())
    }

    async fn forward_simple(
        &mut self,
        frame: Frame,
        route: Route,
        read_only: bool,
    ) -> Result<(), SessionError> {
        self.forward_simple_outcome(frame, route, true, read_only)
            .await
            .map(|_| ())
    }

    /// Forwards a Query; `None` when it never reached a backend. `binds_tx`:
    /// whether it runs inside a held-back transaction (and so opens it).
    async fn forward_simple_outcome(
        &mut self,
        frame: Frame,
        route: Route,
        binds_tx: bool,
        read_only: bool,
    ) -> Result<Option<Outcome>, SessionError> {
        let mut outcome = Outcome::default();
        let reached = self
            .dispatch_query(route, binds_tx, read_only, &frame.raw, &mut outcome)
            .await?;
        Ok(reached.then_some(outcome))
    }

    async fn aborted_error(&mut self) -> Result<(), SessionError> {
        self.client.error(
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
            None,
        );
        self.ready().await
    }

    /// Ends a request the proxy answered: ReadyForQuery if the client sent
    /// Sync (or a Query), else just what is buffered (after Flush).
    async fn end_request(&mut self, synced: bool) -> Result<(), SessionError> {
        if synced {
            self.ready().await
        } else {
            self.client.flush().await
        }
    }

    /// Writes ReadyForQuery with the session's status and flushes.
    async fn ready(&mut self) -> Result<(), SessionError> {
        let status = self.status();
        messages::ready_for_query(status, &mut self.client.out);
        self.client.flush().await
    }

    fn record_setting(&mut self, name: String, value: Option<String>) {
        if matches!(self.tx, Tx::Bound | Tx::Deferred { .. }) {
            self.tx_settings.push((name, value));
            return;
        }
        match value {
            Some(value) => {
                self.settings.insert(name, value);
            }
            None => {
                self.settings.remove(&name);
            }
        }
    }

    fn apply_tx_settings(&mut self, committed: bool) {
        let changes = std::mem::take(&mut self.tx_settings);
        if committed {
            for (name, value) in changes {
                match value {
                    Some(value) => {
                        self.settings.insert(name, value);
                    }
                    None => {
                        self.settings.remove(&name);
                    }
                }
            }
        }
    }

    /// `SET shardline.<setting>`: settings of the proxy itself.
    async fn proxy_setting(&mut self, setting: &str, value: &str) -> Result<(), SessionError> {
        match parse_proxy_setting(setting, value) {
            Ok(ProxySetting::ReadReplica(on)) => {
                self.read_replica = on;
                messages::command_complete("SET", &mut self.client.out);
            }
            Err(e) => self.route_error(&e),
        }
        self.ready().await
    }

    async fn show_proxy_setting(&mut self, name: &str) -> Result<(), SessionError> {
        let value = match name {
            "shardline.version" => Some(env!("CARGO_PKG_VERSION").to_string()),
            "shardline.read_replica" => {
                Some(if self.read_replica { "on" } else { "off" }.to_string())
            }
            "shardline.map_version" => self
                .shared
                .map
                .borrow()
                .as_ref()
                .map(|v| v.map.version.to_string()),
            _ => None,
        };
        match value {
            Some(value) => {
                messages::row_description(&[name], &mut self.client.out);
                messages::data_row(&[Some(&value)], &mut self.client.out);
                messages::command_complete("SHOW", &mut self.client.out);
            }
            None => self.client.error(
                "42704",
                &format!("unrecognized configuration parameter \"{name}\""),
                None,
            ),
        }
        self.ready().await
    }

    // ------------------------------------------------------------ extended protocol

    /// Runs one extended-protocol request; drains `frames` (the caller's
    /// buffer is reused for the next request).
    async fn extended(&mut self, frames: &mut Vec<Frame>) -> Result<(), SessionError> {
        Metrics::add(&self.shared.metrics.requests, 1);
        let mut items = Vec::with_capacity(frames.len());
        for frame in frames.drain(..) {
            let body = frame.body();
            let item = match frame.tag {
                b'P' => Parse::decode(body).map(|p| Item::Parse(frame, p)),
                b'B' => Bind::decode(body).map(|b| Item::Bind(frame, b)),
                b'D' => Target::decode(body, "Describe").map(|t| Item::Describe(frame, t)),
                b'E' => messages::decode_execute_portal(body).map(|p| Item::Execute(frame, p)),
                b'C' => Target::decode(body, "Close").map(|t| Item::Close(frame, t)),
                b'S' => Ok(Item::Sync(frame)),
                _ => Ok(Item::Flush(frame)),
            };
            items.push(item.map_err(|e| SessionError::ClientProtocol(e.to_string()))?);
        }
        let synced = matches!(items.last(), Some(Item::Sync(_)));

        // Register this request's statements first: its Binds may use them.
        let counting = self.shared.config.pool.prepare_unnamed_after > 0;
        for item in &items {
            let Item::Parse(_, parse) = item else {
                continue;
            };
            // Drivers re-parse the same unnamed statement all the time.
            let reused = self.statements.get(&parse.name).filter(|existing| {
                parse.same_text(&existing.query) && existing.param_types == parse.param_types
            });
            let statement = match reused {
                Some(existing) => existing.clone(),
                None => {
                    let analyzed = self.shared.analyzer.analyze(parse.query());
                    let keepable =
                        matches!(analyzed.analysis.commands.as_slice(), [Command::Data(_)])
                            && !has_quoted_constant(parse.query());
                    let prepared = Arc::new(Prepared {
                        backend_name: backend_statement_name(
                            parse.query(),
                            &parse.param_types,
                            &self.settings,
                        ),
                        query: parse.query().to_string(),
                        param_types: parse.param_types.clone(),
                        analyzed,
                        keepable,
                    });
                    self.statements.insert(parse.name.clone(), prepared.clone());
                    prepared
                }
            };
            if counting && parse.name.is_empty() && statement.keepable {
                self.shared.statement_uses.count(&statement.backend_name);
            }
        }

        let decided = self.decide_binds(&items).await;
        let BindPlan {
            portals,
            route,
            tx_before_forward,
            tx_after,
            settings,
            changes_session_state,
            drops_statements,
            read_only,
        } = match decided {
            Ok(decision) => decision,
            Err(error) => {
                // Nothing of this request ran: report the error and skip to Sync.
                self.route_error(&error);
                self.fail_transaction().await;
                self.forget_closed(&items);
                return if synced {
                    self.ready().await
                } else {
                    self.client.flush().await
                };
            }
        };
        for setting in settings {
            match setting {
                ProxySetting::ReadReplica(on) => self.read_replica = on,
            }
        }
        let forwards = portals.values().any(|u| matches!(u, PortalUse::Forward));
        let route = if route == Route::Any {
            self.prepare_route(&items)
        } else {
            route
        };

        if !self.needs_backend(&items, &portals) {
            // The proxy answers everything itself.
            if let (Tx::Deferred { .. } | Tx::Aborted, Tx::Idle) = (&self.tx, &tx_after) {
                let committed = portals
                    .values()
                    .any(|u| matches!(u, PortalUse::Answer("COMMIT")));
                self.apply_tx_settings(committed);
            }
            if self.tx != Tx::Bound {
                self.tx = tx_after;
            }
            let mut plan = Plan::default();
            self.build_extended(&items, &portals, &mut plan, None);
            emit_leading_synthetic(&mut plan.expects, &mut self.client.out);
            self.forget_closed(&items);
            return if synced {
                self.ready().await
            } else {
                self.client.flush().await
            };
        }

        if forwards {
            if let (Tx::Deferred { .. } | Tx::Aborted, Tx::Idle) = (&self.tx, &tx_before_forward) {
                let committed = portals
                    .values()
                    .any(|u| matches!(u, PortalUse::Answer("COMMIT")));
                self.apply_tx_settings(committed);
            }
            if self.tx != Tx::Bound {
                self.tx = tx_before_forward;
            }
        }
        let mut outcome = Outcome::default();
        let mut build =
            |session: &mut Session, plan: &mut Plan, prepared: &mut FxHashSet<Arc<str>>| {
                session.build_extended(&items, &portals, plan, Some(prepared));
            };
        self.changes_session_state = changes_session_state;
        self.drops_statements = drops_statements;
        let flags = DispatchFlags {
            binds_tx: forwards,
            synced,
            read_only,
        };
        self.in_extended = true;
        self.keep_unnamed = self.keeps_unnamed_prepared(&items, synced);
        let dispatched = self.dispatch(route, flags, &mut build, &mut outcome).await;
        self.in_extended = false;
        self.keep_unnamed = false;
        dispatched?;
        self.forget_closed(&items);
        Ok(())
    }

    /// Whether the next request runs in an implicit transaction of its own:
    /// no transaction open or held back, no backend kept from an unsynced
    /// request. Only then can a request be sent a second time unseen.
    fn in_implicit_transaction(&self) -> bool {
        self.tx == Tx::Idle && self.lease.is_none() && !self.unsynced
    }

    /// Whether this request's unnamed statement runs as a statement kept
    /// prepared on the server: the client parsed it often enough, and the
    /// request is one statement in an implicit transaction (Parse, Bind,
    /// Describe, Execute, Sync), so that if the server's cached plan went
    /// stale the whole request can be sent again with nobody noticing.
    fn keeps_unnamed_prepared(&self, items: &[Item], synced: bool) -> bool {
        let pool = &self.shared.config.pool;
        if pool.prepare_unnamed_after == 0 || !synced || !self.in_implicit_transaction() {
            return false;
        }
        let (mut binds, mut parses) = (0, 0);
        for item in items {
            match item {
                Item::Parse(_, parse) if !parse.name.is_empty() || binds > 0 => return false,
                Item::Parse(..) => parses += 1,
                Item::Bind(_, bind) if !bind.statement.is_empty() => return false,
                Item::Bind(..) => binds += 1,
                Item::Describe(_, target) if target.kind == b'S' && !target.name.is_empty() => {
                    return false
                }
                Item::Close(..) | Item::Flush(_) => return false,
                _ => {}
            }
        }
        let Some(statement) = self.statements.unnamed.as_ref() else {
            return false;
        };
        binds == 1
            && parses <= 1
            && statement.keepable
            && self.shared.statement_uses.get(&statement.backend_name) >= pool.prepare_unnamed_after
    }

    /// Decides, per Bind, whether the proxy answers it (transaction control
    /// outside a server) or it runs on a backend, and routes those that run.
    /// Returns the decisions, the merged route, the transaction state the
    /// first forwarded statement runs in, and the state after the request.
    async fn decide_binds(&self, items: &[Item]) -> Result<BindPlan, RouteError> {
        let mut portals = Portals::default();
        let mut settings = Vec::new();
        let mut changes_session_state = false;
        let mut drops_statements = false;
        let mut binds = 0usize;
        let mut read_only = true;
        let mut route = Route::Any;
        let mut tx = self.tx.clone();
        let mut before_forward: Option<Tx> = None;
        for item in items {
            let Item::Bind(_, bind) = item else { continue };
            let prepared = self
                .statements
                .get(&bind.statement)
                .cloned()
                .ok_or_else(|| RouteError {
                    code: "26000",
                    message: format!("prepared statement \"{}\" does not exist", bind.statement),
                    hint: None,
                })?;
            let command = prepared.command().unwrap_or(&Command::Empty);
            // Once something in this request runs on a backend, transaction
            // control runs there too.
            let on_backend = before_forward.is_some() || tx == Tx::Bound;
            let usage = match command {
                _ if tx == Tx::Aborted && !matches!(command, Command::Commit | Command::Rollback) => {
                    return Err(RouteError {
                        code: "25P02",
                        message: "current transaction is aborted, commands ignored until end of transaction block".into(),
                        hint: None,
                    })
                }
                Command::Begin { read_only } if !on_backend => {
                    if tx == Tx::Idle {
                        tx = Tx::Deferred {
                            prelude: vec![prepared.query.clone()],
                            read_only: *read_only,
                        };
                    }
                    PortalUse::Answer("BEGIN")
                }
                Command::Commit | Command::Rollback if !on_backend => {
                    let tag = if *command == Command::Commit && tx != Tx::Aborted { "COMMIT" } else { "ROLLBACK" };
                    tx = Tx::Idle;
                    PortalUse::Answer(tag)
                }
                Command::Unsupported(what) => return Err(unsupported(what)),
                Command::Set { name, value } if name.starts_with("shardline.") => {
                    let value = render(value, &prepared.analyzed.literals);
                    let setting = name.trim_start_matches("shardline.");
                    settings.push(parse_proxy_setting(setting, &value)?);
                    PortalUse::Answer("SET")
                }
                Command::Data(data) => {
                    let literals = prepared.analyzed.literals.clone();
                    let resolved = self
                        .route_holding(|map| {
                            let params = Params {
                                bind,
                                types: &prepared.param_types,
                            };
                            match route_data(data, map, &literals, Some(&params))? {
                                Resolution::Route(r) => Ok(r),
                                Resolution::NeedsParams => Ok(Route::Any),
                            }
                        })
                        .await?;
                    route = route.merge(resolved).map_err(|(a, b)| cross_server(&a, &b))?;
                    PortalUse::Forward
                }
                _ => PortalUse::Forward,
            };
            binds += 1;
            read_only &= matches!(command, Command::Data(d) if d.read_only);
            if matches!(usage, PortalUse::Forward) {
                changes_session_state |= changes_session(command);
                drops_statements |=
                    matches!(command, Command::Discard | Command::Deallocate { .. });
                if before_forward.is_none() {
                    before_forward = Some(tx.clone());
                    if matches!(tx, Tx::Deferred { .. }) {
                        tx = Tx::Bound;
                    }
                }
            }
            portals.insert(bind.portal.clone(), usage);
        }
        let before = before_forward.unwrap_or_else(|| tx.clone());
        Ok(BindPlan {
            portals,
            route,
            tx_before_forward: before,
            tx_after: tx,
            settings,
            changes_session_state,
            drops_statements,
            // Preparing (Parse/Describe without Bind) uses the primary: a
            // replica may not have replayed the newest schema yet.
            read_only: binds > 0 && read_only,
        })
    }

    /// Where to prepare or describe statements that do not run yet: where
    /// they would run if that is known without parameters (an unsharded
    /// table's home), else anywhere (every server has the same tables).
    fn prepare_route(&self, items: &[Item]) -> Route {
        let Some(snapshot) = self.shared.map.borrow().clone() else {
            return Route::Any;
        };
        let mut route = Route::Any;
        for item in items {
            let name = match item {
                Item::Parse(_, parse) => &parse.name,
                Item::Describe(_, target) if target.kind == b'S' => &target.name,
                _ => continue,
            };
            let Some(prepared) = self.statements.get(name) else {
                continue;
            };
            let Some(Command::Data(data)) = prepared.command() else {
                continue;
            };
            if let Ok(Resolution::Route(r)) =
                route_data(data, &snapshot.map, &prepared.analyzed.literals, None)
            {
                match route.clone().merge(r) {
                    Ok(merged) => route = merged,
                    Err(_) => return route,
                }
            }
        }
        route
    }

    /// Whether any message of the request must reach a server.
    fn needs_backend(&self, items: &[Item], portals: &Portals) -> bool {
        let statement_runs = |name: &str| {
            self.statements
                .get(name)
                .is_some_and(|p| !is_tx_control(p.command()))
        };
        let portal_runs = |name: &str| !matches!(portals.get(name), Some(PortalUse::Answer(_)));
        items.iter().any(|item| match item {
            Item::Parse(_, parse) => statement_runs(&parse.name),
            Item::Bind(_, bind) => portal_runs(&bind.portal),
            Item::Describe(_, target) if target.kind == b'S' => statement_runs(&target.name),
            Item::Describe(_, target) | Item::Close(_, target) if target.kind == b'P' => {
                portal_runs(&target.name)
            }
            Item::Execute(_, portal) => portal_runs(portal),
            _ => false,
        }) || (self.unsynced && self.lease.is_some())
    }

    /// Forgets statements the client closed in this request.
    fn forget_closed(&mut self, items: &[Item]) {
        for item in items {
            if let Item::Close(_, target) = item {
                if target.kind == b'S' {
                    self.statements.remove(&target.name);
                }
            }
        }
    }

    /// Turns the request's messages into backend bytes and expected replies.
    /// `prepared` is the backend's prepared-statement set (None: no backend,
    /// everything answered by the proxy).
    fn build_extended(
        &self,
        items: &[Item],
        portals: &Portals,
        plan: &mut Plan,
        mut prepared: Option<&mut FxHashSet<Arc<str>>>,
    ) {
        let mut unnamed_parsed = false;
        // Whether the unnamed statement runs kept prepared on this backend
        // (under its backend name, like a named one).
        let keep = self.keep_unnamed
            && match (&prepared, &self.statements.unnamed) {
                (Some(set), Some(statement)) => can_keep(
                    set,
                    &statement.backend_name,
                    self.shared.config.pool.max_prepared_unnamed,
                ),
                _ => false,
            };
        if keep {
            Metrics::add(&self.shared.metrics.kept_prepared_runs, 1);
        }
        for item in items {
            let live = prepared.is_some();
            match item {
                Item::Parse(frame, parse) => {
                    let statement = self.statements.get(&parse.name);
                    let runs = statement.is_some_and(|p| !is_tx_control(p.command()));
                    match (prepared.as_deref_mut(), statement) {
                        (Some(set), Some(statement)) if runs => {
                            if parse.name.is_empty() && !keep {
                                plan.send(&frame.raw, End::ParseComplete);
                                unnamed_parsed = true;
                            } else if set.contains(&statement.backend_name) {
                                plan.synthetic(simple_reply(b'1'));
                            } else {
                                // The client's own Parse: its reply goes to the client.
                                prepare_statement(plan, set, statement, true);
                            }
                        }
                        _ => plan.synthetic(simple_reply(b'1')),
                    }
                }
                Item::Bind(frame, bind) => {
                    let forwarded =
                        live && matches!(portals.get(&bind.portal), Some(PortalUse::Forward));
                    let statement = self.statements.get(&bind.statement);
                    match (forwarded, statement, prepared.as_deref_mut()) {
                        (true, Some(statement), Some(set)) => {
                            if bind.statement.is_empty() && !keep {
                                ensure_unnamed_parsed(plan, statement, &mut unnamed_parsed);
                                plan.send(&frame.raw, End::BindComplete);
                            } else {
                                ensure_prepared(plan, set, statement);
                                bind.encode_with_statement(&statement.backend_name, &mut plan.out);
                                let kept = bind.statement.is_empty();
                                plan.expect(
                                    End::BindComplete,
                                    kept.then(|| statement.backend_name.clone()),
                                );
                            }
                        }
                        _ => plan.synthetic(simple_reply(b'2')),
                    }
                }
                Item::Describe(frame, target) if target.kind == b'P' => {
                    match portals.get(&target.name) {
                        Some(PortalUse::Answer(_)) => plan.synthetic(simple_reply(b'n')),
                        _ if live => plan.send(&frame.raw, End::Describe),
                        _ => plan.synthetic(simple_reply(b'n')),
                    }
                }
                Item::Describe(frame, target) => {
                    let statement = self.statements.get(&target.name);
                    match (prepared.as_deref_mut(), statement) {
                        (Some(set), Some(statement)) if !is_tx_control(statement.command()) => {
                            if target.name.is_empty() && !keep {
                                ensure_unnamed_parsed(plan, statement, &mut unnamed_parsed);
                                plan.send(&frame.raw, End::Describe);
                            } else {
                                ensure_prepared(plan, set, statement);
                                Target {
                                    kind: b'S',
                                    name: statement.backend_name.to_string(),
                                }
                                .encode(b'D', &mut plan.out);
                                // Postgres revalidates the plan here too.
                                let kept = target.name.is_empty();
                                plan.expect(
                                    End::Describe,
                                    kept.then(|| statement.backend_name.clone()),
                                );
                            }
                        }
                        (_, Some(_)) => {
                            // Transaction control: no parameters, no rows.
                            let mut out = BytesMut::new();
                            out.extend_from_slice(&[b't', 0, 0, 0, 6, 0, 0]);
                            out.extend_from_slice(&simple_reply(b'n'));
                            plan.synthetic(out);
                        }
                        (_, None) => {
                            let mut out = BytesMut::new();
                            messages::error_fields(
                                b'E',
                                "ERROR",
                                "26000",
                                &format!("prepared statement \"{}\" does not exist", target.name),
                                None,
                                &mut out,
                            );
                            plan.synthetic(out);
                        }
                    }
                }
                Item::Execute(frame, portal) => match portals.get(portal) {
                    Some(PortalUse::Answer(tag)) => {
                        let mut out = BytesMut::new();
                        messages::command_complete(tag, &mut out);
                        plan.synthetic(out);
                    }
                    _ if live => plan.send(&frame.raw, End::Execute),
                    _ => {
                        let mut out = BytesMut::new();
                        messages::error_fields(
                            b'E',
                            "ERROR",
                            "34000",
                            &format!("portal \"{portal}\" does not exist"),
                            None,
                            &mut out,
                        );
                        plan.synthetic(out);
                    }
                },
                Item::Close(frame, target) => {
                    // Statements on backends are shared by clients: closing one
                    // only forgets it for this client (see `forget_closed`).
                    if target.kind == b'P'
                        && live
                        && !matches!(portals.get(&target.name), Some(PortalUse::Answer(_)))
                    {
                        plan.send(&frame.raw, End::CloseComplete);
                    } else {
                        plan.synthetic(simple_reply(b'3'));
                    }
                }
                Item::Sync(frame) => {
                    if live {
                        plan.send(&frame.raw, End::Sync);
                    }
                }
                Item::Flush(frame) => {
                    if live {
                        plan.out.extend_from_slice(&frame.raw);
                    }
                }
            }
        }
    }

    // ------------------------------------------------------------ dispatch and relay

    /// Sends a simple Query message as it came from the client.
    async fn dispatch_query(
        &mut self,
        route: Route,
        binds_tx: bool,
        read_only: bool,
        query: &Bytes,
        outcome: &mut Outcome,
    ) -> Result<bool, SessionError> {
        let mut build = |_: &mut Session, plan: &mut Plan, _: &mut FxHashSet<Arc<str>>| {
            plan.send(query, End::Query);
        };
        let flags = DispatchFlags {
            binds_tx,
            synced: true,
            read_only,
        };
        self.dispatch(route, flags, &mut build, outcome).await
    }

    /// Binds a backend for `route`, brings it in line with the session
    /// (settings; the held-back BEGIN when `binds_tx`), sends the request
    /// `build` produces and relays the replies. Returns false if no backend
    /// could be used (an error went to the client instead). `synced` is false
    /// for a request ending in Flush: the backend is then kept for the Sync.
    async fn dispatch(
        &mut self,
        route: Route,
        flags: DispatchFlags,
        build: &mut BuildRequest<'_>,
        outcome: &mut Outcome,
    ) -> Result<bool, SessionError> {
        let DispatchFlags {
            binds_tx,
            synced,
            read_only,
        } = flags;
        let held = self.lease.as_ref().map(|l| l.server().to_string());
        let target = match (route.server(), &held) {
            (Some(server), Some(held)) if server != held => {
                let error = RouteError::new(
                    "0A000",
                    format!("this statement runs on server {server}, but the transaction is on server {held}"),
                    "a transaction stays on one server: start a new transaction for the other key",
                );
                self.route_error(&error);
                self.fail_transaction().await;
                self.end_request(synced).await?;
                return Ok(false);
            }
            (Some(server), _) => server.to_string(),
            (None, Some(held)) => held.clone(),
            (None, None) => match self.any_server() {
                Some(server) => server,
                None => {
                    self.client
                        .error("57P03", "the shard map has no servers", None);
                    self.end_request(synced).await?;
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
                    self.end_request(synced).await?;
                    return Ok(false);
                }
            },
        };
        if !self.shared.liveness.serving() && !matches!(route, Route::Any) {
            // Routed while the lease was alive, but it lapsed while this
            // request waited for a backend: the route may be stale now.
            // (Requests that touch no partition, such as a Parse/Describe
            // or a catalog query, do not depend on the map.)
            if self.tx == Tx::Bound {
                self.lease = Some(lease);
            }
            self.route_error(&not_serving());
            self.fail_transaction().await;
            self.end_request(synced).await?;
            return Ok(false);
        }
        {
            let backend = lease.backend();
            self.set_cancel_target(Some(CancelTarget {
                addr: backend.addr,
                process_id: backend.process_id,
                secret_key: backend.secret_key,
            }));
        }
        // Prefix: settings the backend lacks, then a held-back BEGIN.
        let mut request = std::mem::take(&mut self.request);
        request.out.clear();
        request.expects.clear();
        if lease.backend().settings_unknown {
            // Someone changed this connection's session state in a way not
            // recorded exactly: start from the server defaults.
            let backend = lease.backend();
            backend.settings.clear();
            backend.settings.insert(RESET_ALL.into(), String::new());
            backend.settings_unknown = false;
        }
        if let Some(sql) = settings_sync_sql(&self.settings, &lease.backend().settings) {
            let mut out = BytesMut::new();
            messages::query(&sql, &mut out);
            request.inject(&out, End::Query);
            lease.backend().settings = replayed_settings(&self.settings);
        }
        if binds_tx {
            if let Tx::Deferred { prelude, .. } = &self.tx {
                let mut out = BytesMut::new();
                messages::query(&prelude.join("; "), &mut out);
                request.inject(&out, End::Query);
                if prelude.len() > 1 {
                    // SET/SAVEPOINT sent with the BEGIN: not tracked exactly.
                    lease.backend().settings_unknown = true;
                }
                self.tx = Tx::Bound;
            }
        }
        if self.changes_session_state {
            lease.backend().settings_unknown = true;
        }
        if !synced {
            lease.backend().pending_sync = true;
        }
        {
            let mut prepared = std::mem::take(&mut lease.backend().prepared);
            build(self, &mut request, &mut prepared);
            lease.backend().prepared = prepared;
        }
        let mut result = self.relay(&mut lease, &mut request, outcome).await;
        if let (Ok(()), Some(stale)) = (&result, outcome.stale.take()) {
            // A table under a kept-prepared statement changed its columns:
            // drop the statement and run the request as the client sent it.
            debug!(statement = %stale, "kept-prepared statement went stale; sending the request again");
            Metrics::add(&self.shared.metrics.stale_plan_retries, 1);
            lease.backend().prepared.remove(&stale);
            request.out.clear();
            request.expects.clear();
            let mut close = BytesMut::new();
            Target {
                kind: b'S',
                name: stale.to_string(),
            }
            .encode(b'C', &mut close);
            request.inject(&close, End::CloseComplete);
            self.keep_unnamed = false;
            let mut prepared = std::mem::take(&mut lease.backend().prepared);
            build(self, &mut request, &mut prepared);
            lease.backend().prepared = prepared;
            result = self.relay(&mut lease, &mut request, outcome).await;
        }
        if std::mem::take(&mut self.drops_statements) {
            // DISCARD/DEALLOCATE on a shared connection: its prepared
            // statements are no longer known; do not reuse it.
            lease.backend().broken = true;
        }
        self.changes_session_state = false;
        // Keep the buffers for the next request (bounded, so one huge request
        // does not pin memory for the session's life).
        if request.out.capacity() <= 64 * 1024 {
            self.request = request;
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
                self.set_cancel_target(None);
                drop(lease);
                self.end_request(synced).await?;
                return Ok(true);
            }
        }
        let status = lease.status();
        if status == b'I' {
            if self.tx == Tx::Bound {
                self.apply_tx_settings(outcome.committed);
                self.tx = Tx::Idle;
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

    async fn acquire(
        &mut self,
        target: &str,
        replica: bool,
    ) -> Result<Lease, (&'static str, String)> {
        let pool = if replica {
            self.replica_pool_for(target)?
        } else {
            self.pool_for(target)?
        };
        pool.acquire().await.map_err(|e| {
            warn!(server = %target, error = %e, "no backend connection");
            ("08006", format!("cannot reach server {target}: {e}"))
        })
    }

    /// The pool of `target`, remembered per map version so the common case
    /// (same server, same map) costs no lookups.
    fn pool_for(&mut self, target: &str) -> Result<Arc<Pool>, (&'static str, String)> {
        let snapshot = self.shared.map.borrow();
        let version = snapshot.as_ref().map_or(0, |v| v.revision);
        if let Some((cached_version, name, pool)) = &self.last_pool {
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
        self.last_pool = Some((version, target.to_string(), pool.clone()));
        Ok(pool)
    }

    /// A pool of one of `target`'s read replicas (round robin), or of the
    /// primary if it has none.
    fn replica_pool_for(&mut self, target: &str) -> Result<Arc<Pool>, (&'static str, String)> {
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
    fn any_server(&self) -> Option<String> {
        let snapshot = self.shared.map.borrow().clone()?;
        let first = snapshot.map.servers.keys().next().cloned();
        first
    }

    fn set_cancel_target(&self, target: Option<CancelTarget>) {
        *self.cancel_slot.lock().unwrap_or_else(|e| e.into_inner()) = target;
    }

    /// Sends `plan` and relays replies until every expected reply arrived.
    /// Replies are copied straight from the backend's read buffer into the
    /// client's write buffer, and written when the backend has nothing more
    /// buffered (or after 32 KiB, so large results stream).
    async fn relay(
        &mut self,
        lease: &mut Lease,
        plan: &mut Plan,
        outcome: &mut Outcome,
    ) -> Result<(), RelayError> {
        let backend = lease.backend();
        // Where this request's replies start, should they be taken back.
        let (out_mark, flushes) = (self.client.out.len(), self.client.flushes);
        emit_leading_synthetic(&mut plan.expects, &mut self.client.out);
        if plan.out.is_empty() {
            self.client.flush().await.map_err(RelayError::Client)?;
            return Ok(());
        }
        backend
            .write_all(&plan.out)
            .await
            .map_err(RelayError::Backend)?;
        let expects = &mut plan.expects;
        outcome.committed = false;
        loop {
            while let Some((tag, len)) = backend.peek_message().map_err(RelayError::Backend)? {
                match tag {
                    b'N' | b'A' | b'S' => {
                        if forwarding(expects) {
                            self.client
                                .out
                                .extend_from_slice(&backend.buffered()[..len]);
                        }
                        backend.consume(len);
                        continue;
                    }
                    b'E' => {
                        if let Some(Expect::Reply {
                            stale_retry: Some(name),
                            ..
                        }) = expects.front()
                        {
                            let stale = is_stale_plan_error(&backend.buffered()[..len]);
                            if stale && self.client.flushes != flushes {
                                // Too late to take the replies back: the client
                                // sees the error, and the connection with the
                                // stale statement is closed after this request.
                                backend.broken = true;
                            } else if stale {
                                // Nothing of the request ran: take its replies
                                // back; the server now skips to ReadyForQuery.
                                outcome.stale = Some(name.clone());
                                self.client.out.truncate(out_mark);
                                backend.consume(len);
                                expects
                                    .retain(|e| matches!(e, Expect::Reply { end: End::Sync, .. }));
                                for expect in expects.iter_mut() {
                                    if let Expect::Reply { forward, .. } = expect {
                                        *forward = false;
                                    }
                                }
                                continue;
                            }
                        }
                        outcome.errored = true;
                        self.client
                            .out
                            .extend_from_slice(&backend.buffered()[..len]);
                        backend.consume(len);
                        // The failing message's statement is not prepared after all.
                        if let Some(Expect::Reply {
                            unprepare: Some(name),
                            ..
                        }) = expects.front()
                        {
                            backend.prepared.remove(name);
                        }
                        let in_query = matches!(
                            expects.front(),
                            Some(Expect::Reply {
                                end: End::Query,
                                ..
                            })
                        );
                        if !in_query {
                            // Postgres skips everything up to Sync after an error
                            // (with none expected, after Flush: the request is done).
                            while let Some(front) = expects.front() {
                                match front {
                                    Expect::Reply { end: End::Sync, .. } => break,
                                    Expect::Reply {
                                        unprepare: Some(name),
                                        ..
                                    } => {
                                        backend.prepared.remove(name);
                                        expects.pop_front();
                                    }
                                    _ => {
                                        expects.pop_front();
                                    }
                                }
                            }
                        }
                        if expects.is_empty() {
                            self.client.flush().await.map_err(RelayError::Client)?;
                            return Ok(());
                        }
                        continue;
                    }
                    b'G' | b'W' => {
                        // COPY FROM STDIN: the client sends data until CopyDone/Fail.
                        self.client
                            .out
                            .extend_from_slice(&backend.buffered()[..len]);
                        backend.consume(len);
                        self.client.flush().await.map_err(RelayError::Client)?;
                        if tag == b'W' {
                            return Err(RelayError::Backend(io::Error::other(
                                "COPY BOTH is not supported",
                            )));
                        }
                        self.copy_in(backend).await?;
                        continue;
                    }
                    _ => {}
                }
                {
                    let message = &backend.buffered()[..len];
                    if tag == b'Z' {
                        backend.status = message.get(5).copied().unwrap_or(b'I');
                        backend.pending_sync = false;
                    } else if tag == b'C' {
                        outcome.committed = message.get(5..12) == Some(&b"COMMIT\0"[..]);
                    }
                }
                match expects.front() {
                    Some(Expect::Reply { end, forward, .. }) => {
                        let (end, forward) = (*end, *forward);
                        if forward && !end.hides(tag) {
                            self.client
                                .out
                                .extend_from_slice(&backend.buffered()[..len]);
                        }
                        backend.consume(len);
                        if end.ends_on(tag) {
                            expects.pop_front();
                            emit_leading_synthetic(expects, &mut self.client.out);
                        }
                    }
                    Some(Expect::Synthetic(_)) | None => {
                        backend.broken = true;
                        return Err(RelayError::Backend(io::Error::other(format!(
                            "unexpected message {:?} from the server",
                            char::from(tag)
                        ))));
                    }
                }
                if expects.is_empty() {
                    self.client.flush().await.map_err(RelayError::Client)?;
                    return Ok(());
                }
            }
            // Stream what we have before waiting for more (large results).
            if self.client.out.len() >= 32 * 1024 {
                self.client.flush().await.map_err(RelayError::Client)?;
            }
            if let Err(e) = backend.fill().await {
                return Err(RelayError::Backend(e));
            }
        }
    }

    /// Pumps COPY data from the client to the backend until CopyDone or CopyFail.
    async fn copy_in(&mut self, backend: &mut crate::backend::Backend) -> Result<(), RelayError> {
        loop {
            let frame = match self.client.read_frame().await {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(_) => {
                    // The client vanished mid-COPY: abort it on the server.
                    let mut out = BytesMut::new();
                    messages::copy_fail("client disconnected during COPY", &mut out);
                    let _ = backend.write_all(&out).await;
                    return Err(RelayError::Client(SessionError::ClientGone));
                }
            };
            match frame.tag {
                b'd' => backend
                    .write_all(&frame.raw)
                    .await
                    .map_err(RelayError::Backend)?,
                b'c' | b'f' => {
                    backend
                        .write_all(&frame.raw)
                        .await
                        .map_err(RelayError::Backend)?;
                    if self.in_extended {
                        // The Sync sent with the Execute was ignored during the
                        // COPY; libpq sends another after CopyDone, which the
                        // server needs before it answers ReadyForQuery.
                        match self.client.read_frame().await {
                            Ok(Some(next)) if next.tag == b'S' => {
                                backend
                                    .write_all(&next.raw)
                                    .await
                                    .map_err(RelayError::Backend)?;
                            }
                            Ok(Some(next)) => {
                                self.client.unread(&next);
                                backend
                                    .write_all(&[b'S', 0, 0, 0, 4])
                                    .await
                                    .map_err(RelayError::Backend)?;
                            }
                            Ok(None) | Err(_) => {
                                return Err(RelayError::Client(SessionError::ClientGone))
                            }
                        }
                    }
                    return Ok(());
                }
                // Flush and Sync are ignored during COPY, as in Postgres.
                b'H' | b'S' => {}
                other => {
                    let mut out = BytesMut::new();
                    messages::copy_fail(
                        &format!(
                            "unexpected message type {:?} during COPY",
                            char::from(other)
                        ),
                        &mut out,
                    );
                    backend.write_all(&out).await.map_err(RelayError::Backend)?;
                    return Ok(());
                }
            }
        }
    }
}

/// A setting of the proxy itself (`SET shardline.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxySetting {
    ReadReplica(bool),
}

fn parse_proxy_setting(setting: &str, value: &str) -> Result<ProxySetting, RouteError> {
    let value = value.trim().trim_matches('\'').to_ascii_lowercase();
    match setting {
        "read_replica" => match value.as_str() {
            "on" | "true" | "1" | "yes" => Ok(ProxySetting::ReadReplica(true)),
            "off" | "false" | "0" | "no" | "default" => Ok(ProxySetting::ReadReplica(false)),
            _ => Err(RouteError::new(
                "22023",
                format!("parameter \"shardline.read_replica\" requires a Boolean value, not \"{value}\""),
                "use on or off",
            )),
        },
        _ => Err(RouteError::new(
            "42704",
            format!("unrecognized configuration parameter \"shardline.{setting}\""),
            "shardline's own settings: shardline.read_replica",
        )),
    }
}

/// Writes a request into the plan, given the backend's prepared statements.
type BuildRequest<'a> = dyn FnMut(&mut Session, &mut Plan, &mut FxHashSet<Arc<str>>) + Send + 'a;

/// How a request is dispatched.
#[derive(Debug, Clone, Copy)]
struct DispatchFlags {
    /// Runs inside a held-back transaction, and so opens it on the server.
    binds_tx: bool,
    /// The request ends with Sync (not Flush): the backend can be released.
    synced: bool,
    /// Only reads: may go to a read replica if the client asked for that.
    read_only: bool,
}

#[derive(Debug)]
enum RelayError {
    Client(SessionError),
    Backend(io::Error),
}

fn forwarding(expects: &VecDeque<Expect>) -> bool {
    !matches!(expects.front(), Some(Expect::Reply { forward: false, .. }))
}

fn emit_leading_synthetic(expects: &mut VecDeque<Expect>, out: &mut BytesMut) {
    while let Some(Expect::Synthetic(_)) = expects.front() {
        if let Some(Expect::Synthetic(bytes)) = expects.pop_front() {
            out.extend_from_slice(&bytes);
        }
    }
}

/// Adds a Parse of `statement` under its backend name if the backend lacks
/// it; its ParseComplete is dropped (the client did not ask for it).
fn ensure_prepared(plan: &mut Plan, prepared: &mut FxHashSet<Arc<str>>, statement: &Prepared) {
    if !prepared.contains(&statement.backend_name) {
        prepare_statement(plan, prepared, statement, false);
    }
}

/// `prepare_on_backend` for a client's statement, its ParseComplete ending
/// the reply; `forward`: whether the client sees it.
fn prepare_statement(
    plan: &mut Plan,
    prepared: &mut FxHashSet<Arc<str>>,
    statement: &Prepared,
    forward: bool,
) {
    prepare_on_backend(
        plan,
        prepared,
        &statement.backend_name,
        &statement.query,
        &statement.param_types,
        End::ParseComplete,
        forward,
    );
}

/// Sends a Parse of `query` as statement `name` and records it as prepared
/// (undone if the Parse fails). Its reply ends at `end`; `forward`: whether
/// the client sees it.
fn prepare_on_backend(
    plan: &mut Plan,
    prepared: &mut FxHashSet<Arc<str>>,
    name: &Arc<str>,
    query: &str,
    param_types: &[u32],
    end: End,
    forward: bool,
) {
    messages::parse(name, query, param_types, &mut plan.out);
    plan.expects.push_back(Expect::Reply {
        end,
        forward,
        unprepare: Some(name.clone()),
        stale_retry: None,
    });
    prepared.insert(name.clone());
}

/// Whether a backend with statements `prepared` may keep statement `name`:
/// it has it already, or it keeps fewer than `max`.
fn can_keep(prepared: &FxHashSet<Arc<str>>, name: &str, max: usize) -> bool {
    prepared.contains(name) || prepared.len() < max
}

/// The unnamed statement may have been parsed in an earlier request, maybe
/// on another backend: parse it again here unless this request already did.
fn ensure_unnamed_parsed(plan: &mut Plan, statement: &Prepared, parsed: &mut bool) {
    if *parsed {
        return;
    }
    let mut out = BytesMut::new();
    messages::parse("", &statement.query, &statement.param_types, &mut out);
    plan.inject(&out, End::ParseComplete);
    *parsed = true;
}

/// Whether an ErrorResponse says a prepared statement's cached plan no longer
/// fits its tables (Postgres refuses to change a statement's result columns).
/// The routine field is checked, not the message: messages are translated.
fn is_stale_plan_error(message: &[u8]) -> bool {
    let Some(body) = message.get(5..) else {
        return false;
    };
    let mut code = None;
    let mut routine = None;
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'C', value)) => code = Some(value),
            Some((b'R', value)) => routine = Some(value),
            _ => {}
        }
    }
    code == Some(b"0A000") && routine == Some(b"RevalidateCachedQuery")
}

/// The error of a proxy that cannot prove its map is current.
fn not_serving() -> RouteError {
    RouteError::new(
        "57P03",
        "this shardline proxy lost its registration in etcd and is not serving until it re-syncs",
        "retry shortly, or connect to another proxy; check that etcd is reachable from this proxy",
    )
}

fn simple_reply(tag: u8) -> BytesMut {
    let mut out = BytesMut::with_capacity(5);
    messages::empty(tag, &mut out);
    out
}

/// Whether running `command` on a backend changes its session state.
fn changes_session(command: &Command) -> bool {
    matches!(
        command,
        Command::Set { .. } | Command::Reset { .. } | Command::Discard | Command::Deallocate { .. }
    )
}

fn is_tx_control(command: Option<&Command>) -> bool {
    matches!(
        command,
        Some(Command::Begin { .. } | Command::Commit | Command::Rollback)
    )
}

fn cross_server(a: &str, b: &str) -> RouteError {
    RouteError::new(
        "0A000",
        format!(
            "this request touches data on servers {a} and {b}; shardline runs it on one server"
        ),
        "split it so that each request (and each transaction) touches one server",
    )
}

fn unsupported(what: &str) -> RouteError {
    RouteError::new(
        "0A000",
        format!("{what} is not supported by shardline"),
        "see docs/ARCHITECTURE.md",
    )
}

/// The text of the (single) statement of a Query message, for re-sending.
fn analyzed_text(_analyzed: &Analyzed, frame: &Frame) -> String {
    messages::decode_query(frame.body())
        .map(|t| t.trim().trim_end_matches(';').trim().to_string())
        .unwrap_or_default()
}

/// Replaces literal markers in shape text by the literals, quoted as SQL.
fn render(shape: &str, literals: &[Literal]) -> String {
    if !shape.contains('$') {
        return shape.to_string();
    }
    let mut out = String::with_capacity(shape.len());
    let mut rest = shape;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let number: Option<usize> = after[..digits].parse().ok();
        match number
            .filter(|n| *n >= LITERAL_MARKER_BASE)
            .and_then(|n| literals.get(n - LITERAL_MARKER_BASE))
        {
            Some(Literal::Number(n)) => out.push_str(n),
            Some(Literal::String(s)) => out.push_str(&quote_literal(s)),
            None => {
                out.push('$');
                out.push_str(&after[..digits]);
            }
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// The CommandComplete tag Postgres gives a transaction-scoped statement.
fn transaction_scoped_tag(sql: &str) -> String {
    let mut words = sql.split_whitespace().map(|w| w.to_uppercase());
    match words.next().as_deref() {
        Some("SAVEPOINT") => "SAVEPOINT".into(),
        Some("RELEASE") => "RELEASE".into(),
        Some("ROLLBACK") => "ROLLBACK".into(),
        Some("SET") => "SET".into(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// SQL bringing a backend's settings to the client's, if they differ.
fn settings_sync_sql(
    client: &BTreeMap<String, String>,
    backend: &BTreeMap<String, String>,
) -> Option<String> {
    let mut statements = Vec::new();
    // A backend whose state is unknown starts from the server defaults.
    let reset_all = backend.contains_key(RESET_ALL);
    if reset_all {
        statements.push("RESET ALL".to_string());
    }
    for (name, value) in client {
        if SETTING_NOT_REPLAYED.contains(&name.as_str()) {
            continue;
        }
        if reset_all || backend.get(name) != Some(value) {
            statements.push(format!("SET {} TO {}", quote_ident(name), value));
        }
    }
    if !reset_all {
        for name in backend.keys() {
            if !client.contains_key(name) {
                statements.push(format!("RESET {}", quote_ident(name)));
            }
        }
    }
    if statements.is_empty() {
        None
    } else {
        debug!(count = statements.len(), "replaying session settings");
        Some(statements.join("; "))
    }
}

/// The settings a backend carries after a replay.
fn replayed_settings(client: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    client
        .iter()
        .filter(|(k, _)| !SETTING_NOT_REPLAYED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A string as an escape-string literal: means the same whatever the
/// session's standard_conforming_strings.
pub fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

fn quote_ident(name: &str) -> String {
    if name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_puts_literals_back() {
        let literals = vec![Literal::String("it's".into()), Literal::Number("5".into())];
        assert_eq!(
            render("SET a TO $100001, $100002, $1", &literals),
            "SET a TO E'it''s', 5, $1"
        );
        assert_eq!(quote_literal(r"a\'b"), r"E'a\\''b'");
    }

    #[test]
    fn settings_sync_only_differences() {
        let mut client = BTreeMap::new();
        client.insert("search_path".to_string(), "app".to_string());
        client.insert("application_name".to_string(), "'x'".to_string());
        let mut backend = BTreeMap::new();
        backend.insert("timezone".to_string(), "'UTC'".to_string());
        assert_eq!(
            settings_sync_sql(&client, &backend).as_deref(),
            Some("SET search_path TO app; RESET timezone")
        );
        backend.clear();
        backend.insert("search_path".to_string(), "app".to_string());
        assert_eq!(settings_sync_sql(&client, &backend), None);
    }

    #[test]
    fn statement_names_depend_on_text_and_types() {
        let none = BTreeMap::new();
        assert_eq!(
            backend_statement_name("select 1", &[], &none),
            backend_statement_name("select 1", &[], &none)
        );
        assert_ne!(
            backend_statement_name("select 1", &[], &none),
            backend_statement_name("select 1", &[23], &none)
        );
    }

    #[test]
    fn quoted_constants_share_a_statement_only_under_the_same_parse_settings() {
        let none = BTreeMap::new();
        let mut berlin = BTreeMap::new();
        berlin.insert("timezone".to_string(), "'Europe/Berlin'".to_string());
        let text = "select timestamptz '2024-06-01 00:00'";
        assert_eq!(
            backend_statement_name(text, &[], &berlin),
            backend_statement_name(text, &[], &berlin)
        );
        assert_ne!(
            backend_statement_name(text, &[], &none),
            backend_statement_name(text, &[], &berlin)
        );
        // Without a quoted constant the settings do not matter.
        assert_eq!(
            backend_statement_name("select $1::timestamptz", &[], &none),
            backend_statement_name("select $1::timestamptz", &[], &berlin)
        );
        // 'now' is fixed when parsed: never shared.
        let now = "insert into log (at) values ('now')";
        assert_ne!(
            backend_statement_name(now, &[], &none),
            backend_statement_name(now, &[], &none)
        );
    }
}
