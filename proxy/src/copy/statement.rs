//! Reading `COPY table [(columns)] FROM STDIN [options]` into a [`CopyIn`]:
//! the table, the column list and the options that decide how the data is
//! split, in both the parenthesised syntax and the old one (`WITH CSV
//! HEADER`, `BINARY`, `USING DELIMITERS`). Options are checked as Postgres
//! 15's `ProcessCopyOptions` checks them (same messages); anything the proxy
//! cannot split exactly (COPY TO, files, PROGRAM, WHERE, FREEZE, HEADER
//! MATCH, encodings other than UTF8, options newer than Postgres 15) is
//! refused with 0A000 and what to do instead.

use crate::analyze::lexer::{self, Literal, LITERAL_MARKER_BASE};

use super::CopyError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
    Binary,
}

/// Columns named by FORCE_NOT_NULL / FORCE_NULL.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ColumnSet {
    #[default]
    None,
    Columns(Vec<String>),
    /// `*`: every column of the COPY.
    All,
}

impl ColumnSet {
    pub fn contains(&self, column: &str) -> bool {
        match self {
            ColumnSet::None => false,
            ColumnSet::Columns(names) => names.iter().any(|n| n == column),
            ColumnSet::All => true,
        }
    }

    pub(super) fn names(&self) -> &[String] {
        match self {
            ColumnSet::Columns(names) => names,
            _ => &[],
        }
    }
}

/// The options that decide how the data splits (defaults filled in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    pub format: CopyFormat,
    /// Text: tab; CSV: comma.
    pub delimiter: u8,
    /// Text: `\N`; CSV: the empty string. Unused for binary.
    pub null: String,
    /// The first line is a header, skipped.
    pub header: bool,
    /// CSV only (`"` by default).
    pub quote: u8,
    /// CSV only (the quote by default).
    pub escape: u8,
    pub force_not_null: ColumnSet,
    pub force_null: ColumnSet,
}

/// A `COPY ... FROM STDIN` the proxy can split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyIn {
    pub schema: Option<String>,
    pub table: String,
    /// `None`: every column of the table, in order.
    pub columns: Option<Vec<String>>,
    pub options: CopyOptions,
}

impl CopyIn {
    /// The columns each row carries: the statement's list checked against
    /// the table's columns (as Postgres checks it), or all of them.
    pub fn row_columns(&self, table_columns: &[String]) -> Result<Vec<String>, CopyError> {
        let Some(columns) = &self.columns else {
            return Ok(table_columns.to_vec());
        };
        for (i, column) in columns.iter().enumerate() {
            if !table_columns.contains(column) {
                return Err(CopyError::new(
                    "42703",
                    format!(
                        "column \"{column}\" of relation \"{}\" does not exist",
                        self.table
                    ),
                ));
            }
            if columns[..i].contains(column) {
                return Err(CopyError::new(
                    "42701",
                    format!("column \"{column}\" specified more than once"),
                ));
            }
        }
        Ok(columns.clone())
    }
}

/// Why the proxy does not run this COPY: the client's ErrorResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyRefusal {
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl CopyRefusal {
    fn unsupported(message: impl Into<String>, hint: impl Into<String>) -> CopyRefusal {
        CopyRefusal {
            code: "0A000",
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// An error Postgres itself gives for this statement (same words).
    fn postgres(code: &'static str, message: impl Into<String>) -> CopyRefusal {
        CopyRefusal {
            code,
            message: message.into(),
            hint: None,
        }
    }

    fn syntax(near: &Tok) -> CopyRefusal {
        let near = match near {
            Tok::End => return CopyRefusal::postgres("42601", "syntax error at end of input"),
            Tok::Word(w) | Tok::Ident(w) | Tok::Num(w) => w.clone(),
            Tok::Str(s) => format!("'{s}'"),
            Tok::Param(n) => format!("${n}"),
            Tok::Sym(c) => char::from(*c).to_string(),
        };
        CopyRefusal::postgres("42601", format!("syntax error at or near \"{near}\""))
    }
}

impl std::fmt::Display for CopyRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl std::error::Error for CopyRefusal {}

const ONLY_STDIN_HINT: &str =
    "send the rows with COPY ... FROM STDIN (psql: \\copy), or COPY into each server directly";

/// Reads one `COPY ... FROM STDIN` statement.
pub fn parse_copy_in(sql: &str) -> Result<CopyIn, CopyRefusal> {
    let mut p = Parser {
        toks: tokenize(sql)?,
        at: 0,
    };
    if !p.eat_word("copy") {
        return Err(CopyRefusal::syntax(p.peek()));
    }
    if p.peek() == &Tok::Sym(b'(') {
        return Err(CopyRefusal::unsupported(
            "COPY (query) TO is not supported for sharded tables",
            "run the query as a SELECT",
        ));
    }
    let mut options = Vec::new();
    if p.eat_word("binary") {
        options.push(Opt::new("format", Arg::Str("binary".into())));
    }
    let (schema, table) = p.qualified_name()?;
    let columns = if p.eat_sym(b'(') {
        Some(p.name_list()?)
    } else {
        None
    };
    if p.eat_word("to") {
        return Err(CopyRefusal::unsupported(
            format!("COPY {table} TO is not supported for sharded tables"),
            "read the rows with SELECT",
        ));
    }
    if !p.eat_word("from") {
        return Err(CopyRefusal::syntax(p.peek()));
    }
    if p.eat_word("program") {
        return Err(CopyRefusal::unsupported(
            "COPY FROM PROGRAM is not supported for sharded tables",
            ONLY_STDIN_HINT,
        ));
    }
    match p.next() {
        Tok::Word(w) if w == "stdin" => {}
        Tok::Str(_) => {
            return Err(CopyRefusal::unsupported(
                "COPY from a file is not supported for sharded tables",
                ONLY_STDIN_HINT,
            ))
        }
        Tok::Word(w) if w == "stdout" => {
            return Err(CopyRefusal::unsupported(
                "COPY FROM STDOUT is not supported for sharded tables",
                "write FROM STDIN",
            ))
        }
        other => return Err(CopyRefusal::syntax(&other)),
    }
    if p.eat_word("using") && !p.peek_word("delimiters") {
        return Err(CopyRefusal::syntax(p.peek()));
    }
    if p.eat_word("delimiters") {
        options.push(Opt::new("delimiter", p.string()?));
    }
    p.eat_word("with");
    if p.eat_sym(b'(') {
        p.generic_options(&mut options)?;
    } else {
        p.legacy_options(&mut options)?;
    }
    if p.eat_word("where") {
        return Err(CopyRefusal::unsupported(
            "COPY FROM ... WHERE is not supported for sharded tables",
            "filter the rows before sending them",
        ));
    }
    if p.peek() != &Tok::End {
        return Err(CopyRefusal::syntax(p.peek()));
    }
    Ok(CopyIn {
        schema,
        table,
        columns,
        options: super::statement_options::process(options)?,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// An unquoted word, lowercased.
    Word(String),
    /// A quoted identifier, as written.
    Ident(String),
    Str(String),
    Num(String),
    Param(usize),
    Sym(u8),
    End,
}

/// The tokens of the one statement in `sql`, from the analyzer's lexer: its
/// shape (comments and whitespace gone, literals numbered) read back.
fn tokenize(sql: &str) -> Result<Vec<Tok>, CopyRefusal> {
    let lexed = lexer::lex(sql);
    let span = match lexed.statements.as_slice() {
        [one] => one.shape.clone(),
        _ => {
            return Err(CopyRefusal::unsupported(
                "COPY must be the only statement in its query",
                "send the COPY statement on its own",
            ))
        }
    };
    let shape = &lexed.shape[span];
    let bytes = shape.as_bytes();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b' ' => i += 1,
            b'"' => {
                let mut name = String::new();
                let mut j = i + 1;
                loop {
                    match shape[j..].find('"') {
                        Some(q) => {
                            name.push_str(&shape[j..j + q]);
                            j += q + 1;
                            if bytes.get(j) == Some(&b'"') {
                                name.push('"');
                                j += 1;
                            } else {
                                break;
                            }
                        }
                        None => return Err(CopyRefusal::syntax(&Tok::End)),
                    }
                }
                toks.push(Tok::Ident(name));
                i = j;
            }
            b'\'' => {
                let (value, end) = lexer::quoted_string(shape, i, false);
                toks.push(Tok::Str(value));
                i = end;
            }
            b'$' => {
                let digits = bytes[i + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                if digits > 0 {
                    let n: usize = shape[i + 1..i + 1 + digits].parse().unwrap_or(0);
                    toks.push(match n.checked_sub(LITERAL_MARKER_BASE) {
                        Some(index) => match lexed.literals.get(index) {
                            Some(Literal::String(s)) => Tok::Str(s.clone()),
                            Some(Literal::Number(n)) => Tok::Num(n.clone()),
                            None => Tok::Param(n),
                        },
                        None => Tok::Param(n),
                    });
                    i += 1 + digits;
                } else if let Some((value, end)) = lexer::dollar_quoted(shape, i) {
                    toks.push(Tok::Str(value));
                    i = end;
                } else {
                    toks.push(Tok::Sym(b'$'));
                    i += 1;
                }
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
                let word = &shape[start..i];
                if word.eq_ignore_ascii_case("u") && bytes.get(i) == Some(&b'&') {
                    return Err(CopyRefusal::unsupported(
                        "U&'...' strings and U&\"...\" names are not supported in a COPY statement for a sharded table",
                        "write them as plain strings and names (E'\\t' for a tab)",
                    ));
                }
                if bytes.get(i) == Some(&b'\'') {
                    // A prefixed string: only E'...' means what we can read.
                    if !word.eq_ignore_ascii_case("e") {
                        return Err(CopyRefusal::unsupported(
                            format!("{word}'...' strings are not supported in a COPY statement for a sharded table"),
                            "write the option as a plain '...' or E'...' string",
                        ));
                    }
                    let (value, end) = lexer::quoted_string(shape, i, true);
                    toks.push(Tok::Str(value));
                    i = end;
                } else {
                    toks.push(Tok::Word(word.to_lowercase()));
                }
            }
            b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'.') {
                    i += 1;
                }
                toks.push(Tok::Num(shape[start..i].to_string()));
            }
            _ => {
                toks.push(Tok::Sym(c));
                i += 1;
            }
        }
    }
    if let Some(Tok::Param(n)) = toks.iter().find(|t| matches!(t, Tok::Param(_))) {
        return Err(CopyRefusal::postgres(
            "42P02",
            format!("there is no parameter ${n}"),
        ));
    }
    Ok(toks)
}

/// A generic option's argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Arg {
    None,
    /// A keyword or unquoted word (lowercased).
    Word(String),
    /// A string, or a quoted identifier.
    Str(String),
    Num(String),
    Star,
    List(Vec<String>),
}

/// One option as Postgres's grammar hands it on (`DefElem`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Opt {
    pub(super) name: String,
    pub(super) arg: Arg,
}

impl Opt {
    fn new(name: &str, arg: Arg) -> Opt {
        Opt {
            name: name.to_string(),
            arg,
        }
    }
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.toks.get(self.at).unwrap_or(&Tok::End)
    }

    fn next(&mut self) -> Tok {
        let tok = self.peek().clone();
        if tok != Tok::End {
            self.at += 1;
        }
        tok
    }

    fn peek_word(&self, word: &str) -> bool {
        matches!(self.peek(), Tok::Word(w) if w == word)
    }

    fn eat_word(&mut self, word: &str) -> bool {
        let found = self.peek_word(word);
        if found {
            self.at += 1;
        }
        found
    }

    fn eat_sym(&mut self, sym: u8) -> bool {
        let found = self.peek() == &Tok::Sym(sym);
        if found {
            self.at += 1;
        }
        found
    }

    fn name(&mut self) -> Result<String, CopyRefusal> {
        match self.next() {
            Tok::Word(w) | Tok::Ident(w) => Ok(w),
            other => Err(CopyRefusal::syntax(&other)),
        }
    }

    fn qualified_name(&mut self) -> Result<(Option<String>, String), CopyRefusal> {
        let first = self.name()?;
        if !self.eat_sym(b'.') {
            return Ok((None, first));
        }
        let second = self.name()?;
        if self.peek() == &Tok::Sym(b'.') {
            return Err(CopyRefusal::unsupported(
                "a COPY target with a database name is not supported",
                "name the table as schema.table",
            ));
        }
        Ok((Some(first), second))
    }

    /// `a, b, c)` (the opening parenthesis already read).
    fn name_list(&mut self) -> Result<Vec<String>, CopyRefusal> {
        let mut names = vec![self.name()?];
        while self.eat_sym(b',') {
            names.push(self.name()?);
        }
        if !self.eat_sym(b')') {
            return Err(CopyRefusal::syntax(self.peek()));
        }
        Ok(names)
    }

    fn string(&mut self) -> Result<Arg, CopyRefusal> {
        match self.next() {
            Tok::Str(s) => Ok(Arg::Str(s)),
            other => Err(CopyRefusal::syntax(&other)),
        }
    }

    /// `name [arg], ...)` (the opening parenthesis already read).
    fn generic_options(&mut self, options: &mut Vec<Opt>) -> Result<(), CopyRefusal> {
        loop {
            let name = match self.next() {
                Tok::Word(w) | Tok::Ident(w) => w,
                other => return Err(CopyRefusal::syntax(&other)),
            };
            let arg = match self.peek().clone() {
                Tok::Sym(b',') | Tok::Sym(b')') => Arg::None,
                Tok::Sym(b'*') => {
                    self.at += 1;
                    Arg::Star
                }
                Tok::Sym(b'(') => {
                    self.at += 1;
                    let mut items = vec![self.list_item()?];
                    while self.eat_sym(b',') {
                        items.push(self.list_item()?);
                    }
                    if !self.eat_sym(b')') {
                        return Err(CopyRefusal::syntax(self.peek()));
                    }
                    Arg::List(items)
                }
                Tok::Sym(sign @ (b'-' | b'+')) => {
                    self.at += 1;
                    match self.next() {
                        Tok::Num(n) if sign == b'-' => Arg::Num(format!("-{n}")),
                        Tok::Num(n) => Arg::Num(n),
                        other => return Err(CopyRefusal::syntax(&other)),
                    }
                }
                Tok::Word(w) => {
                    self.at += 1;
                    Arg::Word(w)
                }
                Tok::Ident(s) | Tok::Str(s) => {
                    self.at += 1;
                    Arg::Str(s)
                }
                Tok::Num(n) => {
                    self.at += 1;
                    Arg::Num(n)
                }
                other => return Err(CopyRefusal::syntax(&other)),
            };
            options.push(Opt { name, arg });
            if self.eat_sym(b')') {
                return Ok(());
            }
            if !self.eat_sym(b',') {
                return Err(CopyRefusal::syntax(self.peek()));
            }
        }
    }

    fn list_item(&mut self) -> Result<String, CopyRefusal> {
        match self.next() {
            Tok::Word(w) | Tok::Ident(w) | Tok::Str(w) => Ok(w),
            other => Err(CopyRefusal::syntax(&other)),
        }
    }

    /// The old syntax: `BINARY`, `CSV`, `HEADER`, `DELIMITER [AS] 'x'`,
    /// `NULL [AS] 'x'`, `QUOTE`, `ESCAPE`, `FORCE NOT NULL a, b`,
    /// `FORCE NULL a`, `FORCE QUOTE ...`, `ENCODING 'x'`, `FREEZE`.
    fn legacy_options(&mut self, options: &mut Vec<Opt>) -> Result<(), CopyRefusal> {
        loop {
            let Tok::Word(word) = self.peek().clone() else {
                return Ok(());
            };
            let option = match word.as_str() {
                "binary" => Opt::new("format", Arg::Str("binary".into())),
                "csv" => Opt::new("format", Arg::Str("csv".into())),
                "header" => Opt::new("header", Arg::None),
                "freeze" => Opt::new("freeze", Arg::None),
                "delimiter" | "null" | "quote" | "escape" | "encoding" => {
                    self.at += 1;
                    if word != "encoding" {
                        self.eat_word("as");
                    }
                    let value = self.string()?;
                    options.push(Opt::new(&word, value));
                    continue;
                }
                "force" => {
                    self.at += 1;
                    let name = if self.eat_word("quote") {
                        "force_quote"
                    } else if self.eat_word("not") {
                        if !self.eat_word("null") {
                            return Err(CopyRefusal::syntax(self.peek()));
                        }
                        "force_not_null"
                    } else if self.eat_word("null") {
                        "force_null"
                    } else {
                        return Err(CopyRefusal::syntax(self.peek()));
                    };
                    let arg = if self.eat_sym(b'*') {
                        Arg::Star
                    } else {
                        let mut names = vec![self.name()?];
                        while self.eat_sym(b',') {
                            names.push(self.name()?);
                        }
                        Arg::List(names)
                    };
                    options.push(Opt::new(name, arg));
                    continue;
                }
                _ => return Ok(()),
            };
            self.at += 1;
            options.push(option);
        }
    }
}
