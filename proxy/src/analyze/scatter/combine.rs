//! Plans whose rows from the servers are combined by one more query
//! (`Merge::Combine`): aggregates whose groups span servers, and DISTINCT.
//! Every server runs a partial query; the proxy feeds all partial rows to
//! `final_sql` as `(VALUES ...) AS _sl(c1, ..., cN)` on one server.

use std::ops::ControlFlow;

use sqlparser::ast::{
    DuplicateTreatment, Expr, Function, FunctionArgumentClause, FunctionArguments, GroupByExpr,
    Ident, ObjectName, OrderByExpr, Query, Select, SelectItem, SetExpr, VisitMut, VisitorMut,
};

use super::exprs::{
    contains_aggregate, function_name, generated, is_aggregate, mentions_column, normalized,
    volatile_function,
};
use super::from::FromInfo;
use super::names::output_name;
use super::{refuse, OrderTarget, Refusal};

/// The token the proxy replaces with the gathered partial rows.
pub const ROWS_TOKEN: &str = "__SL_ROWS__";
/// The token the proxy replaces with the partial columns under the
/// collations the servers reported for them (`c1, c2 COLLATE "x", ...`).
pub const COLLATED_TOKEN: &str = "__SL_COLLATED__";

pub(super) struct Combined {
    pub partial_sql: String,
    pub final_sql: String,
    pub partial_columns: usize,
    pub visible: usize,
}

/// What the final query needs from a partial column.
#[derive(PartialEq)]
enum Role {
    /// Grouped by in the final query (group expressions, and expressions
    /// of them that the select list computes on the servers).
    Grouping,
    Aggregate,
}

#[derive(Default)]
struct Partials {
    /// As written in the partial query, with the normalized form they are
    /// matched by.
    columns: Vec<(Expr, Expr, Role)>,
}

impl Partials {
    /// The 1-based column number of `expr`, adding it if new.
    fn column(&mut self, expr: &Expr, role: Role) -> usize {
        let key = normalized(expr);
        if let Some(at) = self.columns.iter().position(|(_, k, _)| *k == key) {
            return at + 1;
        }
        self.columns.push((expr.clone(), key, role));
        self.columns.len()
    }

    fn grouping_column(&self, expr: &Expr) -> Option<usize> {
        let key = normalized(expr);
        self.columns
            .iter()
            .position(|(_, k, role)| *role == Role::Grouping && *k == key)
            .map(|at| at + 1)
    }
}

fn column(n: usize) -> Expr {
    Expr::Identifier(Ident::new(format!("c{n}")))
}

/// The user's select items, refusing `*` (its columns are not known here).
fn select_exprs(select: &Select) -> Result<Vec<&Expr>, Refusal> {
    select
        .projection
        .iter()
        .map(|item| match item {
            SelectItem::UnnamedExpr(expr) | SelectItem::ExprWithAlias { expr, .. } => Ok(expr),
            _ => Err(refuse(
                format!("cannot combine the results of `{item}` from several servers: the columns of * are not known to the proxy"),
                "Name the columns in the select list.",
            )),
        })
        .collect()
}

fn final_select_list(select: &Select, exprs: Vec<Expr>) -> String {
    select
        .projection
        .iter()
        .zip(exprs)
        .map(|(item, expr)| {
            let name = output_name(item).unwrap_or_default();
            let alias = Ident::with_quote('"', name);
            format!("{expr} AS {alias}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The final query's FROM: the gathered rows, each text column under the
/// collation it had on the servers (parameters would take the default).
fn values_source(columns: usize) -> String {
    let names: Vec<String> = (1..=columns).map(|n| format!("c{n}")).collect();
    let names = names.join(", ");
    format!("(SELECT {COLLATED_TOKEN} FROM (VALUES {ROWS_TOKEN}) AS _v({names})) AS _sl({names})")
}

/// After the partial columns, one more per column: the name of its
/// collation. The collation is fixed when the statement is parsed, so a
/// never-evaluated argument carries it and costs nothing per row.
fn collation_probes(exprs: &[Expr]) -> Result<Vec<SelectItem>, Refusal> {
    exprs
        .iter()
        .map(|expr| {
            let nested = Expr::Nested(Box::new(expr.clone()));
            generated(&format!(
                "pg_collation_for(CASE WHEN false THEN ({nested})::text END)"
            ))
            .map(SelectItem::UnnamedExpr)
        })
        .collect()
}

fn order_clause(items: Vec<String>) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(" ORDER BY {}", items.join(", "))
    }
}

/// ` DESC NULLS FIRST` and the like, as written (USING is refused earlier).
fn direction(order: &OrderByExpr) -> String {
    order.options.to_string()
}

fn partial_query(query: &Query, select: Select) -> String {
    let mut partial = query.clone();
    *partial.body = SetExpr::Select(Box::new(select));
    partial.order_by = None;
    partial.limit_clause = None;
    partial.to_string()
}

/// `SELECT DISTINCT` (or a DISTINCT over groups that never span servers):
/// each server de-duplicates its rows, the final query de-duplicates again.
pub(super) fn distinct(
    query: &Query,
    select: &Select,
    order: &[(OrderTarget, &OrderByExpr)],
) -> Result<Combined, Refusal> {
    let exprs = select_exprs(select)?;
    let visible = exprs.len();
    let mut order_items = Vec::new();
    for (target, order_by) in order {
        let at = match target {
            OrderTarget::Position(at) => Some(*at),
            OrderTarget::Expr(expr) => {
                let key = normalized(expr);
                exprs
                    .iter()
                    .position(|e| normalized(e) == key)
                    .map(|i| i + 1)
            }
        };
        let Some(at) = at else {
            return Err(refuse(
                format!(
                    "for SELECT DISTINCT, ORDER BY expressions must appear in the select list: {}",
                    order_by.expr
                ),
                "Add the expression to the select list.",
            ));
        };
        order_items.push(format!("{at}{}", direction(order_by)));
    }
    // As written: GROUP BY may name the select items' aliases.
    let mut partial = select.clone();
    let probes = collation_probes(&exprs.iter().map(|e| (*e).clone()).collect::<Vec<_>>())?;
    partial.projection.extend(probes);
    let final_sql = format!(
        "SELECT DISTINCT {} FROM {}{}",
        final_select_list(select, (1..=visible).map(column).collect()),
        values_source(visible),
        order_clause(order_items)
    );
    Ok(Combined {
        partial_sql: partial_query(query, partial),
        final_sql,
        partial_columns: visible,
        visible,
    })
}

/// Aggregates whose groups may span servers.
pub(super) fn aggregate(
    query: &Query,
    select: &Select,
    group_exprs: &[Expr],
    order: &[(OrderTarget, &OrderByExpr)],
    from: &FromInfo,
) -> Result<Combined, Refusal> {
    let exprs = select_exprs(select)?;
    let mut partials = Partials::default();
    for expr in group_exprs {
        partials.column(expr, Role::Grouping);
    }
    // Non-aggregate items that read columns depend on the groups (Postgres
    // checked that), so servers can compute them; ones that read no column
    // (constants, now()) are computed once, by the final query.
    let order_exprs = order.iter().filter_map(|(target, _)| match target {
        OrderTarget::Expr(expr) => Some(&**expr),
        OrderTarget::Position(_) => None,
    });
    for expr in exprs.iter().copied().chain(order_exprs) {
        if !contains_aggregate(expr)
            && mentions_column(expr)
            && partials.grouping_column(expr).is_none()
        {
            if let Some(name) = volatile_function(expr) {
                return Err(refuse(
                    format!("cannot group results from several servers by an expression using {name}(): its value differs per server"),
                    "Compute it in the application, or add the sharding key to the WHERE clause.",
                ));
            }
            partials.column(expr, Role::Grouping);
        }
    }
    let mut rewriter = Rewriter {
        partials,
        finals: Vec::new(),
        from,
    };
    let final_items = exprs
        .iter()
        .map(|e| rewriter.rewrite(e))
        .collect::<Result<Vec<_>, _>>()?;
    let having = select
        .having
        .as_ref()
        .map(|h| rewriter.rewrite(h))
        .transpose()?;
    let mut order_items = Vec::new();
    for (target, order_by) in order {
        let key = match target {
            OrderTarget::Position(at) => at.to_string(),
            OrderTarget::Expr(expr) => rewriter.rewrite(expr)?.to_string(),
        };
        order_items.push(format!("{key}{}", direction(order_by)));
    }
    let partials = rewriter.partials;
    let grouping: Vec<String> = partials
        .columns
        .iter()
        .enumerate()
        .filter(|(_, (_, _, role))| *role == Role::Grouping)
        .map(|(at, _)| format!("c{}", at + 1))
        .collect();
    let mut final_sql = format!(
        "SELECT {} FROM {}",
        final_select_list(select, final_items),
        values_source(partials.columns.len())
    );
    if !grouping.is_empty() {
        final_sql.push_str(&format!(" GROUP BY {}", grouping.join(", ")));
    }
    if let Some(having) = having {
        final_sql.push_str(&format!(" HAVING {having}"));
    }
    final_sql.push_str(&order_clause(order_items));

    let mut partial = select.clone();
    partial.distinct = None;
    partial.having = None;
    partial.projection = partials
        .columns
        .iter()
        .map(|(expr, _, _)| SelectItem::UnnamedExpr(expr.clone()))
        .collect();
    let probes = collation_probes(
        &partials
            .columns
            .iter()
            .map(|(e, _, _)| e.clone())
            .collect::<Vec<_>>(),
    )?;
    partial.projection.extend(probes);
    if !group_exprs.is_empty() {
        partial.group_by = GroupByExpr::Expressions(group_exprs.to_vec(), Vec::new());
    }
    Ok(Combined {
        partial_sql: partial_query(query, partial),
        final_sql,
        partial_columns: partials.columns.len(),
        visible: exprs.len(),
    })
}

/// Rewrites a select item, HAVING or ORDER BY expression for the final
/// query: group expressions become their partial column, aggregate calls
/// their combination over the partial columns.
struct Rewriter<'f> {
    partials: Partials,
    /// Final forms of aggregate calls, put in after the walk so that it does
    /// not mistake the combining `sum(cK)` for a user's aggregate.
    finals: Vec<Expr>,
    from: &'f FromInfo,
}

const FINAL_MARK: &str = "__sl_final_";

impl Rewriter<'_> {
    fn rewrite(&mut self, expr: &Expr) -> Result<Expr, Refusal> {
        let mut out = expr.clone();
        if let ControlFlow::Break(refusal) = out.visit(self) {
            return Err(refusal);
        }
        let mut fill = FillFinals(&self.finals);
        let _ = out.visit(&mut fill);
        Ok(out)
    }

    fn final_aggregate(&mut self, call: &Function) -> Result<Expr, Refusal> {
        let name = function_name(call);
        let unsupported = |why: &str| {
            refuse(
                format!("cannot combine {name}() across servers: {why}"),
                "Supported across servers: count, sum, min, max, avg, bool_and, bool_or, every, \
                 and count(DISTINCT sharding key); GROUP BY the sharding key runs any aggregate \
                 on the servers.",
            )
        };
        let FunctionArguments::List(list) = &call.args else {
            return Err(unsupported("its arguments are not a plain list"));
        };
        if !call.within_group.is_empty() {
            return Err(unsupported("WITHIN GROUP needs all rows in one place"));
        }
        if list
            .clauses
            .iter()
            .any(|c| matches!(c, FunctionArgumentClause::OrderBy(_)))
        {
            return Err(unsupported(
                "an ORDER BY inside the aggregate needs all rows in one place",
            ));
        }
        if !list.clauses.is_empty() || call.null_treatment.is_some() {
            return Err(unsupported("its argument clauses are not supported"));
        }
        let distinct = list.duplicate_treatment == Some(DuplicateTreatment::Distinct);
        if distinct
            && !matches!(
                name.as_str(),
                "min" | "max" | "bool_and" | "bool_or" | "every"
            )
        {
            let on_key = match &list.args[..] {
                [sqlparser::ast::FunctionArg::Unnamed(sqlparser::ast::FunctionArgExpr::Expr(
                    arg,
                ))] => self.from.is_key(arg),
                _ => false,
            };
            if !on_key {
                return Err(unsupported(
                    "DISTINCT over anything but the sharding key needs all rows in one place \
                     (equal values may be on several servers)",
                ));
            }
        }
        let partial = Expr::Function(call.clone());
        let renamed = |new_name: &str| {
            let mut f = call.clone();
            f.name = ObjectName::from(vec![Ident::new(new_name)]);
            Expr::Function(f)
        };
        let text = match name.as_str() {
            "count" => {
                let c = self.partials.column(&partial, Role::Aggregate);
                format!("CAST(sum(c{c}) AS int8)")
            }
            "sum" => {
                let c = self.partials.column(&partial, Role::Aggregate);
                format!("CAST(sum(c{c}) AS __SL_TYPE_c{c}__)")
            }
            "min" | "max" | "bool_and" | "bool_or" => {
                let c = self.partials.column(&partial, Role::Aggregate);
                format!("{name}(c{c})")
            }
            "every" => {
                let c = self.partials.column(&partial, Role::Aggregate);
                format!("bool_and(c{c})")
            }
            "avg" => {
                let s = self.partials.column(&renamed("sum"), Role::Aggregate);
                let c = self.partials.column(&renamed("count"), Role::Aggregate);
                format!("__SL_AVG_c{s}_c{c}__")
            }
            _ => {
                return Err(unsupported(
                    "only the server holding all rows can compute it",
                ))
            }
        };
        generated(&text)
    }
}

impl VisitorMut for Rewriter<'_> {
    type Break = Refusal;

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<Refusal> {
        ControlFlow::Break(refuse(
            format!(
                "cannot compute a subquery over combined results from several servers: ({query})"
            ),
            "Move the subquery into the FROM clause or compute it in a separate statement.",
        ))
    }

    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Refusal> {
        if let Some(c) = self.partials.grouping_column(expr) {
            *expr = column(c);
            return ControlFlow::Continue(());
        }
        match expr {
            Expr::Function(call) if is_aggregate(call) => match self.final_aggregate(call) {
                Ok(combined) => {
                    self.finals.push(combined);
                    *expr = Expr::Identifier(Ident::new(format!(
                        "{FINAL_MARK}{}",
                        self.finals.len() - 1
                    )));
                }
                Err(refusal) => return ControlFlow::Break(refusal),
            },
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                return ControlFlow::Break(refuse(
                    format!("column {expr} must appear in the GROUP BY clause or be used in an aggregate function"),
                    "Group by it or aggregate it.",
                ));
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

struct FillFinals<'a>(&'a [Expr]);

impl VisitorMut for FillFinals<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::Identifier(ident) = expr {
            if let Some(n) = ident.value.strip_prefix(FINAL_MARK) {
                if let Some(combined) = n.parse::<usize>().ok().and_then(|n| self.0.get(n)) {
                    *expr = combined.clone();
                }
            }
        }
        ControlFlow::Continue(())
    }
}
