//! Writes across servers, in the simple protocol: a multi-row INSERT whose
//! rows belong to several servers, an UPDATE or DELETE without one key.
//! Each server's part (planned by `route::writes`) runs on that server's leg
//! of the client's transaction, opened as for any statement that reaches
//! another server (see `legs`); outside a transaction the parts run in one
//! of their own, committed with two-phase commit. The client gets one reply,
//! as from one Postgres: RETURNING rows in VALUES order (INSERT) or part
//! after part (UPDATE/DELETE), and one CommandComplete with the total.

use std::io;

use bytes::{Bytes, BytesMut};

use crate::pool::Lease;
use crate::route::writes::{WritePart, WritePlan};
use crate::wire::frame::Frame;
use crate::wire::messages::{self, Bind};

use crate::wire::rows;

use super::client::SessionError;
use super::legs::{query_replies, send_replies, Ended, Failure};
use super::scatter::param_types;
use super::statements::Prepared;
use super::tx::Tx;
use super::Session;

/// What one server's part answered.
enum PartReply {
    Done {
        /// The RowDescription message (RETURNING), whole.
        description: Option<Bytes>,
        /// DataRow messages, whole, in the server's order.
        rows: Vec<Bytes>,
        /// The row count of its CommandComplete.
        count: u64,
    },
    /// The ErrorResponse message, whole (forwarded as the server wrote it).
    Failed(Bytes),
}

/// How a write's parts are sent to their servers.
pub(super) enum PartProtocol<'a> {
    /// As simple Queries (the client sent a Query).
    Simple,
    /// As Parse/Bind/Describe/Execute/Sync with the client's parameter
    /// values. When the client left a parameter's type open, or `describe`,
    /// the client's statement is first described on the first part's
    /// server: each part is prepared with the types a server infers for
    /// the client's statement (see `WritePart::param_types`), and the
    /// description is the reply to the client's Describe of it.
    Extended {
        bind: &'a Bind,
        statement: &'a Prepared,
        describe: bool,
    },
}

/// The client's statement as a server describes it: ParameterDescription
/// and RowDescription (or NoData), whole.
pub(super) struct Described {
    pub(super) parameters: Bytes,
    pub(super) result: Bytes,
}

/// A write that ran (and, outside a transaction, committed): what the
/// client is sent, as one Postgres would send it.
pub(super) struct WriteReply {
    /// RowDescription (RETURNING), whole.
    pub(super) description: Option<Bytes>,
    /// The DataRows, whole, in the client's order.
    pub(super) rows: BytesMut,
    /// CommandComplete, whole.
    pub(super) complete: BytesMut,
    /// The client's statement described (extended protocol, when asked).
    pub(super) described: Option<Described>,
}

/// Prepares the client's statement as the unnamed statement on a leg and
/// describes it. `Err` is the server's ErrorResponse, whole.
async fn describe_on(
    lease: &mut Lease,
    statement: &Prepared,
) -> io::Result<Result<Described, Bytes>> {
    let mut out = BytesMut::new();
    messages::parse("", &statement.query, &statement.param_types, &mut out);
    rows::describe(b'S', &mut out);
    rows::sync(&mut out);
    let (mut parameters, mut result, mut error) = (Bytes::new(), Bytes::new(), None);
    send_replies(lease, &out, |frame: Frame| match frame.tag {
        b't' => parameters = frame.raw,
        b'T' | b'n' => result = frame.raw,
        b'E' if error.is_none() => error = Some(frame.raw),
        _ => {}
    })
    .await?;
    Ok(match error {
        Some(error) => Err(error),
        None => Ok(Described { parameters, result }),
    })
}

/// Runs one part on its leg and collects the reply.
async fn run_part(
    lease: &mut Lease,
    part: &WritePart,
    protocol: &PartProtocol<'_>,
    types: &[u32],
) -> io::Result<PartReply> {
    let mut description = None;
    let mut rows = Vec::new();
    let mut count = 0;
    let mut error = None;
    let collect = |frame: Frame| match frame.tag {
        b'T' => description = Some(frame.raw),
        b'D' => rows.push(frame.raw),
        b'C' => count = tag_count(&frame.body()),
        b'E' if error.is_none() => error = Some(frame.raw),
        _ => {}
    };
    match protocol {
        PartProtocol::Simple => query_replies(lease, &part.sql, collect).await?,
        PartProtocol::Extended { bind, .. } => {
            let mut out = BytesMut::new();
            messages::parse("", &part.sql, &part.param_types(types), &mut out);
            let mut bind = part.bind(bind);
            bind.portal.clear();
            bind.encode_with_statement("", &mut out);
            messages::describe_execute_sync(&mut out);
            send_replies(lease, &out, collect).await?
        }
    }
    Ok(match error {
        Some(error) => PartReply::Failed(error),
        None => PartReply::Done {
            description,
            rows,
            count,
        },
    })
}

/// Runs one part; before the first part of an extended-protocol write,
/// works out the parameter types (and the client's Describe) on its leg.
async fn describe_and_run(
    lease: &mut Lease,
    part: &WritePart,
    protocol: &PartProtocol<'_>,
    types: &mut Option<Vec<u32>>,
    described: &mut Option<Described>,
) -> io::Result<PartReply> {
    if let (
        None,
        PartProtocol::Extended {
            bind,
            statement,
            describe,
        },
    ) = (&types, protocol)
    {
        let open =
            (0..bind.params.len()).any(|i| statement.param_types.get(i).is_none_or(|t| *t == 0));
        if !open && !describe {
            *types = Some(statement.param_types.clone());
        } else {
            match describe_on(lease, statement).await? {
                Ok(d) => {
                    *types = Some(param_types(d.parameters.get(5..).unwrap_or_default()));
                    *described = Some(d);
                }
                Err(error) => return Ok(PartReply::Failed(error)),
            }
        }
    }
    run_part(lease, part, protocol, types.as_deref().unwrap_or_default()).await
}

/// The row count at the end of a CommandComplete tag (`INSERT 0 3`,
/// `UPDATE 2`).
pub(super) fn tag_count(body: &[u8]) -> u64 {
    let end = body.iter().position(|b| *b == 0).unwrap_or(body.len());
    std::str::from_utf8(&body[..end])
        .ok()
        .and_then(|tag| tag.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl Session {
    /// Runs a write planned across servers and answers the client (then
    /// ReadyForQuery).
    pub(super) async fn write_across(&mut self, plan: WritePlan) -> Result<(), SessionError> {
        if let Some(reply) = self.run_write(&plan, &PartProtocol::Simple).await {
            if let Some(description) = &reply.description {
                self.client.out.extend_from_slice(description);
            }
            self.client.out.extend_from_slice(&reply.rows);
            self.client.out.extend_from_slice(&reply.complete);
        }
        self.ready().await
    }

    /// Runs each part of a write on its server's leg of the client's
    /// transaction (outside a transaction: of one of its own, committed
    /// here with two-phase commit). `None` when it failed: the error is
    /// written for the client, and the transaction rolled back (implicit)
    /// or aborted (the client's).
    pub(super) async fn run_write(
        &mut self,
        plan: &WritePlan,
        protocol: &PartProtocol<'_>,
    ) -> Option<WriteReply> {
        let implicit = self.tx == Tx::Idle;
        if implicit {
            self.tx = Tx::Deferred {
                prelude: vec!["BEGIN".into()],
                read_only: false,
            };
        }
        let mut replies = Vec::with_capacity(plan.parts.len());
        let mut described = None;
        let mut types: Option<Vec<u32>> = None;
        for part in &plan.parts {
            if let Err(failure) = self.enter_leg(&part.server).await {
                self.client
                    .error(&failure.code, &failure.message, Some(failure.hint));
                return self.abandon_write(implicit).await;
            }
            let Some(lease) = self.lease.as_mut() else {
                self.client.error(
                    "XX000",
                    "internal error: no leg for a part of a write",
                    Some("report this to the shardline developers"),
                );
                return self.abandon_write(implicit).await;
            };
            match describe_and_run(lease, part, protocol, &mut types, &mut described).await {
                Ok(PartReply::Done {
                    description,
                    rows,
                    count,
                }) => replies.push((description, rows, count)),
                Ok(PartReply::Failed(error)) => {
                    // As in Postgres, the statement's error aborts the
                    // transaction (the leg it failed on now says so).
                    self.client.out.extend_from_slice(&error);
                    return self.abandon_write(implicit).await;
                }
                Err(e) => {
                    self.client.error(
                        "08006",
                        &format!("connection to server {} was lost: {e}", part.server),
                        Some("the transaction was rolled back; retry it"),
                    );
                    return self.abandon_write(implicit).await;
                }
            }
        }
        let mut reply = WriteReply {
            description: replies.iter().find_map(|(d, _, _)| d.clone()),
            rows: BytesMut::new(),
            complete: BytesMut::new(),
            described,
        };
        if plan.returning {
            let returned: Vec<usize> = replies.iter().map(|(_, rows, _)| rows.len()).collect();
            let Some(order) = plan.returning_order(&returned) else {
                self.client.error(
                    "0A000",
                    "an INSERT across servers returned fewer rows than it inserted (a trigger skipped some), so its RETURNING rows cannot be put back in the order of its VALUES",
                    Some("run the INSERT per server, or without RETURNING"),
                );
                return self.abandon_write(implicit).await;
            };
            for (part, index) in order {
                if let Some(row) = replies.get(part).and_then(|(_, rows, _)| rows.get(index)) {
                    reply.rows.extend_from_slice(row);
                }
            }
        }
        let counts: Vec<u64> = replies.iter().map(|(_, _, count)| *count).collect();
        let total = match plan.total(&counts) {
            Ok(total) => total,
            Err(diverged) => {
                self.route_error(&diverged);
                return self.abandon_write(implicit).await;
            }
        };
        messages::command_complete(&plan.command_tag(total), &mut reply.complete);
        if !implicit {
            return Some(reply);
        }
        match self.finish_legs(true).await {
            Ended::Committed => return Some(reply),
            Ended::RolledBack => self.client.error(
                "40P01",
                "the write was rolled back on a server before it could commit",
                Some("retry the statement"),
            ),
            Ended::Failed(failure) => {
                self.client
                    .error(&failure.code, &failure.message, Some(failure.hint))
            }
        }
        None
    }

    /// A write that failed part-way (its error already written): outside a
    /// transaction its parts roll back everywhere; inside one, the
    /// transaction is aborted, as any failed statement aborts it.
    async fn abandon_write(&mut self, implicit: bool) -> Option<WriteReply> {
        if implicit {
            self.finish_legs(false).await;
        } else if self.lease.as_ref().is_none_or(|l| l.status() != b'E') {
            self.fail_transaction().await;
        }
        None
    }

    /// Makes `server`'s leg the active backend of the transaction, opening
    /// the transaction there first if it is still held back.
    pub(super) async fn enter_leg(&mut self, server: &str) -> Result<(), Failure> {
        match &self.tx {
            Tx::Deferred { prelude, .. } => {
                let prelude = prelude.clone();
                let leg = self.open_leg(server, &prelude.join("; ")).await?;
                self.leg_prelude = super::legs::leg_prelude(&prelude);
                self.lease = Some(leg);
                self.tx = Tx::Bound;
                Ok(())
            }
            Tx::Bound if self.lease.as_ref().is_some_and(|l| &**l.server() == server) => Ok(()),
            Tx::Bound => self.switch_leg(server).await,
            Tx::Aborted | Tx::Idle => Err(Failure::new(
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
                "ROLLBACK",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tag_count;

    #[test]
    fn counts_come_from_the_end_of_the_tag() {
        assert_eq!(tag_count(b"INSERT 0 3\0"), 3);
        assert_eq!(tag_count(b"UPDATE 12\0"), 12);
        assert_eq!(tag_count(b"DELETE 0\0"), 0);
        assert_eq!(tag_count(b"garbage"), 0);
    }
}
