//! Whether a simple Query's integer literals can be sent as parameters of a
//! statement kept prepared on the server, and the parameterized text.
//!
//! An integer literal has a type from the start (int4, or int8 if it does
//! not fit), so wherever it is an operand of an expression, a parameter
//! declared with that type means exactly the same: Postgres resolves the
//! same operators and casts and computes the same values. What differs is
//! where the grammar or the analyser looks at a constant as written: a
//! column position (`ORDER BY 1`, `GROUP BY 1`), a type modifier
//! (`numeric(10, 2)`), `FETCH FIRST -1` (a constant only), and clauses that
//! match expressions by their text or prove predicates with constants. So
//! a literal qualifies only where it is certainly an operand:
//! - right after a comparison (`k = 42`, `n >= 7`, `j -> 3`);
//! - right after an arithmetic operator (`abalance + 5`, `x * 2`);
//! - a whole item of an INSERT's or a VALUES list's row (`VALUES (7, 1)`);
//!
//! with an optional sign in front (`= -5`, `+ -4023`, `VALUES (-3)`) when
//! the statement has no ORDER BY or FETCH (where `-2` can be a position or
//! a constant only); but not computed with a literal on its left (`1 + 2`,
//! `10 / 0`), since the planner folds constants and raises their errors
//! even where no row is read, where a generic plan's parameters do not.

use std::sync::OnceLock;

use super::lexer;

/// A one-statement query whose literals can be sent as parameters instead
/// (see the module doc). Ineligible besides: any quoted constant (valued
/// when parsed: `DATE 'today'`, time zones); clauses that match expressions
/// by their text or prove predicates (GROUP BY, HAVING, DISTINCT, WINDOW,
/// PARTITION BY, ON CONFLICT); SELECT ... INTO; anything but
/// SELECT/INSERT/UPDATE/DELETE.
#[derive(Debug, PartialEq, Eq)]
pub struct Parameterized {
    /// The shape with literal markers renumbered `$1..$n`.
    pub text: String,
    pub params: usize,
    /// The parameters written with a minus sign in front: `-2147483648` is
    /// an int4 constant, but `-$1` with `$1` = 2147483648 (an int8) is an
    /// int8, so that one value is sent as written.
    pub negated: Vec<usize>,
    /// Its name on the servers when every parameter is an int4 (the usual
    /// case), worked out once.
    pub int4_name: OnceLock<std::sync::Arc<str>>,
}

impl Parameterized {
    /// A statement without parameters, sent as it is.
    pub fn constant(text: String) -> Parameterized {
        Parameterized {
            text,
            params: 0,
            negated: Vec::new(),
            int4_name: OnceLock::new(),
        }
    }
}

/// Most parameters a parameterized statement may have.
const MAX_PARAMETERS: usize = 1000;

/// Whether `word` occurs in `text` as a whole word.
fn has_word(text: &str, word: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices(word).any(|(at, _)| {
        let before = at.checked_sub(1).and_then(|i| bytes.get(i));
        let after = bytes.get(at + word.len());
        !before.is_some_and(|&b| is_ident(b)) && !after.is_some_and(|&b| is_ident(b))
    })
}

fn is_ident(b: u8) -> bool {
    b == b'_' || b == b'$' || b.is_ascii_alphanumeric() || b >= 0x80
}

/// Characters of Postgres operators.
fn is_operator(b: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?".contains(&b)
}

/// Where a literal stands, as far as its eligibility goes.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Place {
    /// Right after a comparison or an arithmetic operator, or a whole item
    /// of a VALUES row.
    Operand {
        negated: bool,
    },
    Other,
}

/// The parenthesis each literal is in, scanned once: whether it opens a
/// VALUES row (`VALUES (`, or `, (` after a row).
struct Parens {
    /// Per open parenthesis: whether it is a VALUES row.
    open: Vec<bool>,
    /// Whether the last parenthesis closed at the current depth was a row.
    closed_row: Vec<bool>,
}

impl Parens {
    fn new() -> Parens {
        Parens {
            open: Vec::new(),
            closed_row: vec![false],
        }
    }

    /// Takes byte `b` at `at` of `text` into account.
    fn step(&mut self, text: &str, at: usize, b: u8) {
        match b {
            b'(' => {
                let before = text[..at].trim_end();
                let row = last_word(before.as_bytes()).eq_ignore_ascii_case(b"values")
                    || (before.ends_with(',') && self.closed_row.last() == Some(&true));
                self.open.push(row);
                self.closed_row.push(false);
            }
            b')' => {
                self.closed_row.pop();
                let row = self.open.pop().unwrap_or(false);
                if let Some(last) = self.closed_row.last_mut() {
                    *last = row;
                }
            }
            b',' => {}
            _ if !b.is_ascii_whitespace() => {
                // Anything but a comma between rows ends the VALUES list.
                if let Some(last) = self.closed_row.last_mut() {
                    *last = false;
                }
            }
            _ => {}
        }
    }

    fn in_row(&self) -> bool {
        self.open.last() == Some(&true)
    }
}

/// The identifier-like word (a name, a keyword, a `$n` marker) that
/// `bytes` ends with; empty if it ends with anything else.
fn last_word(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .rposition(|&b| !is_ident(b))
        .map_or(0, |i| i + 1);
    &bytes[start..]
}

/// Where the literal whose marker starts at `at` stands; `signs` allows a
/// sign in front of it.
fn place(statement: &str, at: usize, in_row: bool, signs: bool) -> Place {
    let before = statement[..at].trim_end().as_bytes();
    let Some((&last, rest)) = before.split_last() else {
        return Place::Other;
    };
    let row_item = |b: u8| in_row && matches!(b, b'(' | b',');
    if last == b'-' || last == b'+' {
        let rest = rest.trim_ascii_end();
        return match rest.last() {
            // After an operator, `(` or `,` the sign belongs to the literal.
            Some(&b) if is_operator(b) || row_item(b) => {
                if signs && (row_item(b) || !constant_operation(rest)) {
                    Place::Operand {
                        negated: last == b'-',
                    }
                } else {
                    Place::Other
                }
            }
            // `BY -2`, `LIMIT -1`, `SELECT -1`: a value starts here.
            Some(&b) if is_ident(b) && ends_with_keyword(rest) => Place::Other,
            // After an operand: a binary operator.
            Some(&b) if is_ident(b) || b == b')' || b == b']' => {
                if constant_operation(before) {
                    Place::Other
                } else {
                    Place::Operand { negated: false }
                }
            }
            _ => Place::Other,
        };
    }
    if row_item(last) || (is_operator(last) && !constant_operation(before)) {
        return Place::Operand { negated: false };
    }
    Place::Other
}

/// Whether the operator ending `bytes` computes with a literal on its left
/// (`1 + 2`, `10 / 0`, `5 * -3`): the planner folds such an expression of
/// constants, and raises its errors (division by zero, overflow) even where
/// no row is read, which an expression of parameters in a generic plan does
/// not. Comparisons fold to a boolean and raise nothing.
fn constant_operation(bytes: &[u8]) -> bool {
    let operator_start = bytes
        .iter()
        .rposition(|&b| !is_operator(b))
        .map_or(0, |i| i + 1);
    let operator = &bytes[operator_start..];
    if operator
        .iter()
        .all(|b| matches!(b, b'=' | b'<' | b'>' | b'!'))
    {
        return false;
    }
    let word = last_word(bytes[..operator_start].trim_ascii_end());
    word.len() > 1 && word[0] == b'$' && word[1..].iter().all(u8::is_ascii_digit)
}

/// Whether the identifier-like text at the end of `bytes` is a keyword
/// after which a sign starts a value (`SELECT -1`, `BY -2`, `LIMIT -1`):
/// then the sign is not a binary operator and the literal is no operand.
fn ends_with_keyword(bytes: &[u8]) -> bool {
    let word = last_word(bytes);
    if word
        .first()
        .is_some_and(|b| b.is_ascii_digit() || *b == b'$')
    {
        return false;
    }
    const VALUE_STARTERS: [&str; 22] = [
        "select",
        "by",
        "limit",
        "offset",
        "first",
        "next",
        "and",
        "or",
        "not",
        "when",
        "then",
        "else",
        "between",
        "is",
        "in",
        "returning",
        "where",
        "set",
        "values",
        "on",
        "as",
        "like",
    ];
    VALUE_STARTERS
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k.as_bytes()))
}

pub(super) fn parameterize(shape: &str, markers: &[usize]) -> Option<Parameterized> {
    let statement = shape.trim_end().trim_end_matches(';').trim_end();
    if statement.contains(';') || statement.contains('\'') || markers.len() > MAX_PARAMETERS {
        return None;
    }
    let lowered = statement.to_ascii_lowercase();
    // A leading comment leaves the shape starting with a space.
    let first = lowered
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()?;
    match first {
        "select" if !has_word(&lowered, "into") => {}
        "insert" | "update" | "delete" => {}
        _ => return None,
    }
    let by_text = [
        "group",
        "having",
        "distinct",
        "window",
        "partition",
        "conflict",
    ];
    if by_text.iter().any(|word| has_word(&lowered, word)) {
        return None;
    }
    // Where a signed constant may be a position or must be a constant.
    let signs = !has_word(&lowered, "order") && !has_word(&lowered, "fetch");
    let bytes = statement.as_bytes();
    // Every `$` must be a literal marker (no dollar quotes, no `$n`).
    if bytes.iter().filter(|&&b| b == b'$').count() != markers.len() {
        return None;
    }
    let mut text = String::with_capacity(statement.len());
    let mut negated = Vec::new();
    let mut copied = 0;
    let mut parens = Parens::new();
    let mut scanned = 0;
    for (index, &at) in markers.iter().enumerate() {
        for (offset, &b) in bytes.get(scanned..at)?.iter().enumerate() {
            parens.step(statement, scanned + offset, b);
        }
        let digits = statement.get(at + 1..)?;
        let len = digits.bytes().take_while(u8::is_ascii_digit).count();
        let number: usize = digits[..len].parse().ok()?;
        if bytes.get(at) != Some(&b'$') || number != lexer::LITERAL_MARKER_BASE + index {
            return None;
        }
        // `0x1F` lexes as 0 followed by a word: not an integer literal.
        let after = bytes.get(at + 1 + len).copied();
        if after.is_some_and(|b| b == b'_' || b == b'.' || b.is_ascii_alphanumeric() || b >= 0x80) {
            return None;
        }
        match place(statement, at, parens.in_row(), signs) {
            Place::Operand { negated: minus } => {
                if minus {
                    negated.push(index);
                }
            }
            Place::Other => return None,
        }
        // The marker is an operand: not a `,` or `)` a VALUES scan must see.
        parens.step(statement, at, b'$');
        scanned = at + 1 + len;
        text.push_str(&statement[copied..at]);
        text.push('$');
        text.push_str(&(index + 1).to_string());
        copied = at + 1 + len;
    }
    text.push_str(&statement[copied..]);
    Some(Parameterized {
        text,
        params: markers.len(),
        negated,
        int4_name: OnceLock::new(),
    })
}

#[cfg(test)]
mod tests;
