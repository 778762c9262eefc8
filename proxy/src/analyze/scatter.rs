//! The scatter planner: how a read-only SELECT that the router sends to
//! several servers runs on each of them, and how the proxy turns their
//! results into the one answer a single Postgres holding all rows would give.
//! Anything that cannot be merged exactly is refused with a reason
//! ("never a wrong answer", DESIGN.md "Cross-shard statements").
//!
//! Three ways to merge: concatenate rows, k-way merge rows each server
//! sorted, or combine partial rows (partial aggregates, per-server DISTINCT)
//! with a final query run on one server. The planner works on sqlparser's
//! AST and prints it back; the client's `$n` parameters are left untouched,
//! since the proxy binds the same values on every server.

mod combine;
mod exprs;
mod from;
mod names;
#[cfg(test)]
mod refusal_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Distinct, Expr, GroupByExpr, ObjectName, ObjectNamePart, OrderByExpr, OrderByKind, OrderBySort,
    Query, Select, SelectItem, SetExpr, Statement, Value, Visit, Visitor,
};
use sqlparser::ast::{Ident, LimitClause};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

pub use combine::{COLLATED_TOKEN, ROWS_TOKEN};
use exprs::{
    contains_aggregate, generated, ident_name, outer_level_aggregate, position, volatile_function,
    walk, window_function,
};
use from::FromInfo;
use names::output_name;

/// What the planner needs to know about the tables (from the shard map).
pub trait TableInfo {
    /// `Some((key_column, group))` if `name` is a sharded table.
    fn sharded(&self, name: &str) -> Option<(&str, &str)>;
    fn is_reference(&self, name: &str) -> bool;
}

/// Why a statement cannot run on several servers. The caller sends it with
/// SQLSTATE 0A000.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    /// What the user can do instead.
    pub hint: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.hint)
    }
}

fn refuse(message: String, hint: &str) -> Refusal {
    Refusal {
        message,
        hint: hint.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScatterPlan {
    /// What every server runs. Keeps the client's `$n` parameters as they are.
    pub partial_sql: String,
    /// Number of result columns the client sees. For Concat/Sorted these are
    /// the first columns of partial_sql's result, followed by `hidden`
    /// columns the proxy strips. With `*` in the select list the count is not
    /// known here and `visible` is 0: the proxy takes the result's column
    /// count minus `hidden` (which is always right).
    pub visible: usize,
    /// Trailing columns of partial_sql's result that the client never sees
    /// (Concat/Sorted; 0 for Combine).
    pub hidden: usize,
    pub merge: Merge,
    /// Applied once by the proxy after merging; for Combine, appended to
    /// final_sql.
    pub limit: Option<Bound>,
    pub offset: Option<Bound>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    Const(u64),
    /// A 0-based index into the client's parameters.
    Param(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// Rows concatenated as they arrive from the servers (no ORDER BY).
    Concat,
    /// Each server returns its rows sorted; the proxy k-way merges. For key
    /// i, partial_sql has two hidden columns after the visible ones: at
    /// `visible + 2*i` the key value `(expr) AS _sl_k{i}`, at
    /// `visible + 2*i + 1` the name of the collation it sorts under, as
    /// `pg_collation_for` prints it (`"default"` for non-text keys), `_sl_c{i}`.
    Sorted { keys: Vec<SortKey> },
    /// Partial rows from every server are combined by running `final_sql`
    /// on one server, its FROM being `(SELECT __SL_COLLATED__ FROM (VALUES
    /// __SL_ROWS__) AS _v(c1..cN)) AS _sl(c1..cN)` with N = partial_columns.
    /// The partial query returns N more columns: each partial column's
    /// collation name (as for sort keys). Tokens for the proxy:
    /// `__SL_ROWS__`, `__SL_COLLATED__` (the columns with their collations),
    /// `__SL_TYPE_cK__` (type of partial column K), `__SL_AVG_cS_cC__`.
    Combine {
        final_sql: String,
        partial_columns: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SortKey {
    pub descending: bool,
    /// Postgres's default: true iff DESC.
    pub nulls_first: bool,
}

/// What an ORDER BY item sorts by: a select item (by position or output
/// name) or an expression over the input.
#[derive(Debug, Clone)]
enum OrderTarget {
    /// 1-based.
    Position(usize),
    Expr(Box<Expr>),
}

pub fn plan(sql: &str, tables: &dyn TableInfo) -> Result<ScatterPlan, Refusal> {
    let query = parse(sql)?;
    let ctes = check_query(&query)?;
    let SetExpr::Select(select) = query.body.as_ref() else {
        return Err(refuse(
            format!(
                "cannot run this statement on several servers: {}",
                query.body
            ),
            "Write a plain SELECT, or add the sharding key to the WHERE clause.",
        ));
    };
    check_select(select)?;
    check_subqueries(&query, &ctes, tables)?;
    let from = from::analyze(select, &ctes, tables)?;
    let (limit, offset) = bounds(&query)?;
    let order = order_targets(&query, select)?;
    for (target, _) in &order {
        if let OrderTarget::Expr(expr) = target {
            refuse_volatile(expr, "ORDER BY")?;
            if let Some(name) = window_function(expr) {
                return Err(window_refusal(Some(name)));
            }
        }
    }
    let groups = group_exprs(select, &from)?;
    for expr in &groups {
        refuse_volatile(expr, "GROUP BY")?;
    }
    let distinct =
        match &select.distinct {
            None | Some(Distinct::All) => false,
            Some(Distinct::Distinct) => true,
            Some(Distinct::On(_)) => return Err(refuse(
                "cannot run SELECT DISTINCT ON on several servers: which row of each group comes \
                 first depends on rows of all servers, and the proxy does not re-pick them"
                    .into(),
                "Use GROUP BY with aggregates, or add the sharding key to the WHERE clause.",
            )),
        };
    if distinct {
        for item in &select.projection {
            if let SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } = item {
                refuse_volatile(expr, "SELECT DISTINCT")?;
            }
        }
    }
    let level_exprs = select_level_exprs(select, &order);
    if let Some(name) = level_exprs
        .iter()
        .find_map(|e| outer_level_aggregate(e, &from.labels))
    {
        return Err(refuse(
            format!(
                "cannot run {name}() over columns of the outer statement inside a subquery on \
                 several servers: Postgres computes it over the rows of every server"
            ),
            "Move the aggregate out of the subquery.",
        ));
    }
    let aggregated = level_exprs.iter().any(|e| contains_aggregate(e));
    if select.having.is_some() && groups.is_empty() && !aggregated {
        return Err(refuse(
            "cannot run HAVING without GROUP BY or aggregates on several servers".into(),
            "Use WHERE.",
        ));
    }
    let order_refs: Vec<(OrderTarget, &OrderByExpr)> = order
        .iter()
        .map(|(target, by)| (target.clone(), *by))
        .collect();
    let per_server_groups = groups.iter().any(|g| from.is_grouping_key(g));
    // Each server's rows are final rows when there are no groups, or when
    // groups never span servers.
    let combined = if (groups.is_empty() && !aggregated) || per_server_groups {
        if !distinct {
            return rows(&query, select, &order_refs, limit, offset);
        }
        combine::distinct(&query, select, &order_refs)?
    } else if distinct {
        return Err(refuse(
            "cannot run SELECT DISTINCT over groups that span servers".into(),
            "Drop DISTINCT, or GROUP BY the sharding key.",
        ));
    } else {
        combine::aggregate(&query, select, &groups, &order_refs, &from)?
    };
    Ok(ScatterPlan {
        partial_sql: combined.partial_sql,
        visible: combined.visible,
        hidden: 0,
        merge: Merge::Combine {
            final_sql: combined.final_sql,
            partial_columns: combined.partial_columns,
        },
        limit,
        offset,
    })
}

fn parse(sql: &str) -> Result<Query, Refusal> {
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).map_err(|e| {
        refuse(
            format!("cannot plan this statement for several servers: it does not parse ({e})"),
            "Check the statement's syntax, or add the sharding key to the WHERE clause so it \
             runs on one server as it is.",
        )
    })?;
    match (statements.pop(), statements.is_empty()) {
        (Some(Statement::Query(query)), true) => Ok(*query),
        _ => Err(refuse(
            "only a single SELECT can run on several servers".into(),
            "Send one SELECT per query, or add the sharding key to the WHERE clause.",
        )),
    }
}

/// Refuses query-level clauses that cannot run on several servers; returns
/// the names of the statement's CTEs.
fn check_query(query: &Query) -> Result<BTreeSet<String>, Refusal> {
    if let SetExpr::SetOperation { op, .. } = query.body.as_ref() {
        return Err(refuse(
            format!(
                "cannot run {op} on several servers: the proxy does not combine set operations"
            ),
            "Run each SELECT separately and combine them in the application, or add the \
             sharding key to the WHERE clause.",
        ));
    }
    if !query.locks.is_empty() {
        return Err(refuse(
            "cannot lock rows (FOR UPDATE/SHARE) on several servers in one statement".into(),
            "Add the sharding key to the WHERE clause so the statement runs on one server.",
        ));
    }
    if query.fetch.is_some() {
        return Err(refuse(
            "cannot run FETCH FIRST on several servers".into(),
            "Write LIMIT n instead.",
        ));
    }
    Ok(query
        .with
        .iter()
        .flat_map(|with| &with.cte_tables)
        .map(|cte| ident_name(&cte.alias.name))
        .collect())
}

fn check_select(select: &Select) -> Result<(), Refusal> {
    if select.into.is_some() {
        return Err(refuse(
            "cannot run SELECT ... INTO on several servers: it creates a table".into(),
            "Use CREATE TABLE ... AS on one server, or INSERT ... SELECT.",
        ));
    }
    let window = select
        .projection
        .iter()
        .filter_map(|item| match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
            _ => None,
        })
        .chain(&select.having)
        .find_map(window_function);
    if window.is_some() || !select.named_window.is_empty() {
        return Err(window_refusal(window));
    }
    Ok(())
}

fn window_refusal(function: Option<String>) -> Refusal {
    refuse(
        format!(
            "cannot run window functions ({}OVER) across servers: a window sees rows of every \
             server",
            function.map_or(String::new(), |name| format!("{name}() "))
        ),
        "Compute the window in the application, or add the sharding key to the WHERE clause.",
    )
}

/// Subqueries and CTEs may read reference tables only: a sharded table in
/// them would be read partly on each server.
fn check_subqueries(
    query: &Query,
    ctes: &BTreeSet<String>,
    tables: &dyn TableInfo,
) -> Result<(), Refusal> {
    struct Nested<'a> {
        depth: usize,
        ctes: &'a BTreeSet<String>,
        tables: &'a dyn TableInfo,
    }
    impl Visitor for Nested<'_> {
        type Break = String;
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<String> {
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<String> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<String> {
            let Some(ObjectNamePart::Identifier(last)) = relation.0.last() else {
                return ControlFlow::Continue(());
            };
            let name = ident_name(last);
            let plain = relation.0.len() == 1 && !self.ctes.contains(&name);
            if self.depth > 1 && plain && self.tables.sharded(&name).is_some() {
                return ControlFlow::Break(name);
            }
            ControlFlow::Continue(())
        }
    }
    let mut nested = Nested {
        depth: 0,
        ctes,
        tables,
    };
    match query.visit(&mut nested) {
        ControlFlow::Break(table) => Err(refuse(
            format!(
                "cannot run a subquery or CTE that reads sharded table \"{table}\" on several \
                 servers: each server would see only its own rows of it"
            ),
            "Join the table in the main FROM clause on its sharding key, run the subquery as a \
             separate statement, or add the sharding key to the WHERE clause.",
        )),
        ControlFlow::Continue(()) => Ok(()),
    }
}

fn refuse_volatile(expr: &Expr, clause: &str) -> Result<(), Refusal> {
    match volatile_function(expr) {
        Some(name) => Err(refuse(
            format!(
                "cannot use {name}() in {clause} on several servers: its value differs per call \
                 or per server, so the servers' results cannot be merged into one answer"
            ),
            "Compute it in the application, or add the sharding key to the WHERE clause.",
        )),
        None => Ok(()),
    }
}

/// Expressions evaluated per group or per output row: select items,
/// HAVING, ORDER BY.
fn select_level_exprs<'a>(
    select: &'a Select,
    order: &'a [(OrderTarget, &'a OrderByExpr)],
) -> Vec<&'a Expr> {
    select
        .projection
        .iter()
        .filter_map(|item| match item {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
            _ => None,
        })
        .chain(&select.having)
        .chain(order.iter().filter_map(|(target, _)| match target {
            OrderTarget::Expr(e) => Some(&**e),
            OrderTarget::Position(_) => None,
        }))
        .collect()
}

fn bound(expr: &Expr, clause: &str) -> Result<Option<Bound>, Refusal> {
    let not_constant = || {
        refuse(
            format!("cannot run {clause} {expr} on several servers: the proxy applies {clause} itself and needs a constant or a parameter"),
            &format!("Write {clause} as an integer or a $n parameter."),
        )
    };
    match expr {
        Expr::Nested(inner) | Expr::Cast { expr: inner, .. } => bound(inner, clause),
        Expr::Value(v) => match &v.value {
            Value::Null => Ok(None),
            Value::Number(text, _) => text
                .parse()
                .map(|n| Some(Bound::Const(n)))
                .map_err(|_| not_constant()),
            Value::Placeholder(p) => {
                match p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) if n >= 1 => Ok(Some(Bound::Param(n - 1))),
                    _ => Err(not_constant()),
                }
            }
            _ => Err(not_constant()),
        },
        _ => Err(not_constant()),
    }
}

fn bounds(query: &Query) -> Result<(Option<Bound>, Option<Bound>), Refusal> {
    match &query.limit_clause {
        None => Ok((None, None)),
        Some(LimitClause::LimitOffset {
            limit,
            offset,
            limit_by,
        }) if limit_by.is_empty() => Ok((
            limit
                .as_ref()
                .map(|l| bound(l, "LIMIT"))
                .transpose()?
                .flatten(),
            offset
                .as_ref()
                .map(|o| bound(&o.value, "OFFSET"))
                .transpose()?
                .flatten(),
        )),
        Some(other) => Err(refuse(
            format!("cannot run{other} on several servers"),
            "Write LIMIT n OFFSET m.",
        )),
    }
}

/// The LIMIT every server gets: enough rows for the proxy's LIMIT after
/// skipping OFFSET rows.
fn pushed_limit(limit: Option<Bound>, offset: Option<Bound>) -> Result<Option<Expr>, Refusal> {
    let term = |b: Bound| match b {
        Bound::Const(n) => n.to_string(),
        // LIMIT gives its parameters type int8; the sum must keep that.
        Bound::Param(i) => format!("CAST(${} AS int8)", i + 1),
    };
    let text = match (limit, offset) {
        (None, _) => return Ok(None),
        (Some(Bound::Const(l)), None) => l.to_string(),
        (Some(Bound::Const(l)), Some(Bound::Const(o))) => match l.checked_add(o) {
            Some(sum) if i64::try_from(sum).is_ok() => sum.to_string(),
            // More rows than any table holds: no limit.
            _ => return Ok(None),
        },
        (Some(l), None) => term(l),
        (Some(l), Some(o)) => format!("{} + {}", term(l), term(o)),
    };
    generated(&text).map(Some)
}

fn order_targets<'q>(
    query: &'q Query,
    select: &Select,
) -> Result<Vec<(OrderTarget, &'q OrderByExpr)>, Refusal> {
    let Some(order_by) = &query.order_by else {
        return Ok(Vec::new());
    };
    let OrderByKind::Expressions(items) = &order_by.kind else {
        return Err(refuse(
            "cannot run ORDER BY ALL on several servers".into(),
            "List the sort expressions.",
        ));
    };
    items
        .iter()
        .map(|item| {
            if let Some(OrderBySort::Using(op)) = &item.options.sort {
                return Err(refuse(
                    format!("cannot merge rows sorted with ORDER BY ... USING {op}: the proxy compares with ASC/DESC only"),
                    "Use ASC or DESC.",
                ));
            }
            if item.with_fill.is_some() {
                return Err(refuse("cannot run ORDER BY ... WITH FILL".into(), "Remove WITH FILL."));
            }
            Ok((select_item_target(&item.expr, select, "ORDER BY")?, item))
        })
        .collect()
}

/// Resolves a position or output-column name to a select item, as Postgres
/// does for ORDER BY (GROUP BY resolves names differently: `group_exprs`).
fn select_item_target(expr: &Expr, select: &Select, clause: &str) -> Result<OrderTarget, Refusal> {
    if let Some(at) = position(expr) {
        let at = at.ok().filter(|&n| n >= 1);
        let before = at.map_or(0, |n| n.min(select.projection.len()));
        if select.projection[..before]
            .iter()
            .any(|i| output_name(i).is_none())
        {
            return Err(refuse(
                format!("cannot resolve {clause} {expr} with * in the select list: the proxy does not know the columns * stands for"),
                "Name the columns in the select list, or write the expression instead of its position.",
            ));
        }
        let Some(at) = at.filter(|&n| n <= select.projection.len()) else {
            return Err(refuse(
                format!("{clause} position {expr} is not in the select list"),
                "Use a position between 1 and the number of select items.",
            ));
        };
        return Ok(OrderTarget::Position(at));
    }
    if let Expr::Identifier(ident) = expr {
        let name = ident_name(ident);
        let matching: Vec<usize> = (0..select.projection.len())
            .filter(|&i| output_name(&select.projection[i]).as_deref() == Some(name.as_str()))
            .collect();
        if let Some(&first) = matching.first() {
            let first_expr = item_expr(&select.projection[first]);
            if matching
                .iter()
                .any(|&i| item_expr(&select.projection[i]) != first_expr)
            {
                return Err(refuse(
                    format!("{clause} \"{name}\" is ambiguous"),
                    "Use a position or a distinct alias.",
                ));
            }
            return Ok(OrderTarget::Position(first + 1));
        }
    }
    Ok(OrderTarget::Expr(Box::new(expr.clone())))
}

fn item_expr(item: &SelectItem) -> Option<&Expr> {
    match item {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => Some(e),
        _ => None,
    }
}

/// The expression a resolved target sorts by.
fn target_expr<'a>(target: &'a OrderTarget, select: &'a Select) -> Option<&'a Expr> {
    match target {
        OrderTarget::Position(at) => select.projection.get(at - 1).and_then(item_expr),
        OrderTarget::Expr(expr) => Some(&**expr),
    }
}

/// GROUP BY items as expressions. A bare name is an input column if one by
/// that name is known to exist (a sharding key, or a name the select list
/// reads), else a select item's output name, as Postgres resolves it.
fn group_exprs(select: &Select, from: &FromInfo) -> Result<Vec<Expr>, Refusal> {
    let items = match &select.group_by {
        GroupByExpr::Expressions(items, modifiers) if modifiers.is_empty() => items,
        other => {
            return Err(refuse(
                format!("cannot run {other} on several servers"),
                "List the grouping expressions.",
            ))
        }
    };
    let keys = from.key_names();
    let read_columns: BTreeSet<String> = select
        .projection
        .iter()
        .filter_map(item_expr)
        .chain(&select.selection)
        .flat_map(|e| {
            let mut names = Vec::new();
            let _ = walk(e, |inner| {
                if let Expr::Identifier(ident) = inner {
                    names.push(ident_name(ident));
                }
                ControlFlow::<()>::Continue(())
            });
            names
        })
        .collect();
    let mut out = Vec::new();
    for item in items {
        if matches!(
            item,
            Expr::GroupingSets(_) | Expr::Cube(_) | Expr::Rollup(_)
        ) {
            return Err(refuse(
                format!("cannot run GROUP BY {item} on several servers"),
                "Run one GROUP BY per grouping set.",
            ));
        }
        let input_column = match item {
            Expr::Identifier(ident) => {
                let name = ident_name(ident);
                keys.contains(name.as_str()) || read_columns.contains(&name)
            }
            _ => false,
        };
        if input_column || !matches!(item, Expr::Identifier(_) | Expr::Value(_)) {
            out.push(item.clone());
            continue;
        }
        match select_item_target(item, select, "GROUP BY")? {
            OrderTarget::Position(at) => {
                out.extend(select.projection.get(at - 1).and_then(item_expr).cloned())
            }
            OrderTarget::Expr(expr) => out.push(*expr),
        }
    }
    Ok(out)
}

/// Concat or Sorted: the servers' rows are final rows.
fn rows(
    query: &Query,
    select: &Select,
    order: &[(OrderTarget, &OrderByExpr)],
    limit: Option<Bound>,
    offset: Option<Bound>,
) -> Result<ScatterPlan, Refusal> {
    let mut partial = query.clone();
    partial.limit_clause = pushed_limit(limit, offset)?.map(|limit| LimitClause::LimitOffset {
        limit: Some(limit),
        offset: None,
        limit_by: Vec::new(),
    });
    let mut partial_select = select.clone();
    let mut keys = Vec::new();
    for (i, (target, by)) in order.iter().enumerate() {
        let Some(expr) = target_expr(target, select) else {
            return Err(refuse(
                format!("cannot resolve ORDER BY {}", by.expr),
                "Write the sort expression instead of a position.",
            ));
        };
        refuse_volatile(expr, "ORDER BY")?;
        let nested = Expr::Nested(Box::new(expr.clone()));
        partial_select.projection.push(SelectItem::ExprWithAlias {
            expr: nested.clone(),
            alias: Ident::new(format!("_sl_k{i}")),
        });
        partial_select.projection.push(SelectItem::ExprWithAlias {
            // The collation is fixed when the statement is parsed, so a
            // never-evaluated argument carries it (and the cast to text
            // makes it valid for any key type). In a sub-SELECT: once the
            // CASE is folded away it references no row, so Postgres runs it
            // once as an InitPlan — as a plain column, it ran for every row
            // fed to the sort (5x the time of a top-100 over 10M rows).
            expr: generated(&format!(
                "(SELECT pg_collation_for(CASE WHEN false THEN ({nested})::text END))"
            ))?,
            alias: Ident::new(format!("_sl_c{i}")),
        });
        let descending = matches!(by.options.sort, Some(OrderBySort::Desc));
        keys.push(SortKey {
            descending,
            nulls_first: by.options.nulls_first.unwrap_or(descending),
        });
    }
    *partial.body = SetExpr::Select(Box::new(partial_select));
    let known = select.projection.iter().all(|i| output_name(i).is_some());
    Ok(ScatterPlan {
        partial_sql: partial.to_string(),
        visible: if known { select.projection.len() } else { 0 },
        hidden: 2 * keys.len(),
        merge: if keys.is_empty() {
            Merge::Concat
        } else {
            Merge::Sorted { keys }
        },
        limit,
        offset,
    })
}
