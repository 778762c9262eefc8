//! The simple protocol: a Query message, one handler per kind of statement
//! (transaction control, SET/RESET, SHOW, DISCARD, DEALLOCATE, data), and
//! repeated queries run as statements kept prepared on the server.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backend::PreparedStatements;

use crate::analyze::{Analyzed, Command, DataStatement, Literal, Parameterized};
use crate::metrics::Metrics;
use crate::route::writes::plan_write;
use crate::route::{route_hinted, Resolution, Route, RouteError};
use crate::wire::frame::Frame;
use crate::wire::messages;

use super::client::SessionError;
use super::plan::{End, Outcome, Plan};
use super::scatter::ScatterStatement;
use super::settings::{changes_session, parse_proxy_setting, render};
use super::statements::{
    backend_statement_name, can_keep, is_prepared, prepare_on_backend, KeptSimple,
};
use super::tx::{transaction_scoped_tag, Tx};
use super::{cross_server, spans_servers, unsupported, Request, Session};

/// The text of the (single) statement of a Query message, as the client
/// wrote it, for sending later (with a held-back BEGIN).
fn statement_text(frame: &Frame) -> String {
    messages::decode_query(frame.body())
        .map(|t| t.trim().trim_end_matches(';').trim().to_string())
        .unwrap_or_default()
}

impl Session {
    pub(super) async fn simple_query(&mut self, frame: Frame) -> Result<(), SessionError> {
        Metrics::add(&self.shared.metrics.requests, 1);
        let body = frame.body();
        let text = match messages::query_text(&body) {
            Ok(text) => text,
            Err(e) => return Err(SessionError::ClientProtocol(e.to_string())),
        };
        let analyzed = self.shared.analyzer.analyze(text);
        for command in &analyzed.analysis.commands {
            self.count_catalog_change_sent(command);
        }
        match analyzed.analysis.commands.as_slice() {
            [] => {
                messages::empty(b'I', &mut self.client.out);
                self.ready().await
            }
            [command] => self.single_statement(frame, &analyzed, command).await,
            _ => self.several_statements(frame, &analyzed).await,
        }
    }

    /// Several statements in one Query run as one unit on one server.
    async fn several_statements(
        &mut self,
        frame: Frame,
        analyzed: &Analyzed,
    ) -> Result<(), SessionError> {
        // In a failed transaction Postgres rejects the first statement and
        // skips the rest of the string: nothing of it may run.
        if self.tx == Tx::Aborted {
            return self.aborted_error().await;
        }
        let commands = &analyzed.analysis.commands;
        let literals = &analyzed.literals;
        if !self.legs.is_empty()
            && commands.iter().any(|c| {
                matches!(
                    c,
                    Command::Begin { .. }
                        | Command::Commit
                        | Command::Rollback
                        | Command::TransactionScoped
                )
            })
        {
            return self
                .refuse(&spans_servers("COMMIT, ROLLBACK and SAVEPOINT"))
                .await;
        }
        let hint = match self.hint_for(&statement_text(&frame)) {
            Ok(hint) => hint,
            Err(e) => return self.refuse(&e).await,
        };
        let route = self
            .route_holding(|map| {
                let mut route = Route::Any;
                for command in commands {
                    if let Command::Data(data) = command {
                        if let Resolution::Route(r) =
                            route_hinted(data, map, literals, None, false, false, &hint)?
                        {
                            route = route.merge(r).map_err(|(a, b)| cross_server(&a, &b))?;
                        }
                    } else if let Command::Unsupported(what) = command {
                        return Err(unsupported(what));
                    }
                }
                Ok(route)
            })
            .await;
        let route = match route {
            Ok(route) => route,
            Err(e) => return self.refuse(&e).await,
        };
        let read_only = commands
            .iter()
            .all(|c| matches!(c, Command::Data(d) if d.read_only));
        let request = Request {
            changes_session_state: commands.iter().any(changes_session),
            drops_statements: commands
                .iter()
                .any(|c| matches!(c, Command::Discard | Command::Deallocate { .. })),
            ..Request::query(true, read_only)
        };
        let mut outcome = Outcome::default();
        self.dispatch_query(route, request, &frame.raw, &mut outcome)
            .await
            .map(|_| ())
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
            Command::Begin { read_only } => self.begin(frame, *read_only).await,
            Command::Commit => self.end_transaction(frame, true).await,
            Command::Rollback => self.end_transaction(frame, false).await,
            Command::TransactionScoped => self.transaction_scoped(frame).await,
            Command::Set { name, value } => {
                let value = render(value, &analyzed.literals);
                self.set(frame, name, value).await
            }
            Command::Reset { name } => self.reset(frame, name.as_deref()).await,
            Command::Show { name } => self.show(frame, name).await,
            Command::Discard => self.discard(frame).await,
            Command::Deallocate { name } => self.deallocate(name.as_deref()).await,
            Command::Unsupported(what) => self.refuse(&unsupported(what)).await,
            Command::Data(data) => self.data_statement(frame, analyzed, data).await,
        }
    }

    /// BEGIN is held back until the transaction's first routed statement,
    /// which decides its server.
    async fn begin(&mut self, frame: Frame, read_only: bool) -> Result<(), SessionError> {
        match self.tx {
            Tx::Idle => {
                self.tx = Tx::Deferred {
                    prelude: vec![statement_text(&frame)],
                    read_only,
                };
                self.tx_hint = None;
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
            }
            Tx::Bound | Tx::Aborted => return self.forward_simple(frame, Route::Any, false).await,
        }
        messages::command_complete("BEGIN", &mut self.client.out);
        self.ready().await
    }

    /// COMMIT or ROLLBACK: answered by the proxy unless a server holds the
    /// transaction.
    async fn end_transaction(&mut self, frame: Frame, commit: bool) -> Result<(), SessionError> {
        let tag = if commit { "COMMIT" } else { "ROLLBACK" };
        match self.tx {
            Tx::Idle => {
                messages::error_fields(
                    b'N',
                    "WARNING",
                    "25P01",
                    "there is no transaction in progress",
                    None,
                    &mut self.client.out,
                );
                messages::command_complete(tag, &mut self.client.out);
            }
            Tx::Deferred { .. } => {
                self.tx = Tx::Idle;
                self.apply_tx_settings(commit);
                messages::command_complete(tag, &mut self.client.out);
            }
            Tx::Aborted => {
                self.tx = Tx::Idle;
                self.tx_settings.clear();
                messages::command_complete("ROLLBACK", &mut self.client.out);
            }
            Tx::Bound if !self.legs.is_empty() => {
                if statement_text(&frame)
                    .to_ascii_lowercase()
                    .contains("chain")
                {
                    return self.refuse(&spans_servers("COMMIT AND CHAIN")).await;
                }
                self.end_legs(commit).await;
            }
            Tx::Bound if self.shared.config.pool.prepare_simple_after == 0 => {
                return self.forward_simple(frame, Route::Any, false).await
            }
            Tx::Bound => {
                // As a statement kept prepared: Postgres never revalidates
                // COMMIT or ROLLBACK, so it cannot go stale.
                let text = statement_text(&frame);
                let kept = KeptSimple {
                    name: backend_statement_name(&text, &[], &BTreeMap::new()),
                    parameterized: Arc::new(Parameterized::constant(text)),
                    types: Vec::new(),
                    literals: Arc::default(),
                };
                let shape = KeptShape {
                    read_only: false,
                    no_result: true,
                    writes: false,
                    ends_transaction: true,
                };
                return self
                    .forward_kept_simple(frame, Route::Any, shape, kept)
                    .await;
            }
        }
        self.ready().await
    }

    /// SAVEPOINT, SET TRANSACTION and the like: in a held-back transaction
    /// they run with the BEGIN, once the transaction has a server.
    async fn transaction_scoped(&mut self, frame: Frame) -> Result<(), SessionError> {
        if let Some((name, value)) = local_proxy_setting(&statement_text(&frame)) {
            return self.set_local_hint(&name, &value).await;
        }
        let Tx::Deferred { prelude, .. } = &mut self.tx else {
            if !self.legs.is_empty() {
                return self
                    .refuse(&spans_servers(
                        "SAVEPOINT, RELEASE, ROLLBACK TO and SET LOCAL",
                    ))
                    .await;
            }
            // A savepoint would exist on this server only: the transaction
            // can no longer extend to another.
            self.leg_prelude = None;
            return self.forward_simple(frame, Route::Any, false).await;
        };
        let text = statement_text(&frame);
        let tag = transaction_scoped_tag(&text);
        prelude.push(text);
        messages::command_complete(&tag, &mut self.client.out);
        self.ready().await
    }

    /// `SET name = value` (`value` as SQL text): recorded so that it can be
    /// replayed on whichever backend the session lands on next.
    async fn set(&mut self, frame: Frame, name: &str, value: String) -> Result<(), SessionError> {
        if let Some(setting) = name.strip_prefix("shardline.") {
            return self.proxy_setting(setting, &value).await;
        }
        if let Tx::Deferred { prelude, .. } = &mut self.tx {
            prelude.push(statement_text(&frame));
            self.tx_settings.push((name.to_string(), Some(value)));
            messages::command_complete("SET", &mut self.client.out);
            return self.ready().await;
        }
        if self.forward_setting_change(frame).await? {
            self.record_setting(name.to_string(), Some(value));
        }
        Ok(())
    }

    /// `RESET name` or `RESET ALL` (`name` None).
    async fn reset(&mut self, frame: Frame, name: Option<&str>) -> Result<(), SessionError> {
        if let Some(setting) = name.and_then(|n| n.strip_prefix("shardline.")) {
            match parse_proxy_setting(setting, "default") {
                Ok(setting) => {
                    self.apply_proxy_setting(setting);
                    messages::command_complete("RESET", &mut self.client.out);
                }
                Err(e) => self.route_error(&e),
            }
            return self.ready().await;
        }
        if name.is_none() {
            // RESET ALL ends the session's routing hint too.
            self.hint = None;
        }
        let names: Vec<String> = match name {
            Some(name) => vec![name.to_string()],
            None => self.settings.keys().cloned().collect(),
        };
        if let Tx::Deferred { prelude, .. } = &mut self.tx {
            prelude.push(statement_text(&frame));
            self.tx_settings
                .extend(names.into_iter().map(|name| (name, None)));
            messages::command_complete("RESET", &mut self.client.out);
            return self.ready().await;
        }
        if self.forward_setting_change(frame).await? {
            for name in names {
                self.record_setting(name, None);
            }
        }
        Ok(())
    }

    /// Runs a SET or RESET on a backend (which then counts as changed in
    /// ways the proxy does not follow exactly); true if it succeeded.
    async fn forward_setting_change(&mut self, frame: Frame) -> Result<bool, SessionError> {
        let request = Request {
            changes_session_state: true,
            ..Request::query(true, false)
        };
        let outcome = self
            .forward_simple_outcome(frame, Route::Any, request)
            .await?;
        Ok(outcome.is_some_and(|o| !o.errored))
    }

    /// SHOW reads a setting: it need not open a held-back transaction.
    async fn show(&mut self, frame: Frame, name: &str) -> Result<(), SessionError> {
        if name.starts_with("shardline.") {
            return self.show_proxy_setting(name).await;
        }
        self.forward_simple_outcome(frame, Route::Any, Request::query(false, true))
            .await
            .map(|_| ())
    }

    /// DISCARD: the backend's prepared statements are shared, so the proxy
    /// forgets only this client's, and its settings.
    async fn discard(&mut self, frame: Frame) -> Result<(), SessionError> {
        self.statements.clear();
        let names: Vec<String> = self.settings.keys().cloned().collect();
        for name in names {
            self.record_setting(name, None);
        }
        let what = statement_text(&frame)
            .split_whitespace()
            .nth(1)
            .unwrap_or("ALL")
            .to_uppercase();
        messages::command_complete(&format!("DISCARD {what}"), &mut self.client.out);
        self.ready().await
    }

    /// DEALLOCATE (ALL when `name` is None): forgets the client's statements;
    /// the backends keep theirs, which other clients share.
    async fn deallocate(&mut self, name: Option<&str>) -> Result<(), SessionError> {
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

    /// A statement that reads or writes tables: routed by its key.
    async fn data_statement(
        &mut self,
        frame: Frame,
        analyzed: &Analyzed,
        data: &DataStatement,
    ) -> Result<(), SessionError> {
        if let Some(copy) = data.copy.as_ref().filter(|c| c.from_stdin) {
            if self.copies_across(copy.table.as_deref()) {
                return self.copy_across(&statement_text(&frame), false).await;
            }
        }
        if crate::analyze::ddl::may_be_ddl(&data.words) {
            if let Some(done) = self.ddl_across(&statement_text(&frame), &data.words).await {
                return done;
            }
        }
        let literals = &analyzed.literals;
        let scatter = self.scatter_allowed();
        let writes = self.cross_server_allowed();
        let text = statement_text(&frame);
        let hint = match self.hint_for(&text) {
            Ok(hint) => hint,
            Err(e) => return self.refuse(&e).await,
        };
        let route = self
            .route_holding(|map| {
                match route_hinted(data, map, literals, None, scatter, writes, &hint)? {
                    Resolution::Route(route) => Ok(route),
                    Resolution::NeedsParams => Err(RouteError::new(
                        "42P02",
                        "there is no parameter $1",
                        "a simple Query cannot have parameters",
                    )),
                }
            })
            .await;
        let route = match route {
            Ok(route) => route,
            Err(e) => return self.refuse(&e).await,
        };
        if let Route::Writes { .. } = &route {
            let planned = match self.shared.map.borrow().clone() {
                Some(snapshot) => {
                    plan_write(&statement_text(&frame), data, &snapshot.map, literals, None)
                }
                None => Err(RouteError::new(
                    "57P03",
                    "the shard map is not loaded yet",
                    "retry shortly",
                )),
            };
            return match planned {
                Ok(plan) => {
                    if plan.replicated {
                        Metrics::add(&self.shared.metrics.reference_writes, 1);
                    }
                    self.write_across(plan).await
                }
                Err(e) => self.refuse(&e).await,
            };
        }
        if let Route::Scatter { servers, .. } = &route {
            let statement = ScatterStatement {
                param_types: Vec::new(),
                param_formats: Vec::new(),
                params: Vec::new(),
                result_formats: Vec::new(),
                describe: true,
                keys_by_server: None,
                fetch: None,
            };
            self.scatter_request(servers, &statement_text(&frame), statement)
                .await?;
            return self.ready().await;
        }
        match self.kept_simple(&frame, analyzed, data, &route) {
            Some(kept) => {
                let shape = KeptShape {
                    read_only: data.read_only,
                    no_result: data.no_result,
                    writes: !data.written.is_empty(),
                    ends_transaction: false,
                };
                self.forward_kept_simple(frame, route, shape, kept).await
            }
            None => self.forward_simple(frame, route, data.read_only).await,
        }
    }

    /// Sends a simple Query as Bind/Describe/Execute/Sync of a statement kept
    /// prepared on the backend (Bind/Execute/Sync for a write without
    /// RETURNING, which has no rows to describe), and relays the replies as
    /// the Query's would be (no BindComplete, no NoData).
    async fn forward_kept_simple(
        &mut self,
        frame: Frame,
        route: Route,
        shape: KeptShape,
        kept: KeptSimple,
    ) -> Result<(), SessionError> {
        let KeptShape {
            read_only,
            no_result,
            writes,
            ends_transaction,
        } = shape;
        let max_kept = self.shared.config.pool.max_prepared_unnamed;
        let shared = self.shared.clone();
        let mut build =
            |_: &Session, request: &Request, plan: &mut Plan, set: &mut PreparedStatements| {
                if !request.keep_unnamed || !can_keep(set, &kept.name, max_kept) {
                    plan.send(&frame.raw, End::Query);
                    return;
                }
                // Where a rule may turn a write into a SELECT, only a Query
                // returns its rows (Execute drops them).
                if writes && set.rules_may_return_rows() {
                    Metrics::add(&shared.metrics.writes_unkept_for_rules, 1);
                    plan.send(&frame.raw, End::Query);
                    return;
                }
                if !ends_transaction {
                    Metrics::add(&shared.metrics.kept_prepared_runs, 1);
                }
                // Kept inside a transaction, a statement that returns rows
                // runs only as prepared under the catalog and search_path of
                // now: a stale plan could not be retried unseen there.
                let text = &kept.parameterized.text;
                let current = !no_result && !request.retry_stale;
                if !is_prepared(set, &kept.name, text, current) {
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
                plan.expect(
                    End::BindForQuery,
                    request.retry_stale.then(|| kept.name.clone()),
                );
                if no_result {
                    // No rows, so no RowDescription to ask for: a Query of
                    // it answers CommandComplete alone, as Execute does.
                    messages::execute_sync(&mut plan.out);
                } else {
                    messages::describe_execute_sync(&mut plan.out);
                    plan.expect(End::DescribeForQuery, None);
                }
                plan.expect(End::Execute, None);
                plan.expect(End::Sync, None);
            };
        let request = Request {
            keep_unnamed: true,
            retry_stale: self.can_resend(),
            ..Request::query(true, read_only)
        };
        let mut outcome = Outcome::default();
        self.dispatch(route, request, &mut build, &mut outcome)
            .await
            .map(|_| ())
    }

    /// Forwards a Query inside the session's transaction (opening a
    /// held-back one).
    async fn forward_simple(
        &mut self,
        frame: Frame,
        route: Route,
        read_only: bool,
    ) -> Result<(), SessionError> {
        self.forward_simple_outcome(frame, route, Request::query(true, read_only))
            .await
            .map(|_| ())
    }

    /// Forwards a Query; `None` when it never reached a backend.
    async fn forward_simple_outcome(
        &mut self,
        frame: Frame,
        route: Route,
        request: Request,
    ) -> Result<Option<Outcome>, SessionError> {
        let mut outcome = Outcome::default();
        let reached = self
            .dispatch_query(route, request, &frame.raw, &mut outcome)
            .await?;
        Ok(reached.then_some(outcome))
    }
}

/// What a kept simple Query is, for sending it.
struct KeptShape {
    read_only: bool,
    /// It returns no rows, so there is no RowDescription to ask for.
    no_result: bool,
    /// It writes tables (a rule may make it return rows).
    writes: bool,
    /// COMMIT or ROLLBACK.
    ends_transaction: bool,
}

/// `SET LOCAL shardline.NAME = value` (or `TO value`): the name without
/// its prefix and the value as written.
pub(super) fn local_proxy_setting(text: &str) -> Option<(String, String)> {
    let rest = text.trim();
    let lowered = rest.to_ascii_lowercase();
    let after = lowered.strip_prefix("set")?.trim_start();
    let after = after.strip_prefix("local")?.trim_start();
    let name_start = rest.len() - after.len();
    let name_end = name_start + after.find(|c: char| c == '=' || c.is_whitespace())?;
    let name = rest[name_start..name_end].to_ascii_lowercase();
    let setting = name.strip_prefix("shardline.")?.to_string();
    let value = rest[name_end..].trim_start();
    let value = value
        .strip_prefix('=')
        .or_else(|| {
            value
                .get(..2)
                .filter(|to| to.eq_ignore_ascii_case("to"))
                .map(|_| &value[2..])
        })?
        .trim();
    Some((setting, value.to_string()))
}

impl Session {
    /// `SET LOCAL shardline.key | shardline.group` (other `shardline.*`
    /// settings are session-wide only).
    async fn set_local_hint(&mut self, name: &str, value: &str) -> Result<(), SessionError> {
        if self.tx == Tx::Idle {
            // As Postgres: outside a transaction block it does nothing.
            messages::error_fields(
                b'N',
                "WARNING",
                "25P01",
                "SET LOCAL can only be used in transaction blocks",
                None,
                &mut self.client.out,
            );
            messages::command_complete("SET", &mut self.client.out);
            return self.ready().await;
        }
        match parse_proxy_setting(name, value) {
            Ok(setting) => {
                if self.apply_local_hint(setting) {
                    messages::command_complete("SET", &mut self.client.out);
                } else {
                    self.route_error(&RouteError::new(
                        "0A000",
                        format!("shardline.{name} cannot be set LOCAL"),
                        format!("SET shardline.{name} for the session"),
                    ));
                }
            }
            Err(e) => self.route_error(&e),
        }
        self.ready().await
    }
}

#[cfg(test)]
mod local_setting_tests {
    use super::local_proxy_setting;

    #[test]
    fn set_local_of_shardline_settings() {
        assert_eq!(
            local_proxy_setting("SET LOCAL shardline.key = '42'"),
            Some(("key".into(), "'42'".into()))
        );
        assert_eq!(
            local_proxy_setting("set local Shardline.Group TO users"),
            Some(("group".into(), "users".into()))
        );
        assert_eq!(local_proxy_setting("SET LOCAL work_mem = '1MB'"), None);
        assert_eq!(local_proxy_setting("SET shardline.key = 1"), None);
    }
}
