//! UPDATE ... FROM and DELETE ... USING on several servers: each server
//! joins only its own rows, so every sharded table joined must be in the
//! target's co-location group and tied to it by key equalities; reference
//! tables are on every server and join freely.

use sqlparser::ast::{
    BinaryOperator, Expr, JoinConstraint, JoinOperator, TableFactor, TableWithJoins,
};

use crate::analyze::statement::conjuncts;

use super::{ident_name, is_catalog, refuse, table_name, Refusal, TableInfo, WriteKind};

/// One sharded table of an UPDATE/DELETE: the target, or one in FROM/USING.
struct Instance {
    label: String,
    table: String,
    key: String,
}

/// UPDATE ... FROM / DELETE ... USING: every sharded table besides the
/// target must be in the target's co-location group and tied to it by key
/// equalities (WHERE, or ON of inner joins), so a matching row is always
/// on the target row's server. Reference tables are on every server.
pub(super) fn check_joined(
    table: &str,
    label: &str,
    from: &[TableWithJoins],
    selection: Option<&Expr>,
    tables: &dyn TableInfo,
    kind: WriteKind,
) -> Result<(), Refusal> {
    let Some((key, group)) = tables.sharded(table) else {
        return Ok(());
    };
    let mut instances = vec![Instance {
        label: label.to_string(),
        table: table.to_string(),
        key: key.to_string(),
    }];
    let mut conditions: Vec<&Expr> = selection.into_iter().collect();
    let mut pending: Vec<&TableFactor> = Vec::new();
    for item in from {
        pending.push(&item.relation);
        for join in &item.joins {
            pending.push(&join.relation);
            match &join.join_operator {
                JoinOperator::Join(c) | JoinOperator::Inner(c) | JoinOperator::CrossJoin(c) => {
                    if let JoinConstraint::On(on) = c {
                        conditions.push(on);
                    }
                }
                _ => {
                    if factor_has_sharded(&join.relation, tables)
                        || factor_has_sharded(&item.relation, tables)
                    {
                        return Err(refuse(
                            format!("an outer join with a sharded table in the FROM of a {} on several servers cannot be checked", kind.verb()),
                            "join sharded tables with inner joins on their sharding keys",
                        ));
                    }
                }
            }
        }
    }
    while let Some(factor) = pending.pop() {
        match factor {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => {
                let (schema, other) = table_name(name);
                let label = alias
                    .as_ref()
                    .map_or_else(|| other.clone(), |a| ident_name(&a.name));
                if (schema.is_none() && tables.is_reference(&other))
                    || is_catalog(schema.as_deref(), &other)
                {
                    continue;
                }
                match tables.sharded(&other).filter(|_| schema.is_none()) {
                    Some((other_key, other_group)) if other_group == group => instances.push(Instance {
                        label,
                        table: other,
                        key: other_key.to_string(),
                    }),
                    Some(_) => {
                        return Err(refuse(
                            format!("cannot {} \"{table}\" joined with \"{other}\" on several servers: \"{other}\" is sharded by another key, so the rows that match may live on other servers", kind.verb()),
                            "read the other table in a statement of its own, or make both tables one co-location group",
                        ))
                    }
                    None => {
                        return Err(refuse(
                            format!("cannot {} \"{table}\" joined with \"{other}\" on several servers: \"{other}\" is neither sharded nor a reference table, so it is not on every server", kind.verb()),
                            "read that table in a statement of its own",
                        ))
                    }
                }
            }
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => {
                if !table_with_joins.joins.is_empty() {
                    return Err(refuse(
                        format!("a parenthesized join in the FROM of a {} on several servers cannot be checked", kind.verb()),
                        "list the tables without parentheses, joined on their sharding keys",
                    ));
                }
                pending.push(&table_with_joins.relation);
            }
            // Subqueries are checked by `check_nested`; table functions
            // give every server the same rows.
            _ => {}
        }
    }
    connected(&instances, &conditions, kind)
}

fn factor_has_sharded(factor: &TableFactor, tables: &dyn TableInfo) -> bool {
    match factor {
        TableFactor::Table {
            name, args: None, ..
        } => {
            let (schema, table) = table_name(name);
            schema.is_none() && tables.sharded(&table).is_some()
        }
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => {
            factor_has_sharded(&table_with_joins.relation, tables)
                || table_with_joins
                    .joins
                    .iter()
                    .any(|j| factor_has_sharded(&j.relation, tables))
        }
        _ => false,
    }
}

/// Every instance must be tied to the target (instance 0) by key equalities.
fn connected(instances: &[Instance], conditions: &[&Expr], kind: WriteKind) -> Result<(), Refusal> {
    let key_of = |expr: &Expr| -> Option<usize> {
        let (qualifier, column) = column_ref(expr)?;
        let mut matching = instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.key == column && qualifier.as_ref().is_none_or(|q| *q == i.label));
        let (found, _) = matching.next()?;
        // An unqualified name several tables have is ambiguous (Postgres refuses it).
        matching.next().is_none().then_some(found)
    };
    let mut root: Vec<usize> = (0..instances.len()).collect();
    fn find(root: &mut [usize], mut i: usize) -> usize {
        while root[i] != i {
            root[i] = root[root[i]];
            i = root[i];
        }
        i
    }
    for condition in conditions {
        let mut parts = Vec::new();
        conjuncts(condition, &mut parts);
        for part in parts {
            if let Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } = part
            {
                if let (Some(a), Some(b)) = (key_of(left), key_of(right)) {
                    let (ra, rb) = (find(&mut root, a), find(&mut root, b));
                    root[ra] = rb;
                }
            }
        }
    }
    for i in 1..instances.len() {
        if find(&mut root, i) != find(&mut root, 0) {
            let (target, other) = (&instances[0], &instances[i]);
            return Err(refuse(
                format!(
                    "cannot {} \"{}\" joined with \"{}\" on several servers unless they are joined on their sharding keys",
                    kind.verb(),
                    target.table,
                    other.table
                ),
                &format!(
                    "add `{}.{} = {}.{}` to the WHERE clause",
                    target.label, target.key, other.label, other.key
                ),
            ));
        }
    }
    Ok(())
}

fn column_ref(expr: &Expr) -> Option<(Option<String>, String)> {
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
