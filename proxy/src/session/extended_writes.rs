//! Writes across servers sent in the extended protocol: a multi-row INSERT,
//! an UPDATE or DELETE without one key, a write of a reference table
//! (Parse/Bind/Describe/Execute), `COPY ... FROM STDIN` into a sharded
//! table started by an Execute (tokio-postgres `copy_in`), and DDL of
//! sharded or reference tables. The servers run them as in the simple
//! protocol (`writes`, `copy_in`); this module fits them into the client's
//! request: every message gets the reply Postgres would send, in order.
//!
//! Such a write must be the only statement of its request that runs on a
//! server (transaction control the proxy answers may come with it), and its
//! portal is executed once: each server's part is a statement of its own,
//! so a portal cannot stay open across requests.

use std::sync::Arc;

use bytes::Bytes;

use crate::analyze::Command;
use crate::route::writes::plan_write;
use crate::route::{Params, RouteError};
use crate::wire::messages::{self, Bind};
use crate::wire::rows;

use super::client::SessionError;
use super::extended::{Item, PortalUse, Portals};
use super::scatter::execute_row_limit;
use super::statements::Prepared;
use super::tx::{is_tx_control, Tx};
use super::writes::{PartProtocol, WriteReply};
use super::Session;

/// The write's own messages in its request.
struct WriteItems<'a> {
    bind: &'a Bind,
    statement: &'a Arc<Prepared>,
}

/// The one Bind a request runs on a server, and the refusal if the request
/// is not one the proxy can split (see the module doc).
fn the_write<'a>(items: &'a [Item], portals: &Portals) -> Result<WriteItems<'a>, &'static str> {
    let mut cursor = portals.cursor();
    let mut write = None;
    let mut executes = 0;
    for item in items {
        let forwarded = matches!(cursor.step(item), Some(PortalUse::Forward));
        match item {
            Item::Bind(_, bind, Some(statement)) if forwarded => {
                if write.is_some() {
                    return Err("a write across servers must be the only statement of its request that runs on a server (no pipelining with other statements)");
                }
                write = Some(WriteItems { bind, statement });
            }
            Item::Execute(..) if forwarded => {
                executes += 1;
                if execute_row_limit(&item_body(item)) > 0 {
                    return Err("a write across servers must be executed without a row limit");
                }
            }
            _ => {}
        }
    }
    let write = write.ok_or("a write across servers must be bound in the request that runs it")?;
    if executes != 1 {
        return Err("a write across servers must be executed once in the request that binds it");
    }
    let describes_another = items.iter().any(|item| {
        matches!(item, Item::Describe(_, target, Some(statement))
            if target.kind == b'S'
                && !is_tx_control(statement.command())
                && !Arc::ptr_eq(statement, write.statement))
    });
    if describes_another {
        return Err("describing another statement in the request of a write across servers is not supported");
    }
    Ok(write)
}

fn item_body(item: &Item) -> Bytes {
    match item {
        Item::Execute(frame, _) => frame.body(),
        _ => Bytes::new(),
    }
}

/// The replies to a request's messages before its (only) Execute, for a
/// statement that takes no parameters and returns no rows (COPY, DDL):
/// ParseComplete, BindComplete, CloseComplete, and NoData for a Describe
/// (after an empty ParameterDescription for a statement's).
fn answer_until_execute(items: &[Item], out: &mut bytes::BytesMut) {
    for item in items {
        match item {
            Item::Parse(..) => messages::empty(b'1', out),
            Item::Bind(..) => messages::empty(b'2', out),
            Item::Close(..) => messages::empty(b'3', out),
            Item::Describe(_, target, _) => {
                if target.kind == b'S' {
                    rows::no_parameters(out);
                }
                messages::empty(b'n', out);
            }
            Item::Execute(..) => return,
            Item::Sync(_) | Item::Flush(_) => {}
        }
    }
}

impl Session {
    /// Runs a request whose Bind routed to `Route::Writes`: the write on
    /// every server concerned, and the replies of the whole request.
    pub(super) async fn writes_extended(
        &mut self,
        items: &[Item],
        portals: &Portals,
        tx_state: Tx,
        synced: bool,
    ) -> Result<(), SessionError> {
        let write = match the_write(items, portals) {
            Ok(write) => write,
            Err(why) => {
                let error = RouteError::new(
                    "0A000",
                    why,
                    "send it as Parse/Bind/Describe/Execute/Sync on its own, or through the simple protocol",
                );
                return self.refuse_extended(&error, synced).await;
            }
        };
        let Some(Command::Data(data)) = write.statement.command() else {
            let error = RouteError::new(
                "XX000",
                "internal error: a write across servers is not a data statement",
                "report this to the shardline developers",
            );
            return self.refuse_extended(&error, synced).await;
        };
        let planned = match self.shared.map.borrow().clone() {
            Some(snapshot) => plan_write(
                &write.statement.query,
                data,
                &snapshot.map,
                &write.statement.analyzed.literals,
                Some(&Params {
                    bind: write.bind,
                    types: &write.statement.param_types,
                }),
            ),
            None => Err(RouteError::new(
                "57P03",
                "the shard map is not loaded yet",
                "retry shortly",
            )),
        };
        let plan = match planned {
            Ok(plan) => plan,
            Err(error) => return self.refuse_extended(&error, synced).await,
        };
        self.enter_answered_state(tx_state, portals);
        let mut cursor = portals.cursor();
        // The client's statement is described when the client asks.
        let describe = items.iter().any(|item| {
            matches!(item, Item::Describe(_, target, Some(statement))
                if target.kind == b'S' && Arc::ptr_eq(statement, write.statement))
        });
        let protocol = PartProtocol::Extended {
            bind: write.bind,
            statement: write.statement,
            describe,
        };
        let mut reply: Option<WriteReply> = None;
        let mut failed = false;
        for item in items {
            let usage = cursor.step(item);
            let writes = matches!(usage, Some(PortalUse::Forward));
            let of_write = |statement: &Option<Arc<Prepared>>| {
                statement
                    .as_ref()
                    .is_some_and(|s| Arc::ptr_eq(s, write.statement))
            };
            // The write runs (once) at the first message whose reply needs it.
            let needs_write = match item {
                Item::Describe(_, target, statement) if target.kind == b'S' => of_write(statement),
                Item::Describe(..) | Item::Execute(..) => writes,
                _ => false,
            };
            if needs_write && reply.is_none() {
                reply = self.run_write(&plan, &protocol).await;
                if reply.is_none() {
                    failed = true;
                    break;
                }
            }
            let ran = reply.as_ref().filter(|_| needs_write);
            match (item, ran) {
                (Item::Parse(..), _) => messages::empty(b'1', &mut self.client.out),
                (Item::Bind(..), _) => messages::empty(b'2', &mut self.client.out),
                (Item::Close(..), _) => messages::empty(b'3', &mut self.client.out),
                (Item::Describe(_, target, _), Some(ran)) if target.kind == b'S' => {
                    if let Some(d) = &ran.described {
                        self.client.out.extend_from_slice(&d.parameters);
                        self.client.out.extend_from_slice(&d.result);
                    }
                }
                (Item::Describe(_, target, _), None) if target.kind == b'S' => {
                    // Transaction control: no parameters, no rows.
                    rows::no_parameters(&mut self.client.out);
                    messages::empty(b'n', &mut self.client.out);
                }
                (Item::Describe(..), Some(ran)) => match &ran.description {
                    Some(description) => self.client.out.extend_from_slice(description),
                    None => messages::empty(b'n', &mut self.client.out),
                },
                (Item::Describe(..), None) => messages::empty(b'n', &mut self.client.out),
                (Item::Execute(..), Some(ran)) => {
                    self.client.out.extend_from_slice(&ran.rows);
                    self.client.out.extend_from_slice(&ran.complete);
                }
                (Item::Execute(..), None) => {
                    if let Some(PortalUse::Answer(tag)) = usage {
                        messages::command_complete(tag, &mut self.client.out);
                    }
                }
                (Item::Sync(_) | Item::Flush(_), _) => {}
            }
        }
        self.end_request(synced, failed).await
    }
}

impl Session {
    /// The COPY FROM STDIN into a sharded table that a request binds, when
    /// the proxy splits it across servers.
    pub(super) fn copy_across_bound(&self, items: &[Item]) -> Option<Arc<Prepared>> {
        items.iter().find_map(|item| match item {
            Item::Bind(_, _, Some(statement)) => match statement.command() {
                Some(Command::Data(data))
                    if data.copy.as_ref().is_some_and(|c| {
                        c.from_stdin && self.copies_across(c.table.as_deref())
                    }) =>
                {
                    Some(statement.clone())
                }
                _ => None,
            },
            _ => None,
        })
    }

    /// Runs a request that binds and executes a COPY FROM STDIN split
    /// across servers (tokio-postgres `copy_in`: Bind, Execute, Sync, then
    /// the data, CopyDone and another Sync).
    pub(super) async fn copy_extended(
        &mut self,
        items: &[Item],
        copy: &Prepared,
        synced: bool,
    ) -> Result<(), SessionError> {
        let binds = items.iter().filter(|i| matches!(i, Item::Bind(..))).count();
        let executes = items
            .iter()
            .filter(|i| matches!(i, Item::Execute(..)))
            .count();
        if binds != 1 || executes != 1 {
            let error = RouteError::new(
                "0A000",
                "a COPY FROM STDIN into a sharded table must be the only statement bound and executed in its request",
                "send Bind, Execute and Sync for the COPY on their own",
            );
            return self.refuse_extended(&error, synced).await;
        }
        if self.tx == Tx::Aborted {
            let error = RouteError {
                code: "25P02",
                message: "current transaction is aborted, commands ignored until end of transaction block".into(),
                hint: None,
            };
            return self.refuse_extended(&error, synced).await;
        }
        answer_until_execute(items, &mut self.client.out);
        let sql = copy.query.trim().trim_end_matches(';').to_string();
        self.copy_across(&sql, true).await
    }
}

impl Session {
    /// Runs a synced request that binds one statement, DDL of sharded or
    /// reference tables (pgjdbc and tokio-postgres send DDL this way: Parse,
    /// Bind, Describe, Execute, Sync), on every server as the simple
    /// protocol does (see `ddl`). `None` when the request is not that.
    pub(super) async fn ddl_extended(
        &mut self,
        items: &[Item],
        synced: bool,
    ) -> Option<Result<(), SessionError>> {
        let mut binds = items.iter().filter_map(|item| match item {
            Item::Bind(_, _, statement) => Some(statement.as_ref()),
            _ => None,
        });
        let (Some(Some(statement)), None) = (binds.next(), binds.next()) else {
            return None;
        };
        let Some(Command::Data(data)) = statement.command() else {
            return None;
        };
        let ends_with_execute = matches!(items, [.., Item::Execute(..), Item::Sync(_)]);
        if !synced
            || !ends_with_execute
            || self.tx == Tx::Aborted
            || !crate::analyze::ddl::may_be_ddl(&data.words)
        {
            return None;
        }
        let sql = statement.query.trim().trim_end_matches(';').to_string();
        let planned = self.plan_ddl_across(&sql, &data.words).await?;
        // Everything before the Execute succeeds, as in Postgres; the
        // Execute's reply and ReadyForQuery come from the DDL's run.
        answer_until_execute(items, &mut self.client.out);
        Some(match planned {
            Ok(plan) => self.run_ddl(&sql, plan).await,
            Err(error) => self.refuse_extended(&error, synced).await,
        })
    }
}
