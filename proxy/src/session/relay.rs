//! Relaying a backend's replies to the client in the order the `Plan`
//! expects, and COPY FROM STDIN data from the client to the backend.

use std::collections::VecDeque;
use std::io;

use bytes::BytesMut;
use tracing::{debug, warn};

use crate::backend::{Backend, StatementChanges};
use crate::metrics::Metrics;
use crate::pool::Lease;
use crate::wire::messages;

use super::client::SessionError;
use super::plan::{emit_leading_synthetic, forwarding, End, Expect, Outcome, Plan};
use super::statements::is_stale_plan_error;
use super::{Request, Session};

#[derive(Debug)]
pub(super) enum RelayError {
    Client(SessionError),
    Backend(io::Error),
}

impl Session {
    /// Sends `plan` and relays replies until every expected reply arrived.
    /// Replies are copied straight from the backend's read buffer into the
    /// client's write buffer, and written when the backend has nothing more
    /// buffered (or after 32 KiB, so large results stream).
    pub(super) async fn relay(
        &mut self,
        lease: &mut Lease,
        plan: &mut Plan,
        request: &Request,
        outcome: &mut Outcome,
    ) -> Result<(), RelayError> {
        let backend = lease.backend();
        // Where this request's replies start, should they be taken back.
        let (out_mark, flushes) = (self.client.out.len(), self.client.flushes);
        emit_leading_synthetic(&mut plan.expects, &mut self.client.out);
        if plan.out.is_empty() {
            self.client.flush().await.map_err(RelayError::Client)?;
            return Ok(());
        }
        backend
            .write_all(&plan.out)
            .await
            .map_err(RelayError::Backend)?;
        let expects = &mut plan.expects;
        outcome.committed = false;
        loop {
            while let Some((tag, len)) = backend.peek_message().map_err(RelayError::Backend)? {
                match tag {
                    b'N' | b'A' | b'S' => {
                        if forwarding(expects) {
                            self.client
                                .out
                                .extend_from_slice(&backend.buffered()[..len]);
                        }
                        backend.consume(len);
                        continue;
                    }
                    b'E' => {
                        if let Some(Expect::Reply {
                            check: true, end, ..
                        }) = expects.front()
                        {
                            let in_query = *end == End::OwnerCheck;
                            let (code, detail) =
                                messages::error_summary(&backend.buffered()[5..len]);
                            if code != "55006" {
                                // Not an answer about ownership: the function is
                                // missing, or the user may not run or lock it.
                                warn!(server = %backend.server, %code, %detail, "the ownership check could not run; install it with `shardctl` (it comes with every sharded table) and let the proxy's user execute it");
                            }
                            outcome.check_detail = Some(detail.clone());
                            backend.consume(len);
                            Metrics::add(&self.shared.metrics.owner_check_failures, 1);
                            if in_query {
                                // The server skips the rest of the string; the
                                // Query's ReadyForQuery follows.
                                expects.pop_front();
                            } else {
                                skip_to_sync(expects, backend);
                            }
                            let server = backend.server.clone();
                            if request.retry_check && self.client.flushes == flushes {
                                // Nothing of the request reached the client:
                                // take it back whole, to be sent again.
                                debug!(%server, %detail, "ownership check failed; holding the request");
                                outcome.recheck = true;
                                self.client.out.truncate(out_mark);
                                swallow_rest(expects);
                            } else {
                                warn!(%server, %detail, "ownership check failed inside a transaction");
                                outcome.errored = true;
                                self.client.error(
                                    "40001",
                                    &format!(
                                        "a partition this statement needs is no longer on server {server}: it moved while this proxy was cut off from etcd ({detail}); the transaction is aborted"
                                    ),
                                    Some("retry the transaction: once this proxy reaches etcd again it routes it to the new owner, or connect to another proxy"),
                                );
                            }
                            if expects.is_empty() {
                                self.client.flush().await.map_err(RelayError::Client)?;
                                return Ok(());
                            }
                            continue;
                        }
                        if let Some(Expect::Reply {
                            stale_retry: Some(name),
                            ..
                        }) = expects.front()
                        {
                            // Once replies reached the client it is too late to
                            // take them back: the client sees the error (below).
                            let stale = is_stale_plan_error(&backend.buffered()[..len]);
                            if stale && self.client.flushes == flushes {
                                // Nothing of the request ran: take its replies
                                // back; the server now skips to ReadyForQuery.
                                outcome.stale = Some(name.clone());
                                self.client.out.truncate(out_mark);
                                backend.consume(len);
                                expects
                                    .retain(|e| matches!(e, Expect::Reply { end: End::Sync, .. }));
                                swallow_rest(expects);
                                continue;
                            }
                        }
                        outcome.errored = true;
                        if is_stale_plan_error(&backend.buffered()[..len]) {
                            // A statement prepared here no longer fits its
                            // tables (changed behind the proxy's back), and
                            // this request cannot be sent again unseen: the
                            // client sees Postgres's error, as it would for its
                            // own prepared statement. Counted at once, so that
                            // kept statements are prepared again before they
                            // run in a transaction (a savepoint's retry too);
                            // the connection, whose other statements may be
                            // stale too, is closed when its lease ends.
                            backend.broken = true;
                            backend.prepared.count_catalog_change();
                        }
                        self.client
                            .out
                            .extend_from_slice(&backend.buffered()[..len]);
                        backend.consume(len);
                        // The failing message's statement is not prepared after all.
                        if let Some(Expect::Reply {
                            unprepare: Some(name),
                            ..
                        }) = expects.front()
                        {
                            backend.prepared.remove(name);
                        }
                        let in_query = matches!(
                            expects.front(),
                            Some(Expect::Reply {
                                end: End::Query,
                                ..
                            })
                        );
                        if !in_query {
                            // With none expected (after Flush) the request is done.
                            skip_to_sync(expects, backend);
                        }
                        if expects.is_empty() {
                            self.client.flush().await.map_err(RelayError::Client)?;
                            return Ok(());
                        }
                        continue;
                    }
                    b'G' | b'W' => {
                        // COPY FROM STDIN: the client sends data until CopyDone/Fail.
                        self.client
                            .out
                            .extend_from_slice(&backend.buffered()[..len]);
                        backend.consume(len);
                        self.client.flush().await.map_err(RelayError::Client)?;
                        if tag == b'W' {
                            return Err(RelayError::Backend(io::Error::other(
                                "COPY BOTH is not supported",
                            )));
                        }
                        self.copy_in(backend, request.extended).await?;
                        continue;
                    }
                    _ => {}
                }
                {
                    let message = &backend.buffered()[..len];
                    if tag == b'Z' {
                        backend.status = message.get(5).copied().unwrap_or(b'I');
                        backend.pending_sync = false;
                        if backend.status == b'I' {
                            // Before the client hears the change is done.
                            backend.publish_changes();
                        }
                    } else if tag == b'C' {
                        outcome.committed = message.get(5..12) == Some(&b"COMMIT\0"[..]);
                        let changes = StatementChanges::of(message.get(5..).unwrap_or_default());
                        backend.note_changes(changes);
                    }
                }
                match expects.front() {
                    Some(Expect::Reply { end, forward, .. }) => {
                        let (end, forward) = (*end, *forward);
                        if forward && !end.hides(tag) {
                            self.client
                                .out
                                .extend_from_slice(&backend.buffered()[..len]);
                        }
                        backend.consume(len);
                        if end.ends_on(tag) {
                            expects.pop_front();
                            emit_leading_synthetic(expects, &mut self.client.out);
                        }
                    }
                    Some(Expect::Synthetic(_)) | None => {
                        backend.broken = true;
                        return Err(RelayError::Backend(io::Error::other(format!(
                            "unexpected message {:?} from the server",
                            char::from(tag)
                        ))));
                    }
                }
                if expects.is_empty() {
                    self.client.flush().await.map_err(RelayError::Client)?;
                    return Ok(());
                }
            }
            // Stream what we have before waiting for more (large results).
            if self.client.out.len() >= 32 * 1024 {
                self.client.flush().await.map_err(RelayError::Client)?;
            }
            if let Err(e) = backend.fill().await {
                return Err(RelayError::Backend(e));
            }
        }
    }

    /// Pumps COPY data from the client to the backend until CopyDone or
    /// CopyFail; `extended`: the COPY was started by an Execute.
    pub(super) async fn copy_in(
        &mut self,
        backend: &mut crate::backend::Backend,
        extended: bool,
    ) -> Result<(), RelayError> {
        loop {
            let frame = match self.client.read_frame().await {
                Ok(Some(frame)) => frame,
                Ok(None) | Err(_) => {
                    // The client vanished mid-COPY: abort it on the server.
                    let mut out = BytesMut::new();
                    messages::copy_fail("client disconnected during COPY", &mut out);
                    let _ = backend.write_all(&out).await;
                    return Err(RelayError::Client(SessionError::ClientGone));
                }
            };
            match frame.tag {
                b'd' => backend
                    .write_all(&frame.raw)
                    .await
                    .map_err(RelayError::Backend)?,
                b'c' | b'f' => {
                    backend
                        .write_all(&frame.raw)
                        .await
                        .map_err(RelayError::Backend)?;
                    if extended {
                        // The Sync sent with the Execute was ignored during the
                        // COPY; libpq sends another after CopyDone, which the
                        // server needs before it answers ReadyForQuery.
                        match self.client.read_frame().await {
                            Ok(Some(next)) if next.tag == b'S' => {
                                backend
                                    .write_all(&next.raw)
                                    .await
                                    .map_err(RelayError::Backend)?;
                            }
                            Ok(Some(next)) => {
                                self.client.unread(&next);
                                backend
                                    .write_all(&[b'S', 0, 0, 0, 4])
                                    .await
                                    .map_err(RelayError::Backend)?;
                            }
                            Ok(None) | Err(_) => {
                                return Err(RelayError::Client(SessionError::ClientGone))
                            }
                        }
                    }
                    return Ok(());
                }
                // Flush and Sync are ignored during COPY, as in Postgres.
                b'H' | b'S' => {}
                other => {
                    let mut out = BytesMut::new();
                    messages::copy_fail(
                        &format!(
                            "unexpected message type {:?} during COPY",
                            char::from(other)
                        ),
                        &mut out,
                    );
                    backend.write_all(&out).await.map_err(RelayError::Backend)?;
                    return Ok(());
                }
            }
        }
    }
}

/// Drops the replies Postgres will not send after an error: it skips the
/// client's messages up to Sync. Statements those messages would have
/// prepared are not prepared after all.
fn skip_to_sync(expects: &mut VecDeque<Expect>, backend: &mut Backend) {
    while let Some(front) = expects.front() {
        match front {
            Expect::Reply { end: End::Sync, .. } => break,
            Expect::Reply {
                unprepare: Some(name),
                ..
            } => {
                backend.prepared.remove(name);
                expects.pop_front();
            }
            _ => {
                expects.pop_front();
            }
        }
    }
}

/// For a request whose replies were taken back: the replies still to come
/// are read and dropped, and nothing the proxy would have answered itself
/// is sent (the request is sent again whole).
fn swallow_rest(expects: &mut VecDeque<Expect>) {
    expects.retain(|e| matches!(e, Expect::Reply { .. }));
    for expect in expects.iter_mut() {
        if let Expect::Reply { forward, .. } = expect {
            *forward = false;
        }
    }
}
