//! COPY FROM STDIN into a sharded table, in the simple protocol (psql
//! `\copy`, psycopg `cursor.copy()`, asyncpg `copy_records_to_table`): the
//! client's data is split into rows as it streams (`copy::CopySplitter`),
//! each row goes to its key's owner, where the client's own COPY statement
//! runs on that server's leg of the transaction. Outside a transaction the
//! whole COPY is one transaction over the servers, committed with two-phase
//! commit; a bad row or a server's error leaves nothing anywhere. Memory
//! stays bounded: rows are buffered per server only up to a flush size.

use bytes::{BufMut, Bytes, BytesMut};
use shardmap::{ClusterMap, KeyType, KeyValue, TableKind};

use crate::copy::{key_position, parse_copy_in, CopyError, CopyFormat, CopyIn, CopySplitter};
use crate::pool::Lease;
use crate::wire::messages;

use super::client::SessionError;
use super::legs::{Ended, Failure};
use super::tx::Tx;
use super::writes::tag_count;
use super::Session;

/// Rows for one server are sent once this many bytes are waiting.
const FLUSH_BYTES: usize = 64 * 1024;

/// Where a COPY's rows go: the table's key and the servers of its partitions.
struct Target {
    table: String,
    key_type: KeyType,
    columns: Vec<String>,
    key: usize,
    /// Servers owning any partition, in name order.
    servers: Vec<String>,
    /// The proxy's region, when it refuses rows of partitions pinned to
    /// another one (`residency`).
    region: Option<String>,
}

/// One server's COPY stream.
struct Stream {
    server: String,
    lease: Lease,
    pending: BytesMut,
    /// The server is in COPY mode (between CopyInResponse and CopyDone).
    copying: bool,
    /// The stream's prefix (a CSV header, the binary signature) is queued:
    /// known only once the splitter has read it from the client's data.
    started: bool,
}

impl Stream {
    async fn send_pending(&mut self) -> std::io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let data = self.pending.split().freeze();
        let mut out = BytesMut::with_capacity(data.len() + 5);
        out.put_u8(b'd');
        out.put_u32(u32::try_from(data.len() + 4).unwrap_or(u32::MAX));
        out.extend_from_slice(&data);
        self.lease.backend().write_all(&out).await
    }
}

/// Why a COPY stopped, for the client.
enum Stop {
    /// An error to report (already phrased for the client).
    Error {
        code: String,
        message: String,
        hint: Option<String>,
        context: Option<String>,
    },
    /// The server's own ErrorResponse, forwarded whole.
    Server(Bytes),
}

impl From<CopyError> for Stop {
    fn from(e: CopyError) -> Stop {
        Stop::Error {
            code: e.code.to_string(),
            message: e.message,
            hint: e.hint,
            context: e.context,
        }
    }
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Stop {
        Stop::Error {
            code: f.code,
            message: f.message,
            hint: Some(f.hint.to_string()),
            context: None,
        }
    }
}

fn stop(code: &str, message: impl Into<String>, hint: &str) -> Stop {
    Stop::Error {
        code: code.into(),
        message: message.into(),
        hint: Some(hint.into()),
        context: None,
    }
}

/// The table's key, its type, the columns the COPY carries and the servers.
fn target(copy: &CopyIn, map: &ClusterMap, region: Option<&str>) -> Result<Target, Stop> {
    let table = copy.table.clone();
    let Some(TableKind::Sharded {
        group,
        key_column,
        embedded_id,
    }) = map.tables.get(&table).map(|t| &t.kind)
    else {
        return Err(stop(
            "XX000",
            format!("{table} is not a sharded table"),
            "report this to the shardline developers",
        ));
    };
    let key_type = if *embedded_id {
        KeyType::Bigint
    } else {
        map.groups
            .get(group)
            .map_or(KeyType::Bigint, |g| g.key_type)
    };
    let recorded = map
        .columns
        .get(&table)
        .and_then(|c| shardmap::ddl::column_names(c));
    let columns = match (&copy.columns, recorded) {
        (Some(listed), _) => listed.clone(),
        (None, Some(all)) => copy.row_columns(&all)?,
        (None, None) => {
            return Err(stop(
                "0A000",
                format!("COPY into sharded table \"{table}\" names no columns, and the shard map does not record its columns"),
                "list the columns: COPY t (key, ...) FROM STDIN, or create the table with `shardctl table create` so its columns are known",
            ))
        }
    };
    let key = key_position(&columns, key_column, &table)?;
    let mut servers: Vec<String> = map.assignments.iter().map(|a| a.owner.clone()).collect();
    servers.sort();
    servers.dedup();
    Ok(Target {
        table,
        key_type,
        columns,
        key,
        servers,
        region: region.map(String::from),
    })
}

/// The server of a row's key field (`None`: SQL NULL).
fn owner_of(
    target: &Target,
    map: &ClusterMap,
    format: CopyFormat,
    field: Option<&Bytes>,
    line: u64,
) -> Result<String, Stop> {
    let context = Some(format!("COPY {}, line {line}", target.table));
    let Some(field) = field else {
        return Err(Stop::Error {
            code: "22004".into(),
            message: format!(
                "the sharding key \"{}\" of a row is NULL",
                target.columns[target.key]
            ),
            hint: Some("every row needs a key: its owner is found by it".into()),
            context,
        });
    };
    let value = match format {
        CopyFormat::Binary => {
            crate::route::keys::decode_binary(field, target.key_type).map_err(|e| e.message)
        }
        _ => std::str::from_utf8(field)
            .map_err(|_| "the key is not valid UTF-8".to_string())
            .and_then(|text| target.key_type.parse_value(text).map_err(|e| e.to_string())),
    };
    let value: KeyValue = value.map_err(|message| Stop::Error {
        code: "22P02".into(),
        message: format!("invalid sharding key in COPY data: {message}"),
        hint: None,
        context: context.clone(),
    })?;
    let partition = map
        .partition_of(&target.table, &value)
        .map_err(|e| Stop::Error {
            code: "22P02".into(),
            message: format!("no partition for the sharding key: {e}"),
            hint: None,
            context: context.clone(),
        })?;
    crate::residency::check(target.region.as_deref(), map, &[partition]).map_err(|e| {
        Stop::Error {
            code: e.code.into(),
            message: e.message,
            hint: e.hint,
            context: context.clone(),
        }
    })?;
    map.owner_of(partition)
        .map(|s| s.name.clone())
        .ok_or_else(|| {
            stop(
                "XX000",
                format!("partition {partition} has no owner"),
                "check the shard map",
            )
        })
}

/// An ErrorResponse with a CONTEXT line, as Postgres reports COPY errors.
fn copy_error(
    code: &str,
    message: &str,
    hint: Option<&str>,
    context: Option<&str>,
    out: &mut BytesMut,
) {
    let mut fields = BytesMut::new();
    for (field, value) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
    ] {
        fields.put_u8(field);
        fields.extend_from_slice(value.as_bytes());
        fields.put_u8(0);
    }
    for (field, value) in [(b'H', hint), (b'W', context)] {
        if let Some(value) = value {
            fields.put_u8(field);
            fields.extend_from_slice(value.as_bytes());
            fields.put_u8(0);
        }
    }
    fields.put_u8(0);
    out.put_u8(b'E');
    out.put_u32(u32::try_from(fields.len() + 4).unwrap_or(u32::MAX));
    out.extend_from_slice(&fields);
}

impl Session {
    /// Whether a simple-protocol statement is a COPY FROM STDIN into a
    /// sharded table that this path takes.
    pub(super) fn copies_across(&self, copy_table: Option<&str>) -> bool {
        let Some(table) = copy_table else {
            return false;
        };
        self.cross_server_allowed()
            && self.shared.map.borrow().as_ref().is_some_and(|s| {
                matches!(
                    s.map.tables.get(table).map(|t| &t.kind),
                    Some(TableKind::Sharded { .. })
                )
            })
    }

    /// Runs the COPY and answers the client: then ReadyForQuery, or, for a
    /// COPY started by an Execute (`extended`) that reached COPY mode, the
    /// ReadyForQuery comes at the client's next Sync (the one it sent with
    /// the Execute was ignored during the COPY, as Postgres ignores it).
    pub(super) async fn copy_across(
        &mut self,
        sql: &str,
        extended: bool,
    ) -> Result<(), SessionError> {
        let copy = match parse_copy_in(sql) {
            Ok(copy) => copy,
            Err(refusal) => {
                self.client
                    .error(refusal.code, &refusal.message, refusal.hint.as_deref());
                self.fail_transaction().await;
                return self.ready().await;
            }
        };
        let Some(snapshot) = self.shared.map.borrow().clone() else {
            self.client.error(
                "57P03",
                "the shard map is not loaded yet",
                Some("retry shortly"),
            );
            return self.ready().await;
        };
        let mut copying = false;
        let map = &snapshot.map;
        let implicit = self.tx == Tx::Idle;
        if implicit {
            self.tx = Tx::Deferred {
                prelude: vec!["BEGIN".into()],
                read_only: false,
            };
        }
        let config = &self.shared.config;
        let region = crate::residency::enforced(config.region.as_deref(), config.residency);
        let result = match target(&copy, map, region) {
            Ok(target) => self.copy_rows(sql, &copy, &target, map, &mut copying).await,
            Err(stop) => Err(stop),
        };
        match result {
            Ok(rows) => {
                if implicit {
                    match self.finish_legs(true).await {
                        Ended::Committed => messages::command_complete(
                            &format!("COPY {rows}"),
                            &mut self.client.out,
                        ),
                        Ended::RolledBack => self.client.error(
                            "40P01",
                            "the COPY was rolled back on a server before it could commit",
                            Some("retry it"),
                        ),
                        Ended::Failed(f) => self.client.error(&f.code, &f.message, Some(f.hint)),
                    }
                } else {
                    messages::command_complete(&format!("COPY {rows}"), &mut self.client.out);
                }
            }
            Err(stop) => {
                match stop {
                    Stop::Error {
                        code,
                        message,
                        hint,
                        context,
                    } => copy_error(
                        &code,
                        &message,
                        hint.as_deref(),
                        context.as_deref(),
                        &mut self.client.out,
                    ),
                    Stop::Server(error) => self.client.out.extend_from_slice(&error),
                }
                if implicit {
                    self.finish_legs(false).await;
                } else {
                    self.fail_transaction().await;
                }
            }
        }
        if extended && copying {
            self.skipping = true;
            return self.client.flush().await;
        }
        self.ready().await
    }

    /// Opens a COPY on every server, streams the client's rows to their
    /// owners, ends every COPY; returns the row count.
    async fn copy_rows(
        &mut self,
        sql: &str,
        copy: &CopyIn,
        target: &Target,
        map: &ClusterMap,
        copying: &mut bool,
    ) -> Result<u64, Stop> {
        let mut splitter = CopySplitter::new(copy, target.columns.clone(), target.key)?;
        // Every leg first (opening one runs statements on the others), then
        // the COPY on each.
        for server in &target.servers {
            self.enter_write_leg(server).await?;
        }
        let mut streams = Vec::with_capacity(target.servers.len());
        let mut leases: Vec<Lease> = std::mem::take(&mut self.legs);
        leases.extend(self.lease.take());
        let result = self
            .stream(
                sql,
                copy,
                target,
                map,
                &mut splitter,
                &mut leases,
                &mut streams,
                copying,
            )
            .await;
        // The leases go back to the transaction, whatever happened; a
        // server still in COPY mode is told the COPY failed first.
        for mut stream in streams {
            if stream.copying {
                let mut out = BytesMut::new();
                messages::copy_fail(
                    "the COPY failed on another server or in the proxy",
                    &mut out,
                );
                let backend = stream.lease.backend();
                let ended = async {
                    backend.write_all(&out).await?;
                    loop {
                        let frame = backend.read_frame().await?;
                        if frame.tag == b'Z' {
                            backend.status = frame.body().first().copied().unwrap_or(b'E');
                            return Ok::<_, std::io::Error>(());
                        }
                    }
                }
                .await;
                if ended.is_err() {
                    stream.lease.backend().broken = true;
                }
            }
            leases.push(stream.lease);
        }
        let mut leases = leases.into_iter();
        self.lease = leases.next();
        self.legs.extend(leases);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn stream(
        &mut self,
        sql: &str,
        copy: &CopyIn,
        target: &Target,
        map: &ClusterMap,
        splitter: &mut CopySplitter,
        leases: &mut Vec<Lease>,
        streams: &mut Vec<Stream>,
        copying: &mut bool,
    ) -> Result<u64, Stop> {
        let lost = |server: &str, e: std::io::Error| {
            stop(
                "08006",
                format!("connection to server {server} was lost during COPY: {e}"),
                "the COPY was rolled back; retry it",
            )
        };
        for lease in leases.drain(..) {
            let server = lease.server().to_string();
            let mut stream = Stream {
                server: server.clone(),
                lease,
                pending: BytesMut::new(),
                copying: false,
                started: false,
            };
            let mut out = BytesMut::new();
            messages::query(sql, &mut out);
            let backend = stream.lease.backend();
            backend
                .write_all(&out)
                .await
                .map_err(|e| lost(&server, e))?;
            loop {
                let frame = backend.read_frame().await.map_err(|e| lost(&server, e))?;
                match frame.tag {
                    b'G' => {
                        stream.copying = true;
                        break;
                    }
                    b'E' => {
                        streams.push(stream);
                        return Err(Stop::Server(frame.raw));
                    }
                    _ => {}
                }
            }
            streams.push(stream);
        }
        // The client may now send its data.
        let format = copy.options.format;
        let columns = i16::try_from(target.columns.len()).unwrap_or(i16::MAX);
        let mut response = BytesMut::new();
        response.put_u8(b'G');
        response.put_u32(4 + 1 + 2 + 2 * columns.max(0) as u32);
        let binary = matches!(format, CopyFormat::Binary);
        response.put_u8(u8::from(binary));
        response.put_i16(columns);
        for _ in 0..columns {
            response.put_i16(i16::from(binary));
        }
        self.client.out.extend_from_slice(&response);
        // From here the client is in COPY mode.
        *copying = true;
        self.client
            .flush()
            .await
            .map_err(|_| stop("08006", "the client went away during COPY", "retry"))?;
        loop {
            let frame = match self.client.read_frame().await {
                Ok(Some(frame)) => frame,
                _ => return Err(stop("08006", "the client went away during COPY", "retry")),
            };
            match frame.tag {
                b'd' => splitter.push(frame.body()),
                b'c' => splitter.finish(),
                b'f' => {
                    let reason = messages::decode_query(frame.body()).unwrap_or_default();
                    return Err(stop(
                        "57014",
                        format!("COPY from stdin failed: {reason}"),
                        "the COPY was rolled back on every server",
                    ));
                }
                // Flush and Sync are ignored during COPY, as in Postgres.
                b'H' | b'S' => continue,
                other => {
                    return Err(stop(
                        "08P01",
                        format!("unexpected message type 0x{other:02X} during COPY from stdin"),
                        "send CopyData, then CopyDone or CopyFail",
                    ))
                }
            }
            while let Some(row) = splitter.next_row()? {
                let server = owner_of(target, map, format, row.key.as_ref(), row.line)?;
                let Some(stream) = streams.iter_mut().find(|s| s.server == server) else {
                    return Err(stop(
                        "XX000",
                        format!("no COPY stream for server {server}"),
                        "report this to the shardline developers",
                    ));
                };
                if !stream.started {
                    stream.pending.extend_from_slice(&splitter.prefix());
                    stream.started = true;
                }
                stream.pending.extend_from_slice(&row.data);
                if stream.pending.len() >= FLUSH_BYTES {
                    let server = stream.server.clone();
                    stream.send_pending().await.map_err(|e| lost(&server, e))?;
                }
            }
            if splitter.is_done() {
                break;
            }
        }
        let mut total = 0u64;
        for stream in streams.iter_mut() {
            let server = stream.server.clone();
            if !stream.started {
                stream.pending.extend_from_slice(&splitter.prefix());
                stream.started = true;
            }
            stream.pending.extend_from_slice(splitter.trailer());
            stream.send_pending().await.map_err(|e| lost(&server, e))?;
            let backend = stream.lease.backend();
            backend
                .write_all(&[b'c', 0, 0, 0, 4])
                .await
                .map_err(|e| lost(&server, e))?;
            stream.copying = false;
            let mut error = None;
            loop {
                let frame = backend.read_frame().await.map_err(|e| lost(&server, e))?;
                match frame.tag {
                    b'C' => total += tag_count(&frame.body()),
                    b'E' if error.is_none() => error = Some(frame.raw),
                    b'Z' => {
                        backend.status = frame.body().first().copied().unwrap_or(b'I');
                        break;
                    }
                    _ => {}
                }
            }
            if let Some(error) = error {
                // The server's line numbers count its own rows only.
                let (code, message) = messages::error_summary(&error[5..]);
                return Err(stop(
                    &code,
                    format!("{message} (in the rows for server {server}; the line numbers a server reports count only the rows it received)"),
                    "the COPY was rolled back on every server; fix the row and retry",
                ));
            }
        }
        if total != splitter.rows() {
            return Err(stop(
                "XX000",
                format!(
                    "the servers stored {total} rows of the {} sent",
                    splitter.rows()
                ),
                "the COPY was rolled back on every server; report this to the shardline developers",
            ));
        }
        Ok(total)
    }

    /// `enter_leg` for a COPY: every server's leg, opened while none is in
    /// COPY mode.
    async fn enter_write_leg(&mut self, server: &str) -> Result<(), Stop> {
        self.enter_leg(server).await.map_err(Stop::from)
    }
}
