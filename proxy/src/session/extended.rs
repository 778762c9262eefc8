//! The extended protocol: a request's messages (Parse, Bind, Describe,
//! Execute, Close up to Sync or Flush), the statements it parses, deciding
//! which Binds run where (or are answered by the proxy), and turning the
//! request into a `Plan` for its backend.

use std::sync::Arc;

use crate::backend::PreparedStatements;
use bytes::BytesMut;

use crate::analyze::Command;
use crate::metrics::Metrics;
use crate::route::{route_data, route_hinted, Params, Resolution, Route, RouteError};
use crate::wire::frame::Frame;
use crate::wire::messages::{self, Bind, Parse, Target};

use super::client::SessionError;
use super::plan::{emit_leading_synthetic, simple_reply, End, Outcome, Plan};
use super::settings::{changes_session, parse_proxy_setting, render, ProxySetting};
use super::simple::local_proxy_setting;
use super::statements::{
    backend_statement_name, can_keep, ensure_prepared, ensure_unnamed_parsed, is_prepared,
    keepable, prepare_statement, Prepared,
};
use super::tx::{ends_transaction, is_tx_control, Tx};
use super::{cross_server, spans_servers, unsupported, Request, Session};

pub(super) use super::portals::{PortalUse, Portals};

/// An extended-protocol message of a request. Messages that name a
/// statement carry the statement that name meant at that point of the
/// request: a request may parse the unnamed statement several times
/// (pipelines, JDBC's BEGIN ahead of the first statement), and each Bind
/// binds the one parsed last before it.
pub(super) enum Item {
    Parse(Frame, Parse, Arc<Prepared>),
    /// The statement bound, if it exists.
    Bind(Frame, Bind, Option<Arc<Prepared>>),
    /// The statement described (for a Describe of a statement), if it exists.
    Describe(Frame, Target, Option<Arc<Prepared>>),
    Execute(Frame, String),
    Close(Frame, Target),
    Sync(Frame),
    Flush(Frame),
}

impl Item {
    /// Whether the message runs something (binds or executes a portal):
    /// a request without one only prepares or describes statements.
    fn runs(&self) -> bool {
        matches!(self, Item::Bind(..) | Item::Execute(..))
    }
}

/// What `decide_binds` found out about a request's Binds.
pub(super) struct BindPlan {
    pub(super) portals: Portals,
    pub(super) route: Route,
    /// The transaction state the first forwarded statement runs in.
    pub(super) tx_before_forward: Tx,
    /// The state after the request, as far as the proxy answers it.
    pub(super) tx_after: Tx,
    /// `SET shardline.*` to apply.
    pub(super) settings: Vec<ProxySetting>,
    /// `SET LOCAL shardline.*` to apply to the transaction.
    pub(super) local_settings: Vec<ProxySetting>,
    /// A BEGIN the proxy answers starts a new transaction in this request.
    pub(super) begins: bool,
    pub(super) changes_session_state: bool,
    pub(super) drops_statements: bool,
    /// Runs SAVEPOINT, SET LOCAL or the like on a server: the transaction
    /// can no longer extend to another server.
    pub(super) tx_scoped: bool,
    /// Every Bind is of a read-only statement (and there is at least one).
    pub(super) read_only: bool,
    /// The Binds route to different servers, each to one, and writes
    /// across servers are allowed: the request runs as a pipeline over
    /// legs of one transaction (see `pipeline`). `route` is then the first
    /// Binds' route only.
    pub(super) spans: bool,
}

impl Session {
    /// Runs one extended-protocol request; drains `frames` (the caller's
    /// buffer is reused for the next request).
    pub(super) async fn extended(&mut self, frames: &mut Vec<Frame>) -> Result<(), SessionError> {
        Metrics::add(&self.shared.metrics.requests, 1);
        let mut items = Vec::with_capacity(frames.len());
        // Statements are defined and closed in message order, as Postgres
        // does; after a failing message nothing more takes effect.
        let mut refused: Option<RouteError> = None;
        for frame in frames.drain(..) {
            let body = frame.body();
            let protocol =
                |e: crate::wire::frame::Malformed| SessionError::ClientProtocol(e.to_string());
            let item = match frame.tag {
                b'P' => {
                    let parse = Parse::decode(body).map_err(protocol)?;
                    if refused.is_none() {
                        refused = self.parse_conflict(&parse);
                    }
                    let statement = self.define_statement(&parse, refused.is_none());
                    Item::Parse(frame, parse, statement)
                }
                b'B' => {
                    let bind = Bind::decode(body).map_err(protocol)?;
                    let statement = self.statements.get(&bind.statement).cloned();
                    Item::Bind(frame, bind, statement)
                }
                b'D' => {
                    let target = Target::decode(body, "Describe").map_err(protocol)?;
                    let statement = match target.kind {
                        b'S' => self.statements.get(&target.name).cloned(),
                        _ => None,
                    };
                    Item::Describe(frame, target, statement)
                }
                b'E' => Item::Execute(
                    frame,
                    messages::decode_execute_portal(body).map_err(protocol)?,
                ),
                b'C' => {
                    let target = Target::decode(body, "Close").map_err(protocol)?;
                    if target.kind == b'S' && refused.is_none() {
                        // Statements on backends are shared by clients:
                        // closing one only forgets it for this client.
                        self.statements.remove(&target.name);
                    }
                    Item::Close(frame, target)
                }
                b'S' => Item::Sync(frame),
                _ => Item::Flush(frame),
            };
            items.push(item);
        }
        let synced = matches!(items.last(), Some(Item::Sync(_)));
        if let Some(error) = refused {
            return self.refuse_extended(&error, synced).await;
        }
        if let Some(copy) = self.copy_across_bound(&items) {
            return self.copy_extended(&items, &copy, synced).await;
        }
        if let Some(done) = self.ddl_extended(&items, synced).await {
            return done;
        }

        let decided = self.decide_binds(&items).await;
        let BindPlan {
            portals,
            route,
            tx_before_forward,
            tx_after,
            settings,
            local_settings,
            begins,
            changes_session_state,
            drops_statements,
            tx_scoped,
            read_only,
            spans,
        } = match decided {
            Ok(decision) => decision,
            Err(error) => return self.refuse_extended(&error, synced).await,
        };
        if spans {
            if !synced {
                let error = RouteError::new(
                    "0A000",
                    "a pipeline whose statements run on several servers must end with Sync, not Flush",
                    "send Sync after the statements",
                );
                return self.refuse_extended(&error, synced).await;
            }
            return self.pipeline_across(items).await;
        }
        if tx_scoped {
            self.leg_prelude = None;
        }
        if portals.values().any(|u| matches!(u, PortalUse::EndLegs(_))) {
            return self.end_legs_extended(&items, &portals, synced).await;
        }
        for setting in settings {
            self.apply_proxy_setting(setting);
        }
        if begins {
            self.tx_hint = None;
        }
        for setting in local_settings {
            self.apply_local_hint(setting);
        }
        if let Route::Writes { .. } = &route {
            return self
                .writes_extended(&items, &portals, tx_before_forward, synced)
                .await;
        }
        if let Route::Scatter { servers, .. } = &route {
            // A read across servers binds no transaction to a server: the
            // state is what the proxy's own answers made it.
            return self
                .scatter_extended(&items, &portals, tx_before_forward, servers, synced)
                .await;
        }
        let forwards = portals.values().any(|u| matches!(u, PortalUse::Forward));
        let route = if route == Route::Any {
            self.prepare_route(&items)
        } else {
            route
        };

        if !self.needs_backend(&items, &portals) {
            // The proxy answers everything itself.
            self.enter_answered_state(tx_after, &portals);
            let mut plan = Plan::default();
            self.build_extended(&items, &portals, &mut plan, None, &Request::default());
            emit_leading_synthetic(&mut plan.expects, &mut self.client.out);
            return if synced {
                self.ready().await
            } else {
                self.client.flush().await
            };
        }

        if forwards {
            self.enter_answered_state(tx_before_forward, &portals);
        } else {
            // Every Bind was answered by the proxy (BEGIN, SET shardline.*);
            // only Parse/Describe reach the server.
            self.enter_answered_state(tx_after.clone(), &portals);
        }
        let mut outcome = Outcome::default();
        let mut build = |session: &Session,
                         request: &Request,
                         plan: &mut Plan,
                         prepared: &mut PreparedStatements| {
            session.build_extended(&items, &portals, plan, Some(prepared), request);
        };
        // A request that only prepares or describes statements and ends in
        // Flush (asyncpg, before it binds) needs no particular server: it is
        // synced on the server, which goes back to its pool, and the Binds
        // that follow are routed by their own keys.
        let flush_as_sync = !synced && self.lease.is_none() && !items.iter().any(Item::runs);
        let request = Request {
            binds_tx: forwards,
            synced: synced || flush_as_sync,
            flush_as_sync,
            read_only,
            changes_session_state,
            drops_statements,
            extended: true,
            keep_unnamed: self.keeps_unnamed_prepared(&items, synced),
            retry_stale: self.can_resend(),
            retry_check: false,
        };
        let reached = self
            .dispatch(route, request, &mut build, &mut outcome)
            .await?;
        if reached && flush_as_sync && outcome.errored {
            // Postgres skips the client's messages up to its Sync after an
            // error; the server was synced already, so the proxy does.
            self.skipping = true;
        }
        Ok(())
    }

    /// Takes the transaction state the proxy's own answers (BEGIN, COMMIT,
    /// ROLLBACK outside a server) lead to; a transaction a server holds
    /// changes only by what the server says. Settings made in a held-back
    /// transaction are kept if it committed.
    pub(super) fn enter_answered_state(&mut self, answered: Tx, portals: &Portals) {
        if self.tx == Tx::Bound {
            return;
        }
        if matches!(self.tx, Tx::Deferred { .. } | Tx::Aborted) && answered == Tx::Idle {
            let committed = portals
                .values()
                .any(|u| matches!(u, PortalUse::Answer("COMMIT")));
            self.apply_tx_settings(committed);
        }
        self.tx = answered;
    }

    /// Answers a request that cannot run with `error`; nothing of it ran.
    pub(super) async fn refuse_extended(
        &mut self,
        error: &RouteError,
        synced: bool,
    ) -> Result<(), SessionError> {
        self.route_error(error);
        self.fail_transaction().await;
        self.end_failed_request(synced).await
    }

    /// A Parse of a named statement that exists already fails, as in Postgres.
    fn parse_conflict(&self, parse: &Parse) -> Option<RouteError> {
        if parse.name.is_empty() || self.statements.get(&parse.name).is_none() {
            return None;
        }
        Some(RouteError {
            code: "42P05",
            message: format!("prepared statement \"{}\" already exists", parse.name),
            hint: Some("close it first (Close, or DEALLOCATE), or use another name".into()),
        })
    }

    /// The statement a Parse defines; recorded as the client's when `takes_effect`.
    fn define_statement(&mut self, parse: &Parse, takes_effect: bool) -> Arc<Prepared> {
        // Drivers re-parse the same unnamed statement all the time.
        let reused = self.statements.get(&parse.name).filter(|existing| {
            parse.same_text(&existing.query) && existing.param_types == parse.param_types
        });
        let cached = || self.shared.parsed.get(parse.query(), &parse.param_types);
        let statement = match reused.cloned().or_else(cached) {
            Some(existing) => existing,
            None => {
                let analyzed = self.shared.analyzer.analyze(parse.query());
                let keepable = keepable(&analyzed.analysis.commands, parse.query());
                let statement = Arc::new(Prepared {
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
                self.shared.parsed.keep(&statement);
                statement
            }
        };
        if takes_effect {
            self.statements
                .insert(parse.name.clone(), statement.clone());
            let counting = self.shared.config.pool.prepare_unnamed_after > 0;
            if counting && parse.name.is_empty() && statement.keepable {
                self.shared.statement_uses.count(&statement.backend_name);
            }
        }
        statement
    }

    /// Whether this request's unnamed statement runs as a statement kept
    /// prepared on the server: the client parsed it often enough, and the
    /// request is one statement (Parse, Bind, Describe, Execute, Sync),
    /// either one that can be sent again with nobody noticing if the
    /// server's cached plan went stale (`can_resend`), or one that cannot go
    /// stale (returns no rows, or ends the transaction: Postgres never
    /// revalidates COMMIT or ROLLBACK), or one that returns rows inside a
    /// transaction on a connection whose kept statements fit the catalog
    /// (`keeps_rows_in_transaction`).
    pub(super) fn keeps_unnamed_prepared(&self, items: &[Item], synced: bool) -> bool {
        let pool = &self.shared.config.pool;
        if pool.prepare_unnamed_after == 0 || !synced {
            return false;
        }
        let (mut bound, mut binds, mut parses) = (None, 0, 0);
        for item in items {
            match item {
                Item::Parse(_, parse, _) if !parse.name.is_empty() || binds > 0 => return false,
                Item::Parse(..) => parses += 1,
                Item::Bind(_, bind, _) if !bind.statement.is_empty() => return false,
                Item::Bind(_, _, statement) => {
                    bound = statement.as_ref();
                    binds += 1;
                }
                Item::Describe(_, target, _) if target.kind == b'S' && !target.name.is_empty() => {
                    return false
                }
                Item::Close(..) | Item::Flush(_) => return false,
                _ => {}
            }
        }
        let Some(statement) = bound else {
            return false;
        };
        binds == 1
            && parses <= 1
            && statement.keepable
            && (self.can_resend()
                || statement.returns_no_rows()
                || (ends_transaction(statement.command())
                    && self.tx == Tx::Bound
                    && self.legs.is_empty())
                || self.keeps_rows_in_transaction())
            && self.shared.statement_uses.get(&statement.backend_name) >= pool.prepare_unnamed_after
    }

    /// Decides, per Bind, whether the proxy answers it (transaction control
    /// outside a server) or it runs on a backend, and routes those that run.
    /// Returns the decisions, the merged route, the transaction state the
    /// first forwarded statement runs in, and the state after the request.
    pub(super) async fn decide_binds(&self, items: &[Item]) -> Result<BindPlan, RouteError> {
        let mut portals = Portals::default();
        let mut settings = Vec::new();
        let mut local_settings = Vec::new();
        let mut begins = false;
        let mut changes_session_state = false;
        let mut drops_statements = false;
        let mut binds = 0usize;
        let mut read_only = true;
        let mut tx_scoped = false;
        let mut route = Route::Any;
        let mut tx = self.tx.clone();
        let mut before_forward: Option<Tx> = None;
        let scatter = self.scatter_allowed();
        let writes = self.cross_server_allowed();
        // Set when two Binds route to different servers: the request can
        // still run as a pipeline if every Bind runs a statement on one
        // server, or is a BEGIN the proxy answers.
        let mut spans: Option<RouteError> = None;
        let mut pipelines = true;
        for item in items {
            let Item::Bind(_, bind, statement) = item else {
                continue;
            };
            let prepared = statement.clone().ok_or_else(|| RouteError {
                code: "26000",
                message: format!("prepared statement \"{}\" does not exist", bind.statement),
                hint: None,
            })?;
            let command = prepared.command().unwrap_or(&Command::Empty);
            self.count_catalog_change_sent(command);
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
                        begins = true;
                    }
                    PortalUse::Answer("BEGIN")
                }
                Command::Commit | Command::Rollback if !self.legs.is_empty() => {
                    PortalUse::EndLegs(*command == Command::Commit)
                }
                Command::TransactionScoped
                    if local_proxy_setting(&prepared.query).is_some() =>
                {
                    // SET LOCAL shardline.key: the proxy's, for this transaction
                    // (outside one it does nothing, as in Postgres).
                    if let Some((name, value)) = local_proxy_setting(&prepared.query) {
                        if tx != Tx::Idle {
                            local_settings.push(parse_proxy_setting(&name, &value)?);
                        }
                    }
                    PortalUse::Answer("SET")
                }
                Command::TransactionScoped if !self.legs.is_empty() => {
                    return Err(spans_servers("SAVEPOINT, RELEASE, ROLLBACK TO and SET LOCAL"))
                }
                Command::Commit | Command::Rollback if !on_backend => {
                    let tag = if *command == Command::Commit && tx != Tx::Aborted { "COMMIT" } else { "ROLLBACK" };
                    tx = Tx::Idle;
                    PortalUse::Answer(tag)
                }
                Command::Unsupported(what) => return Err(unsupported(what)),
                Command::Reset { name: Some(name) } if name.starts_with("shardline.") => {
                    let setting = name.trim_start_matches("shardline.");
                    settings.push(parse_proxy_setting(setting, "default")?);
                    PortalUse::Answer("RESET")
                }
                Command::Reset { name: None } => {
                    // RESET ALL ends the routing hints too (and runs on the server).
                    for setting in ["key", "group", "partition", "server"] {
                        settings.push(parse_proxy_setting(setting, "default")?);
                    }
                    PortalUse::Forward
                }
                Command::Set { name, value } if name.starts_with("shardline.") => {
                    let value = render(value, &prepared.analyzed.literals);
                    let setting = name.trim_start_matches("shardline.");
                    settings.push(parse_proxy_setting(setting, &value)?);
                    PortalUse::Answer("SET")
                }
                Command::Data(data) => {
                    let literals = prepared.analyzed.literals.clone();
                    let hint = self.hint_for(&prepared.query)?;
                    let resolved = self
                        .route_holding(|map| {
                            let params = Params {
                                bind,
                                types: &prepared.param_types,
                            };
                            match route_hinted(data, map, &literals, Some(&params), scatter, writes, &hint)? {
                                Resolution::Route(r) => Ok(r),
                                Resolution::NeedsParams => Ok(Route::Any),
                            }
                        })
                        .await?;
                    pipelines &= matches!(
                        resolved,
                        Route::Partitions { .. } | Route::Server(_) | Route::Any
                    );
                    if spans.is_none() {
                        let first = (route != Route::Any).then(|| route.clone());
                        match route.merge(resolved) {
                            Ok(merged) => route = merged,
                            Err((a, b)) => {
                                spans = Some(cross_server(&a, &b));
                                route = first.unwrap_or(Route::Any);
                            }
                        }
                    }
                    PortalUse::Forward
                }
                _ => PortalUse::Forward,
            };
            binds += 1;
            pipelines &= matches!(
                (command, &usage),
                (Command::Data(_), _) | (Command::Begin { .. }, PortalUse::Answer(_))
            );
            read_only &= matches!(command, Command::Data(d) if d.read_only);
            if matches!(usage, PortalUse::Forward) {
                changes_session_state |= changes_session(command);
                tx_scoped |= matches!(command, Command::TransactionScoped);
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
        if let Some(error) = spans.as_ref().filter(|_| !(writes && pipelines)) {
            return Err(error.clone());
        }
        let before = before_forward.unwrap_or_else(|| tx.clone());
        Ok(BindPlan {
            spans: spans.is_some(),
            local_settings,
            begins,
            portals,
            route,
            tx_before_forward: before,
            tx_after: tx,
            settings,
            changes_session_state,
            drops_statements,
            tx_scoped,
            // Preparing (Parse/Describe without Bind) uses the primary: a
            // replica may not have replayed the newest schema yet.
            read_only: binds > 0 && read_only,
        })
    }

    /// Where to prepare or describe statements that do not run yet: where
    /// they would run if that is known without parameters (an unsharded
    /// table's home), else anywhere (every server has the same tables).
    pub(super) fn prepare_route(&self, items: &[Item]) -> Route {
        let Some(snapshot) = self.shared.map.borrow().clone() else {
            return Route::Any;
        };
        let mut route = Route::Any;
        for item in items {
            let prepared = match item {
                Item::Parse(_, _, statement) => statement,
                Item::Describe(_, _, Some(statement)) => statement,
                _ => continue,
            };
            let Some(Command::Data(data)) = prepared.command() else {
                continue;
            };
            if let Ok(Resolution::Route(r)) = route_data(
                data,
                &snapshot.map,
                &prepared.analyzed.literals,
                None,
                false,
                false,
            ) {
                match route.clone().merge(r) {
                    Ok(merged) => route = merged,
                    Err(_) => return route,
                }
            }
        }
        route
    }

    /// Whether any message of the request must reach a server.
    pub(super) fn needs_backend(&self, items: &[Item], portals: &Portals) -> bool {
        let statement_runs = |statement: &Prepared| !is_tx_control(statement.command());
        let mut cursor = portals.cursor();
        items.iter().any(|item| {
            let portal_runs = !matches!(cursor.step(item), Some(PortalUse::Answer(_)));
            match item {
                Item::Parse(_, _, statement) => statement_runs(statement),
                Item::Describe(_, target, statement) if target.kind == b'S' => {
                    statement.as_deref().is_some_and(statement_runs)
                }
                Item::Bind(..) | Item::Execute(..) => portal_runs,
                Item::Describe(_, target, _) | Item::Close(_, target) => {
                    target.kind == b'P' && portal_runs
                }
                Item::Sync(_) | Item::Flush(_) => false,
            }
        }) || (self.unsynced && self.lease.is_some())
    }

    /// Turns the request's messages into backend bytes and expected replies.
    /// `prepared` is the backend's prepared-statement set (None: no backend,
    /// everything answered by the proxy).
    pub(super) fn build_extended(
        &self,
        items: &[Item],
        portals: &Portals,
        plan: &mut Plan,
        mut prepared: Option<&mut PreparedStatements>,
        request: &Request,
    ) {
        // The backend's unnamed statement as this request left it so far.
        let mut backend_unnamed: Option<&Arc<Prepared>> = None;
        let bound_unnamed = items.iter().find_map(|item| match item {
            Item::Bind(_, bind, statement) if bind.statement.is_empty() => statement.as_ref(),
            _ => None,
        });
        // Whether the unnamed statement runs kept prepared on this backend
        // (under its backend name, like a named one).
        let keep = request.keep_unnamed
            && match (&prepared, bound_unnamed) {
                (Some(set), Some(statement)) => can_keep(
                    set,
                    &statement.backend_name,
                    self.shared.config.pool.max_prepared_unnamed,
                ),
                _ => false,
            };
        if keep && bound_unnamed.is_some_and(|statement| !ends_transaction(statement.command())) {
            Metrics::add(&self.shared.metrics.kept_prepared_runs, 1);
        }
        // Kept inside a transaction, a statement that returns rows runs only
        // as prepared under the catalog and search_path of now: a stale plan
        // could not be retried unseen there (`has_current`).
        let current = keep
            && !request.retry_stale
            && bound_unnamed.is_some_and(|statement| {
                !statement.returns_no_rows() && !is_tx_control(statement.command())
            });
        let mut cursor = portals.cursor();
        for item in items {
            let live = prepared.is_some();
            let portal = cursor.step(item);
            match item {
                Item::Parse(frame, parse, statement) => {
                    let runs = !is_tx_control(statement.command());
                    match prepared.as_deref_mut() {
                        Some(set) if runs => {
                            if parse.name.is_empty() && !keep {
                                plan.send(&frame.raw, End::ParseComplete);
                                backend_unnamed = Some(statement);
                            } else if is_prepared(
                                set,
                                &statement.backend_name,
                                &statement.query,
                                current && parse.name.is_empty(),
                            ) {
                                plan.synthetic(simple_reply(b'1'));
                            } else {
                                // The client's own Parse: its reply goes to the client.
                                prepare_statement(plan, set, statement, true);
                            }
                        }
                        _ => plan.synthetic(simple_reply(b'1')),
                    }
                }
                Item::Bind(frame, bind, statement) => {
                    let forwarded = live && matches!(portal, Some(PortalUse::Forward));
                    match (forwarded, statement, prepared.as_deref_mut()) {
                        (true, Some(statement), Some(set)) => {
                            if bind.statement.is_empty() && !keep {
                                ensure_unnamed_parsed(plan, statement, &mut backend_unnamed);
                                plan.send(&frame.raw, End::BindComplete);
                            } else {
                                let kept = bind.statement.is_empty();
                                ensure_prepared(plan, set, statement, current && kept);
                                bind.encode_with_statement(&statement.backend_name, &mut plan.out);
                                plan.expect(
                                    End::BindComplete,
                                    (kept && request.retry_stale)
                                        .then(|| statement.backend_name.clone()),
                                );
                            }
                        }
                        _ => plan.synthetic(simple_reply(b'2')),
                    }
                }
                Item::Describe(frame, target, _) if target.kind == b'P' => match portal {
                    Some(PortalUse::Answer(_)) => plan.synthetic(simple_reply(b'n')),
                    _ if live => plan.send(&frame.raw, End::Describe),
                    _ => plan.synthetic(simple_reply(b'n')),
                },
                Item::Describe(frame, target, statement) => {
                    match (prepared.as_deref_mut(), statement) {
                        (Some(set), Some(statement)) if !is_tx_control(statement.command()) => {
                            if target.name.is_empty() && !keep {
                                ensure_unnamed_parsed(plan, statement, &mut backend_unnamed);
                                plan.send(&frame.raw, End::Describe);
                            } else {
                                let kept = target.name.is_empty();
                                ensure_prepared(plan, set, statement, current && kept);
                                Target {
                                    kind: b'S',
                                    name: statement.backend_name.to_string(),
                                }
                                .encode(b'D', &mut plan.out);
                                // Postgres revalidates the plan here too.
                                plan.expect(
                                    End::Describe,
                                    (kept && request.retry_stale)
                                        .then(|| statement.backend_name.clone()),
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
                Item::Execute(frame, name) => match portal {
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
                            &format!("portal \"{name}\" does not exist"),
                            None,
                            &mut out,
                        );
                        plan.synthetic(out);
                    }
                },
                Item::Close(frame, target) => {
                    // Statements on backends are shared by clients: closing one
                    // only forgets it for this client (done when decoded).
                    if target.kind == b'P' && live && !matches!(portal, Some(PortalUse::Answer(_)))
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
                    if live && request.flush_as_sync {
                        plan.inject(&[b'S', 0, 0, 0, 4], End::Sync);
                    } else if live {
                        plan.out.extend_from_slice(&frame.raw);
                    }
                }
            }
        }
    }
}
