//! Statement analysis: lex once, look the shape up in a cache, parse with
//! sqlparser only on a miss. See `lexer` for shapes and `statement` for what
//! is extracted.

pub mod ddl;
pub mod lexer;
mod parameterize;
pub mod prepared;
pub mod scatter;
pub mod statement;
pub mod writes;

use rustc_hash::FxHashMap;
use std::sync::{Arc, RwLock};

pub use lexer::{lex, Lexed, Literal};
use parameterize::parameterize;
pub use parameterize::Parameterized;
pub use statement::{Command, DataStatement, KeyExpr};

/// The analysis of a whole query string (one or more statements).
#[derive(Debug)]
pub struct Analysis {
    pub commands: Vec<Command>,
    /// The statement with its literals as parameters, if that is exactly
    /// equivalent (see `Parameterized`); worked out once per shape.
    parameterized: Option<Arc<Parameterized>>,
}

impl Analysis {
    pub fn parameterized(&self) -> Option<&Arc<Parameterized>> {
        self.parameterized.as_ref()
    }
}

/// The type Postgres gives an integer literal: int4 if it fits, else int8;
/// `None` for anything else (a decimal, an exponent, a numeric-sized integer).
pub fn integer_literal_type(literal: &Literal) -> Option<u32> {
    const INT4: u32 = 23;
    const INT8: u32 = 20;
    let Literal::Number(text) = literal else {
        return None;
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: i64 = text.parse().ok()?;
    Some(if value <= i64::from(i32::MAX) {
        INT4
    } else {
        INT8
    })
}

/// A query's analysis together with its own literal values.
#[derive(Debug, Clone)]
pub struct Analyzed {
    pub analysis: Arc<Analysis>,
    pub literals: Arc<Vec<Literal>>,
}

/// Caches analyses by shape. Bounded: when full it starts over, which costs
/// only re-parsing (shapes of a real application are few).
pub struct Analyzer {
    cache: RwLock<FxHashMap<String, Arc<Analysis>>>,
    capacity: usize,
}

impl Analyzer {
    pub fn new(capacity: usize) -> Analyzer {
        Analyzer {
            cache: RwLock::new(FxHashMap::default()),
            capacity,
        }
    }

    pub fn analyze(&self, sql: &str) -> Analyzed {
        let Lexed {
            shape, literals, ..
        } = lexer::lex_with(sql, false);
        let literals = Arc::new(literals);
        if let Some(hit) = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&shape)
        {
            return Analyzed {
                analysis: hit.clone(),
                literals,
            };
        }
        // A miss: lex again with the words the analysis needs.
        let lexed = lex(sql);
        let analysis = Arc::new(analyze_lexed(&lexed));
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.capacity {
            cache.clear();
        }
        cache.insert(lexed.shape, analysis.clone());
        Analyzed { analysis, literals }
    }

    pub fn cached_shapes(&self) -> usize {
        self.cache.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

fn analyze_lexed(lexed: &Lexed) -> Analysis {
    let commands = lexed
        .statements
        .iter()
        .map(|span| {
            statement::analyze(
                &lexed.shape[span.shape.clone()],
                &lexed.words[span.words.clone()],
            )
        })
        .collect();
    // A simple Query cannot give real parameters a value.
    let parameterized = if lexed.has_params {
        None
    } else {
        parameterize(&lexed.shape, &lexed.markers).map(Arc::new)
    };
    Analysis {
        commands,
        parameterized,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_shape_is_analysed_once() {
        let analyzer = Analyzer::new(100);
        let a = analyzer.analyze("SELECT * FROM t WHERE k = 1");
        let b = analyzer.analyze("SELECT * FROM t WHERE k = 2");
        assert!(Arc::ptr_eq(&a.analysis, &b.analysis));
        assert_eq!(b.literals.as_slice(), &[Literal::Number("2".into())]);
        assert_eq!(analyzer.cached_shapes(), 1);
    }

    #[test]
    fn only_literals_that_are_operands_become_parameters() {
        let analyzer = Analyzer::new(100);
        let text = |sql: &str| {
            analyzer
                .analyze(sql)
                .analysis
                .parameterized()
                .map(|p| (p.text.clone(), p.params))
        };
        assert_eq!(
            text("SELECT abalance FROM pgbench_accounts WHERE aid = 41234;"),
            Some((
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1".into(),
                1
            ))
        );
        // A leading comment (a routing hint) is not part of the shape.
        let hinted = text("/* shardline.key: 42 */ SELECT u FROM t WHERE id > 0");
        assert_eq!(
            hinted.map(|(t, n)| (t.trim().to_string(), n)),
            Some(("SELECT u FROM t WHERE id > $1".into(), 1))
        );
        assert_eq!(
            text("update t set v = 5 where k >= 7 and j <> 8"),
            Some(("update t set v = $1 where k >= $2 and j <> $3".into(), 3))
        );
        assert_eq!(
            text("SELECT * FROM t WHERE k = 1 ORDER BY 1"),
            None,
            "ORDER BY 1 is a column position"
        );
        assert_eq!(text("SELECT * FROM t WHERE k = 1 LIMIT 5"), None);
        assert_eq!(
            text("SELECT * FROM t WHERE k = -1"),
            Some(("SELECT * FROM t WHERE k = -$1".into(), 1))
        );
        // The string's marker qualifies by its place; a string never gets
        // an integer type, so the query is not kept (see below).
        assert_eq!(
            text("INSERT INTO t VALUES (1, 'x')"),
            Some(("INSERT INTO t VALUES ($1, $2)".into(), 2))
        );
        assert_eq!(text("SELECT 1 INTO t2 FROM t WHERE k = 1"), None);
        assert_eq!(text("EXPLAIN SELECT * FROM t WHERE k = 1"), None);
        assert_eq!(text("SELECT * FROM t WHERE k = 1; SELECT 2"), None);
        assert_eq!(
            text("SELECT $1 FROM t WHERE k = 1"),
            None,
            "a real parameter"
        );
        assert_eq!(
            text("SELECT * FROM t WHERE k = 1 AND s LIKE '=$100001'"),
            None,
            "marker-like text in a string is not a marker (and strings stay)"
        );
        assert_eq!(
            text("SELECT * FROM t WHERE k = 1 AND d = DATE 'today'"),
            None,
            "a quoted constant is valued when parsed"
        );
        assert_eq!(text("SELECT*INTO t2 FROM t WHERE k = 1"), None);
        assert_eq!(
            text("SELECT s > 100, count(*) FROM t WHERE k = 3 GROUP BY s > 100"),
            None,
            "GROUP BY matches expressions by their text"
        );
        assert_eq!(
            text(
                "INSERT INTO t SELECT * FROM u WHERE k = 1 ON CONFLICT (k) WHERE f = 1 DO NOTHING"
            ),
            None
        );
        assert_eq!(text("SELECT * FROM t WHERE k = 0x1F"), None);
        // A dollar-quoted string is a literal like any string: its marker
        // qualifies, but a string never gets an integer type (see below).
        let dollar = analyzer.analyze("SELECT * FROM t WHERE k = $q$x$q$");
        assert!(matches!(dollar.literals.as_slice(), [Literal::String(_)]));
        assert_eq!(integer_literal_type(&dollar.literals[0]), None);
        assert_eq!(
            text("SELECT * FROM t WHERE k = 7"),
            Some(("SELECT * FROM t WHERE k = $1".into(), 1))
        );
        assert_eq!(
            text("SELECT * FROM t WHERE grouped = 7"),
            Some(("SELECT * FROM t WHERE grouped = $1".into(), 1)),
            "whole words only"
        );
    }

    #[test]
    fn integer_literals_get_the_type_postgres_gives_them() {
        let number = |s: &str| Literal::Number(s.into());
        assert_eq!(integer_literal_type(&number("7")), Some(23));
        assert_eq!(integer_literal_type(&number("2147483647")), Some(23));
        assert_eq!(integer_literal_type(&number("2147483648")), Some(20));
        assert_eq!(integer_literal_type(&number("99999999999999999999")), None);
        assert_eq!(integer_literal_type(&number("1.5")), None);
        assert_eq!(integer_literal_type(&number("1e3")), None);
        assert_eq!(integer_literal_type(&Literal::String("7".into())), None);
    }

    #[test]
    fn several_statements() {
        let analyzer = Analyzer::new(100);
        let a = analyzer.analyze("BEGIN; UPDATE t SET v = 1 WHERE k = 5; COMMIT;");
        assert_eq!(a.analysis.commands.len(), 3);
        assert!(matches!(a.analysis.commands[0], Command::Begin { .. }));
        assert!(matches!(a.analysis.commands[2], Command::Commit));
    }
}
