//! Expression helpers for the scatter planner: which calls are aggregates,
//! window or volatile functions, comparing expressions the way Postgres
//! matches them (unquoted names fold to lower case), and walking an
//! expression without entering its subqueries (a subquery's aggregates and
//! columns belong to the subquery, not to the statement being planned).

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, Function, Ident, ObjectNamePart, Query, Value, Visit, VisitMut, Visitor, VisitorMut,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::Refusal;

/// Aggregates built into Postgres. A call to one of these (without OVER) makes
/// the statement an aggregate query; the planner combines a few of them and
/// refuses the rest by name.
const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "bool_and",
    "bool_or",
    "every",
    "any_value",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "json_agg_strict",
    "jsonb_agg_strict",
    "json_objectagg",
    "json_arrayagg",
    "xmlagg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "range_agg",
    "range_intersect_agg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "grouping",
];

/// Functions whose value differs per call or per server: sorting, grouping or
/// de-duplicating by them on several servers cannot match one server's answer.
const VOLATILE: &[&str] = &[
    "random",
    "random_normal",
    "setseed",
    "clock_timestamp",
    "timeofday",
    "statement_timestamp",
    "now",
    "current_timestamp",
    "localtimestamp",
    "transaction_timestamp",
    "current_time",
    "localtime",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v4",
    "nextval",
    "currval",
    "lastval",
    "setval",
    "txid_current",
    "txid_current_if_assigned",
    "txid_current_snapshot",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_current_snapshot",
    "pg_backend_pid",
    "inet_server_addr",
    "inet_server_port",
    "pg_postmaster_start_time",
];

/// A name as Postgres sees it: unquoted identifiers fold to lower case.
pub(super) fn ident_name(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// The last part of a function's name, folded (`pg_catalog.COUNT` → `count`).
pub(super) fn function_name(function: &Function) -> String {
    match function.name.0.last() {
        Some(ObjectNamePart::Identifier(ident)) => ident_name(ident),
        Some(ObjectNamePart::Function(f)) => ident_name(&f.name),
        None => String::new(),
    }
}

pub(super) fn is_aggregate(function: &Function) -> bool {
    function.over.is_none()
        && (AGGREGATES.contains(&function_name(function).as_str())
            // Only aggregates take these clauses, whatever their name.
            || !function.within_group.is_empty()
            || function.filter.is_some())
}

/// Calls `visit` on every expression of `expr` outside subqueries, stopping
/// at the first `Break`.
pub(super) fn walk<B>(expr: &Expr, visit: impl FnMut(&Expr) -> ControlFlow<B>) -> ControlFlow<B> {
    struct OutsideSubqueries<F> {
        depth: usize,
        visit: F,
    }
    impl<B, F: FnMut(&Expr) -> ControlFlow<B>> Visitor for OutsideSubqueries<F> {
        type Break = B;
        fn pre_visit_query(&mut self, _query: &Query) -> ControlFlow<B> {
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<B> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<B> {
            if self.depth == 0 {
                (self.visit)(expr)
            } else {
                ControlFlow::Continue(())
            }
        }
    }
    expr.visit(&mut OutsideSubqueries { depth: 0, visit })
}

/// The first function call in `expr` (outside subqueries) that `pick` names.
fn find_function(expr: &Expr, pick: impl Fn(&Function) -> bool) -> Option<String> {
    match walk(expr, |e| match e {
        Expr::Function(f) if pick(f) => ControlFlow::Break(function_name(f)),
        _ => ControlFlow::Continue(()),
    }) {
        ControlFlow::Break(name) => Some(name),
        ControlFlow::Continue(()) => None,
    }
}

pub(super) fn contains_aggregate(expr: &Expr) -> bool {
    find_function(expr, is_aggregate).is_some()
}

pub(super) fn window_function(expr: &Expr) -> Option<String> {
    find_function(expr, |f| f.over.is_some())
}

pub(super) fn volatile_function(expr: &Expr) -> Option<String> {
    find_function(expr, |f| VOLATILE.contains(&function_name(f).as_str()))
}

/// An aggregate inside a subquery of `expr` whose argument reads a column of
/// the outer statement (qualified by one of `outer_labels`): Postgres
/// computes such an aggregate at the outer level, over all outer rows.
pub(super) fn outer_level_aggregate(
    expr: &Expr,
    outer_labels: &std::collections::BTreeSet<String>,
) -> Option<String> {
    struct Find<'a> {
        depth: usize,
        labels: &'a std::collections::BTreeSet<String>,
    }
    impl Visitor for Find<'_> {
        type Break = String;
        fn pre_visit_query(&mut self, _query: &Query) -> ControlFlow<String> {
            self.depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<String> {
            self.depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<String> {
            let Expr::Function(call) = expr else {
                return ControlFlow::Continue(());
            };
            if self.depth == 0 || !is_aggregate(call) {
                return ControlFlow::Continue(());
            }
            let labels = self.labels;
            let reads_outer = call.args.visit(&mut OuterColumn(labels)).is_break();
            if reads_outer {
                return ControlFlow::Break(function_name(call));
            }
            ControlFlow::Continue(())
        }
    }
    struct OuterColumn<'a>(&'a std::collections::BTreeSet<String>);
    impl Visitor for OuterColumn<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            match column_ref(expr) {
                Some((Some(qualifier), _)) if self.0.contains(&qualifier) => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        }
    }
    match expr.visit(&mut Find {
        depth: 0,
        labels: outer_labels,
    }) {
        ControlFlow::Break(name) => Some(name),
        ControlFlow::Continue(()) => None,
    }
}

/// Whether `expr` reads a column (outside subqueries).
pub(super) fn mentions_column(expr: &Expr) -> bool {
    walk(expr, |e| match e {
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    })
    .is_break()
}

/// Unquoted names folded, so that `SUM(X)` and `sum(x)` compare equal, as
/// they are equal to Postgres.
pub(super) fn normalized(expr: &Expr) -> Expr {
    struct Fold;
    impl VisitorMut for Fold {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
            let fold = |ident: &mut Ident| {
                if ident.quote_style.is_none() {
                    ident.value = ident.value.to_lowercase();
                }
            };
            match expr {
                Expr::Identifier(ident) => fold(ident),
                Expr::CompoundIdentifier(parts) => parts.iter_mut().for_each(fold),
                Expr::Function(function) => {
                    for part in &mut function.name.0 {
                        if let ObjectNamePart::Identifier(ident) = part {
                            fold(ident);
                        }
                    }
                }
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    let mut folded = expr.clone();
    let _ = VisitMut::visit(&mut folded, &mut Fold);
    strip_parentheses(folded)
}

pub(super) fn strip_parentheses(expr: Expr) -> Expr {
    match expr {
        Expr::Nested(inner) => strip_parentheses(*inner),
        other => other,
    }
}

/// A column as written: (qualifier, column), both folded.
pub(super) fn column_ref(expr: &Expr) -> Option<(Option<String>, String)> {
    match expr {
        Expr::Nested(inner) => column_ref(inner),
        Expr::Identifier(ident) => Some((None, ident_name(ident))),
        Expr::CompoundIdentifier(parts) if parts.len() >= 2 => Some((
            Some(ident_name(&parts[parts.len() - 2])),
            ident_name(&parts[parts.len() - 1]),
        )),
        _ => None,
    }
}

pub(super) use crate::analyze::statement::conjuncts;

/// A 1-based position (`ORDER BY 2`, `GROUP BY 1`), if `expr` is one.
pub(super) fn position(expr: &Expr) -> Option<Result<usize, String>> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Number(text, _) => Some(text.parse::<usize>().map_err(|_| text.to_string())),
            _ => None,
        },
        _ => None,
    }
}

/// Parses an expression the planner wrote itself.
pub(super) fn generated(text: &str) -> Result<Expr, Refusal> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(text)
        .and_then(|mut parser| parser.parse_expr())
        .map_err(|e| Refusal {
            message: format!(
                "internal error: the scatter planner wrote an expression it cannot parse ({text}): {e}"
            ),
            hint: "Report this as a shardline bug, with the statement; add the sharding key to \
                   the WHERE clause to run it on one server meanwhile."
                .into(),
        })
}
