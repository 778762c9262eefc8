//! Statement analysis: lex once, look the shape up in a cache, parse with
//! sqlparser only on a miss. See `lexer` for shapes and `statement` for what
//! is extracted.

pub mod lexer;
pub mod statement;

use rustc_hash::FxHashMap;
use std::sync::{Arc, OnceLock, RwLock};

pub use lexer::{lex, Lexed, Literal};
pub use statement::{Command, DataStatement, KeyExpr};

/// The analysis of a whole query string (one or more statements).
#[derive(Debug)]
pub struct Analysis {
    pub commands: Vec<Command>,
    /// The shape this analysis is cached under.
    pub shape: String,
    /// Where the shape's literal markers start, and whether it has real
    /// parameters: what `parameterized` needs.
    markers: Vec<usize>,
    has_params: bool,
    parameterized: OnceLock<Option<Arc<Parameterized>>>,
}

impl Analysis {
    /// The statement with its literals as parameters, if that is exactly
    /// equivalent (see `Parameterized`); worked out once per shape.
    pub fn parameterized(&self) -> Option<&Arc<Parameterized>> {
        self.parameterized
            .get_or_init(|| {
                if self.has_params {
                    return None;
                }
                parameterize(&self.shape, &self.markers).map(Arc::new)
            })
            .as_ref()
    }
}

/// A one-statement query whose literals can be sent as parameters instead:
/// every literal is an integer right after a comparison (`k = 42`,
/// `n >= 7`), where a parameter of the literal's own type (int4, or int8 if
/// it does not fit) means exactly what the literal means. Literals anywhere
/// else (`LIMIT 5`, `ORDER BY 1`, `VALUES (1)`, `numeric(10,2)`, `-5`) make
/// the statement ineligible, as does anything but SELECT/INSERT/UPDATE/DELETE.
#[derive(Debug, PartialEq, Eq)]
pub struct Parameterized {
    /// The shape with literal markers renumbered `$1..$n`.
    pub text: String,
    pub params: usize,
}

fn parameterize(shape: &str, markers: &[usize]) -> Option<Parameterized> {
    let statement = shape.trim_end().trim_end_matches(';').trim_end();
    if statement.contains(';') {
        return None;
    }
    let lowered = statement.to_ascii_lowercase();
    match lowered.split(' ').next()? {
        // SELECT ... INTO creates a table: not a plain query.
        "select" if !lowered.contains(" into ") => {}
        "insert" | "update" | "delete" => {}
        _ => return None,
    }
    let mut text = String::with_capacity(statement.len());
    let mut copied = 0;
    for (index, &at) in markers.iter().enumerate() {
        let digits = statement.get(at + 1..)?;
        let len = digits.bytes().take_while(u8::is_ascii_digit).count();
        let number: usize = digits[..len].parse().ok()?;
        if statement.as_bytes().get(at) != Some(&b'$')
            || number != lexer::LITERAL_MARKER_BASE + index
        {
            return None;
        }
        let before = statement[..at].trim_end().as_bytes();
        if !before.last().is_some_and(|b| matches!(b, b'=' | b'<' | b'>')) {
            return None;
        }
        text.push_str(&statement[copied..at]);
        text.push('$');
        text.push_str(&(index + 1).to_string());
        copied = at + 1 + len;
    }
    text.push_str(&statement[copied..]);
    Some(Parameterized {
        text,
        params: markers.len(),
    })
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
    Some(if value <= i64::from(i32::MAX) { INT4 } else { INT8 })
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
    Analysis {
        commands,
        shape: lexed.shape.clone(),
        markers: lexed.markers.clone(),
        has_params: lexed.has_params,
        parameterized: OnceLock::new(),
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
    fn only_literals_after_comparisons_become_parameters() {
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
            Some(("SELECT abalance FROM pgbench_accounts WHERE aid = $1".into(), 1))
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
        assert_eq!(text("SELECT * FROM t WHERE k = -1"), None);
        assert_eq!(text("INSERT INTO t VALUES (1, 'x')"), None);
        assert_eq!(text("SELECT 1 INTO t2 FROM t WHERE k = 1"), None);
        assert_eq!(text("EXPLAIN SELECT * FROM t WHERE k = 1"), None);
        assert_eq!(text("SELECT * FROM t WHERE k = 1; SELECT 2"), None);
        assert_eq!(text("SELECT $1 FROM t WHERE k = 1"), None, "a real parameter");
        assert_eq!(
            text("SELECT * FROM t WHERE k = 1 AND s LIKE '=$100001'"),
            Some(("SELECT * FROM t WHERE k = $1 AND s LIKE '=$100001'".into(), 1)),
            "marker-like text in a string is not a marker"
        );
        assert_eq!(
            text("SELECT * FROM t WHERE d = DATE '2024-01-01'"),
            Some(("SELECT * FROM t WHERE d = DATE '2024-01-01'".into(), 0))
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
