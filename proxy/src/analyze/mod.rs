//! Statement analysis: lex once, look the shape up in a cache, parse with
//! sqlparser only on a miss. See `lexer` for shapes and `statement` for what
//! is extracted.

pub mod lexer;
pub mod statement;

use rustc_hash::FxHashMap;
use std::sync::{Arc, RwLock};

pub use lexer::{lex, Lexed, Literal};
pub use statement::{Command, DataStatement, KeyExpr};

/// The analysis of a whole query string (one or more statements).
#[derive(Debug)]
pub struct Analysis {
    pub commands: Vec<Command>,
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
    Analysis { commands }
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
    fn several_statements() {
        let analyzer = Analyzer::new(100);
        let a = analyzer.analyze("BEGIN; UPDATE t SET v = 1 WHERE k = 5; COMMIT;");
        assert_eq!(a.analysis.commands.len(), 3);
        assert!(matches!(a.analysis.commands[0], Command::Begin { .. }));
        assert!(matches!(a.analysis.commands[2], Command::Commit));
    }
}
