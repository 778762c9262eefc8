//! Degraded mode's ownership check. While this proxy cannot prove its etcd
//! lease alive, a cutover may have gone ahead without it, so its cached map
//! may name a server that no longer owns a partition (there, the leaf is
//! detached: a read would find no rows, an UPDATE would change none). So a
//! request that touches partitions first runs
//! `public.shardline_check_owner(parents, leaves)` (see
//! [`shardmap::ddl::OWNER_CHECK_FUNCTION`]) in the same transaction: it locks
//! each partition's parent against DETACH until the transaction ends and
//! fails unless the leaf is attached. A failed check is taken back before
//! the client sees anything when it can be (the request is then held and
//! sent again), and otherwise becomes a clear error.
//!
//! The check goes where the request's own statements start:
//! - a simple Query gets it as the first statement of its string, which
//!   makes one implicit transaction of both;
//! - extended messages get Bind/Execute/Close of a statement kept prepared
//!   on the server (`CHECK_STATEMENT`) before them: everything up to Sync
//!   is one implicit transaction too.

use std::sync::Arc;

use bytes::Buf;
use shardmap::ClusterMap;

use crate::backend::PreparedStatements;
use crate::wire::messages::{self, Target};

use super::plan::{End, Expect, Plan};
use super::settings::quote_literal;

/// The server-side statement of the extended form.
pub(super) const CHECK_STATEMENT: &str = "shardline_owner_check";
const CHECK_SQL: &str = "SELECT public.shardline_check_owner($1::text[], $2::text[])";

/// `(parent, leaf)` of each of `partitions` (see [`shardmap::ddl::owner_leaf`]).
pub(super) fn leaves_to_check(map: &ClusterMap, partitions: &[u32]) -> Vec<(String, String)> {
    partitions
        .iter()
        .filter_map(|p| shardmap::ddl::owner_leaf(map, *p))
        .collect()
}

/// A text array literal (`{"a","b"}`), each element quoted.
fn array_literal<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::from("{");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

fn arrays(pairs: &[(String, String)]) -> (String, String) {
    (
        array_literal(pairs.iter().map(|(parent, _)| parent.as_str())),
        array_literal(pairs.iter().map(|(_, leaf)| leaf.as_str())),
    )
}

/// Why a check could not be placed: the request's messages are not a shape
/// the proxy knows how to prefix (a bug; the request is refused, never sent
/// unchecked).
#[derive(Debug)]
pub(super) struct Unplaceable;

/// Puts the check for `pairs` in front of the request messages `build`
/// wrote to `plan` from byte `out_mark` and expectation `expects_mark` on.
/// Nothing to prefix (the request sends nothing of its own) is fine.
pub(super) fn place(
    plan: &mut Plan,
    out_mark: usize,
    expects_mark: usize,
    pairs: &[(String, String)],
    prepared: &mut PreparedStatements,
) -> Result<(), Unplaceable> {
    if pairs.is_empty() || plan.out.len() <= out_mark {
        return Ok(());
    }
    let (parents, leaves) = arrays(pairs);
    if plan.out.get(out_mark) == Some(&b'Q') {
        // One Query: the check becomes its first statement.
        let tail = plan.out.split_off(out_mark);
        let Some(len) = tail.get(1..5).map(|mut b| b.get_i32()) else {
            return Err(Unplaceable);
        };
        let end = usize::try_from(len).map_err(|_| Unplaceable)? + 1;
        let Some(text) = tail
            .get(5..end.saturating_sub(1))
            .and_then(|t| std::str::from_utf8(t).ok())
        else {
            return Err(Unplaceable);
        };
        let sql = format!(
            "SELECT public.shardline_check_owner({}::text[], {}::text[]); {text}",
            quote_literal(&parents),
            quote_literal(&leaves)
        );
        messages::query(&sql, &mut plan.out);
        plan.out.extend_from_slice(&tail[end..]);
        plan.expects
            .insert(expects_mark, check_reply(End::OwnerCheck, None));
        return Ok(());
    }
    let mut front = Plan::default();
    let name: Arc<str> = Arc::from(CHECK_STATEMENT);
    if !prepared.has(CHECK_STATEMENT, CHECK_SQL) {
        messages::parse(CHECK_STATEMENT, CHECK_SQL, &[], &mut front.out);
        prepared.insert(name.clone(), CHECK_SQL);
        front
            .expects
            .push_back(check_reply(End::ParseComplete, Some(name)));
    }
    messages::bind_portal_text(
        CHECK_STATEMENT,
        CHECK_STATEMENT,
        &[&parents, &leaves],
        &mut front.out,
    );
    front
        .expects
        .push_back(check_reply(End::BindComplete, None));
    messages::execute(CHECK_STATEMENT, &mut front.out);
    front.expects.push_back(check_reply(End::Execute, None));
    // Closed at once: a portal of that name must not exist at the next
    // check of the same transaction.
    Target {
        kind: b'P',
        name: CHECK_STATEMENT.to_string(),
    }
    .encode(b'C', &mut front.out);
    front
        .expects
        .push_back(check_reply(End::CloseComplete, None));
    plan.insert_front((out_mark, expects_mark), front);
    Ok(())
}

fn check_reply(end: End, unprepare: Option<Arc<str>>) -> Expect {
    Expect::Reply {
        end,
        forward: false,
        unprepare,
        stale_retry: None,
        check: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::peek_header;
    use bytes::BytesMut;

    fn pairs() -> Vec<(String, String)> {
        vec![("users".into(), "users_p3".into())]
    }

    #[test]
    fn array_literals_quote_every_element() {
        assert_eq!(
            array_literal(["a", "b\"c", "d\\e"].into_iter()),
            r#"{"a","b\"c","d\\e"}"#
        );
        assert_eq!(array_literal(std::iter::empty()), "{}");
    }

    #[test]
    fn a_query_gets_the_check_as_its_first_statement() {
        let mut plan = Plan::default();
        let mut settings = BytesMut::new();
        messages::query("SET x = 1", &mut settings);
        plan.inject(&settings, End::Query);
        let (out_mark, expects_mark) = (plan.out.len(), plan.expects.len());
        messages::query("SELECT n FROM users WHERE id = 7", &mut plan.out);
        plan.expect(End::Query, None);
        let mut prepared = PreparedStatements::default();
        place(&mut plan, out_mark, expects_mark, &pairs(), &mut prepared).expect("placed");
        let text = messages::query_text(&plan.out[out_mark + 5..]).expect("query");
        assert_eq!(
            text,
            r#"SELECT public.shardline_check_owner(E'{"users"}'::text[], E'{"users_p3"}'::text[]); SELECT n FROM users WHERE id = 7"#
        );
        let ends: Vec<(End, bool)> = plan
            .expects
            .iter()
            .filter_map(|e| match e {
                Expect::Reply { end, check, .. } => Some((*end, *check)),
                Expect::Synthetic(_) => None,
            })
            .collect();
        assert_eq!(
            ends,
            vec![
                (End::Query, false),
                (End::OwnerCheck, true),
                (End::Query, false)
            ]
        );
        assert!(prepared.is_empty());
    }

    #[test]
    fn extended_messages_get_a_kept_check_before_them() {
        let mut plan = Plan::default();
        let mut prepared = PreparedStatements::default();
        for round in 0..2 {
            plan.out.clear();
            plan.expects.clear();
            messages::bind_text("s1", &["7"], &mut plan.out);
            plan.expect(End::BindComplete, None);
            place(&mut plan, 0, 0, &pairs(), &mut prepared).expect("placed");
            let tags: Vec<u8> = frames(&plan.out).into_iter().map(|(tag, _)| tag).collect();
            if round == 0 {
                assert_eq!(tags, b"PBECB".to_vec(), "parsed once");
            } else {
                assert_eq!(tags, b"BECB".to_vec(), "then kept");
            }
            assert!(prepared.has(CHECK_STATEMENT, CHECK_SQL));
            let checks = plan
                .expects
                .iter()
                .filter(|e| matches!(e, Expect::Reply { check: true, .. }))
                .count();
            assert_eq!(checks, tags.len() - 1);
        }
    }

    #[test]
    fn nothing_to_check_or_nothing_sent_leaves_the_plan_alone() {
        let mut plan = Plan::default();
        let mut prepared = PreparedStatements::default();
        place(&mut plan, 0, 0, &pairs(), &mut prepared).expect("nothing sent");
        assert!(plan.out.is_empty() && plan.expects.is_empty());
        messages::query("SELECT 1", &mut plan.out);
        plan.expect(End::Query, None);
        let before = plan.out.clone();
        place(&mut plan, 0, 0, &[], &mut prepared).expect("no partitions");
        assert_eq!(plan.out, before);
    }

    #[test]
    fn a_truncated_query_is_refused_not_sent_unchecked() {
        let mut plan = Plan::default();
        plan.out.extend_from_slice(&[b'Q', 0, 0, 0]);
        let mut prepared = PreparedStatements::default();
        assert!(place(&mut plan, 0, 0, &pairs(), &mut prepared).is_err());
    }

    /// Each message's tag and length field (the size less the tag).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, usize)> {
        let mut frames = Vec::new();
        while let Ok(Some((tag, size))) = peek_header(bytes, usize::MAX) {
            frames.push((tag, size - 1));
            bytes = &bytes[size..];
        }
        frames
    }
}
