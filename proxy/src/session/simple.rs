//! The simple protocol: a Query message, one handler per kind of statement
//! (transaction control, SET/RESET, SHOW, DISCARD, DEALLOCATE, data), and
//! repeated queries run as statements kept prepared on the server.

use std::sync::Arc;

use rustc_hash::FxHashSet;

use crate::analyze::{Analyzed, Command, Literal};
use crate::metrics::Metrics;
use crate::route::{route_data, Resolution, Route, RouteError};
use crate::wire::frame::Frame;
use crate::wire::messages::{self};

use super::binding::DispatchFlags;
use super::client::SessionError;
use super::plan::{End, Outcome, Plan};
use super::settings::{changes_session, render};
use super::statements::{can_keep, prepare_on_backend, KeptSimple};
use super::tx::{transaction_scoped_tag, Tx};
use super::{cross_server, unsupported, Session};

/// The text of the (single) statement of a Query message, for re-sending.
pub(super) fn analyzed_text(_analyzed: &Analyzed, frame: &Frame) -> String {
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

    pub(super) async fn single_statement(
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

    /// Sends a simple Query as Bind/Describe/Execute/Sync of a statement kept
    /// prepared on the backend, and relays the replies as the Query's would
    /// be (no BindComplete, no NoData).
    pub(super) async fn forward_kept_simple(
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

    pub(super) async fn forward_simple(
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
    pub(super) async fn forward_simple_outcome(
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
}
