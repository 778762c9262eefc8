//! One connection from the proxy to a Postgres server: connect, secure it
//! as the server's sslmode says (see the `pgtls` crate), authenticate
//! (trust, cleartext, md5, SCRAM-SHA-256), then read and write
//! protocol frames. It remembers what the session layer needs to reuse it:
//! which statements are prepared on it, which settings it carries, and the
//! transaction status of its last ReadyForQuery.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use pgtls::{Connector, PgStream};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use rustc_hash::FxHashMap;
use shardmap::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::wire::frame::{next_frame, peek_header, Frame, DEFAULT_MAX_MESSAGE};
use crate::wire::messages::{self, error_summary};
use crate::wire::rows::data_row_values;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to server {server} at {addr}: {source}")]
    Connect {
        server: String,
        addr: String,
        source: io::Error,
    },
    #[error("server {server} refused the login: {message} (SQLSTATE {code}){}",
        pgtls::refusal_hint(code, message).map(|h| format!("; {h}")).unwrap_or_default())]
    Refused {
        server: String,
        code: String,
        message: String,
    },
    #[error("cannot secure the connection to server {server} at {addr}: {message}")]
    Tls {
        server: String,
        addr: String,
        message: String,
    },
    #[error("server {server}: {0}", server = .1)]
    Protocol(String, String),
    #[error("server {server} needs a password but none is configured for it")]
    NoPassword { server: String },
    #[error("connection to server {server} failed: {source}")]
    Io { server: String, source: io::Error },
    #[error("connecting to server {server} timed out after {timeout:?}")]
    Timeout { server: String, timeout: Duration },
}

/// A live, authenticated backend connection.
pub struct Backend {
    stream: PgStream,
    read_buf: BytesMut,
    pub server: Arc<str>,
    pub addr: SocketAddr,
    pub process_id: i32,
    pub secret_key: i32,
    /// ParameterStatus values the server reported at startup.
    pub parameters: Vec<(String, String)>,
    /// The statements prepared on this connection.
    pub prepared: PreparedStatements,
    /// Session settings applied with SET (name → value text).
    pub settings: BTreeMap<String, String>,
    /// Transaction status of the last ReadyForQuery: `I`, `T` or `E`.
    pub status: u8,
    /// Set when the connection can no longer be trusted (I/O error, protocol
    /// desync); it is closed instead of going back to the pool.
    pub broken: bool,
    /// Extended-protocol messages were sent without a Sync: the server is in
    /// the middle of an implicit transaction and the connection must not be
    /// handed to anyone else.
    pub pending_sync: bool,
    /// A client changed session state on this connection in a way the proxy
    /// did not record exactly (SET inside a transaction or a multi-statement
    /// query, RESET): reset everything before the next client uses it.
    pub settings_unknown: bool,
    /// This connection's statements changed what a kept statement's plan or
    /// a write's rows depend on (a rule, a table's columns: see
    /// `catalog_change`) during its lease, or a kept statement's plan went
    /// stale on it: the server's other connections catch up when the lease
    /// ends (see `Lease` drop).
    pub catalog_changed: bool,
    pub created: Instant,
    pub last_used: Instant,
}

impl Backend {
    /// Connects and logs in to `endpoint` as its user, over TLS as `tls` says.
    pub async fn connect(
        server: Arc<str>,
        endpoint: &Endpoint,
        password: Option<&str>,
        tls: &Connector,
        timeout: Duration,
    ) -> Result<Backend, BackendError> {
        match tokio::time::timeout(
            timeout,
            Backend::connect_inner(server.clone(), endpoint, password, tls),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(BackendError::Timeout {
                server: server.to_string(),
                timeout,
            }),
        }
    }

    async fn connect_inner(
        server: Arc<str>,
        endpoint: &Endpoint,
        password: Option<&str>,
        tls: &Connector,
    ) -> Result<Backend, BackendError> {
        let addr_text = format!("{}:{}", endpoint.host, endpoint.port);
        let stream =
            TcpStream::connect(&addr_text)
                .await
                .map_err(|source| BackendError::Connect {
                    server: server.to_string(),
                    addr: addr_text.clone(),
                    source,
                })?;
        let io_err = |source| BackendError::Io {
            server: server.to_string(),
            source,
        };
        stream.set_nodelay(true).map_err(io_err)?;
        let addr = stream.peer_addr().map_err(io_err)?;
        let stream = tls
            .negotiate(stream, &endpoint.host)
            .await
            .map_err(|e| match e {
                pgtls::TlsError::Io(source) => io_err(source),
                other => BackendError::Tls {
                    server: server.to_string(),
                    addr: addr_text.clone(),
                    message: other.to_string(),
                },
            })?;
        let now = Instant::now();
        let mut backend = Backend {
            stream,
            read_buf: BytesMut::with_capacity(16 * 1024),
            server: server.clone(),
            addr,
            process_id: 0,
            secret_key: 0,
            parameters: Vec::new(),
            prepared: PreparedStatements::default(),
            settings: BTreeMap::new(),
            status: b'I',
            broken: false,
            pending_sync: false,
            settings_unknown: false,
            catalog_changed: false,
            created: now,
            last_used: now,
        };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", endpoint.user.as_str()),
                ("database", endpoint.dbname.as_str()),
                ("application_name", "shardline"),
                ("client_encoding", "UTF8"),
            ],
            &mut out,
        )
        .map_err(io_err)?;
        backend.write_all(&out).await.map_err(io_err)?;
        backend.authenticate(&endpoint.user, password).await?;
        Ok(backend)
    }

    /// Catches up with the catalog changes made through the proxy on this
    /// server (on any of its connections), within `limit`: drops the
    /// statements kept prepared here (`DEALLOCATE ALL`: their plans may no
    /// longer fit, and inside a transaction a stale plan cannot be retried
    /// unseen) and reads the database's rules (`read_rules`), which it also
    /// does when this connection has not read them yet, or could not. The
    /// pool calls it at checkout, so a pooled connection does not wait for
    /// `pool.max_lifetime` to see a rule that makes writes return rows or a
    /// column whose type changed. An error means the connection is no
    /// longer usable.
    pub async fn refresh_catalog(&mut self, limit: Duration) -> io::Result<()> {
        let deallocate = self.prepared.statements_stale();
        if !self.prepared.rules_stale() && !deallocate {
            return Ok(());
        }
        // Counted before reading: a change made meanwhile reads them again.
        let seen = self.prepared.catalog_count();
        let read = tokio::time::timeout(limit, self.read_rules(deallocate)).await;
        let read = read.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("reading the rules took longer than {limit:?}"),
            )
        })??;
        if deallocate {
            // Done whatever the rules read found: DEALLOCATE is not
            // undone by the error that ends the implicit transaction.
            self.prepared.texts.clear();
            self.prepared.statements_seen = seen.unwrap_or_default();
        }
        self.prepared.rules_return_rows = read != RulesRead::None;
        // Busy: read them again at the next checkout.
        self.prepared.rules_seen = seen.filter(|_| read != RulesRead::Busy);
        Ok(())
    }

    /// Notes a catalog change made by this connection's statement: after a
    /// CREATE RULE (or CREATE OR REPLACE) its writes may return rows at
    /// once; the server's other connections hear of it when the
    /// transaction ends (`publish_catalog_changes`).
    pub fn note_catalog_change(&mut self, change: CatalogChange) {
        if change == CatalogChange::RuleCreated {
            self.prepared.rules_return_rows = true;
        }
        self.catalog_changed = true;
    }

    /// Once the transaction that changed the catalog has ended (committed,
    /// the change is visible to the other connections), has every
    /// connection to the server catch up at its next checkout
    /// (`refresh_catalog`).
    pub fn publish_catalog_changes(&mut self) {
        if std::mem::take(&mut self.catalog_changed) {
            if let Some(changes) = &self.prepared.catalog_changes {
                changes.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether a rule of this database may make an INSERT, UPDATE or DELETE
    /// return rows (a SELECT or VALUES among its actions). A simple Query
    /// returns such rows; Execute in the extended protocol does not. So
    /// where such a rule exists, simple-protocol writes are not run as kept
    /// statements on this connection. Read at the first checkout, and at
    /// checkout after a rule changed through the proxy (`refresh_catalog`); a
    /// rule created otherwise (on the server directly, through another
    /// proxy, by a function) is seen by connections opened after it, within
    /// `pool.max_lifetime`. The read waits for no lock (`pg_get_ruledef`
    /// locks the rule's table): a table locked by DDL makes it Busy.
    /// With `deallocate`, the same Query drops the connection's prepared
    /// statements first.
    async fn read_rules(&mut self, deallocate: bool) -> io::Result<RulesRead> {
        let mut out = BytesMut::new();
        let drop_statements = if deallocate { "DEALLOCATE ALL; " } else { "" };
        messages::query(
            &format!("{drop_statements}{RULES_READ_LIMITS} {RULES_THAT_RETURN_ROWS}"),
            &mut out,
        );
        let server = self.server.clone();
        let (mut answer, mut malformed, mut parameters) = (None, None, Vec::new());
        self.exchange(&out, |frame| match frame.tag {
            // The last row is the answer (the limits' row comes first).
            b'D' => match data_row_values(&frame.body()) {
                Ok(values) => {
                    answer = Some(match values.first() {
                        Some(Some(v)) if &v[..] == b"f" => RulesRead::None,
                        _ => RulesRead::ReturnRows,
                    });
                }
                Err(e) => malformed = Some(e),
            },
            b'E' => {
                let (code, detail) = error_summary(&frame.body());
                answer = Some(if code == "55P03" || code == "57014" {
                    debug!(server = %server, %code, %detail, "the rules could not be read now (a table is locked): simple-protocol writes are not kept prepared on this connection until they are");
                    RulesRead::Busy
                } else {
                    warn!(server = %server, %code, %detail, "cannot read the database's rules (pg_rewrite): simple-protocol writes are not kept prepared on this connection; let the proxy's user read pg_catalog.pg_rewrite");
                    RulesRead::ReturnRows
                });
            }
            b'S' => parameters.push(frame.body()),
            _ => {}
        })
        .await?;
        if let Some(e) = malformed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{e} from the server"),
            ));
        }
        for body in parameters {
            self.record_parameter(&body);
        }
        let read = answer.unwrap_or(RulesRead::ReturnRows);
        if answer.is_some_and(|found| found == RulesRead::ReturnRows) {
            debug!(server = %self.server, "a rule may turn writes into SELECTs: simple-protocol writes are not kept prepared on this connection");
        }
        Ok(read)
    }

    /// Sends `out` (a Query, or extended-protocol messages ending in Sync)
    /// and hands every reply before ReadyForQuery to `each`; records the
    /// transaction status and the rule changes its statements made. A
    /// connection that fails is marked broken.
    pub async fn exchange(&mut self, out: &[u8], mut each: impl FnMut(Frame)) -> io::Result<()> {
        let result = async {
            self.write_all(out).await?;
            loop {
                let frame = self.read_frame().await?;
                match frame.tag {
                    b'Z' => {
                        self.status = frame.body().first().copied().unwrap_or(b'I');
                        return Ok(());
                    }
                    b'C' => {
                        if let Some(change) = catalog_change(&frame.body()) {
                            self.note_catalog_change(change);
                        }
                    }
                    _ => {}
                }
                each(frame);
            }
        }
        .await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// Records a ParameterStatus (its body): a new value replaces the old.
    fn record_parameter(&mut self, body: &[u8]) {
        let mut fields = body.split(|&b| b == 0);
        let name = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
        let value = String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
        match self.parameters.iter_mut().find(|(known, _)| *known == name) {
            Some((_, old)) => *old = value,
            None => self.parameters.push((name, value)),
        }
    }

    fn protocol(&self, what: impl Into<String>) -> BackendError {
        BackendError::Protocol(what.into(), self.server.to_string())
    }

    async fn authenticate(
        &mut self,
        user: &str,
        password: Option<&str>,
    ) -> Result<(), BackendError> {
        let server = self.server.to_string();
        let io_err = |source| BackendError::Io {
            server: server.clone(),
            source,
        };
        let need_password = || BackendError::NoPassword {
            server: server.clone(),
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read_frame().await.map_err(io_err)?;
            let mut body = frame.body();
            match frame.tag {
                b'R' => {
                    if body.len() < 4 {
                        return Err(self.protocol("short authentication message"));
                    }
                    let code = body.get_i32();
                    let mut out = BytesMut::new();
                    match code {
                        0 => continue,
                        3 => {
                            let password = password.ok_or_else(need_password)?;
                            frontend::password_message(password.as_bytes(), &mut out)
                                .map_err(io_err)?;
                        }
                        5 => {
                            let password = password.ok_or_else(need_password)?;
                            if body.len() < 4 {
                                return Err(self.protocol("short md5 salt"));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hashed = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                password.as_bytes(),
                                salt,
                            );
                            frontend::password_message(hashed.as_bytes(), &mut out)
                                .map_err(io_err)?;
                        }
                        10 => {
                            let password = password.ok_or_else(need_password)?;
                            let mechanisms: Vec<&[u8]> = body.split(|&b| b == 0).collect();
                            if !mechanisms.contains(&&b"SCRAM-SHA-256"[..]) {
                                return Err(self.protocol(
                                    "server offers no SASL mechanism shardline supports",
                                ));
                            }
                            let client = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                client.message(),
                                &mut out,
                            )
                            .map_err(io_err)?;
                            scram = Some(client);
                        }
                        11 => {
                            let client = scram
                                .as_mut()
                                .ok_or_else(|| self.protocol("SASL continue without SASL start"))?;
                            client.update(&body).map_err(io_err)?;
                            frontend::sasl_response(client.message(), &mut out).map_err(io_err)?;
                        }
                        12 => {
                            let client = scram
                                .as_mut()
                                .ok_or_else(|| self.protocol("SASL final without SASL start"))?;
                            client.finish(&body).map_err(io_err)?;
                            continue;
                        }
                        other => {
                            return Err(self
                                .protocol(format!("unsupported authentication request {other}")))
                        }
                    }
                    self.write_all(&out).await.map_err(io_err)?;
                }
                b'E' => {
                    let (code, message) = error_summary(&body);
                    return Err(BackendError::Refused {
                        server,
                        code,
                        message,
                    });
                }
                b'S' => self.record_parameter(&body),
                b'K' => {
                    if body.len() < 8 {
                        return Err(self.protocol("short BackendKeyData"));
                    }
                    self.process_id = body.get_i32();
                    self.secret_key = body.get_i32();
                }
                b'Z' => {
                    self.status = body.first().copied().unwrap_or(b'I');
                    return Ok(());
                }
                b'N' => {}
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message {:?} during login",
                        char::from(other)
                    )))
                }
            }
        }
    }

    /// Reads the next whole message.
    pub async fn read_frame(&mut self) -> io::Result<Frame> {
        loop {
            if let Some(frame) = next_frame(&mut self.read_buf, DEFAULT_MAX_MESSAGE)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
            {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    /// Takes the next whole message if it is already buffered.
    pub fn try_frame(&mut self) -> io::Result<Option<Frame>> {
        next_frame(&mut self.read_buf, DEFAULT_MAX_MESSAGE)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
    }

    /// Tag and total length (tag included) of the next message if it is
    /// completely buffered. Lengths are checked as in `next_frame`.
    pub fn peek_message(&self) -> io::Result<Option<(u8, usize)>> {
        let header = peek_header(&self.read_buf, DEFAULT_MAX_MESSAGE).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{e} from the server"))
        })?;
        Ok(header.filter(|&(_, size)| self.read_buf.len() >= size))
    }

    /// The bytes read but not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        &self.read_buf
    }

    /// Drops `n` consumed bytes from the front of the buffer.
    pub fn consume(&mut self, n: usize) {
        self.read_buf.advance(n.min(self.read_buf.len()));
    }

    /// Reads more bytes from the server into the buffer.
    pub async fn fill(&mut self) -> io::Result<()> {
        if self.read_buf.capacity() - self.read_buf.len() < 4096 {
            self.read_buf.reserve(16 * 1024);
        }
        let n = self.stream.read_buf(&mut self.read_buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        Ok(())
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        // TLS may hold the bytes in its buffer; on plain TCP this is a no-op.
        self.stream.flush().await
    }

    /// Whether the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.stream.is_tls()
    }

    /// Whether the server closed the connection (or sent something unasked)
    /// while it sat idle. Does not block.
    pub fn closed_while_idle(&mut self) -> bool {
        if !self.read_buf.is_empty() {
            return true;
        }
        self.stream.closed_while_idle()
    }
}

/// The statements prepared on one server connection, by name, with their
/// text. Names are derived from texts by a hash (shared by every client), so
/// a name is reused only for the same text: two texts that happen to share
/// a name never run one for the other.
#[derive(Debug, Default)]
pub struct PreparedStatements {
    texts: FxHashMap<Arc<str>, Box<str>>,
    /// A rule of the database may make a write return rows: see
    /// `Backend::read_rules`.
    rules_return_rows: bool,
    /// The server's count of catalog changes made through the proxy (see
    /// `Backend::publish_catalog_changes`), shared by its pools on every
    /// serving thread; `None` only in the empty set a request takes out.
    catalog_changes: Option<Arc<AtomicU64>>,
    /// The count when `rules_return_rows` was last read; `None` before the
    /// first read, or when it could not be done.
    rules_seen: Option<u64>,
    /// The count when the statements prepared here were last known to fit
    /// the catalog: when the connection began following the count (nothing
    /// prepared yet), or when they were dropped (`refresh_catalog`).
    statements_seen: u64,
}

/// What reading the rules found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RulesRead {
    /// No rule makes a write return rows.
    None,
    /// One may (or the rules cannot be read: the safe answer).
    ReturnRows,
    /// A table was locked: to be read again.
    Busy,
}

/// Limits for reading the rules, in the same implicit transaction: never
/// wait for a lock (`pg_get_ruledef` takes the rule's table's), nor longer
/// than a statement should, whatever the last client left set.
const RULES_READ_LIMITS: &str = "SELECT pg_catalog.set_config('lock_timeout', '100', true), \
     pg_catalog.set_config('statement_timeout', '2000', true);";

/// A statement that changed what kept statements or the rules check
/// depend on, by its CommandComplete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatalogChange {
    /// CREATE RULE, CREATE OR REPLACE RULE: writes may return rows.
    RuleCreated,
    /// ALTER RULE, DROP RULE, or a change that may alter the columns a
    /// statement returns.
    Other,
}

/// What a CommandComplete's tag (with or without its zero byte) says of
/// the catalog: rule changes, and the statements that may change the
/// columns a prepared statement returns (a column's type, a view's
/// columns, a table dropped and made again, a type, a domain, a function
/// dropped and made again, a schema renamed or dropped). Postgres refuses
/// to run a prepared statement whose result columns changed ("cached plan
/// must not change result type"). CREATE TABLE is not counted: a table that
/// shadows another through `search_path` is the one case it misses, and
/// transactions that create temporary tables would otherwise have every
/// connection drop its statements.
pub fn catalog_change(tag: &[u8]) -> Option<CatalogChange> {
    match tag.strip_suffix(b"\0").unwrap_or(tag) {
        b"CREATE RULE" => Some(CatalogChange::RuleCreated),
        b"ALTER RULE"
        | b"DROP RULE"
        | b"ALTER TABLE"
        | b"DROP TABLE"
        | b"ALTER VIEW"
        | b"CREATE VIEW"
        | b"DROP VIEW"
        | b"ALTER MATERIALIZED VIEW"
        | b"DROP MATERIALIZED VIEW"
        | b"ALTER FOREIGN TABLE"
        | b"DROP FOREIGN TABLE"
        | b"ALTER TYPE"
        | b"DROP TYPE"
        | b"ALTER DOMAIN"
        | b"DROP DOMAIN"
        | b"DROP FUNCTION"
        | b"ALTER SCHEMA"
        | b"DROP SCHEMA"
        | b"ALTER EXTENSION"
        | b"DROP EXTENSION" => Some(CatalogChange::Other),
        _ => None,
    }
}

/// Rules on INSERT, UPDATE or DELETE (`ev_type` other than SELECT's `1`)
/// of tables outside `pg_catalog` (whose `pg_settings` has one; its
/// updates take quoted names, which are never kept) with an action that
/// returns rows: as `pg_get_ruledef` prints them, a SELECT, VALUES or WITH
/// after `DO`, `INSTEAD`, or the opening bracket or a semicolon of a list
/// of actions (not after a column list's closing bracket: `INSERT INTO log
/// (a) VALUES (new.a)` returns nothing). A query nested in brackets in
/// another action may match too, which only costs the keeping of
/// simple-protocol writes. Operators are
/// qualified: the proxy's user may have another schema first on its path.
pub const RULES_THAT_RETURN_ROWS: &str = r"SELECT EXISTS (SELECT FROM pg_catalog.pg_rewrite r
     JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.ev_class
     WHERE r.ev_type OPERATOR(pg_catalog.<>) '1'
     AND c.relnamespace OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace
     AND pg_catalog.pg_get_ruledef(r.oid)
         OPERATOR(pg_catalog.~*) E'(\\mDO|\\mINSTEAD|[(;])\\s*(SELECT|VALUES|WITH)\\M')";

impl PreparedStatements {
    /// Whether a rule may make a write return rows here: one was found when
    /// the rules were last read, or a rule was created, replaced or dropped
    /// through the proxy since (answered again at the next checkout, see
    /// `Backend::refresh_catalog`).
    pub fn rules_may_return_rows(&self) -> bool {
        self.rules_return_rows || self.rules_stale()
    }

    /// Whether the rules are to be read (again): not read yet, or the
    /// catalog changed through the proxy since.
    pub fn rules_stale(&self) -> bool {
        self.catalog_count()
            .is_some_and(|count| self.rules_seen != Some(count))
    }

    /// Whether the catalog changed through the proxy since the statements
    /// prepared here were last known to fit it: they are dropped at the
    /// next checkout, and until then, inside a transaction, statements that
    /// return rows are not kept here (a stale plan could not be retried
    /// unseen). False for a set that follows no count.
    pub fn statements_stale(&self) -> bool {
        self.catalog_count()
            .is_some_and(|count| count != self.statements_seen)
    }

    /// The server's count of catalog changes now, if this set follows it.
    fn catalog_count(&self) -> Option<u64> {
        (self.catalog_changes.as_ref()).map(|changes| changes.load(Ordering::Acquire))
    }

    /// Follows `changes`, the server's count of catalog changes, from a
    /// connection's first checkout (nothing is prepared on it yet); the
    /// rules are read at once.
    pub fn follow_catalog_changes(&mut self, changes: Arc<AtomicU64>) {
        self.statements_seen = changes.load(Ordering::Acquire);
        self.catalog_changes = Some(changes);
        self.rules_seen = None;
    }

    /// Whether `name` is prepared here with exactly `text`.
    pub fn has(&self, name: &str, text: &str) -> bool {
        self.texts
            .get(name)
            .is_some_and(|prepared| &**prepared == text)
    }

    /// Whether `name` is prepared here, with whatever text.
    pub fn contains(&self, name: &str) -> bool {
        self.texts.contains_key(name)
    }

    pub fn insert(&mut self, name: Arc<str>, text: &str) {
        self.texts.insert(name, text.into());
    }

    pub fn remove(&mut self, name: &str) {
        self.texts.remove(name);
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_changes_are_read_from_command_tags() {
        assert_eq!(
            catalog_change(b"CREATE RULE\0"),
            Some(CatalogChange::RuleCreated)
        );
        assert_eq!(
            catalog_change(b"CREATE RULE"),
            Some(CatalogChange::RuleCreated)
        );
        for change in [
            &b"DROP RULE\0"[..],
            b"ALTER RULE",
            b"ALTER TABLE\0",
            b"CREATE VIEW\0",
            b"DROP TABLE\0",
            b"ALTER TYPE\0",
        ] {
            assert_eq!(catalog_change(change), Some(CatalogChange::Other));
        }
        for other in [
            &b"CREATE TRIGGER\0"[..],
            b"CREATE TABLE\0",
            b"INSERT 0 1\0",
            b"SELECT 1\0",
            b"RULE\0",
            b"",
        ] {
            assert_eq!(catalog_change(other), None);
        }
    }

    #[test]
    fn a_catalog_change_makes_the_statements_stale_until_dropped() {
        let mut set = PreparedStatements::default();
        assert!(
            !set.statements_stale(),
            "a request's empty set follows no count"
        );
        let changes = Arc::new(AtomicU64::new(3));
        set.follow_catalog_changes(changes.clone());
        assert!(
            !set.statements_stale(),
            "nothing prepared on a new connection"
        );
        changes.fetch_add(1, Ordering::AcqRel);
        assert!(set.statements_stale());
        set.statements_seen = 4;
        assert!(!set.statements_stale());
    }

    #[test]
    fn a_rule_change_makes_the_rules_stale_until_read_again() {
        let mut set = PreparedStatements::default();
        assert!(!set.rules_may_return_rows(), "a request's empty set");
        let changes = Arc::new(AtomicU64::new(7));
        set.follow_catalog_changes(changes.clone());
        assert!(
            set.rules_stale() && set.rules_may_return_rows(),
            "not read yet"
        );
        set.rules_seen = Some(7);
        assert!(!set.rules_may_return_rows());
        changes.fetch_add(1, Ordering::AcqRel);
        assert!(set.rules_stale() && set.rules_may_return_rows());
    }
}
