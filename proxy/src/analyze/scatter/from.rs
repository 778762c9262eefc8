//! The FROM clause of a scattered SELECT: which sharded tables it reads and
//! whether every row it produces can be built on one server. Each server
//! holds whole partitions, so a join row is built correctly by one server
//! only when its sharded rows share a partition: sharded tables must be in
//! the same co-location group and joined on equal keys. Reference tables are
//! complete on every server, so they may be joined freely, except on the
//! preserved side of an outer join, where every server would add the same
//! unmatched reference rows.

use std::collections::BTreeSet;

use sqlparser::ast::{
    BinaryOperator, Expr, JoinConstraint, JoinOperator, ObjectName, ObjectNamePart, Select,
    TableFactor, TableWithJoins,
};

use super::exprs::{column_ref, conjuncts, ident_name};
use super::{Refusal, TableInfo};

/// One use of a sharded table in FROM.
#[derive(Debug, Clone)]
pub(super) struct Instance {
    /// How columns are qualified: the alias, or the table name.
    pub label: String,
    pub table: String,
    pub key: String,
    pub group: String,
    /// On the nullable side of an outer join: its key may be NULL on any
    /// server, so grouping by it does not keep groups on one server.
    pub nullable: bool,
}

#[derive(Debug, Default)]
pub(super) struct FromInfo {
    pub instances: Vec<Instance>,
}

impl FromInfo {
    /// The instance whose key column `expr` is, if it is one.
    fn key_of(&self, expr: &Expr) -> Option<usize> {
        let (qualifier, column) = column_ref(expr)?;
        let mut matching = self.instances.iter().enumerate().filter(|(_, i)| {
            i.key == column && qualifier.as_ref().is_none_or(|q| *q == i.label)
        });
        let (found, _) = matching.next()?;
        // An unqualified name shared by several instances is ambiguous
        // (Postgres refuses it), so it is nobody's key.
        matching.next().is_none().then_some(found)
    }

    /// Whether `expr` is the sharding key of one of the tables: a key value
    /// lives on exactly one server.
    pub fn is_key(&self, expr: &Expr) -> bool {
        self.key_of(expr).is_some()
    }

    /// Whether grouping by `expr` keeps every group on one server.
    pub fn is_grouping_key(&self, expr: &Expr) -> bool {
        self.key_of(expr)
            .is_some_and(|i| !self.instances[i].nullable)
    }

    pub fn key_names(&self) -> BTreeSet<&str> {
        self.instances.iter().map(|i| i.key.as_str()).collect()
    }
}

/// What one side of a join holds.
#[derive(Debug, Default, Clone)]
struct Side {
    /// Indexes into `FromInfo::instances`.
    sharded: Vec<usize>,
    /// A single table factor (not a join of several).
    single: bool,
}

/// A key equality `a.k = b.k` between two instances, found in ON or WHERE.
type Edge = (usize, usize);

struct Walk<'t> {
    tables: &'t dyn TableInfo,
    ctes: &'t BTreeSet<String>,
    info: FromInfo,
    /// Equalities that every output row satisfies (WHERE, inner ON).
    inner_edges: Vec<Edge>,
}

pub(super) fn analyze(
    select: &Select,
    ctes: &BTreeSet<String>,
    tables: &dyn TableInfo,
) -> Result<FromInfo, Refusal> {
    let mut walk = Walk {
        tables,
        ctes,
        info: FromInfo::default(),
        inner_edges: Vec::new(),
    };
    for item in &select.from {
        walk.table_with_joins(item)?;
    }
    if let Some(selection) = &select.selection {
        let edges = walk.edges(selection);
        walk.inner_edges.extend(edges);
    }
    walk.check_connected()?;
    Ok(walk.info)
}

fn refusal(message: String, hint: &str) -> Refusal {
    Refusal {
        message,
        hint: hint.to_string(),
    }
}

fn table_name(name: &ObjectName) -> (Option<String>, String) {
    let mut parts: Vec<String> = name
        .0
        .iter()
        .map(|part| match part {
            ObjectNamePart::Identifier(ident) => ident_name(ident),
            ObjectNamePart::Function(f) => ident_name(&f.name),
        })
        .collect();
    let table = parts.pop().unwrap_or_default();
    (parts.pop().filter(|schema| schema != "public"), table)
}

impl Walk<'_> {
    fn table_with_joins(&mut self, item: &TableWithJoins) -> Result<Side, Refusal> {
        let mut left = self.factor(&item.relation)?;
        for join in &item.joins {
            let right = self.factor(&join.relation)?;
            left = self.join(left, right, &join.join_operator)?;
        }
        Ok(left)
    }

    fn factor(&mut self, factor: &TableFactor) -> Result<Side, Refusal> {
        match factor {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                let (schema, table) = table_name(name);
                // Table functions and CTEs (over reference tables, checked
                // elsewhere) give every server the same rows, like a reference table.
                if args.is_some() || (schema.is_none() && self.ctes.contains(&table)) {
                    return Ok(Side {
                        sharded: Vec::new(),
                        single: true,
                    });
                }
                let sharded = schema
                    .is_none()
                    .then(|| self.tables.sharded(&table))
                    .flatten();
                if let Some((key, group)) = sharded {
                    let label = alias
                        .as_ref()
                        .map_or_else(|| table.clone(), |a| ident_name(&a.name));
                    self.info.instances.push(Instance {
                        label,
                        table: table.clone(),
                        key: key.to_string(),
                        group: group.to_string(),
                        nullable: false,
                    });
                    return Ok(Side {
                        sharded: vec![self.info.instances.len() - 1],
                        single: true,
                    });
                }
                if schema.is_none() && self.tables.is_reference(&table) {
                    return Ok(Side {
                        sharded: Vec::new(),
                        single: true,
                    });
                }
                Err(refusal(
                    format!(
                        "cannot read table \"{}\" in a statement that runs on every server: it is \
                         neither sharded nor a reference table, so its rows are not on every server",
                        schema.map_or(table.clone(), |s| format!("{s}.{table}"))
                    ),
                    "Query that table in a separate statement, or add the sharding key to the \
                     WHERE clause so the statement runs on one server.",
                ))
            }
            // Subqueries that read sharded tables are refused before this.
            TableFactor::Derived { .. } | TableFactor::UNNEST { .. } | TableFactor::Function { .. } => {
                Ok(Side {
                    sharded: Vec::new(),
                    single: true,
                })
            }
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => {
                let side = self.table_with_joins(table_with_joins)?;
                Ok(Side {
                    single: false,
                    ..side
                })
            }
            other => Err(refusal(
                format!("cannot run this FROM item on every server: {other}"),
                "Rewrite it as a plain table, join or subquery over reference tables.",
            )),
        }
    }

    fn join(&mut self, left: Side, right: Side, operator: &JoinOperator) -> Result<Side, Refusal> {
        let mut joined = Side {
            sharded: left.sharded.iter().chain(&right.sharded).copied().collect(),
            single: false,
        };
        match operator {
            JoinOperator::Join(constraint)
            | JoinOperator::Inner(constraint)
            | JoinOperator::CrossJoin(constraint) => {
                let edges = self.constraint_edges(constraint, &left, &right);
                self.inner_edges.extend(edges);
            }
            JoinOperator::Left(constraint) | JoinOperator::LeftOuter(constraint) => {
                self.outer(&left, &right, constraint, "LEFT")?;
            }
            JoinOperator::Right(constraint) | JoinOperator::RightOuter(constraint) => {
                self.outer(&right, &left, constraint, "RIGHT")?;
            }
            JoinOperator::FullOuter(constraint) => {
                self.outer(&left, &right, constraint, "FULL")?;
                self.outer(&right, &left, constraint, "FULL")?;
            }
            other => {
                return Err(refusal(
                    format!("this kind of join cannot run on every server: {other:?}"),
                    "Use an inner or outer join with ON.",
                ))
            }
        }
        joined.sharded.sort_unstable();
        Ok(joined)
    }

    /// An outer join keeping every row of `preserved` and adding the
    /// matching rows of `nullable` (NULLs where none match).
    fn outer(
        &mut self,
        preserved: &Side,
        nullable: &Side,
        constraint: &JoinConstraint,
        kind: &str,
    ) -> Result<(), Refusal> {
        if preserved.sharded.is_empty() {
            return Err(refusal(
                format!(
                    "a {kind} JOIN that keeps the unmatched rows of reference tables cannot run on \
                     every server: each server would return the same unmatched rows"
                ),
                "Put the sharded table on the preserved side (sharded LEFT JOIN reference), or \
                 use an inner join.",
            ));
        }
        if nullable.sharded.is_empty() {
            return Ok(());
        }
        let [only] = nullable.sharded[..] else {
            return Err(refusal(
                format!(
                    "a {kind} JOIN whose optional side joins several sharded tables cannot be \
                     checked for running on every server"
                ),
                "Join the sharded tables one at a time, each ON its key.",
            ));
        };
        if !nullable.single {
            return Err(refusal(
                format!("a {kind} JOIN whose optional side is a parenthesized join cannot run on every server"),
                "Join the tables one at a time, each ON its key.",
            ));
        }
        let edges = self.constraint_edges(constraint, preserved, nullable);
        let attached = edges
            .iter()
            .any(|&(a, b)| a == only || b == only);
        if !attached {
            let partner = preserved.sharded[0];
            return Err(self.missing_join(partner, only, &format!("in the ON clause of the {kind} JOIN ")));
        }
        self.info.instances[only].nullable = true;
        Ok(())
    }

    fn constraint_edges(&self, constraint: &JoinConstraint, left: &Side, right: &Side) -> Vec<Edge> {
        match constraint {
            JoinConstraint::On(on) => self.edges(on),
            JoinConstraint::Using(columns) => {
                let mut edges = Vec::new();
                for column in columns {
                    let (_, name) = table_name(column);
                    let with_key = |side: &Side| {
                        side.sharded
                            .iter()
                            .copied()
                            .filter(|&i| self.info.instances[i].key == name)
                            .collect::<Vec<_>>()
                    };
                    // USING names a column each side has once; several
                    // tables with it on one side is an error in Postgres.
                    if let ([a], [b]) = (&with_key(left)[..], &with_key(right)[..]) {
                        if self.same_group(*a, *b) {
                            edges.push((*a, *b));
                        }
                    }
                }
                edges
            }
            _ => Vec::new(),
        }
    }

    fn same_group(&self, a: usize, b: usize) -> bool {
        self.info.instances[a].group == self.info.instances[b].group
    }

    /// Key equalities among the conjuncts of `predicate`.
    fn edges(&self, predicate: &Expr) -> Vec<Edge> {
        let mut parts = Vec::new();
        conjuncts(predicate, &mut parts);
        parts
            .into_iter()
            .filter_map(|part| match part {
                Expr::BinaryOp {
                    left,
                    op: BinaryOperator::Eq,
                    right,
                } => {
                    let a = self.info.key_of(left)?;
                    let b = self.info.key_of(right)?;
                    (a != b && self.same_group(a, b)).then_some((a, b))
                }
                _ => None,
            })
            .collect()
    }

    fn check_connected(&self) -> Result<(), Refusal> {
        let instances = &self.info.instances;
        let inner: Vec<usize> = (0..instances.len())
            .filter(|&i| !instances[i].nullable)
            .collect();
        let Some(&first) = inner.first() else {
            return Err(refusal(
                "no sharded table is read outside the optional side of an outer join, so there \
                 is nothing to run on every server"
                    .into(),
                "Send statements over reference tables only as they are; they run on one server.",
            ));
        };
        // Union-find over the inner instances.
        let mut parent: Vec<usize> = (0..instances.len()).collect();
        fn root(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        for &(a, b) in &self.inner_edges {
            if instances[a].nullable || instances[b].nullable {
                continue;
            }
            let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
            parent[ra] = rb;
        }
        for &other in &inner[1..] {
            if root(&mut parent, first) != root(&mut parent, other) {
                return Err(self.missing_join(first, other, ""));
            }
        }
        Ok(())
    }

    fn missing_join(&self, a: usize, b: usize, place: &str) -> Refusal {
        let (x, y) = (&self.info.instances[a], &self.info.instances[b]);
        if x.group != y.group {
            return refusal(
                format!(
                    "cannot join \"{}\" and \"{}\" across servers: they are in different \
                     co-location groups (\"{}\" and \"{}\"), so matching rows may live on \
                     different servers",
                    x.table, y.table, x.group, y.group
                ),
                "Query each table separately and join in the application, or make one of them \
                 a reference table.",
            );
        }
        refusal(
            format!(
                "cannot join sharded tables \"{}\" and \"{}\" across servers without equal keys: \
                 join \"{}\" and \"{}\" {place}on {}.{} = {}.{}",
                x.table, y.table, x.table, y.table, x.label, x.key, y.label, y.key
            ),
            &format!(
                "Add {}.{} = {}.{} to the join condition (rows with equal keys are on the same \
                 server), or add the sharding key to the WHERE clause to run on one server.",
                x.label, x.key, y.label, y.key
            ),
        )
    }
}
