//! DDL of sharded and reference tables through the proxy (simple protocol):
//! the client's statement on every serving server (planned by `route::ddl`).
//!
//! - Transactional DDL (almost all of it in Postgres) runs on each server's
//!   leg of the client's transaction, as a write across servers does (see
//!   `writes`); outside a transaction the legs form an implicit transaction
//!   committed with two-phase commit, so the DDL is applied on every server
//!   or on none. A server's error rolls back everywhere.
//! - `CONCURRENTLY` cannot run in a transaction block: it runs server by
//!   server, and a failure part-way is reported with the servers that
//!   applied it and those that did not, and how to finish or undo it.
//!   Inside a client transaction it gets Postgres's own 25001.
//! - After DDL that changes a table's columns or constraints commits, the
//!   map's column list of that table (`map.columns`, what `INSERT` without
//!   a column list and `shardctl server add` use) is read back from a
//!   server's catalog and stored in etcd. Such DDL inside a client
//!   transaction is refused (the map could not follow its commit or
//!   rollback): it must run on its own.

use std::time::Duration;

use bytes::Bytes;
use shardmap::Change;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::route::ddl::{plan_ddl, DdlPlan};
use crate::route::{Route, RouteError};
use crate::wire::{messages, rows};

use super::client::SessionError;
use super::legs::{query_replies, run_simple, Ended, Reply};
use super::settings::{backend_settings_sql, replayed_settings};
use super::tx::Tx;
use super::Session;

/// What one server answered to the DDL.
enum DdlReply {
    /// Its CommandComplete tag.
    Done(String),
    /// Its ErrorResponse's body.
    Failed(Bytes),
}

impl Session {
    /// Runs `sql` on every server if it is DDL of sharded or reference
    /// tables, and answers the client; `None` when it is not (the caller
    /// routes it as usual).
    pub(super) async fn ddl_across(
        &mut self,
        sql: &str,
        words: &[String],
    ) -> Option<Result<(), SessionError>> {
        Some(match self.plan_ddl_across(sql, words).await? {
            Ok(plan) => self.run_ddl(sql, plan).await,
            Err(e) => self.refuse(&e).await,
        })
    }

    /// The plan of `sql` if it is DDL of sharded or reference tables (or
    /// why it cannot run); `None` when it is not such DDL.
    pub(super) async fn plan_ddl_across(
        &mut self,
        sql: &str,
        words: &[String],
    ) -> Option<Result<DdlPlan, RouteError>> {
        let ddl = crate::analyze::ddl::analyze_ddl(sql, words)?;
        let mut planned: Option<DdlPlan> = None;
        let routed = self
            .route_holding(|map| {
                planned = plan_ddl(&ddl, map)?;
                Ok(Route::Any)
            })
            .await;
        if let Err(e) = routed {
            return Some(Err(e));
        }
        planned.map(Ok)
    }

    pub(super) async fn run_ddl(&mut self, sql: &str, plan: DdlPlan) -> Result<(), SessionError> {
        Metrics::add(&self.shared.metrics.ddl_across_servers, 1);
        if !plan.transactional {
            return self.ddl_server_by_server(sql, &plan).await;
        }
        if self.tx != Tx::Idle && !plan.refresh_columns.is_empty() {
            return self
                .refuse(&RouteError::new(
                    "0A000",
                    format!(
                        "{} changes the columns of \"{}\", which the shard map records; inside a transaction the map could not follow its commit",
                        plan.what,
                        plan.refresh_columns.join("\", \"")
                    ),
                    "run it on its own, outside a transaction block (it still runs on every server at once)",
                ))
                .await;
        }
        if plan.servers.len() > 1 && !self.cross_server_allowed() {
            return self
                .refuse(&RouteError::new(
                    "0A000",
                    format!(
                        "{} of a sharded or reference table runs on every server in one two-phase transaction, and transactions across servers are off (shardline.cross_server = refuse)",
                        plan.what
                    ),
                    "SET shardline.cross_server = '2pc', or run the statement on each server directly",
                ))
                .await;
        }
        let implicit = self.tx == Tx::Idle;
        if implicit {
            self.tx = Tx::Deferred {
                prelude: vec!["BEGIN".into()],
                read_only: false,
            };
        }
        let mut tag = String::new();
        for server in &plan.servers {
            if let Err(failure) = self.enter_leg(server).await {
                self.client
                    .error(&failure.code, &failure.message, Some(failure.hint));
                return self.abandon_ddl(implicit).await;
            }
            let Some(lease) = self.lease.as_mut() else {
                self.client.error(
                    "XX000",
                    "internal error: no leg for DDL on a server",
                    Some("report this to the shardline developers"),
                );
                return self.abandon_ddl(implicit).await;
            };
            let mut error = None;
            let mut done = String::new();
            let replied = query_replies(lease, sql, |frame| match frame.tag {
                b'C' => done = command_tag(&frame.body()),
                b'E' if error.is_none() => error = Some(frame.body()),
                _ => {}
            })
            .await;
            match (replied, error) {
                (Ok(()), None) => tag = done,
                (Ok(()), Some(error)) => {
                    let (code, message) = messages::error_summary(&error);
                    let undone = if implicit {
                        "it was rolled back on every server"
                    } else {
                        "the transaction is aborted on every server"
                    };
                    self.client.error(
                        &code,
                        &format!("{message} (on server {server}; {undone})"),
                        Some("fix the cause on that server (or the statement), then run it again"),
                    );
                    return self.abandon_ddl(implicit).await;
                }
                (Err(e), _) => {
                    self.client.error(
                        "08006",
                        &format!("connection to server {server} was lost: {e}"),
                        Some("the DDL was rolled back; retry it"),
                    );
                    return self.abandon_ddl(implicit).await;
                }
            }
        }
        if implicit {
            match self.finish_legs(true).await {
                Ended::Committed => {}
                Ended::RolledBack => {
                    self.client.error(
                        "40P01",
                        "the DDL was rolled back on a server before it could commit",
                        Some("retry the statement"),
                    );
                    return self.ready().await;
                }
                Ended::Failed(failure) => {
                    self.client
                        .error(&failure.code, &failure.message, Some(failure.hint));
                    return self.ready().await;
                }
            }
            info!(what = %plan.what, servers = ?plan.servers, "DDL committed on every server");
            for table in &plan.refresh_columns {
                self.refresh_columns(&plan.servers[0], table).await;
            }
        }
        messages::command_complete(&tag, &mut self.client.out);
        self.ready().await
    }

    /// DDL that failed on a server (its error already written): rolled back
    /// everywhere outside a transaction; inside one the transaction is
    /// aborted, as any failed statement aborts it.
    async fn abandon_ddl(&mut self, implicit: bool) -> Result<(), SessionError> {
        if implicit {
            self.finish_legs(false).await;
        } else if self.lease.as_ref().is_none_or(|l| l.status() != b'E') {
            self.fail_transaction().await;
        }
        self.ready().await
    }

    /// `CONCURRENTLY`: one server after the other, each on a pooled
    /// connection outside any transaction.
    async fn ddl_server_by_server(
        &mut self,
        sql: &str,
        plan: &DdlPlan,
    ) -> Result<(), SessionError> {
        if self.tx != Tx::Idle {
            return self
                .refuse(&RouteError::new(
                    "25001",
                    format!("{} CONCURRENTLY cannot run inside a transaction block", plan.what),
                    "run it on its own, outside a transaction (shardline then runs it server by server)",
                ))
                .await;
        }
        let mut applied: Vec<&str> = Vec::new();
        let mut tag = String::new();
        for (index, server) in plan.servers.iter().enumerate() {
            let reply = match self.acquire(server, false).await {
                Ok(mut lease) => {
                    let mut result = Ok(DdlReply::Done(String::new()));
                    if let Some(sync) = backend_settings_sql(&self.settings, lease.backend()) {
                        match run_simple(&mut lease, &sync).await {
                            Ok(Reply::Done(_)) => lease
                                .backend()
                                .record_settings(replayed_settings(&self.settings)),
                            Ok(Reply::Failed { code, message }) => {
                                lease.backend().broken = true;
                                result = Err((code, message));
                            }
                            Err(e) => result = Err(("08006".into(), e.to_string())),
                        }
                    }
                    if result.is_ok() {
                        let mut error = None;
                        let mut done = String::new();
                        result = match query_replies(&mut lease, sql, |frame| match frame.tag {
                            b'C' => done = command_tag(&frame.body()),
                            b'E' if error.is_none() => error = Some(frame.body()),
                            _ => {}
                        })
                        .await
                        {
                            Ok(()) => Ok(match error {
                                Some(error) => DdlReply::Failed(error),
                                None => DdlReply::Done(done),
                            }),
                            Err(e) => Err((
                                "08006".into(),
                                format!("connection to server {server} was lost: {e}"),
                            )),
                        };
                    }
                    result
                }
                Err((code, message)) => Err((code.to_string(), message)),
            };
            let (code, message) = match reply {
                Ok(DdlReply::Done(done)) => {
                    applied.push(server);
                    tag = done;
                    continue;
                }
                Ok(DdlReply::Failed(error)) => messages::error_summary(&error),
                Err(failed) => failed,
            };
            let not_applied: Vec<&str> = plan.servers[index..].iter().map(String::as_str).collect();
            let list = |servers: &[&str]| {
                if servers.is_empty() {
                    "none".to_string()
                } else {
                    servers.join(", ")
                }
            };
            warn!(what = %plan.what, %server, applied = ?applied, "DDL failed part-way");
            self.client.error(
                &code,
                &format!(
                    "{} failed on server {server}: {message}. Applied on: {}; not applied on: {}",
                    plan.what,
                    list(&applied),
                    list(&not_applied)
                ),
                Some(&format!(
                    "it cannot run in a transaction, so it is not undone: fix the cause and run it on {} directly (a failed CREATE INDEX CONCURRENTLY leaves an INVALID index on {server}: drop it there first), or undo it on {}",
                    list(&not_applied),
                    list(&applied)
                )),
            );
            return self.ready().await;
        }
        messages::command_complete(&tag, &mut self.client.out);
        self.ready().await
    }

    /// Stores `table`'s column list as `server`'s catalog has it now in the
    /// map, and waits (briefly) until this proxy's map has it too, so the
    /// client's next INSERT without a column list is routed by it. A
    /// failure is a warning for the client: the DDL itself committed.
    async fn refresh_columns(&mut self, server: &str, table: &str) {
        if let Err(e) = self.store_columns(server, table).await {
            warn!(%table, error = %e, "could not update the map's column list after DDL");
            messages::error_fields(
                b'N',
                "WARNING",
                "01000",
                &format!(
                    "the DDL committed on every server, but the shard map's column list of \"{table}\" could not be updated: {e}"
                ),
                Some("INSERTs into it without a column list may be refused or misrouted (Postgres then rejects the row) until it is: list the columns, or run the DDL again with IF EXISTS / IF NOT EXISTS"),
                &mut self.client.out,
            );
        }
    }

    async fn store_columns(&mut self, server: &str, table: &str) -> Result<(), String> {
        let mut lease = self
            .acquire(server, false)
            .await
            .map_err(|(_, message)| message)?;
        let mut value = None;
        let mut error = None;
        query_replies(
            &mut lease,
            &shardmap::ddl::column_list_query(table),
            |frame| match frame.tag {
                b'D' if value.is_none() => {
                    value = rows::data_row_values(&frame.body())
                        .ok()
                        .and_then(|values| values.into_iter().next().flatten())
                        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
                }
                b'E' => error = Some(messages::error_summary(&frame.body()).1),
                _ => {}
            },
        )
        .await
        .map_err(|e| format!("reading the columns on server {server}: {e}"))?;
        drop(lease);
        if let Some(error) = error {
            return Err(format!("reading the columns on server {server}: {error}"));
        }
        let columns = value.ok_or_else(|| format!("server {server} lists no columns"))?;
        let shared = self.shared.clone();
        let store = shared
            .map_store
            .get_or_try_init(|| async {
                shardmap::MapStore::connect(&shared.config.etcd, &shared.config.cluster).await
            })
            .await
            .map_err(|e| format!("cannot reach etcd: {e}"))?;
        let mut unchanged = false;
        let saved = store
            .update("shardline-proxy", |map| {
                match map.columns.get(table) {
                    None => return Err(format!("the map no longer records columns of {table}")),
                    Some(recorded) if *recorded == columns => {
                        unchanged = true;
                        return Err("unchanged".into());
                    }
                    Some(_) => {}
                }
                map.columns.insert(table.to_string(), columns.clone());
                Ok(Change::new(
                    "table columns",
                    format!("{table}: {columns} (after DDL through the proxy)"),
                ))
            })
            .await;
        let version = match saved {
            Ok(saved) => saved.map.version,
            Err(_) if unchanged => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        let mut rx = self.shared.map.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while rx
                .borrow_and_update()
                .as_ref()
                .is_none_or(|v| v.map.version < version)
            {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        Ok(())
    }
}

/// The tag of a CommandComplete body.
fn command_tag(body: &[u8]) -> String {
    let end = body.iter().position(|b| *b == 0).unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}
