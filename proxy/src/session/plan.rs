//! What is sent to a backend for one request, and the replies expected back in
//! client order: forwarded, swallowed (messages the proxy injected) or
//! answered by the proxy itself (synthetic replies).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::wire::messages::{self, Target};

/// Which reply ends the replies to one forwarded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    ParseComplete,
    BindComplete,
    CloseComplete,
    Describe,
    /// Parse, Bind and Describe sent for a simple Query: their
    /// ParseComplete, BindComplete and NoData are not forwarded (a Query has
    /// none of those), but notices on the way are.
    ParseForQuery,
    BindForQuery,
    DescribeForQuery,
    Execute,
    Sync,
    Query,
    /// The ownership check the proxy put first in a Query's string (see
    /// `owner_check`): its replies end with its CommandComplete.
    OwnerCheck,
}

impl End {
    pub(super) fn ends_on(self, tag: u8) -> bool {
        match self {
            End::ParseComplete => tag == b'1',
            End::BindComplete => tag == b'2',
            End::CloseComplete => tag == b'3',
            End::Describe | End::DescribeForQuery => tag == b'T' || tag == b'n',
            End::ParseForQuery => tag == b'1',
            End::BindForQuery => tag == b'2',
            End::Execute => matches!(tag, b'C' | b'I' | b's'),
            End::OwnerCheck => tag == b'C',
            End::Sync | End::Query => tag == b'Z',
        }
    }

    /// Whether the reply `tag` is kept from the client.
    pub(super) fn hides(self, tag: u8) -> bool {
        matches!(
            (self, tag),
            (End::ParseForQuery, b'1') | (End::BindForQuery, b'2') | (End::DescribeForQuery, b'n')
        )
    }
}

/// One expected reply (or synthetic reply) in client order.
#[derive(Debug)]
pub(super) enum Expect {
    /// Replies to a message sent to the backend, up to `end`.
    Reply {
        end: End,
        /// False for messages the proxy injected: their replies are dropped.
        forward: bool,
        /// A statement to forget on the backend if this message fails.
        unprepare: Option<Arc<str>>,
        /// A Bind of a client's unnamed statement that the proxy keeps
        /// prepared under this name: if the server's cached plan went stale
        /// (a table's columns changed), the request is sent again unprepared.
        stale_retry: Option<Arc<str>>,
        /// Part of degraded mode's ownership check: an error here means
        /// the server does not own a partition the request touches.
        check: bool,
    },
    /// Bytes the proxy answers itself, at this point of the reply stream.
    Synthetic(Bytes),
}

/// What the backend said while relaying one request.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    pub(super) errored: bool,
    /// Whether the last CommandComplete was a COMMIT.
    pub(super) committed: bool,
    /// The kept-prepared statement whose plan went stale: its replies were
    /// taken back, and the request must be sent again without it.
    pub(super) stale: Option<Arc<str>>,
    /// The ownership check failed before the client saw anything: the
    /// server undid the request, which is to be held and sent again.
    pub(super) recheck: bool,
    /// What the server said when the ownership check failed.
    pub(super) check_detail: Option<String>,
}

/// A request ready to send: bytes for the backend and the replies expected.
#[derive(Default)]
pub(super) struct Plan {
    pub(super) out: BytesMut,
    pub(super) expects: VecDeque<Expect>,
}

impl Plan {
    /// Closes statement `name` on the backend; the client sees nothing of it.
    pub(super) fn close_statement(&mut self, name: &str) {
        let mut close = BytesMut::new();
        Target {
            kind: b'S',
            name: name.to_string(),
        }
        .encode(b'C', &mut close);
        self.inject(&close, End::CloseComplete);
    }

    pub(super) fn send(&mut self, bytes: &[u8], end: End) {
        self.out.extend_from_slice(bytes);
        self.expect(end, None);
    }

    pub(super) fn inject(&mut self, bytes: &[u8], end: End) {
        self.out.extend_from_slice(bytes);
        self.expects.push_back(Expect::Reply {
            end,
            forward: false,
            unprepare: None,
            stale_retry: None,
            check: false,
        });
    }

    /// Expects the forwarded replies of a message already in `out`, up to
    /// `end`; `stale_retry` as in `Expect::Reply`.
    pub(super) fn expect(&mut self, end: End, stale_retry: Option<Arc<str>>) {
        self.expects.push_back(Expect::Reply {
            end,
            forward: true,
            unprepare: None,
            stale_retry,
            check: false,
        });
    }

    /// Puts `front`'s messages and expected replies before what was written
    /// from `at` on (the lengths of `out` and `expects` then): what the
    /// proxy sends ahead of a request `build` already wrote.
    pub(super) fn insert_front(&mut self, at: (usize, usize), front: Plan) {
        let (out_at, expects_at) = at;
        self.out.extend_from_slice(&front.out);
        self.out[out_at..].rotate_right(front.out.len());
        for (i, expect) in front.expects.into_iter().enumerate() {
            self.expects.insert(expects_at + i, expect);
        }
    }

    pub(super) fn synthetic(&mut self, bytes: BytesMut) {
        self.expects.push_back(Expect::Synthetic(bytes.freeze()));
    }
}

pub(super) fn forwarding(expects: &VecDeque<Expect>) -> bool {
    !matches!(expects.front(), Some(Expect::Reply { forward: false, .. }))
}

pub(super) fn emit_leading_synthetic(expects: &mut VecDeque<Expect>, out: &mut BytesMut) {
    while let Some(Expect::Synthetic(_)) = expects.front() {
        if let Some(Expect::Synthetic(bytes)) = expects.pop_front() {
            out.extend_from_slice(&bytes);
        }
    }
}

pub(super) fn simple_reply(tag: u8) -> BytesMut {
    let mut out = BytesMut::with_capacity(5);
    messages::empty(tag, &mut out);
    out
}
