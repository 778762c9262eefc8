//! A pipeline whose statements run on different servers: one
//! extended-protocol request (up to its Sync) that binds statements with
//! keys on several servers — asyncpg's and psycopg's `executemany`,
//! pgjdbc's `executeBatch` over keys that live apart. Postgres runs such a
//! request as one implicit transaction; so does the proxy: each statement
//! runs on its server's leg of one transaction (see `legs`), committed with
//! two-phase commit at the end, or, inside the client's transaction, as
//! legs of it. Statements run in the client's order, each with its own
//! replies; after an error nothing more of the request runs, as in Postgres.

use bytes::Bytes;

use crate::backend::PreparedStatements;
use crate::route::Route;
use crate::wire::frame::Frame;

use super::client::SessionError;
use super::cross_server;
use super::extended::Item;
use super::legs::Ended;
use super::plan::{emit_leading_synthetic, Outcome, Plan};
use super::tx::Tx;
use super::{Request, Session};

/// The request cut after each Execute: each piece binds and runs one
/// statement (with the Parse and Describe messages before it); what follows
/// the last Execute (Close) goes with the last piece, the final Sync with
/// none.
fn pieces(items: Vec<Item>) -> Vec<Vec<Item>> {
    let mut pieces: Vec<Vec<Item>> = Vec::new();
    let mut current = Vec::new();
    for item in items {
        match item {
            Item::Sync(_) => {}
            Item::Execute(..) => {
                current.push(item);
                pieces.push(std::mem::take(&mut current));
            }
            other => current.push(other),
        }
    }
    if !current.is_empty() {
        match pieces.last_mut() {
            Some(last) => last.append(&mut current),
            None => pieces.push(current),
        }
    }
    pieces
}

/// A Flush ending each piece: the piece's backend is then synced by the
/// proxy (a Sync whose ReadyForQuery the client does not see), while the
/// transaction stays open on it.
fn flush() -> Item {
    Item::Flush(Frame {
        tag: b'H',
        raw: Bytes::from_static(&[b'H', 0, 0, 0, 4]),
    })
}

impl Session {
    /// Runs a synced request whose statements route to different servers
    /// (see the module doc), then ReadyForQuery.
    pub(super) async fn pipeline_across(&mut self, items: Vec<Item>) -> Result<(), SessionError> {
        let mut implicit = false;
        let mut failed = false;
        for mut piece in pieces(items) {
            piece.push(flush());
            let decided = match self.decide_binds(&piece).await {
                Ok(decided) => decided,
                Err(error) => {
                    self.route_error(&error);
                    failed = true;
                    break;
                }
            };
            if !self.needs_backend(&piece, &decided.portals) {
                // Transaction control the proxy answers (pgjdbc's BEGIN).
                self.enter_answered_state(decided.tx_after, &decided.portals);
                let mut plan = Plan::default();
                self.build_extended(
                    &piece,
                    &decided.portals,
                    &mut plan,
                    None,
                    &Request::default(),
                );
                emit_leading_synthetic(&mut plan.expects, &mut self.client.out);
                continue;
            }
            if decided.spans
                || matches!(decided.route, Route::Scatter { .. } | Route::Writes { .. })
            {
                // A statement of the pipeline that itself spans servers.
                let servers = decided
                    .route
                    .server()
                    .unwrap_or("several servers")
                    .to_string();
                self.route_error(&cross_server(&servers, "others"));
                failed = true;
                break;
            }
            if self.tx == Tx::Idle {
                implicit = true;
                self.tx = Tx::Deferred {
                    prelude: vec!["BEGIN".into()],
                    read_only: false,
                };
            }
            let route = if decided.route == Route::Any {
                self.prepare_route(&piece)
            } else {
                decided.route.clone()
            };
            let request = Request {
                binds_tx: true,
                synced: true,
                flush_as_sync: true,
                read_only: false,
                changes_session_state: decided.changes_session_state,
                drops_statements: decided.drops_statements,
                extended: true,
                keep_unnamed: false,
                retry_stale: false,
                retry_check: false,
            };
            let mut outcome = Outcome::default();
            let portals = &decided.portals;
            let mut build = |session: &Session,
                             request: &Request,
                             plan: &mut Plan,
                             prepared: &mut PreparedStatements| {
                session.build_extended(&piece, portals, plan, Some(prepared), request);
            };
            let reached = self
                .dispatch(route, request, &mut build, &mut outcome)
                .await?;
            // A failure the proxy reported ends the request like the
            // client's Sync would: nothing is left to skip.
            self.skipping = false;
            let aborted = self.lease.as_ref().is_some_and(|l| l.status() == b'E');
            if !reached || outcome.errored || aborted || self.tx == Tx::Aborted {
                failed = true;
                break;
            }
        }
        if implicit {
            if failed {
                self.finish_legs(false).await;
            } else {
                match self.finish_legs(true).await {
                    Ended::Committed => {}
                    Ended::RolledBack => self.client.error(
                        "40P01",
                        "the pipeline's statements were rolled back on a server before they could commit",
                        Some("retry them"),
                    ),
                    Ended::Failed(failure) => {
                        self.client
                            .error(&failure.code, &failure.message, Some(failure.hint))
                    }
                }
            }
        } else if failed && self.tx != Tx::Idle {
            self.fail_transaction().await;
        }
        self.ready().await
    }
}
