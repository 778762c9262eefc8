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

mod begin;
mod binding;
mod client;
mod combine;
mod copy_in;
mod ddl;
mod extended;
mod extended_writes;
mod gather;
mod hold;
mod legs;
mod owner_check;
mod pipeline;
mod plan;
mod portals;
mod relay;
mod scatter;
mod settings;
mod simple;
mod statements;
mod tx;
mod writes;

pub use client::{ClientIo, SessionError, IDLE_AFTER};
pub use settings::quote_literal;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cancel::TargetSlot;
use crate::context::Shared;
use crate::liveness::Flight;
use crate::metrics::Metrics;
use crate::pool::{Lease, Pool};
use crate::route::hint::Hint;
use crate::route::RouteError;
use crate::wire::frame::Frame;
use crate::wire::messages;

use client::Next;
use plan::Plan;
use statements::Statements;
use tx::Tx;

/// What one client request needs on its way to a backend and back. Made
/// for each request (never kept on the `Session`), so nothing of one request
/// can leak into the next, whichever way the request ends.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Request {
    /// Runs inside a held-back transaction, and so opens it on the server.
    pub(super) binds_tx: bool,
    /// Ends with Sync or is a Query (not Flush): the backend can be released.
    pub(super) synced: bool,
    /// Only reads: may go to a read replica if the client asked for that.
    pub(super) read_only: bool,
    /// Changes session state in ways the settings record cannot follow
    /// (SET/RESET/DISCARD inside a multi-statement Query or through the
    /// extended protocol): the backend's settings become unknown.
    pub(super) changes_session_state: bool,
    /// Runs DISCARD or DEALLOCATE on the backend, whose prepared statements
    /// are shared: the connection is not reused.
    pub(super) drops_statements: bool,
    /// An extended-protocol request (a COPY in it ends with the client's Sync).
    pub(super) extended: bool,
    /// The client ended the request with Flush, but it needs no backend
    /// beyond its replies: the proxy sends Sync instead, so that the
    /// backend goes back to its pool (`synced` is then set too).
    pub(super) flush_as_sync: bool,
    /// The unnamed statement runs as a statement kept prepared on the server
    /// (see `keeps_unnamed_prepared`); cleared for the retry of a stale plan.
    pub(super) keep_unnamed: bool,
    /// The request can be held and sent again after a failed ownership
    /// check (set by `dispatch`: nothing of a transaction ran before it).
    pub(super) retry_check: bool,
    /// A kept statement whose plan went stale can be sent again unseen
    /// (`Session::can_resend`: alone in an implicit transaction, or the
    /// first statement of a held-back one). Elsewhere in a transaction only
    /// statements that cannot go stale are kept (`DataStatement::no_result`),
    /// since a failed Bind aborts it.
    pub(super) retry_stale: bool,
}

impl Request {
    /// A simple Query; `binds_tx` and `read_only` as in the fields.
    pub(super) fn query(binds_tx: bool, read_only: bool) -> Request {
        Request {
            binds_tx,
            synced: true,
            read_only,
            ..Request::default()
        }
    }
}

/// Why `Session::run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Closed,
    Idle,
}

/// One client's session after login.
pub struct Session {
    shared: Arc<Shared>,
    client: ClientIo,
    statements: Statements,
    /// Session settings from startup parameters and SET (name → value as SQL text).
    settings: BTreeMap<String, String>,
    /// SETs made inside the open transaction: kept only if it commits.
    tx_settings: Vec<(String, Option<String>)>,
    tx: Tx,
    /// The backend the transaction (or the unsynced request) is on; with a
    /// transaction over several servers, the one its last statement used.
    lease: Option<Lease>,
    /// The other servers' backends of a transaction over several servers
    /// (see `legs`); empty otherwise.
    legs: Vec<Lease>,
    /// How to begin the transaction on another server, if it can be.
    leg_prelude: Option<String>,
    /// `SET shardline.cross_server`; `None` follows `[transactions]`.
    cross_server: Option<bool>,
    /// `SET shardline.key` / `shardline.group`: the routing hint of the
    /// session (see `route::hint`).
    hint: Option<Box<Hint>>,
    /// `SET LOCAL shardline.key` / `shardline.group`: the current
    /// transaction's hint (cleared when the next transaction begins).
    /// Boxed: rare, and every session would carry its size.
    tx_hint: Option<Box<Hint>>,
    /// Set when a request ended with Flush: the backend is kept until Sync.
    unsynced: bool,
    /// Set when a request that did not end in Sync failed where no backend
    /// skips for the client: messages are ignored up to the client's Sync.
    skipping: bool,
    /// The pool used last, with the map revision it was looked up in.
    last_pool: Option<Box<(i64, String, Arc<Pool>)>>,
    /// Buffers of the request being sent, reused from one request to the next.
    plan_buffers: Option<Box<Plan>>,
    /// `SET shardline.read_replica = on`: reads outside transactions go to replicas.
    read_replica: bool,
    /// `SET shardline.scatter`; `None` follows the proxy's `[scatter] enabled`.
    scatter: Option<bool>,
    replica_turn: usize,
    cancel_slot: TargetSlot,
    /// The request being served, for the map acknowledgement (released while
    /// a statement is held for a blocked partition).
    flight: std::sync::Mutex<Option<Flight>>,
    /// The last route was computed in degraded mode (from a map that may be
    /// stale): its request gets the ownership check even if the proxy has
    /// left degraded mode since.
    routed_degraded: std::sync::atomic::AtomicBool,
    /// Partitions whose ownership the open transaction checked already.
    owner_checked: Vec<u32>,
}

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
            legs: Vec::new(),
            leg_prelude: None,
            cross_server: None,
            hint: None,
            tx_hint: None,
            unsynced: false,
            skipping: false,
            last_pool: None,
            plan_buffers: None,
            read_replica: false,
            scatter: None,
            replica_turn: 0,
            cancel_slot,
            flight: std::sync::Mutex::new(None),
            routed_degraded: std::sync::atomic::AtomicBool::new(false),
            owner_checked: Vec::new(),
        }
    }

    /// The transaction status to report in ReadyForQuery.
    pub(super) fn status(&self) -> u8 {
        match self.tx {
            Tx::Idle => b'I',
            Tx::Deferred { .. } => b'T',
            Tx::Aborted => b'E',
            Tx::Bound => self.lease.as_ref().map_or(b'I', |l| l.status()),
        }
    }

    /// Serves the client until it closes the connection.
    pub async fn serve(&mut self) -> Result<(), SessionError> {
        loop {
            if self.client.read_buf.is_empty() {
                self.client.readable().await?;
            }
            // Boxed, so that the large state of a request in flight exists
            // only while the client is busy: the task of an idle client is
            // a few hundred bytes. A busy client stays in `run` from one
            // request to the next (one box per busy period, not per request).
            if Box::pin(self.run()).await? == Ended::Closed {
                return Ok(());
            }
        }
    }

    /// Serves requests until the client closes the connection or goes idle.
    async fn run(&mut self) -> Result<Ended, SessionError> {
        let mut batch: Vec<Frame> = Vec::new();
        let mut batch_bytes = 0usize;
        loop {
            // Inside an unsynced batch the rest follows shortly; between
            // requests the client may go idle.
            let next = if batch.is_empty() {
                self.client.read_request().await?
            } else {
                self.client
                    .read_frame()
                    .await?
                    .map_or(Next::Closed, Next::Frame)
            };
            let frame = match next {
                Next::Frame(frame) => frame,
                Next::Closed => return Ok(Ended::Closed),
                Next::Idle => {
                    // Reused while busy; an idle client keeps none.
                    self.plan_buffers = None;
                    return Ok(Ended::Idle);
                }
            };
            if self.skipping {
                match frame.tag {
                    b'S' => {
                        self.skipping = false;
                        self.ready().await?;
                    }
                    b'X' => return Ok(Ended::Closed),
                    // Ignored after an error until Sync, as in Postgres.
                    _ => {}
                }
                continue;
            }
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
                b'X' => return Ok(Ended::Closed),
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

    pub(super) fn route_error(&mut self, error: &RouteError) {
        Metrics::add(&self.shared.metrics.route_errors, 1);
        self.client
            .error(error.code, &error.message, error.hint.as_deref());
    }

    /// Answers a simple-protocol request with `error`: a failure inside a
    /// transaction aborts it, as in Postgres.
    pub(super) async fn refuse(&mut self, error: &RouteError) -> Result<(), SessionError> {
        self.route_error(error);
        self.fail_transaction().await;
        self.ready().await
    }

    /// Ends a request whose error the proxy reported: ReadyForQuery if the
    /// client sent Sync (or a Query), else what is buffered (after Flush).
    pub(super) async fn end_failed_request(&mut self, synced: bool) -> Result<(), SessionError> {
        if synced {
            return self.ready().await;
        }
        // Postgres skips the client's messages up to its Sync after an
        // error, and so does the proxy.
        self.close_mid_sequence_backend();
        self.unsynced = false;
        self.skipping = true;
        self.client.flush().await
    }

    /// Ends a request the proxy answered itself: ReadyForQuery if the
    /// client sent Sync; after Flush, what is buffered — and after a
    /// failure the client's messages are skipped up to its Sync, as
    /// Postgres skips them.
    pub(super) async fn end_request(
        &mut self,
        synced: bool,
        failed: bool,
    ) -> Result<(), SessionError> {
        if synced {
            return self.ready().await;
        }
        if failed {
            self.skipping = true;
        }
        self.client.flush().await
    }

    /// Writes ReadyForQuery with the session's status and flushes.
    pub(super) async fn ready(&mut self) -> Result<(), SessionError> {
        let status = self.status();
        messages::ready_for_query(status, &mut self.client.out);
        self.client.flush().await
    }
}

pub(super) fn cross_server(a: &str, b: &str) -> RouteError {
    RouteError::new(
        "0A000",
        format!(
            "this request touches data on servers {a} and {b}; shardline runs it on one server"
        ),
        "split it so that each request (and each transaction) touches one server",
    )
}

/// A statement refused in a transaction that spans servers.
pub(super) fn spans_servers(what: &str) -> RouteError {
    RouteError::new(
        "0A000",
        format!("{what} cannot run in a transaction that spans servers this way"),
        "send COMMIT or ROLLBACK on its own (not with other statements, not AND CHAIN), and use no savepoints once a transaction has reached a second server",
    )
}

pub(super) fn unsupported(what: &str) -> RouteError {
    RouteError::new(
        "0A000",
        format!("{what} is not supported by shardline"),
        "see docs/ARCHITECTURE.md",
    )
}
