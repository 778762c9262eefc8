//! A statement a client prepared (extended protocol Parse), as the proxy
//! understands it, and the cache of those a serving thread parsed lately.
//! What the proxy makes of a statement depends on its text and parameter
//! types, and, for a text with quoted constants, on settings.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::{Analyzed, Command};

/// A statement the client prepared (extended protocol Parse).
#[derive(Debug)]
pub struct Prepared {
    pub query: String,
    pub param_types: Vec<u32>,
    /// Name on the backends: the same for every client preparing the same text
    /// with the same parameter types.
    pub backend_name: Arc<str>,
    pub analyzed: Analyzed,
    /// As the unnamed statement, it may be kept prepared on the servers: it
    /// reads or writes tables, or ends a transaction, and has no quoted
    /// constant (those are valued when parsed: 'now', time zones).
    pub keepable: bool,
}

impl Prepared {
    pub fn command(&self) -> Option<&Command> {
        match self.analyzed.analysis.commands.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// INSERT, UPDATE or DELETE without RETURNING (see `DataStatement::no_result`).
    pub fn returns_no_rows(&self) -> bool {
        matches!(self.command(), Some(Command::Data(data)) if data.no_result)
    }
}

/// Whether `query` has a quoted constant (a string or a dollar-quoted
/// string): Postgres turns those into values when it parses the statement.
pub fn has_quoted_constant(query: &str) -> bool {
    let bytes = query.as_bytes();
    memchr::memchr(b'\'', bytes).is_some()
        || memchr::memchr_iter(b'$', bytes)
            .any(|at| !bytes.get(at + 1).is_some_and(u8::is_ascii_digit))
}

/// Statements parsed lately on one serving thread, by text, shared by its
/// sessions. Drivers parse the same few texts as the unnamed statement
/// again and again, alternating between them (pgbench's five TPC-B
/// statements), so a session's last statement rarely matches; a hit here
/// skips lexing, analysis and naming. Only texts without quoted constants
/// are kept: what the proxy makes of the others also depends on settings.
/// Bounded: when full it starts over.
#[derive(Default)]
pub struct ParseCache {
    texts: std::sync::Mutex<FxHashMap<Box<str>, Arc<Prepared>>>,
}

/// Bound on `ParseCache`.
const PARSE_CACHE_TEXTS: usize = 1024;

impl ParseCache {
    pub fn get(&self, query: &str, param_types: &[u32]) -> Option<Arc<Prepared>> {
        self.texts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(query)
            .filter(|hit| hit.param_types == param_types)
            .cloned()
    }

    /// Keeps `statement` if what the proxy made of it depends on its text
    /// and parameter types alone.
    pub fn keep(&self, statement: &Arc<Prepared>) {
        if has_quoted_constant(&statement.query) {
            return;
        }
        let mut texts = self.texts.lock().unwrap_or_else(|e| e.into_inner());
        if texts.len() >= PARSE_CACHE_TEXTS {
            texts.clear();
        }
        texts.insert(statement.query.as_str().into(), statement.clone());
    }

    pub fn len(&self) -> usize {
        self.texts.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(query: &str, param_types: &[u32]) -> Arc<Prepared> {
        let analyzer = super::super::Analyzer::new(16);
        Arc::new(Prepared {
            query: query.into(),
            param_types: param_types.to_vec(),
            backend_name: format!("sl_test_{}", query.len()).into(),
            analyzed: analyzer.analyze(query),
            keepable: true,
        })
    }

    #[test]
    fn the_parse_cache_answers_the_same_text_and_types_only() {
        let cache = ParseCache::default();
        let select = prepared(
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            &[23],
        );
        cache.keep(&select);
        let hit = cache
            .get(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                &[23],
            )
            .expect("the same text and types");
        assert!(Arc::ptr_eq(&hit, &select));
        assert!(cache
            .get(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                &[20]
            )
            .is_none());
        assert!(cache
            .get(
                "SELECT abalance FROM pgbench_accounts WHERE aid = $2",
                &[23]
            )
            .is_none());
    }

    #[test]
    fn the_parse_cache_skips_quoted_constants_and_stays_bounded() {
        let cache = ParseCache::default();
        // Its value depends on the session's TimeZone when Postgres parses it.
        cache.keep(&prepared("SELECT TIMESTAMPTZ '2024-06-01 00:00'", &[]));
        cache.keep(&prepared("SELECT $tag$x$tag$", &[]));
        assert!(cache.is_empty());
        for i in 0..PARSE_CACHE_TEXTS + 1 {
            cache.keep(&prepared(&format!("SELECT {i}"), &[]));
        }
        assert!(cache.len() <= PARSE_CACHE_TEXTS, "{} texts", cache.len());
        assert!(cache
            .get(&format!("SELECT {PARSE_CACHE_TEXTS}"), &[])
            .is_some());
    }
}
