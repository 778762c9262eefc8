//! Writes that one server cannot run: a multi-row `INSERT ... VALUES` whose
//! rows' keys belong to several servers, and `UPDATE` / `DELETE` of a
//! sharded table without a key that fixes one server. `route_write` gives
//! their [`Route::Writes`]; `plan_write` gives what each server runs. Both
//! work out the rows' partitions the same way (`targets`), so a plan never
//! names a server or partition its route did not, and the partitions the
//! session holds while a move is cut over are the ones the plan writes.
//!
//! The session part (one transaction over the servers, two-phase commit,
//! merging RETURNING rows and CommandComplete counts) lives in the session;
//! this module is pure.

#[cfg(test)]
mod tests;

use bytes::Bytes;
use shardmap::{ClusterMap, KeyType, TableKind};

use super::keys::{evaluate_keys, invalid_key};
use super::{
    array_param_by_server, insert_key_index, key_exprs, key_partition, key_partitions, known_table,
    owner_of, reference, Params, Resolution, Route, RouteError,
};
use crate::analyze::statement::{DataStatement, InsertRows, TableUse};
use crate::analyze::writes::{analyze_write, Refusal, TableInfo, WriteText};
use crate::analyze::Literal;
use crate::wire::messages::Bind;

pub use crate::analyze::writes::WriteKind;

/// What every server runs for one write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePlan {
    pub kind: WriteKind,
    /// The sharded table written.
    pub table: String,
    /// Rows come back (`RETURNING`): see [`WritePlan::returning_order`].
    pub returning: bool,
    /// INSERT: the number of VALUES rows; 0 for UPDATE/DELETE.
    pub rows: usize,
    /// Partitions written (sorted): the same as the route's.
    pub partitions: Vec<u32>,
    /// One per server, in the route's server order.
    pub parts: Vec<WritePart>,
    /// A reference-table write: every part is the same statement on a copy
    /// of the same table, so the first part's reply stands for all and the
    /// counts must agree (see `total`); `table` is the reference table.
    pub replicated: bool,
}

/// One server's part of a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePart {
    pub server: String,
    /// The statement this server runs. INSERT: the client's text with only
    /// this server's VALUES rows and its parameters renumbered `$1..$m`;
    /// UPDATE/DELETE: the client's text.
    pub sql: String,
    /// INSERT: the 0-based VALUES index of each row of `sql`, ascending
    /// (Postgres returns an INSERT's rows in VALUES order, so this is also
    /// which client row each RETURNING row is). Empty for UPDATE/DELETE.
    pub rows: Vec<usize>,
    /// For each parameter of `sql` (`$1..$m`), the 0-based index of the
    /// client's parameter whose value, format and type it takes.
    pub params: Vec<usize>,
    /// `key = ANY($n)`: this server's value of the client's parameter `n-1`
    /// (only the keys it owns, in the client's format), replacing the
    /// client's value in this server's Bind.
    pub array_param: Option<(usize, Bytes)>,
}

impl WritePart {
    /// This server's Bind: the client's values of `params` in order, with
    /// their format codes, the narrowed key array if any; portal, statement
    /// name and result formats as the client sent them (the caller renames
    /// the statement with `Bind::encode_with_statement`).
    pub fn bind(&self, client: &Bind) -> Bind {
        let param_formats = match client.param_formats.len() {
            // None, or one for all: still right for any number of parameters.
            0 | 1 => client.param_formats.clone(),
            _ => self
                .params
                .iter()
                .map(|&i| client.param_formats.get(i).copied().unwrap_or(0))
                .collect(),
        };
        let params = self
            .params
            .iter()
            .map(|&i| match &self.array_param {
                Some((index, narrowed)) if *index == i => Some(narrowed.clone()),
                _ => client.params.get(i).cloned().flatten(),
            })
            .collect();
        Bind {
            portal: client.portal.clone(),
            statement: client.statement.clone(),
            param_formats,
            params,
            result_formats: client.result_formats.clone(),
        }
    }

    /// The parameter types to declare in this server's Parse, picked from
    /// `types` by `params` (0, "infer", where `types` has none).
    ///
    /// Pass the types of the client's statement as the server inferred them
    /// (the ParameterDescription of a Describe of the client's statement)
    /// when the session has them, else the types the client declared. With
    /// the inferred types a server's statement means exactly what the
    /// client's does even when this server lacks the VALUES row whose
    /// context gave a parameter its type (`VALUES ($1, $2), ($3, $2::text)`,
    /// or a parameter used only in RETURNING besides another server's row),
    /// so a binary value is read as the type the client encoded it for.
    pub fn param_types(&self, types: &[u32]) -> Vec<u32> {
        self.params
            .iter()
            .map(|&i| types.get(i).copied().unwrap_or(0))
            .collect()
    }
}

impl WritePlan {
    /// How to put the servers' RETURNING rows back in the client's order,
    /// given how many rows each part returned (`returned[j]` for
    /// `parts[j]`): the (part, row of that part) to send for each row.
    /// INSERT: VALUES order. UPDATE/DELETE have no order in Postgres either:
    /// part after part. `None` when an INSERT's part returned another number
    /// of rows than it has (a trigger skipped rows): its rows cannot be
    /// matched to the client's, so the session must fail the statement
    /// rather than return them in a wrong order.
    pub fn returning_order(&self, returned: &[usize]) -> Option<Vec<(usize, usize)>> {
        if returned.len() != self.parts.len() {
            return None;
        }
        if self.replicated {
            // One copy's rows (the counts are compared by `total`).
            return Some((0..returned[0]).map(|k| (0, k)).collect());
        }
        if self.kind != WriteKind::Insert {
            return Some(
                returned
                    .iter()
                    .enumerate()
                    .flat_map(|(part, &n)| (0..n).map(move |k| (part, k)))
                    .collect(),
            );
        }
        let mut order: Vec<Option<(usize, usize)>> = vec![None; self.rows];
        for (part, (plan, &count)) in self.parts.iter().zip(returned).enumerate() {
            if plan.rows.len() != count {
                return None;
            }
            for (k, &row) in plan.rows.iter().enumerate() {
                *order.get_mut(row)? = Some((part, k));
            }
        }
        order.into_iter().collect()
    }

    /// The CommandComplete tag for the client, given `total`'s count.
    pub fn command_tag(&self, rows: u64) -> String {
        self.kind.command_tag(rows)
    }

    /// The row count for the client from each part's count (`counts[j]`
    /// for `parts[j]`): their sum, or for a replicated (reference-table)
    /// write the count every copy reported. Copies that report different
    /// counts have diverged (someone wrote one server directly): the
    /// error, sent instead of the write's reply, says which servers
    /// disagree, and the session rolls the write back.
    pub fn total(&self, counts: &[u64]) -> Result<u64, RouteError> {
        if !self.replicated {
            return Ok(counts.iter().sum());
        }
        let Some(&first) = counts.first() else {
            return Ok(0);
        };
        if counts.iter().all(|&n| n == first) {
            return Ok(first);
        }
        let mut by_count: Vec<(u64, Vec<&str>)> = Vec::new();
        for (part, &n) in self.parts.iter().zip(counts) {
            match by_count.iter_mut().find(|(count, _)| *count == n) {
                Some((_, servers)) => servers.push(&part.server),
                None => by_count.push((n, vec![&part.server])),
            }
        }
        let counts = by_count
            .iter()
            .map(|(n, servers)| format!("{}: {n}", servers.join(", ")))
            .collect::<Vec<_>>()
            .join("; ");
        Err(RouteError::new(
            "XX001",
            format!(
                "the copies of reference table \"{}\" differ between servers: this {} changed a different number of rows on each ({counts}); it was rolled back",
                self.table,
                self.kind.command_tag(0).split(' ').next().unwrap_or("write")
            ),
            format!(
                "compare the table on those servers (e.g. SELECT count(*), sum(hashtext(t::text)) FROM {} t), make every copy equal to the right one \
                 (on each server directly, or copy the right server's rows with COPY), then retry",
                self.table
            ),
        ))
    }
}

/// The shard map as the write analysis sees it.
pub struct MapTables<'m>(pub &'m ClusterMap);

impl TableInfo for MapTables<'_> {
    fn sharded(&self, name: &str) -> Option<(&str, &str)> {
        match &self.0.tables.get(name)?.kind {
            TableKind::Sharded {
                group, key_column, ..
            } => Some((key_column.as_str(), group.as_str())),
            _ => None,
        }
    }

    fn is_reference(&self, name: &str) -> bool {
        matches!(
            self.0.tables.get(name).map(|t| &t.kind),
            Some(TableKind::Reference)
        )
    }
}

fn sharded<'m>(map: &'m ClusterMap, name: &str) -> Option<(&'m str, &'m str, KeyType)> {
    let TableKind::Sharded {
        group,
        key_column,
        embedded_id,
    } = &map.tables.get(name)?.kind
    else {
        return None;
    };
    let key_type = if *embedded_id {
        KeyType::Bigint
    } else {
        map.groups
            .get(group)
            .map_or(KeyType::Bigint, |g| g.key_type)
    };
    Some((key_column.as_str(), group.as_str(), key_type))
}

/// Whether `statement` is a write this module routes when one server
/// cannot run it: INSERT ... VALUES into a sharded table, or UPDATE/DELETE
/// naming one. Anything else keeps the single-server router's answer.
pub(super) fn applies(statement: &DataStatement, map: &ClusterMap) -> bool {
    if statement.read_only || statement.unparsed.is_some() || statement.copy.is_some() {
        return false;
    }
    if let Some(insert) = &statement.insert {
        return sharded(map, &insert.table).is_some();
    }
    // The first word tells UPDATE/DELETE from other writes (DDL, locking
    // reads, `WITH ... UPDATE`, which stay refused).
    matches!(
        statement.words.first().map(String::as_str),
        Some("update" | "delete")
    ) && statement
        .tables
        .iter()
        .any(|t| t.schema.is_none() && sharded(map, &t.name).is_some())
}

/// The route of a write one server cannot run.
pub(super) fn route_write(
    statement: &DataStatement,
    map: &ClusterMap,
    literals: &[Literal],
    params: Option<&Params<'_>>,
) -> Result<Resolution, RouteError> {
    let Some(targets) = targets(statement, map, literals, params)? else {
        return Ok(Resolution::NeedsParams);
    };
    let (servers, partitions) = owners(map, targets.partitions())?;
    if servers.is_empty() {
        // `key = ANY('{}')`: no row can match, on any server.
        return Ok(Resolution::Route(Route::Any));
    }
    Ok(Resolution::Route(Route::Writes {
        servers,
        partitions,
    }))
}

/// What each server runs for a write routed to [`Route::Writes`] (a write to
/// a reference table: the client's statement on every server, see
/// `route::reference`). `sql` is
/// the statement's own text (the Query's, or the Parse's), `statement` and
/// `literals` its analysis, `params` the Bind (none in the simple protocol).
pub fn plan_write(
    sql: &str,
    statement: &DataStatement,
    map: &ClusterMap,
    literals: &[Literal],
    params: Option<&Params<'_>>,
) -> Result<WritePlan, RouteError> {
    if reference::written_reference(statement, map).is_some() {
        return reference::plan_reference_write(sql, statement, map, params);
    }
    let text = analyze_write(sql, &MapTables(map)).map_err(refused)?;
    let bound = params.map_or(0, |p| p.bind.params.len());
    if let Some((_, n)) = text.params.iter().find(|(_, n)| *n >= bound) {
        return Err(RouteError::new(
            "08P01",
            format!(
                "the statement uses parameter ${}, but the Bind supplies {bound} parameters",
                n + 1
            ),
            "bind a value for every parameter",
        ));
    }
    let Some(targets) = targets(statement, map, literals, params)? else {
        return Err(RouteError::new(
            "XX000",
            "internal error: a write across servers was planned before its parameters were bound",
            "report this to the shardline developers",
        ));
    };
    let (servers, partitions) = owners(map, targets.partitions())?;
    let parts = match targets {
        Targets::Rows(rows) => insert_parts(sql, &text, map, &rows)?,
        Targets::Partitions(_) => {
            let split = params.and_then(|p| array_param_by_server(statement, map, p.bind));
            servers
                .into_iter()
                .map(|server| WritePart {
                    array_param: split
                        .as_ref()
                        .and_then(|(i, values)| Some((*i, values.get(&server)?.clone()))),
                    server,
                    sql: sql.to_string(),
                    rows: Vec::new(),
                    params: (0..bound).collect(),
                })
                .collect()
        }
    };
    Ok(WritePlan {
        kind: text.kind,
        table: text.table,
        returning: text.returning,
        rows: text.rows.len(),
        partitions,
        parts,
        replicated: false,
    })
}

fn insert_parts(
    sql: &str,
    text: &WriteText,
    map: &ClusterMap,
    rows: &[u32],
) -> Result<Vec<WritePart>, RouteError> {
    if text.kind != WriteKind::Insert || text.rows.len() != rows.len() {
        return Err(RouteError::new(
            "0A000",
            format!(
                "shardline found {} VALUES rows in this INSERT's text but {} in its analysis",
                text.rows.len(),
                rows.len()
            ),
            "send the rows in plain VALUES (...), (...) form",
        ));
    }
    let mut by_server: Vec<(String, Vec<usize>)> = Vec::new();
    for (row, &partition) in rows.iter().enumerate() {
        let owner = owner_of(map, partition)?;
        match by_server.iter_mut().find(|(server, _)| server == owner) {
            Some((_, rows)) => rows.push(row),
            None => by_server.push((owner.to_string(), vec![row])),
        }
    }
    if text.returning && text.may_skip_rows && by_server.len() > 1 {
        return Err(RouteError::new(
            "0A000",
            format!(
                "INSERT ... ON CONFLICT ... RETURNING into \"{}\" with rows on several servers cannot return its rows in VALUES order: a row may return nothing, so the proxy cannot tell which row a returned one is",
                text.table
            ),
            "leave out RETURNING, or send one INSERT per server's keys (or SELECT the rows back by key)",
        ));
    }
    Ok(by_server
        .into_iter()
        .map(|(server, rows)| {
            let (sql, params) = text.render(sql, &rows);
            WritePart {
                server,
                sql,
                rows,
                params,
                array_param: None,
            }
        })
        .collect())
}

fn refused(refusal: Refusal) -> RouteError {
    RouteError::new("0A000", refusal.message, refusal.hint)
}

/// The partitions a write touches.
enum Targets {
    /// INSERT: each VALUES row's partition, in VALUES order.
    Rows(Vec<u32>),
    /// UPDATE/DELETE: the partitions that may hold matching rows (sorted).
    Partitions(Vec<u32>),
}

impl Targets {
    fn partitions(&self) -> &[u32] {
        match self {
            Targets::Rows(p) | Targets::Partitions(p) => p,
        }
    }
}

/// The owners of `partitions` (first seen first) and the partitions sorted.
fn owners(map: &ClusterMap, partitions: &[u32]) -> Result<(Vec<String>, Vec<u32>), RouteError> {
    let mut servers: Vec<String> = Vec::new();
    for &partition in partitions {
        let owner = owner_of(map, partition)?;
        if !servers.iter().any(|s| s == owner) {
            servers.push(owner.to_string());
        }
    }
    let mut sorted = partitions.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    Ok((servers, sorted))
}

/// `None` when a Bind parameter is needed and there is none yet.
fn targets(
    statement: &DataStatement,
    map: &ClusterMap,
    literals: &[Literal],
    params: Option<&Params<'_>>,
) -> Result<Option<Targets>, RouteError> {
    let mut sharded_uses: Vec<&TableUse> = Vec::new();
    let mut group: Option<&str> = None;
    if let Some(insert) = &statement.insert {
        insert_shape(insert)?;
    }
    let target = statement.insert.as_ref().map(|i| i.table.as_str());
    for table in &statement.tables {
        if table.is_catalog() {
            continue;
        }
        let def = known_table(map, table)?;
        match &def.kind {
            TableKind::Reference if Some(table.name.as_str()) != target => {}
            TableKind::Sharded { group: g, .. } if target.is_none_or(|t| t == table.name) => {
                if group.is_some_and(|seen| seen != g.as_str()) {
                    return Err(RouteError::new(
                        "0A000",
                        format!(
                            "a write on several servers can join only tables of one co-location group; \"{}\" is in group {g}",
                            table.name
                        ),
                        "read the other table in a statement of its own",
                    ));
                }
                group = Some(g.as_str());
                sharded_uses.push(table);
            }
            _ => {
                return Err(RouteError::new(
                    "0A000",
                    format!(
                        "a write on several servers cannot read table \"{}\": each server that runs the write has only part of its rows, or none",
                        table.name
                    ),
                    "read that table in a statement of its own",
                ))
            }
        }
    }
    match &statement.insert {
        Some(insert) => insert_rows(insert, map, literals, params),
        None => match sharded_uses.as_slice() {
            [only] => modify_partitions(statement, only, map, literals, params),
            _ => Ok(Some(Targets::Partitions(all_partitions(map)))),
        },
    }
}

/// An INSERT whose rows the proxy can see: VALUES, not a query or DEFAULT VALUES.
fn insert_shape(insert: &InsertRows) -> Result<(), RouteError> {
    let table = &insert.table;
    if insert.from_query {
        return Err(RouteError::new(
            "0A000",
            format!("INSERT ... SELECT into sharded table \"{table}\" cannot be split by server: the proxy does not know the rows' keys"),
            "insert with VALUES and the key as a literal or parameter, or run the INSERT ... SELECT on each server",
        ));
    }
    if insert.rows.is_empty() {
        return Err(RouteError::new(
            "0A000",
            format!("INSERT ... DEFAULT VALUES into sharded table \"{table}\" gives no key to route the row by"),
            "insert with VALUES and a value for the sharding key",
        ));
    }
    Ok(())
}

fn all_partitions(map: &ClusterMap) -> Vec<u32> {
    (0..map.assignments.len() as u32).collect()
}

fn insert_rows(
    insert: &InsertRows,
    map: &ClusterMap,
    literals: &[Literal],
    params: Option<&Params<'_>>,
) -> Result<Option<Targets>, RouteError> {
    let table = insert.table.as_str();
    let Some((key_column, _, key_type)) = sharded(map, table) else {
        return Err(RouteError::new(
            "0A000",
            format!("\"{table}\" is not a sharded table"),
            "run the statement on the server that holds the table",
        ));
    };
    let index = insert_key_index(insert, key_column, map)?;
    let mut partitions = Vec::with_capacity(insert.rows.len());
    for (n, row) in insert.rows.iter().enumerate() {
        let Some(expr) = row.get(index).and_then(Option::as_ref) else {
            return Err(RouteError::new(
                "0A000",
                format!("the value of key column \"{key_column}\" in VALUES row {} must be a non-NULL literal or a parameter", n + 1),
                "give every row its key as a literal or parameter (compute it in the application, or with the shardline id generator)",
            ));
        };
        let Some(keys) = evaluate_keys(expr, key_type, literals, params)? else {
            return Ok(None);
        };
        let [key] = keys.as_slice() else {
            return Err(invalid_key(format!(
                "VALUES row {} has no single key",
                n + 1
            )));
        };
        partitions.push(key_partition(map, table, key)?);
    }
    Ok(Some(Targets::Rows(partitions)))
}

/// UPDATE/DELETE: the owners of the keys its WHERE fixes (`IN (...)`,
/// `= ANY(...)`), or every partition.
fn modify_partitions(
    statement: &DataStatement,
    table: &TableUse,
    map: &ClusterMap,
    literals: &[Literal],
    params: Option<&Params<'_>>,
) -> Result<Option<Targets>, RouteError> {
    let Some((key_column, _, key_type)) = sharded(map, &table.name) else {
        return Ok(Some(Targets::Partitions(all_partitions(map))));
    };
    let exprs = key_exprs(statement, table, key_column, map)?;
    if exprs.is_empty() {
        return Ok(Some(Targets::Partitions(all_partitions(map))));
    }
    Ok(
        key_partitions(&exprs, key_type, &table.name, map, literals, params)?
            .map(Targets::Partitions),
    )
}
