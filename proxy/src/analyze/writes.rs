//! The text side of writes that reach several servers: a multi-row
//! `INSERT ... VALUES` split by the owner of each row's key, and `UPDATE` /
//! `DELETE` run on every server that may hold matching rows. This module
//! knows no map (tables come through [`TableInfo`]); `route::writes` picks
//! the servers.
//!
//! An INSERT is split by cutting its text, not by printing sqlparser's AST:
//! every server's statement is the client's text with only that server's
//! VALUES rows, so the column list, `ON CONFLICT` and `RETURNING` reach
//! Postgres byte for byte as written. Row boundaries and `$n` positions come
//! from sqlparser's own tokens (the same tokens the statement is parsed
//! from), so strings, comments and dollar quotes cannot fool the cut.
//!
//! Refused here, with the reason: shapes whose rows cannot be sent to
//! their owners (`INSERT ... SELECT`, `DEFAULT VALUES`, `VALUES ... LIMIT`),
//! updates of the sharding key (the row would have to move to another
//! server), joins with tables that are neither reference tables nor
//! co-located and joined on the key, and subqueries reading sharded or
//! unsharded tables (each server would see only its own rows of them).

mod joins;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::ops::{ControlFlow, Range};

use sqlparser::ast::{
    AssignmentTarget, FromTable, ObjectName, OnConflictAction, OnInsert, Query, SetExpr, Statement,
    TableFactor, TableObject, TableWithJoins, UpdateTableFromKind, Visit, Visitor,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

use super::statement::{ident_name, object_parts};
use joins::check_joined;

pub use super::scatter::{Refusal, TableInfo};

/// Which write it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Insert,
    Update,
    Delete,
}

impl WriteKind {
    /// The CommandComplete tag one Postgres would send for `rows` rows
    /// (the sum of the servers' counts).
    pub fn command_tag(self, rows: u64) -> String {
        match self {
            WriteKind::Insert => format!("INSERT 0 {rows}"),
            WriteKind::Update => format!("UPDATE {rows}"),
            WriteKind::Delete => format!("DELETE {rows}"),
        }
    }

    fn verb(self) -> &'static str {
        match self {
            WriteKind::Insert => "INSERT",
            WriteKind::Update => "UPDATE",
            WriteKind::Delete => "DELETE",
        }
    }
}

/// What the planner needs from a write's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteText {
    pub kind: WriteKind,
    /// The table written (a sharded table).
    pub table: String,
    /// Rows come back (`RETURNING`).
    pub returning: bool,
    /// `ON CONFLICT DO NOTHING`, or `DO UPDATE ... WHERE`: a VALUES row may
    /// write, and return, nothing.
    pub may_skip_rows: bool,
    /// INSERT: where each VALUES row lies in the text, parentheses included.
    pub rows: Vec<Range<usize>>,
    /// Every `$n` of the statement: where it lies, and n - 1.
    pub params: Vec<(Range<usize>, usize)>,
}

impl WriteText {
    /// The INSERT with only the VALUES rows `keep` (indexes into `rows`,
    /// ascending), everything around them as written, and its parameters
    /// renumbered `$1..$m` in the order of their original numbers. Returns
    /// the text and, for each new parameter, the 0-based index of the
    /// client's parameter it stands for.
    ///
    /// Why renumber: Postgres must know the type of every `$k` below the
    /// highest one used, and a server's statement no longer mentions the
    /// parameters of other servers' rows. Keeping the relative order makes
    /// the mapping monotonic, so a Bind is built by picking values.
    pub fn render(&self, sql: &str, keep: &[usize]) -> (String, Vec<usize>) {
        let mut pieces: Vec<Range<usize>> = Vec::with_capacity(keep.len() + 2);
        match (self.rows.first(), self.rows.last()) {
            (Some(first), Some(last)) => {
                pieces.push(0..first.start);
                pieces.extend(keep.iter().filter_map(|&i| self.rows.get(i).cloned()));
                pieces.push(last.end..sql.len());
            }
            _ => pieces.push(0..sql.len()),
        }
        // Parameters are in text order, and so are the pieces.
        let within = |piece: &Range<usize>| {
            let from = self.params.partition_point(|(s, _)| s.start < piece.start);
            let to = self.params.partition_point(|(s, _)| s.start < piece.end);
            &self.params[from..to.max(from)]
        };
        let used: BTreeSet<usize> = pieces
            .iter()
            .flat_map(|piece| within(piece).iter().map(|(_, n)| *n))
            .collect();
        let order: Vec<usize> = used.into_iter().collect();
        let mut out = String::with_capacity(sql.len());
        let last_piece = pieces.len().saturating_sub(1);
        for (p, piece) in pieces.iter().enumerate() {
            // Rows are separated by ", " (comments between rows are dropped).
            if p > 1 && p < last_piece {
                out.push_str(", ");
            }
            let mut copied = piece.start;
            for (span, n) in within(piece) {
                out.push_str(sql.get(copied..span.start).unwrap_or_default());
                let renumbered = order.binary_search(n).unwrap_or(0) + 1;
                out.push('$');
                out.push_str(&renumbered.to_string());
                copied = span.end;
            }
            out.push_str(sql.get(copied..piece.end).unwrap_or_default());
        }
        (out, order)
    }
}

fn refuse(message: String, hint: &str) -> Refusal {
    Refusal {
        message,
        hint: hint.to_string(),
    }
}

/// Analyses an INSERT, UPDATE or DELETE of a sharded table that is to run
/// on several servers.
pub fn analyze_write(sql: &str, tables: &dyn TableInfo) -> Result<WriteText, Refusal> {
    let dialect = PostgreSqlDialect {};
    let cannot_parse = |e: &dyn std::fmt::Display| {
        refuse(
            format!("shardline cannot analyse this write to run it on several servers: {e}"),
            "rewrite it in a simpler form, or send one statement per server's keys",
        )
    };
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| cannot_parse(&e))?;
    let mut offsets = Offsets::new(sql);
    let mut params = Vec::new();
    for token in &tokens {
        if let Token::Placeholder(text) = &token.token {
            if let Some(n) = text.strip_prefix('$').and_then(|d| d.parse::<usize>().ok()) {
                let span = offsets.span(token);
                // `$0` means nothing to Postgres either: it rejects it.
                params.push((span, n.saturating_sub(1)));
            }
        }
    }
    let mut statements = Parser::new(&dialect)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .map_err(|e| cannot_parse(&e))?;
    if statements.len() != 1 {
        return Err(cannot_parse(&format!(
            "expected one statement, found {}",
            statements.len()
        )));
    }
    let statement = statements.remove(0);
    let mut text = match &statement {
        Statement::Insert(insert) => insert_text(insert, tables, &mut offsets)?,
        Statement::Update(update) => update_text(update, tables)?,
        Statement::Delete(delete) => delete_text(delete, tables)?,
        other => {
            return Err(refuse(
                format!(
                    "only INSERT, UPDATE and DELETE can write on several servers, not {}",
                    other
                        .to_string()
                        .split_whitespace()
                        .next()
                        .unwrap_or("this statement")
                ),
                "send the statement to each server directly",
            ))
        }
    };
    check_nested(&statement, tables)?;
    text.params = params;
    Ok(text)
}

fn insert_text(
    insert: &sqlparser::ast::Insert,
    tables: &dyn TableInfo,
    offsets: &mut Offsets<'_>,
) -> Result<WriteText, Refusal> {
    let TableObject::TableName(name) = &insert.table else {
        return Err(refuse(
            "INSERT INTO a table function cannot run on several servers".into(),
            "insert into the table by name",
        ));
    };
    let table = sharded_target(name, tables, WriteKind::Insert)?;
    let mysql_forms = insert.or.is_some()
        || insert.ignore
        || insert.replace_into
        || insert.overwrite
        || insert.partitioned.is_some()
        || !insert.assignments.is_empty()
        || matches!(insert.on, Some(OnInsert::DuplicateKeyUpdate(_)));
    if mysql_forms {
        return Err(refuse(
            format!("this form of INSERT into \"{table}\" is not PostgreSQL syntax"),
            "use INSERT INTO t (columns) VALUES (...), (...) [ON CONFLICT ...] [RETURNING ...]",
        ));
    }
    let Some(source) = &insert.source else {
        return Err(refuse(
            format!("INSERT ... DEFAULT VALUES into sharded table \"{table}\" gives no key to route the row by"),
            "insert with VALUES and a value for the sharding key",
        ));
    };
    let plain_query = source.with.is_none()
        && source.order_by.is_none()
        && source.limit_clause.is_none()
        && source.fetch.is_none()
        && source.locks.is_empty();
    let values = match source.body.as_ref() {
        SetExpr::Values(values) if plain_query && !values.explicit_row && !values.value_keyword => {
            values
        }
        SetExpr::Values(_) => {
            return Err(refuse(
                format!("INSERT into sharded table \"{table}\" with VALUES under WITH, ORDER BY, LIMIT or ROW cannot be split by server"),
                "send plain VALUES rows",
            ))
        }
        _ => {
            return Err(refuse(
                format!("INSERT ... SELECT into sharded table \"{table}\" cannot be split by server: the proxy does not know the rows' keys"),
                "insert with VALUES and the key as a literal or parameter, or run the INSERT ... SELECT on each server",
            ))
        }
    };
    let mut rows = Vec::with_capacity(values.rows.len());
    for row in &values.rows {
        let start = offsets.at(row.opening_token.0.span.start);
        let end = offsets.at(row.closing_token.0.span.end);
        match (start, end) {
            (Some(start), Some(end)) if start < end => rows.push(start..end),
            _ => {
                return Err(refuse(
                    "cannot find the VALUES rows in the statement's text".into(),
                    "send the rows in plain VALUES (...), (...) form",
                ))
            }
        }
    }
    let may_skip_rows = match &insert.on {
        Some(OnInsert::OnConflict(conflict)) => match &conflict.action {
            OnConflictAction::DoNothing => true,
            OnConflictAction::DoUpdate(update) => update.selection.is_some(),
        },
        _ => false,
    };
    Ok(WriteText {
        kind: WriteKind::Insert,
        table,
        returning: insert.returning.is_some(),
        may_skip_rows,
        rows,
        params: Vec::new(),
    })
}

fn update_text(
    update: &sqlparser::ast::Update,
    tables: &dyn TableInfo,
) -> Result<WriteText, Refusal> {
    if update.or.is_some() || update.limit.is_some() || !update.order_by.is_empty() {
        return Err(refuse(
            "UPDATE with OR, ORDER BY or LIMIT is not PostgreSQL syntax".into(),
            "write UPDATE t SET ... [FROM ...] WHERE ...",
        ));
    }
    let (table, label) = single_target(&update.table, tables, WriteKind::Update)?;
    let key = tables
        .sharded(&table)
        .map(|(k, _)| k.to_string())
        .unwrap_or_default();
    for assignment in &update.assignments {
        let columns: Vec<&ObjectName> = match &assignment.target {
            AssignmentTarget::ColumnName(c) => vec![c],
            AssignmentTarget::Tuple(cs) => cs.iter().collect(),
        };
        if columns
            .iter()
            .any(|c| object_parts(c).first().is_some_and(|first| *first == key))
        {
            return Err(refuse(
                format!(
                    "cannot update the sharding key \"{key}\" of \"{table}\" in a statement that runs on several servers: a row would have to move to another partition, possibly on another server"
                ),
                "DELETE the row and INSERT it again with its new key (in one transaction)",
            ));
        }
    }
    let from = match &update.from {
        Some(UpdateTableFromKind::BeforeSet(from) | UpdateTableFromKind::AfterSet(from)) => {
            from.as_slice()
        }
        None => &[],
    };
    check_joined(
        &table,
        &label,
        from,
        update.selection.as_ref(),
        tables,
        WriteKind::Update,
    )?;
    Ok(WriteText {
        kind: WriteKind::Update,
        table,
        returning: update.returning.is_some(),
        may_skip_rows: false,
        rows: Vec::new(),
        params: Vec::new(),
    })
}

fn delete_text(
    delete: &sqlparser::ast::Delete,
    tables: &dyn TableInfo,
) -> Result<WriteText, Refusal> {
    let targets = match &delete.from {
        FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
    };
    let [target] = targets.as_slice() else {
        return Err(refuse(
            "DELETE from several tables is not PostgreSQL syntax".into(),
            "write DELETE FROM t [USING ...] WHERE ...",
        ));
    };
    if !delete.tables.is_empty() || delete.limit.is_some() || !delete.order_by.is_empty() {
        return Err(refuse(
            "DELETE with ORDER BY, LIMIT or several tables is not PostgreSQL syntax".into(),
            "write DELETE FROM t [USING ...] WHERE ...",
        ));
    }
    let (table, label) = single_target(target, tables, WriteKind::Delete)?;
    let using = delete.using.as_deref().unwrap_or(&[]);
    check_joined(
        &table,
        &label,
        using,
        delete.selection.as_ref(),
        tables,
        WriteKind::Delete,
    )?;
    Ok(WriteText {
        kind: WriteKind::Delete,
        table,
        returning: delete.returning.is_some(),
        may_skip_rows: false,
        rows: Vec::new(),
        params: Vec::new(),
    })
}

/// The table of `UPDATE t` / `DELETE FROM t` and the name its columns are
/// qualified with (its alias, or its name).
fn single_target(
    item: &TableWithJoins,
    tables: &dyn TableInfo,
    kind: WriteKind,
) -> Result<(String, String), Refusal> {
    let TableFactor::Table {
        name,
        alias,
        args: None,
        ..
    } = &item.relation
    else {
        return Err(refuse(
            format!(
                "{} of this kind of table cannot run on several servers",
                kind.verb()
            ),
            "name the sharded table directly",
        ));
    };
    if !item.joins.is_empty() {
        return Err(refuse(
            format!("{} of a join is not PostgreSQL syntax", kind.verb()),
            "put the other tables in FROM (UPDATE) or USING (DELETE)",
        ));
    }
    let table = sharded_target(name, tables, kind)?;
    let label = alias
        .as_ref()
        .map_or_else(|| table.clone(), |a| ident_name(&a.name));
    Ok((table, label))
}

fn sharded_target(
    name: &ObjectName,
    tables: &dyn TableInfo,
    kind: WriteKind,
) -> Result<String, Refusal> {
    let (schema, table) = table_name(name);
    if schema.is_none() && tables.sharded(&table).is_some() {
        return Ok(table);
    }
    let what = if schema.is_none() && tables.is_reference(&table) {
        "a reference table: writes to it must reach every server, which is not supported yet"
    } else {
        "not a sharded table, so its rows are not split by server"
    };
    Err(refuse(
        format!(
            "{} of \"{table}\" cannot run on several servers: it is {what}",
            kind.verb()
        ),
        "run the statement on the server that holds the table",
    ))
}

/// Subqueries (in WHERE, SET, VALUES, RETURNING, ON CONFLICT, FROM) may
/// read reference tables and catalogs only: a server holds only its own
/// rows of a sharded table, and an unsharded table lives on one server.
fn check_nested(statement: &Statement, tables: &dyn TableInfo) -> Result<(), Refusal> {
    struct Nested<'a> {
        depth: usize,
        ctes: BTreeSet<String>,
        functions: BTreeSet<Vec<String>>,
        tables: &'a dyn TableInfo,
    }
    impl Visitor for Nested<'_> {
        type Break = (String, bool);
        fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<Self::Break> {
            self.depth += 1;
            if let Some(with) = &query.with {
                self.ctes
                    .extend(with.cte_tables.iter().map(|c| ident_name(&c.alias.name)));
            }
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<Self::Break> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<Self::Break> {
            if let TableFactor::Table {
                name,
                args: Some(_),
                ..
            } = factor
            {
                self.functions.insert(object_parts(name));
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<Self::Break> {
            if self.depth == 0 || self.functions.contains(&object_parts(relation)) {
                return ControlFlow::Continue(());
            }
            let (schema, table) = table_name(relation);
            let fine = is_catalog(schema.as_deref(), &table)
                || (schema.is_none()
                    && (self.ctes.contains(&table) || self.tables.is_reference(&table)));
            if fine {
                return ControlFlow::Continue(());
            }
            let sharded = schema.is_none() && self.tables.sharded(&table).is_some();
            ControlFlow::Break((table, sharded))
        }
    }
    let mut nested = Nested {
        depth: 0,
        ctes: BTreeSet::new(),
        functions: BTreeSet::new(),
        tables,
    };
    match statement.visit(&mut nested) {
        ControlFlow::Break((table, true)) => Err(refuse(
            format!("a subquery of a write on several servers reads sharded table \"{table}\": each server would see only its own rows of it"),
            "read that table in a statement of its own and pass the values, or join it in FROM/USING on the sharding key",
        )),
        ControlFlow::Break((table, false)) => Err(refuse(
            format!("a subquery of a write on several servers reads \"{table}\", which is not on every server"),
            "read that table in a statement of its own and pass the values",
        )),
        ControlFlow::Continue(()) => Ok(()),
    }
}

fn is_catalog(schema: Option<&str>, table: &str) -> bool {
    matches!(schema, Some("pg_catalog" | "information_schema"))
        || (schema.is_none() && table.starts_with("pg_"))
}

/// (schema unless `public`, table).
fn table_name(name: &ObjectName) -> (Option<String>, String) {
    let mut parts = object_parts(name);
    let table = parts.pop().unwrap_or_default();
    (parts.pop().filter(|s| s != "public"), table)
}

/// Byte offsets of sqlparser's locations (1-based line and column, columns
/// counted in characters). Asked in increasing order it walks the text
/// once; asked backwards it starts over.
struct Offsets<'s> {
    sql: &'s str,
    line: u64,
    column: u64,
    byte: usize,
}

impl<'s> Offsets<'s> {
    fn new(sql: &'s str) -> Offsets<'s> {
        Offsets {
            sql,
            line: 1,
            column: 1,
            byte: 0,
        }
    }

    fn at(&mut self, location: Location) -> Option<usize> {
        if (location.line, location.column) < (self.line, self.column) {
            *self = Offsets::new(self.sql);
        }
        while (self.line, self.column) < (location.line, location.column) {
            let c = self.sql[self.byte..].chars().next()?;
            if c == '\n' {
                self.line += 1;
                self.column = 1;
            } else {
                self.column += 1;
            }
            self.byte += c.len_utf8();
        }
        ((self.line, self.column) == (location.line, location.column)).then_some(self.byte)
    }

    fn span(&mut self, token: &TokenWithSpan) -> Range<usize> {
        let start = self.at(token.span.start).unwrap_or(self.sql.len());
        let end = self.at(token.span.end).unwrap_or(self.sql.len());
        start..end.max(start)
    }
}
