//! One connection from the proxy to a Postgres server: connect, secure it
//! as the server's sslmode says (see the `pgtls` crate), authenticate
//! (trust, cleartext, md5, SCRAM-SHA-256), then read and write
//! protocol frames. It remembers what the session layer needs to reuse it:
//! which statements are prepared on it, which settings it carries, and the
//! transaction status of its last ReadyForQuery.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use pgtls::{Connector, PgStream};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use shardmap::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tracing::{debug, warn};

use crate::cancel::ServerAddr;
use crate::outbox::Outbox;
use crate::wire::frame::{next_frame, peek_header, Frame, DEFAULT_MAX_MESSAGE};
use crate::wire::messages::{self, error_summary};
use crate::wire::rows::data_row_values;

mod prepared;
pub use prepared::{PreparedStatements, RuleChange, StatementChanges, RULES_THAT_RETURN_ROWS};

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

/// What a statement kept prepared under `search_path` was prepared under.
fn search_path_token(search_path: Option<&String>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    search_path.hash(&mut hasher);
    hasher.finish()
}

/// A live, authenticated backend connection.
pub struct Backend {
    stream: PgStream,
    read_buf: BytesMut,
    pub server: Arc<str>,
    pub addr: ServerAddr,
    pub process_id: i32,
    pub secret_key: i32,
    /// ParameterStatus values the server reported at startup.
    pub parameters: Vec<(String, String)>,
    /// The statements prepared on this connection.
    pub prepared: PreparedStatements,
    /// Session settings applied with SET (name → value text); written only
    /// through `record_settings` and `mark_settings_unknown`, which keep
    /// `search_path` in step.
    settings: BTreeMap<String, String>,
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
    settings_unknown: bool,
    /// A hash of the `search_path` in `settings`, None while they are
    /// unknown: statements are kept prepared under it (`take_prepared`).
    /// Computed when the settings change, not on every request.
    search_path: Option<u64>,
    /// A rule was created, replaced, altered or dropped on this connection
    /// during its lease: the server's other connections read their rules
    /// again when it ends (see `Lease` drop).
    pub rules_changed: bool,
    /// A statement that may change the columns a prepared statement
    /// returns ran on this connection during its lease: counted again when
    /// its transaction ends (`publish_changes`), as it was when sent.
    pub catalog_changed: bool,
    pub created: Instant,
    pub last_used: Instant,
    /// Sends gathered with the thread's others (see `outbox`); none over
    /// TLS or where sends are not gathered.
    outbox: Option<Outbox>,
}

impl Backend {
    /// Connects and logs in to `endpoint` as its user, over TLS as `tls` says;
    /// through the server's Unix-domain socket in `socket_dir` instead of
    /// TCP when one is given (then without TLS, as libpq does).
    pub async fn connect(
        server: Arc<str>,
        endpoint: &Endpoint,
        socket_dir: Option<&Path>,
        password: Option<&str>,
        tls: &Connector,
        timeout: Duration,
    ) -> Result<Backend, BackendError> {
        match tokio::time::timeout(
            timeout,
            Backend::connect_inner(server.clone(), endpoint, socket_dir, password, tls),
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
        socket_dir: Option<&Path>,
        password: Option<&str>,
        tls: &Connector,
    ) -> Result<Backend, BackendError> {
        let io_err = |source| BackendError::Io {
            server: server.to_string(),
            source,
        };
        let (stream, addr) = match socket_dir {
            Some(dir) => {
                let path: Arc<Path> = dir.join(format!(".s.PGSQL.{}", endpoint.port)).into();
                let stream =
                    UnixStream::connect(&path)
                        .await
                        .map_err(|source| BackendError::Connect {
                            server: server.to_string(),
                            // Not the map's address: say where it comes from.
                            addr: format!("{} (from [pool.socket_dirs])", path.display()),
                            source,
                        })?;
                (PgStream::Unix(stream), ServerAddr::Unix(path))
            }
            None => {
                let addr_text = format!("{}:{}", endpoint.host, endpoint.port);
                let stream = TcpStream::connect(&addr_text).await.map_err(|source| {
                    BackendError::Connect {
                        server: server.to_string(),
                        addr: addr_text.clone(),
                        source,
                    }
                })?;
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
                (stream, ServerAddr::Tcp(addr))
            }
        };
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
            search_path: Some(search_path_token(None)),
            rules_changed: false,
            catalog_changed: false,
            created: now,
            last_used: now,
            outbox: None,
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

    /// Reads the database's rules (`read_rules`) if this connection has not
    /// yet, or could not, or if a rule was changed through the proxy since
    /// (on any connection to this server), within `limit`: the pool calls it
    /// at checkout, so a pooled connection does not wait for
    /// `pool.max_lifetime` to see a rule that makes writes return rows. An
    /// error means the connection is no longer usable.
    pub async fn refresh_rules(&mut self, limit: Duration) -> io::Result<()> {
        if !self.prepared.rules_stale() {
            return Ok(());
        }
        // Counted before reading: a change made meanwhile reads them again.
        let seen = self.prepared.rule_count();
        let read = tokio::time::timeout(limit, self.read_rules()).await;
        let read = read.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("reading the rules took longer than {limit:?}"),
            )
        })??;
        self.prepared.rules_return_rows = read != RulesRead::None;
        // Busy: read them again at the next checkout.
        self.prepared.rules_seen = seen.filter(|_| read != RulesRead::Busy);
        Ok(())
    }

    /// Notes what a statement that ran on this connection changed: a rule
    /// (after a CREATE RULE or CREATE OR REPLACE its writes may return rows
    /// at once), or what may change the columns a prepared statement
    /// returns. The server's other connections hear of it when the
    /// transaction ends (`publish_changes`).
    pub fn note_changes(&mut self, changes: StatementChanges) {
        if let Some(change) = changes.rule {
            if change == RuleChange::Created {
                self.prepared.rules_return_rows = true;
            }
            self.rules_changed = true;
        }
        if changes.result_columns {
            self.catalog_changed = true;
        }
    }

    /// The statements prepared here, taken out to build a request, told the
    /// connection's `search_path` as the proxy set it (unknown after a
    /// client changed session state in a way not recorded exactly).
    pub fn take_prepared(&mut self) -> PreparedStatements {
        self.prepared.set_search_path(self.search_path);
        std::mem::take(&mut self.prepared)
    }

    /// Session settings applied with SET, as far as the proxy knows them
    /// (see `settings_unknown`).
    pub fn settings(&self) -> &BTreeMap<String, String> {
        &self.settings
    }

    /// Whether a client changed this connection's session state in a way
    /// the proxy did not record exactly.
    pub fn settings_unknown(&self) -> bool {
        self.settings_unknown
    }

    /// Notes that a client changed session state here in a way the proxy
    /// did not record exactly: the next user starts from RESET ALL, and no
    /// statement counts as prepared under the `search_path` of now.
    pub fn mark_settings_unknown(&mut self) {
        self.settings_unknown = true;
        self.search_path = None;
    }

    /// Records the settings this connection now carries (and so that they
    /// are known).
    pub fn record_settings(&mut self, settings: BTreeMap<String, String>) {
        self.search_path = Some(search_path_token(settings.get("search_path")));
        self.settings = settings;
        self.settings_unknown = false;
    }

    /// Once the transaction that changed a rule has ended (committed, the
    /// change is visible to the other connections), has every connection to
    /// the server read its rules again; once the one that changed the
    /// catalog has, counts that change again (the session counted it when
    /// it sent the statement): a statement kept prepared meanwhile, under
    /// the old columns, is prepared again before it runs in a transaction.
    pub fn publish_changes(&mut self) {
        if std::mem::take(&mut self.rules_changed) {
            if let Some(changes) = &self.prepared.rule_changes {
                changes.fetch_add(1, Ordering::AcqRel);
            }
        }
        if std::mem::take(&mut self.catalog_changed) {
            self.prepared.count_catalog_change();
        }
    }

    /// Whether a rule of this database may make an INSERT, UPDATE or DELETE
    /// return rows (a SELECT or VALUES among its actions). A simple Query
    /// returns such rows; Execute in the extended protocol does not. So
    /// where such a rule exists, simple-protocol writes are not run as kept
    /// statements on this connection. Read at the first checkout, and at
    /// checkout after a rule changed through the proxy (`refresh_rules`); a
    /// rule created otherwise (on the server directly, through another
    /// proxy, by a function) is seen by connections opened after it, within
    /// `pool.max_lifetime`. The read waits for no lock (`pg_get_ruledef`
    /// locks the rule's table): a table locked by DDL makes it Busy.
    async fn read_rules(&mut self) -> io::Result<RulesRead> {
        let mut out = BytesMut::new();
        messages::query(
            &format!("{RULES_READ_LIMITS} {RULES_THAT_RETURN_ROWS}"),
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
                    b'C' => self.note_changes(StatementChanges::of(&frame.body())),
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

    /// From now on, sends go out with the thread's others at the end of
    /// each pass of its event loop (see `outbox`), where that can be done.
    pub fn gather_sends(&mut self) {
        if self.outbox.is_none() {
            self.outbox = self.stream.plain_fd().and_then(Outbox::new);
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        if let Some(outbox) = &self.outbox {
            return outbox.send(bytes).await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_dir_without_the_server_says_where_the_path_came_from() {
        let dir = std::env::temp_dir().join(format!("shardline-no-socket-{}", std::process::id()));
        let endpoint = Endpoint::parse("postgres://postgres@127.0.0.1:6543/postgres").expect("url");
        let tls = Connector::new(&settings::BackendTls::default()).expect("default TLS settings");
        let error = Backend::connect(
            "pg1".into(),
            &endpoint,
            Some(&dir),
            None,
            &tls,
            Duration::from_secs(5),
        )
        .await
        .err()
        .expect("no server listens there");
        let message = error.to_string();
        let expected = format!("{}/.s.PGSQL.6543 (from [pool.socket_dirs])", dir.display());
        assert!(matches!(error, BackendError::Connect { .. }), "{message}");
        assert!(message.contains(&expected), "{message}");
    }
}
