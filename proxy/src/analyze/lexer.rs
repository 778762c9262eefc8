//! A small SQL lexer that turns a statement into its *shape*: the text with
//! comments dropped, whitespace collapsed and literals replaced by numbered
//! markers (`$100001`, `$100002`, ...), plus the literal values in order.
//!
//! Statements that differ only in their literals (pgbench's
//! `... WHERE aid = 123`) share one shape, so the expensive analysis runs
//! once per shape and routing only has to pick the key out of the literals.
//! A literal directly after a word (`DATE '2024-01-01'`, `INTERVAL '1 day'`,
//! `LIKE 'x%'`) stays in the shape verbatim: it may be part of the syntax.

/// Numbered markers for literals start here; real parameters are `$1..$65535`.
pub const LITERAL_MARKER_BASE: usize = 100_001;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Literal {
    /// A number as written.
    Number(String),
    /// A string's value (quotes and escapes resolved).
    String(String),
}

impl Literal {
    pub fn text(&self) -> &str {
        match self {
            Literal::Number(s) | Literal::String(s) => s,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lexed {
    pub shape: String,
    /// Where each `;`-separated statement lies: a range of `shape` and a
    /// range of `words`. Empty statements are left out.
    pub statements: Vec<StatementSpan>,
    pub literals: Vec<Literal>,
    /// Every identifier (lowercased unless quoted), for the fallback when a
    /// statement cannot be parsed.
    pub words: Vec<String>,
    /// Where each literal marker starts in `shape` (collected with the words).
    pub markers: Vec<usize>,
    /// The text has real parameters (`$1`).
    pub has_params: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prev {
    Nothing,
    Word,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementSpan {
    pub shape: std::ops::Range<usize>,
    pub words: std::ops::Range<usize>,
}

/// Lexes `sql`, collecting its words too. Never fails: unterminated strings
/// or comments simply run to the end (the parser will then report the error).
pub fn lex(sql: &str) -> Lexed {
    lex_with(sql, true)
}

/// Lexes `sql`; `collect_words` is false on the hot path (a cache hit needs
/// only the shape and the literals).
pub fn lex_with(sql: &str, collect_words: bool) -> Lexed {
    let bytes = sql.as_bytes();
    let mut shape = String::with_capacity(sql.len());
    let mut literals = Vec::new();
    let mut words = Vec::new();
    let mut markers = Vec::new();
    let mut has_params = false;
    let mut prev = Prev::Nothing;
    let mut statements = Vec::new();
    let mut statement_start = (0usize, 0usize);
    let mut i = 0;
    let push_space = |shape: &mut String| {
        if !matches!(shape.as_bytes().last(), None | Some(b' ')) {
            shape.push(' ');
        }
    };
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                push_space(&mut shape);
                i += 1;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                push_space(&mut shape);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < bytes.len() {
                    if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                push_space(&mut shape);
            }
            b'\'' => {
                let (value, end) = quoted_string(sql, i, false);
                literal_or_verbatim(
                    &mut shape,
                    &mut literals,
                    collect_words.then_some(&mut markers),
                    prev,
                    Literal::String(value),
                    &sql[i..end],
                );
                prev = Prev::Other;
                i = end;
            }
            b'e' | b'E' if bytes.get(i + 1) == Some(&b'\'') && !continues_word(&shape) => {
                let (value, end) = quoted_string(sql, i + 1, true);
                literal_or_verbatim(
                    &mut shape,
                    &mut literals,
                    collect_words.then_some(&mut markers),
                    prev,
                    Literal::String(value),
                    &sql[i..end],
                );
                prev = Prev::Other;
                i = end;
            }
            b'"' => {
                let start = i;
                i += 1;
                let mut name = String::new();
                while i < bytes.len() {
                    if bytes[i] == b'"' {
                        if bytes.get(i + 1) == Some(&b'"') {
                            name.push('"');
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    let ch_len = utf8_len(bytes[i]);
                    name.push_str(&sql[i..(i + ch_len).min(sql.len())]);
                    i += ch_len;
                }
                shape.push_str(&sql[start..i.min(sql.len())]);
                if collect_words {
                    words.push(name);
                }
                prev = Prev::Word;
            }
            b'$' => {
                if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) {
                    let start = i;
                    i += 1;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                    shape.push_str(&sql[start..i]);
                    has_params = true;
                    prev = Prev::Other;
                } else if let Some((value, end)) = dollar_quoted(sql, i) {
                    literal_or_verbatim(
                        &mut shape,
                        &mut literals,
                        collect_words.then_some(&mut markers),
                        prev,
                        Literal::String(value),
                        &sql[i..end],
                    );
                    prev = Prev::Other;
                    i = end;
                } else {
                    shape.push('$');
                    i += 1;
                    prev = Prev::Other;
                }
            }
            // A number: `12`, `1.5e3`, or `.5` (a dot followed by a digit).
            b'0'..=b'9' | b'.'
                if c != b'.'
                    || (bytes.get(i + 1).is_some_and(u8::is_ascii_digit)
                        && !continues_word(&shape)) =>
            {
                let start = i;
                i = number_end(bytes, i);
                literal_or_verbatim(
                    &mut shape,
                    &mut literals,
                    collect_words.then_some(&mut markers),
                    Prev::Other,
                    Literal::Number(sql[start..i].to_string()),
                    &sql[start..i],
                );
                prev = Prev::Other;
            }
            c if c == b'_' || c.is_ascii_alphabetic() || c >= 0x80 => {
                let start = i;
                while i < bytes.len()
                    && (bytes[i] == b'_'
                        || bytes[i] == b'$'
                        || bytes[i].is_ascii_alphanumeric()
                        || bytes[i] >= 0x80)
                {
                    i += 1;
                }
                let word = &sql[start..i];
                shape.push_str(word);
                if collect_words {
                    words.push(word.to_lowercase());
                }
                prev = Prev::Word;
            }
            b';' => {
                close_statement(&mut statements, &mut statement_start, &shape, words.len());
                shape.push(';');
                statement_start = (shape.len(), words.len());
                i += 1;
                prev = Prev::Nothing;
            }
            _ if c < 0x80 => {
                shape.push(char::from(c));
                i += 1;
                prev = Prev::Other;
            }
            _ => {
                let ch_len = utf8_len(c);
                let end = (i + ch_len).min(sql.len());
                shape.push_str(&sql[i..end]);
                i = end;
                prev = Prev::Other;
            }
        }
    }
    let trimmed = shape.trim_end().len();
    shape.truncate(trimmed);
    close_statement(&mut statements, &mut statement_start, &shape, words.len());
    Lexed {
        shape,
        statements,
        literals,
        words,
        markers,
        has_params,
    }
}

fn close_statement(
    statements: &mut Vec<StatementSpan>,
    start: &mut (usize, usize),
    shape: &str,
    words_end: usize,
) {
    let (shape_start, words_start) = *start;
    let text = shape.get(shape_start..).unwrap_or("");
    let leading = text.len() - text.trim_start().len();
    let end = shape_start + text.trim_end().len();
    if shape_start + leading < end {
        statements.push(StatementSpan {
            shape: shape_start + leading..end,
            words: words_start..words_end,
        });
    }
}

fn continues_word(shape: &str) -> bool {
    shape
        .as_bytes()
        .last()
        .is_some_and(|&b| b == b'_' || b.is_ascii_alphanumeric() || b >= 0x80)
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

fn literal_or_verbatim(
    shape: &mut String,
    literals: &mut Vec<Literal>,
    markers: Option<&mut Vec<usize>>,
    prev: Prev,
    literal: Literal,
    verbatim: &str,
) {
    if prev == Prev::Word {
        shape.push_str(verbatim);
    } else {
        literals.push(literal);
        if let Some(markers) = markers {
            markers.push(shape.len());
        }
        push_marker(shape, LITERAL_MARKER_BASE + literals.len() - 1);
    }
}

/// Appends `$n` without formatting machinery (this runs for every literal).
fn push_marker(shape: &mut String, n: usize) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut rest = n;
    loop {
        digits[len] = b'0' + (rest % 10) as u8;
        len += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    shape.push('$');
    for d in digits[..len].iter().rev() {
        shape.push(char::from(*d));
    }
}
/// A `'...'` string starting at `start` (the quote); returns its value and the end.
pub(crate) fn quoted_string(sql: &str, start: usize, backslash_escapes: bool) -> (String, usize) {
    let bytes = sql.as_bytes();
    let mut value = String::new();
    let mut i = start + 1;
    let mut run = i;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' if bytes.get(i + 1) == Some(&b'\'') => {
                value.push_str(&sql[run..i + 1]);
                i += 2;
                run = i;
            }
            b'\'' => {
                value.push_str(&sql[run..i]);
                return (value, i + 1);
            }
            b'\\' if backslash_escapes && i + 1 < bytes.len() => {
                value.push_str(&sql[run..i]);
                let escaped = bytes[i + 1];
                let ch = match escaped {
                    b'n' => '\n',
                    b't' => '\t',
                    b'r' => '\r',
                    b'b' => '\x08',
                    b'f' => '\x0c',
                    _ => char::from(escaped),
                };
                if escaped.is_ascii() {
                    value.push(ch);
                    i += 2;
                } else {
                    i += 1;
                }
                run = i;
            }
            _ => i += 1,
        }
    }
    value.push_str(&sql[run..]);
    (value, bytes.len())
}

/// A `$tag$...$tag$` string starting at `start`, if one starts there.
pub(crate) fn dollar_quoted(sql: &str, start: usize) -> Option<(String, usize)> {
    let bytes = sql.as_bytes();
    let mut i = start + 1;
    while i < bytes.len()
        && (bytes[i] == b'_' || bytes[i].is_ascii_alphanumeric() || bytes[i] >= 0x80)
    {
        i += 1;
    }
    if bytes.get(i) != Some(&b'$') {
        return None;
    }
    let tag = &sql[start..=i];
    let body_start = i + 1;
    match sql[body_start..].find(tag) {
        Some(offset) => Some((
            sql[body_start..body_start + offset].to_string(),
            body_start + offset + tag.len(),
        )),
        None => Some((sql[body_start..].to_string(), sql.len())),
    }
}

fn number_end(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'_') {
        i += 1;
    }
    if i < bytes.len() && bytes[i] == b'.' && bytes.get(i + 1) != Some(&b'.') {
        i += 1;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
    }
    if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
        let mut j = i + 1;
        if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
            j += 1;
        }
        if j < bytes.len() && bytes[j].is_ascii_digit() {
            i = j;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_become_markers() {
        let l = lex("SELECT abalance FROM pgbench_accounts WHERE aid = 123;");
        assert_eq!(
            l.shape,
            "SELECT abalance FROM pgbench_accounts WHERE aid = $100001;"
        );
        assert_eq!(l.literals, vec![Literal::Number("123".into())]);
        let other = lex("SELECT abalance FROM pgbench_accounts  WHERE aid = 99 ; -- comment");
        assert_eq!(
            other.shape,
            "SELECT abalance FROM pgbench_accounts WHERE aid = $100001 ;"
        );
    }

    #[test]
    fn strings_escapes_and_dollar_quotes() {
        let l =
            lex("select * from t where a = 'it''s' and b = E'x\\ny' and c = $q$raw'$q$ and d = $2");
        assert_eq!(
            l.literals,
            vec![
                Literal::String("it's".into()),
                Literal::String("x\ny".into()),
                Literal::String("raw'".into())
            ]
        );
        assert_eq!(
            l.shape,
            "select * from t where a = $100001 and b = $100002 and c = $100003 and d = $2"
        );
    }

    #[test]
    fn typed_literals_and_identifiers_stay() {
        let l = lex(
            "select date '2024-01-01', x1, \"Weird \"\"Name\", 1.5e3 /* c /* nested */ */ from t",
        );
        assert_eq!(l.literals, vec![Literal::Number("1.5e3".into())]);
        assert!(l.shape.contains("date '2024-01-01'"), "{}", l.shape);
        assert!(l.words.contains(&"Weird \"Name".to_string()));
    }

    #[test]
    fn statements_are_split_outside_strings() {
        let l = lex("BEGIN; UPDATE t SET a = ';' WHERE k = 1 ;; COMMIT");
        let texts: Vec<&str> = l
            .statements
            .iter()
            .map(|s| &l.shape[s.shape.clone()])
            .collect();
        assert_eq!(
            texts,
            vec![
                "BEGIN",
                "UPDATE t SET a = $100001 WHERE k = $100002",
                "COMMIT"
            ]
        );
        assert_eq!(
            &l.words[l.statements[2].words.clone()],
            &["commit".to_string()]
        );
    }

    #[test]
    fn unterminated_input_does_not_panic() {
        for sql in [
            "select 'abc",
            "select $tag$ abc",
            "/* never closed",
            "select \"x",
            "E'\\",
            "ü'",
            "$",
        ] {
            let _ = lex(sql);
        }
    }
}
