//! What one statement needs for routing, found once per statement shape:
//! its command (transaction control, session settings, data), the tables it
//! touches, and where their sharding keys come from (`key = literal`,
//! `key = $n`, `key IN (...)`, INSERT values). Nothing here depends on the
//! map: the same analysis serves every map version.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, CopySource, Expr, FromTable, InTarget, JoinConstraint, JoinOperator,
    ObjectName, ObjectNamePart, Query, Select, SetExpr, Statement, TableFactor, TableObject,
    UnaryOperator, Value, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::lexer::LITERAL_MARKER_BASE;

/// Where a key value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyExpr {
    /// Bind parameter, 0-based.
    Param(usize),
    /// The n-th literal of the statement text (0-based).
    Literal(usize),
    /// A literal kept in the shape (typed literal, or from an unshaped parse).
    Const(String),
    /// `-expr`.
    Negate(Box<KeyExpr>),
    /// An array of keys: `key = ANY($1)` or `= ANY('{1,2}')` (the inner
    /// expression gives the array's text or its binary value).
    Array(Box<KeyExpr>),
}

/// A column as written: `col` or `qualifier.col` (lowercased unless quoted).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ColumnRef {
    pub qualifier: Option<String>,
    pub column: String,
}

/// `column = value` or `column IN (values)` from a WHERE/ON conjunction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Equality {
    pub column: ColumnRef,
    pub values: Vec<KeyExpr>,
}

/// One referenced table (never a CTE name or a function).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TableUse {
    pub schema: Option<String>,
    pub name: String,
    pub alias: Option<String>,
}

impl TableUse {
    /// A system catalog: same on every server.
    pub fn is_catalog(&self) -> bool {
        matches!(
            self.schema.as_deref(),
            Some("pg_catalog") | Some("information_schema")
        ) || (self.schema.is_none() && self.name.starts_with("pg_"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertRows {
    pub table: String,
    /// Empty when the statement names no columns.
    pub columns: Vec<String>,
    /// Per row, per column: the value if it is a literal or parameter.
    pub rows: Vec<Vec<Option<KeyExpr>>>,
    /// `INSERT ... SELECT`: rows come from a query.
    pub from_query: bool,
}

/// A statement that reads or writes tables (or none).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DataStatement {
    pub read_only: bool,
    pub tables: Vec<TableUse>,
    pub equalities: Vec<Equality>,
    pub insert: Option<InsertRows>,
    /// `COPY table FROM STDIN` / `TO STDOUT`.
    pub copy: Option<CopyInfo>,
    /// The tables the statement writes: INSERT, UPDATE, DELETE and MERGE
    /// targets (those of data-modifying CTEs too) and `COPY ... FROM`'s.
    /// Every other table it names is only read (or locked, or the object
    /// of DDL). A reference table written must be written on every server.
    pub written: Vec<TableUse>,
    /// The statement could not be parsed: `words` holds its identifiers so
    /// routing can still tell whether it mentions a known table.
    pub unparsed: Option<String>,
    pub words: Vec<String>,
    /// INSERT, UPDATE or DELETE without RETURNING: it returns no rows, so
    /// its result cannot change type when its tables change, and a server's
    /// cached plan of it never fails as stale (see `Request::retry_stale`).
    pub no_result: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInfo {
    pub table: Option<String>,
    pub from_stdin: bool,
}

/// What a statement does, as far as the session is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Begin {
        read_only: bool,
    },
    Commit,
    Rollback,
    /// Valid only inside a transaction, and runs where it runs:
    /// SAVEPOINT, RELEASE, ROLLBACK TO, SET LOCAL, SET TRANSACTION.
    TransactionScoped,
    /// `SET name = value` for the session (value as written, may be `DEFAULT`).
    Set {
        name: String,
        value: String,
    },
    /// `RESET name`, or `RESET ALL` (`None`).
    Reset {
        name: Option<String>,
    },
    Show {
        name: String,
    },
    /// `DISCARD ALL | PLANS | SEQUENCES | TEMP`.
    Discard,
    /// `DEALLOCATE name` or `DEALLOCATE ALL` (`None`).
    Deallocate {
        name: Option<String>,
    },
    /// A feature transaction pooling cannot offer; the text says which.
    Unsupported(&'static str),
    Data(DataStatement),
    Empty,
}

/// Analyses one statement given its shape text and its words.
pub fn analyze(shape: &str, words: &[String]) -> Command {
    if let Some(command) = classify_by_words(shape, words) {
        return command;
    }
    let mut data = match parse_one(shape) {
        Ok(statement) => extract(&statement),
        Err(why) => DataStatement {
            unparsed: Some(why),
            ..DataStatement::default()
        },
    };
    data.words = words.to_vec();
    Command::Data(data)
}

fn parse_one(sql: &str) -> Result<Statement, String> {
    let mut statements =
        Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| e.to_string())?;
    match statements.len() {
        1 => Ok(statements.remove(0)),
        n => Err(format!("expected one statement, found {n}")),
    }
}

fn word(words: &[String], i: usize) -> &str {
    words.get(i).map_or("", String::as_str)
}

/// Commands recognised by their leading keywords: cheaper and more robust
/// than a full parse, and what Postgres itself keys on.
fn classify_by_words(shape: &str, words: &[String]) -> Option<Command> {
    if shape.trim().is_empty() {
        return Some(Command::Empty);
    }
    let first_is_word = shape
        .trim_start()
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_');
    if !first_is_word {
        return None;
    }
    let read_only = words.windows(2).any(|w| w[0] == "read" && w[1] == "only");
    Some(match word(words, 0) {
        "begin" | "start" => Command::Begin { read_only },
        "commit" | "end" if word(words, 1) != "prepared" => Command::Commit,
        "abort" => Command::Rollback,
        "rollback" => match word(words, 1) {
            "to" => Command::TransactionScoped,
            "work" | "transaction" if word(words, 2) == "to" => Command::TransactionScoped,
            "prepared" => Command::Unsupported("two-phase commit statements"),
            _ => Command::Rollback,
        },
        "savepoint" | "release" => Command::TransactionScoped,
        "prepare" if word(words, 1) == "transaction" => Command::Unsupported("PREPARE TRANSACTION"),
        "commit" => Command::Unsupported("COMMIT PREPARED"),
        "prepare" => Command::Unsupported(
            "SQL-level PREPARE (use the extended protocol's prepared statements)",
        ),
        "execute" => Command::Unsupported(
            "SQL-level EXECUTE (use the extended protocol's prepared statements)",
        ),
        "listen" | "unlisten" => Command::Unsupported("LISTEN/UNLISTEN under transaction pooling"),
        "set" => match word(words, 1) {
            "local" | "transaction" | "constraints" => Command::TransactionScoped,
            "session" if word(words, 2) == "characteristics" => {
                Command::Unsupported("SET SESSION CHARACTERISTICS under transaction pooling")
            }
            "session" if word(words, 2) == "authorization" => {
                Command::Unsupported("SET SESSION AUTHORIZATION under transaction pooling")
            }
            "role" => Command::Unsupported("SET ROLE under transaction pooling"),
            _ => {
                let (name, value) = split_set(shape)?;
                Command::Set { name, value }
            }
        },
        "reset" => match word(words, 1) {
            "all" => Command::Reset { name: None },
            "" => return None,
            // The whole name (`shardline.key`: the words split at dots).
            _ => Command::Reset {
                name: Some(
                    strip_prefix_ci(shape.trim_start(), "reset")
                        .unwrap_or_default()
                        .trim()
                        .trim_end_matches(';')
                        .trim()
                        .trim_matches('"')
                        .to_lowercase(),
                ),
            },
        },
        "show" => Command::Show {
            name: strip_prefix_ci(shape.trim_start(), "show")
                .unwrap_or_default()
                .trim()
                .trim_matches('"')
                .to_lowercase(),
        },
        "discard" => Command::Discard,
        "deallocate" => {
            let rest: Vec<&str> = words[1..]
                .iter()
                .map(String::as_str)
                .filter(|w| *w != "prepare")
                .collect();
            match rest.as_slice() {
                ["all"] => Command::Deallocate { name: None },
                [name] => Command::Deallocate {
                    name: Some((*name).to_string()),
                },
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// `text` without a case-insensitive ASCII `prefix`, if it starts with it.
/// Works on bytes, so multi-byte characters right after the prefix are fine.
fn strip_prefix_ci<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    let head = text.as_bytes().get(..prefix.len())?;
    if head.eq_ignore_ascii_case(prefix.as_bytes()) {
        // The prefix is ASCII, so its end is a character boundary.
        text.get(prefix.len()..)
    } else {
        None
    }
}

/// `SET [SESSION] name {TO|=} value` → (name, value text).
fn split_set(shape: &str) -> Option<(String, String)> {
    let rest = strip_prefix_ci(shape.trim_start(), "set")?.trim_start();
    let rest = strip_prefix_ci(rest, "session ").map_or(rest, str::trim_start);
    // `SET TIME ZONE value` is `SET timezone TO value`.
    if let Some(value) = strip_prefix_ci(rest, "time zone") {
        if value.starts_with(char::is_whitespace) {
            return Some(("timezone".into(), value.trim().to_string()));
        }
    }
    let name_end = rest.find(|c: char| c.is_whitespace() || c == '=')?;
    let name = rest[..name_end].trim_matches('"').to_lowercase();
    let after = rest[name_end..].trim_start();
    let value = if let Some(v) = after.strip_prefix('=') {
        v
    } else {
        strip_prefix_ci(after, "to")?
    };
    Some((name, value.trim().to_string()))
}

pub(crate) fn ident_name(ident: &sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

pub(crate) fn object_parts(name: &ObjectName) -> Vec<String> {
    name.0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(ident) => ident_name(ident),
            ObjectNamePart::Function(f) => ident_name(&f.name),
        })
        .collect()
}

pub(crate) fn table_use(name: &ObjectName, alias: Option<String>) -> TableUse {
    let mut parts = object_parts(name);
    let table = parts.pop().unwrap_or_default();
    let schema = parts.pop().filter(|s| s != "public");
    TableUse {
        schema,
        name: table,
        alias,
    }
}

fn key_expr(expr: &Expr) -> Option<KeyExpr> {
    match expr {
        Expr::Nested(inner) => key_expr(inner),
        Expr::Cast { expr, .. } => key_expr(expr),
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => key_expr(expr).map(|k| KeyExpr::Negate(Box::new(k))),
        Expr::UnaryOp {
            op: UnaryOperator::Plus,
            expr,
        } => key_expr(expr),
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => {
                let n: usize = p.strip_prefix('$')?.parse().ok()?;
                if n >= LITERAL_MARKER_BASE {
                    Some(KeyExpr::Literal(n - LITERAL_MARKER_BASE))
                } else if n >= 1 {
                    Some(KeyExpr::Param(n - 1))
                } else {
                    None
                }
            }
            Value::Number(n, _) => Some(KeyExpr::Const(n.to_string())),
            Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => {
                Some(KeyExpr::Const(s.clone()))
            }
            _ => None,
        },
        _ => None,
    }
}

/// The expression under any casts and parentheses.
fn strip_casts(expr: &Expr) -> &Expr {
    match expr {
        Expr::Nested(inner) | Expr::Cast { expr: inner, .. } => strip_casts(inner),
        other => other,
    }
}

fn column_ref(expr: &Expr) -> Option<ColumnRef> {
    match expr {
        Expr::Nested(inner) => column_ref(inner),
        Expr::Identifier(ident) => Some(ColumnRef {
            qualifier: None,
            column: ident_name(ident),
        }),
        Expr::CompoundIdentifier(parts) if parts.len() >= 2 => Some(ColumnRef {
            qualifier: Some(ident_name(&parts[parts.len() - 2])),
            column: ident_name(&parts[parts.len() - 1]),
        }),
        _ => None,
    }
}

/// Splits `a AND (b AND c)` into [a, b, c].
pub(crate) fn conjuncts<'e>(expr: &'e Expr, out: &mut Vec<&'e Expr>) {
    match expr {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            conjuncts(left, out);
            conjuncts(right, out);
        }
        Expr::Nested(inner) => conjuncts(inner, out),
        other => out.push(other),
    }
}

#[derive(Default)]
struct Extractor {
    tables: BTreeSet<TableUse>,
    /// Table-valued functions in FROM (their names are visited as relations too).
    functions: BTreeSet<Vec<String>>,
    ctes: BTreeSet<String>,
    equalities: Vec<Equality>,
    writes: bool,
    written: BTreeSet<TableUse>,
}

impl Extractor {
    fn predicates(&mut self, expr: &Expr) {
        let mut parts = Vec::new();
        conjuncts(expr, &mut parts);
        for part in parts {
            match part {
                Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } => {
                    let pair = match (column_ref(left), key_expr(right)) {
                        (Some(c), Some(k)) => Some((c, k)),
                        _ => column_ref(right).zip(key_expr(left)),
                    };
                    if let Some((column, value)) = pair {
                        self.equalities.push(Equality {
                            column,
                            values: vec![value],
                        });
                    }
                }
                Expr::AnyOp {
                    left,
                    compare_op: BinaryOperator::Eq,
                    right,
                    ..
                } => {
                    let Some(column) = column_ref(left) else {
                        continue;
                    };
                    let values = match strip_casts(right) {
                        Expr::Array(array) => array.elem.iter().map(key_expr).collect(),
                        other => key_expr(other).map(|k| vec![KeyExpr::Array(Box::new(k))]),
                    };
                    if let Some(values) = values {
                        self.equalities.push(Equality { column, values });
                    }
                }
                Expr::In {
                    expr,
                    target: InTarget::List(list),
                    negated: false,
                    ..
                } => {
                    if let Some(column) = column_ref(expr) {
                        let values: Option<Vec<KeyExpr>> = list.iter().map(key_expr).collect();
                        if let Some(values) = values.filter(|v| !v.is_empty()) {
                            self.equalities.push(Equality { column, values });
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn select(&mut self, select: &Select) {
        if let Some(selection) = &select.selection {
            self.predicates(selection);
        }
        for from in &select.from {
            for join in &from.joins {
                // Only inner joins: an ON condition does not restrict the
                // preserved side of an outer join.
                if let JoinOperator::Join(JoinConstraint::On(on))
                | JoinOperator::Inner(JoinConstraint::On(on)) = &join.join_operator
                {
                    self.predicates(on);
                }
            }
        }
    }
}

impl Visitor for Extractor {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(ident_name(&cte.alias.name));
            }
        }
        if !query.locks.is_empty() {
            self.writes = true;
        }
        if matches!(
            *query.body,
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
        ) {
            self.writes = true;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        self.select(select);
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        if let TableFactor::Table {
            name, alias, args, ..
        } = factor
        {
            if args.is_none() {
                self.tables
                    .insert(table_use(name, alias.as_ref().map(|a| ident_name(&a.name))));
            } else {
                self.functions.insert(object_parts(name));
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        match statement {
            Statement::Update(update) => {
                self.writes = true;
                if let TableFactor::Table { name, .. } = &update.table.relation {
                    self.written.insert(table_use(name, None));
                }
                if let Some(selection) = &update.selection {
                    self.predicates(selection);
                }
            }
            Statement::Delete(delete) => {
                self.writes = true;
                let (FromTable::WithFromKeyword(targets) | FromTable::WithoutKeyword(targets)) =
                    &delete.from;
                for target in targets {
                    if let TableFactor::Table { name, .. } = &target.relation {
                        self.written.insert(table_use(name, None));
                    }
                }
                for name in &delete.tables {
                    self.written.insert(table_use(name, None));
                }
                if let Some(selection) = &delete.selection {
                    self.predicates(selection);
                }
            }
            Statement::Insert(insert) => {
                self.writes = true;
                if let TableObject::TableName(name) = &insert.table {
                    self.written.insert(table_use(name, None));
                }
            }
            Statement::Copy {
                source: CopySource::Table { table_name, .. },
                to: false,
                ..
            } => {
                self.writes = true;
                self.written.insert(table_use(table_name, None));
            }
            Statement::Copy { .. } => self.writes = true,
            Statement::Merge(merge) => {
                self.writes = true;
                if let TableFactor::Table { name, .. } = &merge.table {
                    self.written.insert(table_use(name, None));
                }
            }
            Statement::Query(_) => {}
            _ => self.writes = true,
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        // Relations outside table factors (INSERT/DELETE targets, COPY, DDL).
        if self.functions.contains(&object_parts(relation)) {
            return ControlFlow::Continue(());
        }
        let table = table_use(relation, None);
        if !self
            .tables
            .iter()
            .any(|t| t.name == table.name && t.schema == table.schema)
        {
            self.tables.insert(table);
        }
        ControlFlow::Continue(())
    }
}

/// Extracts tables and key predicates from a parsed statement.
fn extract(statement: &Statement) -> DataStatement {
    let mut extractor = Extractor::default();
    let _ = statement.visit(&mut extractor);
    let mut insert = None;
    let mut copy = None;
    match statement {
        Statement::Insert(ins) => {
            if let TableObject::TableName(name) = &ins.table {
                let table = table_use(name, None).name;
                let columns: Vec<String> = ins
                    .columns
                    .iter()
                    .map(|c| object_parts(c).pop().unwrap_or_default())
                    .collect();
                let (rows, from_query) = match ins.source.as_deref().map(|q| q.body.as_ref()) {
                    Some(SetExpr::Values(values)) => (
                        values
                            .rows
                            .iter()
                            .map(|row| row.content.iter().map(key_expr).collect())
                            .collect(),
                        false,
                    ),
                    Some(_) => (Vec::new(), true),
                    None => (Vec::new(), false),
                };
                insert = Some(InsertRows {
                    table,
                    columns,
                    rows,
                    from_query,
                });
            }
        }
        Statement::Copy {
            source, to, target, ..
        } => {
            let table = match source {
                CopySource::Table { table_name, .. } => Some(table_use(table_name, None).name),
                CopySource::Query(_) => None,
            };
            let from_stdin = !*to && matches!(target, sqlparser::ast::CopyTarget::Stdin);
            copy = Some(CopyInfo { table, from_stdin });
        }
        _ => {}
    }
    // CTE names are not tables.
    let ctes = extractor.ctes;
    let tables: Vec<TableUse> = extractor
        .tables
        .into_iter()
        .filter(|t| !(t.schema.is_none() && ctes.contains(&t.name)))
        .collect();
    DataStatement {
        read_only: !extractor.writes,
        tables,
        equalities: extractor.equalities,
        insert,
        copy,
        written: extractor.written.into_iter().collect(),
        unparsed: None,
        words: Vec::new(),
        no_result: match statement {
            Statement::Insert(insert) => insert.returning.is_none(),
            Statement::Update(update) => update.returning.is_none(),
            Statement::Delete(delete) => delete.returning.is_none(),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests;
