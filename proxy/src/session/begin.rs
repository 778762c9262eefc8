//! Sending a held-back BEGIN in front of the request that opens the
//! transaction on a server.
//!
//! Sent as a simple Query, BEGIN has its own ReadyForQuery, and Postgres
//! writes its replies out at every ReadyForQuery: one more send by the
//! server and one more wake-up and read by the proxy in every transaction.
//! In front of an extended-protocol request, BEGIN goes instead as a Bind
//! and Execute of a statement kept prepared on the connection, without a
//! Sync of its own, the way pgjdbc sends it: the request's Sync then ends
//! both, and the server answers in one write. Its replies (ParseComplete
//! once, BindComplete, CommandComplete) are dropped like the Query's.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::BytesMut;

use crate::backend::PreparedStatements;
use crate::wire::{frame, messages};

use super::plan::{End, Plan};
use super::statements::{backend_statement_name, can_keep, prepare_on_backend};

/// Puts `sql` (the transaction's BEGIN, with the SAVEPOINTs and SET LOCALs
/// the client sent right after it) in front of the request that was
/// written into `plan` from `at` (the lengths of its bytes and of its
/// expected replies before the request). `one_statement`: `sql` is the
/// BEGIN alone, which may travel kept prepared (a prepared statement holds
/// one command; the others go as a Query). `max_kept` bounds the
/// statements kept prepared on the backend, as for the client's unnamed
/// statements.
pub(super) fn place_begin(
    plan: &mut Plan,
    at: (usize, usize),
    sql: &str,
    one_statement: bool,
    prepared: &mut PreparedStatements,
    max_kept: usize,
) {
    let mut front = Plan::default();
    let kept_name = (one_statement && plan.out.get(at.0..).is_some_and(only_extended_messages))
        .then(|| begin_statement_name(sql))
        .filter(|name| can_keep(prepared, name, max_kept));
    if let Some(name) = kept_name {
        if !prepared.has(&name, sql) {
            prepare_on_backend(
                &mut front,
                prepared,
                &name,
                sql,
                &[],
                End::ParseComplete,
                false,
            );
        }
        let mut out = BytesMut::new();
        messages::bind_text(&name, &[], &mut out);
        front.inject(&out, End::BindComplete);
        out.clear();
        messages::execute("", &mut out);
        front.inject(&out, End::Execute);
    } else {
        let mut out = BytesMut::new();
        messages::query(sql, &mut out);
        front.inject(&out, End::Query);
    }
    plan.insert_front(at, front);
}

thread_local! {
    /// The BEGIN text this thread placed last, and its name on the
    /// backends: a client sends the same BEGIN in every transaction, and
    /// naming it hashes the text and formats a string.
    static LAST_BEGIN: RefCell<Option<(Box<str>, Arc<str>)>> = const { RefCell::new(None) };
}

/// `backend_statement_name` of a BEGIN text (no parameters, no quoted
/// constant that settings could shape: a BEGIN's options are keywords).
fn begin_statement_name(sql: &str) -> Arc<str> {
    LAST_BEGIN.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((text, name)) if **text == *sql => name.clone(),
            _ => {
                let name = backend_statement_name(sql, &[], &BTreeMap::new());
                *last = Some((sql.into(), name.clone()));
                name
            }
        }
    })
}

/// Whether `bytes` hold whole messages of the extended protocol (the
/// request starts with one and carries no simple Query), so that a BEGIN
/// without a Sync may go in front of them.
fn only_extended_messages(mut bytes: &[u8]) -> bool {
    if !matches!(bytes.first(), Some(b'P' | b'B')) {
        return false;
    }
    while !bytes.is_empty() {
        // The messages were framed (and their lengths bounded) when read.
        let Ok(Some((tag, size))) = frame::peek_header(bytes, usize::MAX) else {
            return false;
        };
        if !matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H') {
            return false;
        }
        let Some(rest) = bytes.get(size..) else {
            return false;
        };
        bytes = rest;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::plan::Expect;

    fn tags(bytes: &[u8]) -> Vec<char> {
        let mut tags = Vec::new();
        let mut at = 0;
        while let Ok(Some((tag, size))) =
            frame::peek_header(bytes.get(at..).unwrap_or_default(), usize::MAX)
        {
            tags.push(char::from(tag));
            at += size;
        }
        assert_eq!(at, bytes.len(), "the messages fill the buffer exactly");
        tags
    }

    fn ends(plan: &Plan) -> Vec<(End, bool)> {
        plan.expects
            .iter()
            .map(|e| match e {
                Expect::Reply { end, forward, .. } => (*end, *forward),
                Expect::Synthetic(_) => panic!("no synthetic replies here"),
            })
            .collect()
    }

    /// A plan holding `prefix` (say, a settings Query), then a client's
    /// Bind/Execute/Sync; returns it with the marks where the request starts.
    fn request_after(prefix: &[u8]) -> (Plan, (usize, usize)) {
        let mut plan = Plan::default();
        if !prefix.is_empty() {
            plan.inject(prefix, End::Query);
        }
        let at = (plan.out.len(), plan.expects.len());
        let mut out = BytesMut::new();
        messages::bind_text("s1", &["7"], &mut out);
        plan.send(&out, End::BindComplete);
        out.clear();
        messages::execute("", &mut out);
        plan.send(&out, End::Execute);
        out.clear();
        out.extend_from_slice(&[b'S', 0, 0, 0, 4]);
        plan.send(&out, End::Sync);
        (plan, at)
    }

    #[test]
    fn an_extended_request_gets_a_prepared_begin_without_a_sync_of_its_own() {
        let mut settings = BytesMut::new();
        messages::query("SET x = 1", &mut settings);
        let (mut plan, at) = request_after(&settings);
        let mut prepared = PreparedStatements::default();
        place_begin(&mut plan, at, "BEGIN", true, &mut prepared, 100);
        assert_eq!(tags(&plan.out), ['Q', 'P', 'B', 'E', 'B', 'E', 'S']);
        assert_eq!(
            ends(&plan),
            [
                (End::Query, false),
                (End::ParseComplete, false),
                (End::BindComplete, false),
                (End::Execute, false),
                (End::BindComplete, true),
                (End::Execute, true),
                (End::Sync, true),
            ]
        );
        assert_eq!(prepared.len(), 1);
        // The settings Query is untouched, and the request's bytes follow the BEGIN's.
        assert_eq!(&plan.out[..settings.len()], &settings[..]);
        let (again, _) = request_after(&[]);
        assert!(plan.out.ends_with(&again.out));

        // The next transaction on this connection only binds it.
        let (mut plan, at) = request_after(&[]);
        place_begin(&mut plan, at, "BEGIN", true, &mut prepared, 100);
        assert_eq!(tags(&plan.out), ['B', 'E', 'B', 'E', 'S']);
    }

    #[test]
    fn a_begin_with_a_savepoint_goes_as_a_query_even_before_an_extended_request() {
        let (mut plan, at) = request_after(&[]);
        let mut prepared = PreparedStatements::default();
        place_begin(
            &mut plan,
            at,
            "BEGIN; SAVEPOINT a",
            false,
            &mut prepared,
            100,
        );
        assert_eq!(tags(&plan.out), ['Q', 'B', 'E', 'S']);
        assert_eq!(prepared.len(), 0, "nothing prepared: it holds two commands");
    }

    #[test]
    fn a_begin_text_named_again_gets_the_name_of_its_own_text() {
        // The same text twice (from the cache), then another, then the first.
        for sql in [
            "BEGIN",
            "BEGIN",
            "begin isolation level serializable",
            "BEGIN",
        ] {
            assert_eq!(
                begin_statement_name(sql),
                backend_statement_name(sql, &[], &BTreeMap::new()),
                "{sql}"
            );
        }
    }

    #[test]
    fn a_simple_query_or_a_full_connection_gets_begin_as_a_query() {
        let mut plan = Plan::default();
        let mut query = BytesMut::new();
        messages::query("UPDATE t SET v = 1", &mut query);
        plan.send(&query, End::Query);
        let mut prepared = PreparedStatements::default();
        place_begin(&mut plan, (0, 0), "BEGIN", true, &mut prepared, 100);
        assert_eq!(tags(&plan.out), ['Q', 'Q']);
        assert_eq!(ends(&plan), [(End::Query, false), (End::Query, true)]);
        assert!(prepared.is_empty());

        // No room left for another kept statement.
        let (mut plan, at) = request_after(&[]);
        place_begin(&mut plan, at, "BEGIN", true, &mut prepared, 0);
        assert_eq!(tags(&plan.out), ['Q', 'B', 'E', 'S']);
    }

    #[test]
    fn only_whole_extended_messages_count_as_extended() {
        let (plan, _) = request_after(&[]);
        assert!(only_extended_messages(&plan.out));
        assert!(!only_extended_messages(&plan.out[..plan.out.len() - 1]));
        assert!(!only_extended_messages(&[]));
        assert!(!only_extended_messages(&[b'B', 0, 0, 0, 2]));
        let mut mixed = plan.out.clone();
        messages::query("SELECT 1", &mut mixed);
        assert!(!only_extended_messages(&mixed));
    }
}
