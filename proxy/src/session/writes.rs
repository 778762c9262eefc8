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
use crate::route::writes::WritePlan;
use crate::wire::messages;

use super::client::SessionError;
use super::legs::{query_replies, Ended, Failure};
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

/// Runs one part as a simple Query on its leg and collects the reply.
async fn run_part(lease: &mut Lease, sql: &str) -> io::Result<PartReply> {
    let mut description = None;
    let mut rows = Vec::new();
    let mut count = 0;
    let mut error = None;
    query_replies(lease, sql, |frame| match frame.tag {
        b'T' => description = Some(frame.raw),
        b'D' => rows.push(frame.raw),
        b'C' => count = tag_count(&frame.body()),
        b'E' if error.is_none() => error = Some(frame.raw),
        _ => {}
    })
    .await?;
    Ok(match error {
        Some(error) => PartReply::Failed(error),
        None => PartReply::Done {
            description,
            rows,
            count,
        },
    })
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
        let implicit = self.tx == Tx::Idle;
        if implicit {
            self.tx = Tx::Deferred {
                prelude: vec!["BEGIN".into()],
                read_only: false,
            };
        }
        let mut replies = Vec::with_capacity(plan.parts.len());
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
            match run_part(lease, &part.sql).await {
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
        let mut reply = BytesMut::new();
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
            if let Some(description) = replies.iter().find_map(|(d, _, _)| d.as_ref()) {
                reply.extend_from_slice(description);
            }
            for (part, index) in order {
                if let Some(row) = replies.get(part).and_then(|(_, rows, _)| rows.get(index)) {
                    reply.extend_from_slice(row);
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
        messages::command_complete(&plan.command_tag(total), &mut reply);
        if implicit {
            match self.finish_legs(true).await {
                Ended::Committed => self.client.out.extend_from_slice(&reply),
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
        } else {
            self.client.out.extend_from_slice(&reply);
        }
        self.ready().await
    }

    /// A write that failed part-way (its error already written): outside a
    /// transaction its parts roll back everywhere; inside one, the
    /// transaction is aborted, as any failed statement aborts it.
    async fn abandon_write(&mut self, implicit: bool) -> Result<(), SessionError> {
        if implicit {
            self.finish_legs(false).await;
        } else if self.lease.as_ref().is_none_or(|l| l.status() != b'E') {
            self.fail_transaction().await;
        }
        self.ready().await
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
