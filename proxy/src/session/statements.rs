//! Prepared statements: the client's own (named and unnamed), their names on
//! the backends (shared by every client preparing the same text), statements
//! the proxy keeps prepared on its own (repeated unnamed statements and
//! simple queries), preparing them on a backend, and recognising a kept
//! statement whose cached plan went stale.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::BytesMut;
use rustc_hash::FxHashMap;

use crate::analyze::{Analyzed, Command, DataStatement, Literal};
use crate::backend::PreparedStatements;
use crate::route::Route;
use crate::wire::frame::Frame;
use crate::wire::messages;

use super::plan::{End, Expect, Plan};
use super::Session;

pub(super) use crate::analyze::prepared::has_quoted_constant;
pub use crate::analyze::prepared::Prepared;

pub(super) const INT4_OID: u32 = 23;

/// The settings Postgres reads while parsing a quoted constant
/// (`TIMESTAMPTZ '2024-06-01 00:00'`, `DATE '01/02/2024'`, `'a\\b'`).
pub(super) const PARSE_SETTINGS: [&str; 4] = [
    "timezone",
    "datestyle",
    "intervalstyle",
    "standard_conforming_strings",
];

/// The name of a statement on the backends: the same for every client
/// preparing the same text with the same parameter types, so they share it.
/// A text with quoted constants also depends on the settings that shape
/// their values; one that may hold `'now'`, `'today'`, `'tomorrow'` or
/// `'yesterday'` (fixed when parsed) is never shared.
pub(super) fn backend_statement_name(
    query: &str,
    param_types: &[u32],
    settings: &BTreeMap<String, String>,
) -> Arc<str> {
    use std::hash::{Hash, Hasher};
    static UNSHARED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    query.hash(&mut hasher);
    param_types.hash(&mut hasher);
    if has_quoted_constant(query) {
        for name in PARSE_SETTINGS {
            settings.get(name).hash(&mut hasher);
        }
        let lowered = query.to_ascii_lowercase();
        if ["now", "today", "tomorrow", "yesterday"]
            .iter()
            .any(|word| lowered.contains(word))
        {
            UNSHARED
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .hash(&mut hasher);
        }
    }
    format!("sl_{:016x}_{}", hasher.finish(), query.len()).into()
}

/// A simple Query to run as a statement kept prepared on the server.
pub(super) struct KeptSimple {
    pub(super) name: Arc<str>,
    pub(super) parameterized: Arc<crate::analyze::Parameterized>,
    pub(super) types: Vec<u32>,
    pub(super) literals: Arc<Vec<Literal>>,
}

/// A client's prepared statements. The unnamed one, which most drivers
/// parse on every request, lives outside the map: no hashing, no compare.
#[derive(Default)]
pub(super) struct Statements {
    pub(super) unnamed: Option<Arc<Prepared>>,
    pub(super) named: FxHashMap<String, Arc<Prepared>>,
}

impl Statements {
    pub(super) fn get(&self, name: &str) -> Option<&Arc<Prepared>> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    pub(super) fn insert(&mut self, name: String, statement: Arc<Prepared>) {
        if name.is_empty() {
            self.unnamed = Some(statement);
        } else {
            self.named.insert(name, statement);
        }
    }

    pub(super) fn remove(&mut self, name: &str) -> Option<Arc<Prepared>> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.named.remove(name)
        }
    }

    pub(super) fn clear(&mut self) {
        self.unnamed = None;
        self.named.clear();
    }
}

/// Adds a Parse of `statement` under its backend name if the backend lacks
/// it (with `current`: or has it from before the last catalog change or
/// under another search_path); its ParseComplete is dropped (the client did
/// not ask for it).
pub(super) fn ensure_prepared(
    plan: &mut Plan,
    prepared: &mut PreparedStatements,
    statement: &Prepared,
    current: bool,
) {
    if !is_prepared(prepared, &statement.backend_name, &statement.query, current) {
        prepare_statement(plan, prepared, statement, false);
    }
}

/// Whether statement `name` is prepared on the backend with `text`; with
/// `current`, under the catalog and search_path of now (see
/// `PreparedStatements::has_current`).
pub(super) fn is_prepared(
    prepared: &PreparedStatements,
    name: &str,
    text: &str,
    current: bool,
) -> bool {
    if current {
        prepared.has_current(name, text)
    } else {
        prepared.has(name, text)
    }
}

/// `prepare_on_backend` for a client's statement, its ParseComplete ending
/// the reply; `forward`: whether the client sees it.
pub(super) fn prepare_statement(
    plan: &mut Plan,
    prepared: &mut PreparedStatements,
    statement: &Prepared,
    forward: bool,
) {
    prepare_on_backend(
        plan,
        prepared,
        &statement.backend_name,
        &statement.query,
        &statement.param_types,
        End::ParseComplete,
        forward,
    );
}

/// Sends a Parse of `query` as statement `name` and records it as prepared
/// (undone if the Parse fails). Its reply ends at `end`; `forward`: whether
/// the client sees it. A statement of another text under the same name is
/// closed first.
pub(super) fn prepare_on_backend(
    plan: &mut Plan,
    prepared: &mut PreparedStatements,
    name: &Arc<str>,
    query: &str,
    param_types: &[u32],
    end: End,
    forward: bool,
) {
    if prepared.contains(name) {
        plan.close_statement(name);
        prepared.remove(name);
    }
    messages::parse(name, query, param_types, &mut plan.out);
    plan.expects.push_back(Expect::Reply {
        end,
        forward,
        unprepare: Some(name.clone()),
        stale_retry: None,
        check: false,
    });
    prepared.insert(name.clone(), query);
}

/// Whether a client's unnamed statement of these commands may be kept
/// prepared on the servers: one query Postgres plans (not FETCH or another
/// utility statement, which it never revalidates), or a transaction's end,
/// without a quoted constant (valued when parsed: 'now', time zones).
pub(super) fn keepable(commands: &[Command], query: &str) -> bool {
    let planned = match commands {
        [Command::Data(data)] => matches!(
            data.words.first().map(String::as_str),
            Some("select" | "insert" | "update" | "delete" | "with" | "values" | "table")
        ),
        [Command::Commit | Command::Rollback] => true,
        _ => false,
    };
    planned && !has_quoted_constant(query)
}

/// Whether a backend with statements `prepared` may keep statement `name`:
/// it has it already, or it keeps fewer than `max`.
pub(super) fn can_keep(prepared: &PreparedStatements, name: &str, max: usize) -> bool {
    prepared.contains(name) || prepared.len() < max
}

/// The unnamed statement may have been parsed in an earlier request, maybe
/// on another backend: parse it again here unless this request already did.
pub(super) fn ensure_unnamed_parsed<'a>(
    plan: &mut Plan,
    statement: &'a Arc<Prepared>,
    backend_unnamed: &mut Option<&'a Arc<Prepared>>,
) {
    if backend_unnamed.is_some_and(|parsed| Arc::ptr_eq(parsed, statement)) {
        return;
    }
    let mut out = BytesMut::new();
    messages::parse("", &statement.query, &statement.param_types, &mut out);
    plan.inject(&out, End::ParseComplete);
    *backend_unnamed = Some(statement);
}

/// Whether an ErrorResponse says a prepared statement's cached plan no longer
/// fits its tables (Postgres refuses to change a statement's result columns).
/// The routine field is checked, not the message: messages are translated.
pub(super) fn is_stale_plan_error(message: &[u8]) -> bool {
    let Some(body) = message.get(5..) else {
        return false;
    };
    let mut code = None;
    let mut routine = None;
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'C', value)) => code = Some(value),
            Some((b'R', value)) => routine = Some(value),
            _ => {}
        }
    }
    code == Some(b"0A000") && routine == Some(b"RevalidateCachedQuery")
}

impl Session {
    /// Whether a simple Query runs as a statement kept prepared on the server,
    /// its integer literals sent as parameters: it is exactly equivalent (see
    /// `Parameterized`), the client sent it often enough, and it runs in an
    /// implicit transaction or opens a held-back one, so that a stale plan
    /// can be retried unseen (`can_resend`), or cannot go stale (it returns
    /// no rows), or runs inside a transaction on a connection whose kept
    /// statements fit the catalog (`keeps_rows_in_transaction`).
    pub(super) fn kept_simple(
        &mut self,
        frame: &Frame,
        analyzed: &Analyzed,
        data: &DataStatement,
        route: &Route,
    ) -> Option<KeptSimple> {
        let after = self.shared.config.pool.prepare_simple_after;
        if after == 0
            || !(self.can_resend() || data.no_result || self.keeps_rows_in_transaction())
            || route.server().is_none()
            || data.copy.is_some()
            || data.unparsed.is_some()
            // The shape has no comments: keep planner hints (pg_hint_plan's
            // `/*+ ... */`) by sending such queries as they are. Routing
            // hints (`/* shardline.key: 42 */`) are the proxy's alone.
            || memchr::memchr_iter(b'/', &frame.raw).any(|at| {
                frame.raw.get(at + 1) == Some(&b'*')
                    && !frame
                        .raw
                        .get(at + 2..)
                        .is_some_and(|rest| rest.trim_ascii_start().starts_with(b"shardline."))
            })
        {
            return None;
        }
        let parameterized = analyzed.analysis.parameterized()?.clone();
        if parameterized.params != analyzed.literals.len() {
            return None;
        }
        let mut types = Vec::with_capacity(parameterized.params);
        for literal in analyzed.literals.iter() {
            types.push(crate::analyze::integer_literal_type(literal)?);
        }
        // `-2147483648` is an int4 constant, `-$1` with an int8 2147483648 an int8.
        let int4_min = |&i: &usize| matches!(analyzed.literals.get(i), Some(Literal::Number(n)) if n == "2147483648");
        if parameterized.negated.iter().any(int4_min) {
            return None;
        }
        // The text has no quoted constant: its name does not depend on settings.
        let name = if types.iter().all(|&t| t == INT4_OID) {
            parameterized
                .int4_name
                .get_or_init(|| backend_statement_name(&parameterized.text, &types, &self.settings))
                .clone()
        } else {
            backend_statement_name(&parameterized.text, &types, &self.settings)
        };
        if self.shared.statement_uses.count(&name) < after {
            return None;
        }
        Some(KeptSimple {
            name,
            parameterized,
            types,
            literals: analyzed.literals.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_taken_by_another_text_is_closed_before_it_is_prepared_again() {
        let mut prepared = PreparedStatements::default();
        let name: Arc<str> = "sl_0000000000000001_8".into();
        prepared.insert(name.clone(), "select 1");
        assert!(prepared.has(&name, "select 1"));
        assert!(!prepared.has(&name, "select 2"));
        let mut plan = Plan::default();
        prepare_on_backend(
            &mut plan,
            &mut prepared,
            &name,
            "select 2",
            &[],
            End::ParseComplete,
            false,
        );
        assert_eq!(plan.out.first(), Some(&b'C'), "Close first");
        let ends: Vec<End> = plan
            .expects
            .iter()
            .filter_map(|e| match e {
                Expect::Reply { end, .. } => Some(*end),
                Expect::Synthetic(_) => None,
            })
            .collect();
        assert_eq!(ends, vec![End::CloseComplete, End::ParseComplete]);
        assert!(prepared.has(&name, "select 2"));
        assert_eq!(prepared.len(), 1);
    }
    use std::collections::BTreeMap;

    #[test]
    fn statement_names_depend_on_text_and_types() {
        let none = BTreeMap::new();
        assert_eq!(
            backend_statement_name("select 1", &[], &none),
            backend_statement_name("select 1", &[], &none)
        );
        assert_ne!(
            backend_statement_name("select 1", &[], &none),
            backend_statement_name("select 1", &[23], &none)
        );
    }

    #[test]
    fn quoted_constants_share_a_statement_only_under_the_same_parse_settings() {
        let none = BTreeMap::new();
        let mut berlin = BTreeMap::new();
        berlin.insert("timezone".to_string(), "'Europe/Berlin'".to_string());
        let text = "select timestamptz '2024-06-01 00:00'";
        assert_eq!(
            backend_statement_name(text, &[], &berlin),
            backend_statement_name(text, &[], &berlin)
        );
        assert_ne!(
            backend_statement_name(text, &[], &none),
            backend_statement_name(text, &[], &berlin)
        );
        // Without a quoted constant the settings do not matter.
        assert_eq!(
            backend_statement_name("select $1::timestamptz", &[], &none),
            backend_statement_name("select $1::timestamptz", &[], &berlin)
        );
        // 'now' is fixed when parsed: never shared.
        let now = "insert into log (at) values ('now')";
        assert_ne!(
            backend_statement_name(now, &[], &none),
            backend_statement_name(now, &[], &none)
        );
    }
}
