//! What a server connection has prepared (`PreparedStatements`), and what
//! the proxy reads from the statements it relays to keep that knowledge
//! true: rule changes (a rule may make writes return rows) and statements
//! that may change the columns a prepared statement returns.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustc_hash::FxHashMap;

/// The statements prepared on one server connection, by name, with their
/// text. Names are derived from texts by a hash (shared by every client), so
/// a name is reused only for the same text: two texts that happen to share
/// a name never run one for the other.
#[derive(Debug, Default)]
pub struct PreparedStatements {
    texts: FxHashMap<Arc<str>, Kept>,
    /// A rule of the database may make a write return rows: see
    /// `Backend::read_rules`.
    pub(super) rules_return_rows: bool,
    /// The server's count of rule changes made through the proxy (see
    /// `Backend::publish_changes`), shared by its pools on every
    /// serving thread; `None` only in the empty set a request takes out.
    pub(super) rule_changes: Option<Arc<AtomicU64>>,
    /// The count when `rules_return_rows` was last read; `None` before the
    /// first read, or when it could not be done.
    pub(super) rules_seen: Option<u64>,
    /// The proxy's count of catalog changes (`pool::Budgets`); `None` on a
    /// read replica's connection, and in the empty set a request takes out.
    catalog_changes: Option<Arc<AtomicU64>>,
    /// The connection's `search_path` as the proxy set it (a hash of the
    /// setting; the server's default has its own), for the request being
    /// built; `None` when a client may have changed it unseen.
    search_path: Option<u64>,
}

/// A statement prepared on the connection, and what its plan was made
/// under: a statement that returns rows may run inside a transaction only
/// if neither changed since (`PreparedStatements::has_current`), for
/// Postgres refuses a plan whose result columns changed ("cached plan must
/// not change result type"), and inside a transaction that cannot be
/// retried unseen.
#[derive(Debug)]
struct Kept {
    text: Box<str>,
    /// The catalog count when it was prepared.
    catalog: u64,
    search_path: Option<u64>,
}

/// A statement that changed the database's rules, by its CommandComplete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleChange {
    /// CREATE RULE, CREATE OR REPLACE RULE.
    Created,
    /// ALTER RULE, DROP RULE.
    Other,
}

/// What a CommandComplete's tag (with or without its zero byte) says of
/// the rules.
pub fn rule_change(tag: &[u8]) -> Option<RuleChange> {
    match tag.strip_suffix(b"\0").unwrap_or(tag) {
        b"CREATE RULE" => Some(RuleChange::Created),
        b"ALTER RULE" | b"DROP RULE" => Some(RuleChange::Other),
        _ => None,
    }
}

/// What a statement changed that the proxy follows, by its CommandComplete
/// (`Backend::note_changes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatementChanges {
    pub rule: Option<RuleChange>,
    /// `changes_result_columns`.
    pub result_columns: bool,
}

impl StatementChanges {
    /// Read from a CommandComplete's tag (with or without its zero byte).
    pub fn of(tag: &[u8]) -> StatementChanges {
        StatementChanges {
            rule: rule_change(tag),
            result_columns: changes_result_columns(tag),
        }
    }
}

/// Whether a CommandComplete's tag (with or without its zero byte) is of a
/// statement that may change the columns a prepared statement returns: a
/// column's type, a view's columns, a table or function dropped and made
/// again, a type or domain, a schema renamed or dropped (CREATE TABLE is
/// not: see ARCHITECTURE.md on tables that shadow others), and the rule
/// changes (`rule_change`). The session counts such statements when it
/// sends them too (`analyze::ddl::may_change_result_columns`); this counts
/// them once more when their transaction ends.
pub fn changes_result_columns(tag: &[u8]) -> bool {
    rule_change(tag).is_some()
        || matches!(
            tag.strip_suffix(b"\0").unwrap_or(tag),
            b"ALTER TABLE"
                | b"DROP TABLE"
                | b"ALTER VIEW"
                | b"CREATE VIEW"
                | b"DROP VIEW"
                | b"ALTER MATERIALIZED VIEW"
                | b"DROP MATERIALIZED VIEW"
                | b"ALTER FOREIGN TABLE"
                | b"DROP FOREIGN TABLE"
                | b"ALTER TYPE"
                | b"DROP TYPE"
                | b"ALTER DOMAIN"
                | b"DROP DOMAIN"
                | b"DROP FUNCTION"
                | b"DROP PROCEDURE"
                | b"DROP ROUTINE"
                | b"ALTER SCHEMA"
                | b"DROP SCHEMA"
                | b"DROP OWNED"
                | b"ALTER EXTENSION"
                | b"DROP EXTENSION"
        )
}

/// Rules on INSERT, UPDATE or DELETE (`ev_type` other than SELECT's `1`)
/// of tables outside `pg_catalog` (whose `pg_settings` has one; its
/// updates take quoted names, which are never kept) with an action that
/// returns rows: as `pg_get_ruledef` prints them, a SELECT, VALUES or WITH
/// after `DO`, `INSTEAD`, or the opening bracket or a semicolon of a list
/// of actions (not after a column list's closing bracket: `INSERT INTO log
/// (a) VALUES (new.a)` returns nothing). A query nested in brackets in
/// another action may match too, which only costs the keeping of
/// simple-protocol writes. Operators are
/// qualified: the proxy's user may have another schema first on its path.
pub const RULES_THAT_RETURN_ROWS: &str = r"SELECT EXISTS (SELECT FROM pg_catalog.pg_rewrite r
     JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.ev_class
     WHERE r.ev_type OPERATOR(pg_catalog.<>) '1'
     AND c.relnamespace OPERATOR(pg_catalog.<>) 'pg_catalog'::pg_catalog.regnamespace
     AND pg_catalog.pg_get_ruledef(r.oid)
         OPERATOR(pg_catalog.~*) E'(\\mDO|\\mINSTEAD|[(;])\\s*(SELECT|VALUES|WITH)\\M')";

impl PreparedStatements {
    /// Whether a rule may make a write return rows here: one was found when
    /// the rules were last read, or a rule was created, replaced or dropped
    /// through the proxy since (answered again at the next checkout, see
    /// `Backend::refresh_rules`).
    pub fn rules_may_return_rows(&self) -> bool {
        self.rules_return_rows || self.rules_stale()
    }

    /// Whether the rules are to be read (again): not read yet, or a rule
    /// changed through the proxy since.
    pub fn rules_stale(&self) -> bool {
        self.rule_count()
            .is_some_and(|count| self.rules_seen != Some(count))
    }

    /// The server's count of rule changes now, if this set follows it.
    pub(super) fn rule_count(&self) -> Option<u64> {
        (self.rule_changes.as_ref()).map(|changes| changes.load(Ordering::Acquire))
    }

    /// Follows the server's count of rule changes (the rules are read at
    /// the next checkout) and, on a primary's connection, the proxy's count
    /// of catalog changes; from a connection's first checkout, with nothing
    /// prepared on it yet.
    pub fn follow_changes(&mut self, rules: Arc<AtomicU64>, catalog: Option<Arc<AtomicU64>>) {
        self.rule_changes = Some(rules);
        self.rules_seen = None;
        self.catalog_changes = catalog;
    }

    /// Whether this connection follows the catalog count, so that a
    /// statement that returns rows may run kept inside a transaction
    /// (`has_current`).
    pub fn follows_catalog(&self) -> bool {
        self.catalog_changes.is_some()
    }

    /// Counts a catalog change now (a stale plan met on this connection).
    pub fn count_catalog_change(&self) {
        if let Some(changes) = &self.catalog_changes {
            changes.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The catalog count now; 0 when not followed.
    fn catalog_count(&self) -> u64 {
        (self.catalog_changes.as_ref()).map_or(0, |changes| changes.load(Ordering::Acquire))
    }

    /// Sets the connection's `search_path` as the proxy knows it, before a
    /// request is built (`None`: unknown).
    pub fn set_search_path(&mut self, search_path: Option<u64>) {
        self.search_path = search_path;
    }

    /// Whether `name` is prepared here with exactly `text`.
    pub fn has(&self, name: &str, text: &str) -> bool {
        self.texts
            .get(name)
            .is_some_and(|prepared| &*prepared.text == text)
    }

    /// Whether `name` is prepared here with exactly `text`, under the
    /// catalog as it is now (no catalog change counted since) and the
    /// connection's current, known `search_path`: what a statement that
    /// returns rows needs to run kept inside a transaction.
    pub fn has_current(&self, name: &str, text: &str) -> bool {
        self.catalog_changes.is_some()
            && self.search_path.is_some()
            && self.texts.get(name).is_some_and(|prepared| {
                &*prepared.text == text
                    && prepared.catalog == self.catalog_count()
                    && prepared.search_path == self.search_path
            })
    }

    /// Whether `name` is prepared here, with whatever text.
    pub fn contains(&self, name: &str) -> bool {
        self.texts.contains_key(name)
    }

    /// Records `name` as prepared with `text` now (the count read before
    /// its Parse is sent: a change counted meanwhile prepares it again).
    pub fn insert(&mut self, name: Arc<str>, text: &str) {
        let kept = Kept {
            text: text.into(),
            catalog: self.catalog_count(),
            search_path: self.search_path,
        };
        self.texts.insert(name, kept);
    }

    pub fn remove(&mut self, name: &str) {
        self.texts.remove(name);
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_changes_are_read_from_command_tags() {
        assert_eq!(rule_change(b"CREATE RULE\0"), Some(RuleChange::Created));
        assert_eq!(rule_change(b"CREATE RULE"), Some(RuleChange::Created));
        assert_eq!(rule_change(b"DROP RULE\0"), Some(RuleChange::Other));
        assert_eq!(rule_change(b"ALTER RULE"), Some(RuleChange::Other));
        for other in [&b"CREATE TRIGGER\0"[..], b"INSERT 0 1\0", b"RULE\0", b""] {
            assert_eq!(rule_change(other), None);
        }
    }

    #[test]
    fn tags_that_may_change_result_columns() {
        for tag in [
            &b"ALTER TABLE\0"[..],
            b"DROP TABLE",
            b"CREATE VIEW\0",
            b"ALTER TYPE\0",
            b"DROP SCHEMA\0",
        ] {
            assert!(changes_result_columns(tag), "{tag:?}");
        }
        for tag in [
            &b"CREATE TABLE\0"[..],
            b"CREATE INDEX\0",
            b"INSERT 0 1\0",
            b"SELECT 1\0",
            b"TABLE\0",
            b"",
        ] {
            assert!(!changes_result_columns(tag), "{tag:?}");
        }
    }

    #[test]
    fn a_statement_is_current_until_the_catalog_or_search_path_changes() {
        let mut set = PreparedStatements::default();
        set.set_search_path(Some(0));
        set.insert("s1".into(), "select 1");
        assert!(set.has("s1", "select 1"));
        assert!(
            !set.has_current("s1", "select 1"),
            "no catalog count followed"
        );
        let catalog = Arc::new(AtomicU64::new(4));
        let mut set = PreparedStatements::default();
        set.follow_changes(Arc::default(), Some(catalog.clone()));
        set.set_search_path(Some(0));
        set.insert("s1".into(), "select 1");
        assert!(set.has_current("s1", "select 1"));
        assert!(!set.has_current("s1", "select 2"), "another text");
        set.set_search_path(Some(7));
        assert!(!set.has_current("s1", "select 1"), "another search_path");
        set.set_search_path(None);
        assert!(!set.has_current("s1", "select 1"), "an unknown search_path");
        set.set_search_path(Some(0));
        assert!(set.has_current("s1", "select 1"));
        set.count_catalog_change();
        assert_eq!(catalog.load(Ordering::Acquire), 5);
        assert!(!set.has_current("s1", "select 1"), "a catalog change since");
        assert!(set.has("s1", "select 1"), "still prepared");
        set.insert("s1".into(), "select 1");
        assert!(set.has_current("s1", "select 1"), "prepared again");
    }

    #[test]
    fn a_rule_change_makes_the_rules_stale_until_read_again() {
        let mut set = PreparedStatements::default();
        assert!(!set.rules_may_return_rows(), "a request's empty set");
        let changes = Arc::new(AtomicU64::new(7));
        set.follow_changes(changes.clone(), None);
        assert!(
            set.rules_stale() && set.rules_may_return_rows(),
            "not read yet"
        );
        set.rules_seen = Some(7);
        assert!(!set.rules_may_return_rows());
        changes.fetch_add(1, Ordering::AcqRel);
        assert!(set.rules_stale() && set.rules_may_return_rows());
    }
}
