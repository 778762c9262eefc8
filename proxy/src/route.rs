//! Turning an analysed statement into a [`Route`] with the current map: which
//! server runs it, and for which partitions (so a blocked partition can be
//! held). Anything that cannot go to exactly one server is an error with a
//! SQLSTATE and a hint — never a silent broadcast, never a guess.

use std::collections::BTreeMap;

use bytes::Bytes;
use shardmap::{ClusterMap, KeyType, KeyValue, TableKind};

use crate::analyze::statement::{DataStatement, InsertRows, KeyExpr, TableUse};
use crate::analyze::Literal;
use crate::wire::messages::Bind;

pub mod ddl;
pub mod hint;
pub(crate) mod keys;
mod reference;
pub mod writes;
use hint::Hint;
use keys::evaluate_keys;

/// Where a statement runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Rows of these partitions, all owned by `server`.
    Partitions {
        server: String,
        partitions: Vec<u32>,
    },
    /// An unsharded table's home server.
    Server(String),
    /// Touches no partitioned data (catalogs, reference-table reads, no
    /// tables at all): any server gives the same answer.
    Any,
    /// A read of partitions on several servers: runs on each, and the proxy
    /// merges the results (see `analyze::scatter`). Only ever made for a
    /// read-only SELECT while scatter reads are allowed, never as a fallback.
    Scatter {
        /// Servers in map order, without repeats.
        servers: Vec<String>,
        partitions: Vec<u32>,
    },
    /// An INSERT ... VALUES, UPDATE or DELETE of a sharded table whose rows
    /// may be on several servers: each server runs its part (see
    /// `writes::plan_write`), in one transaction. Only made by `route_data`
    /// with writes allowed, for statements one server cannot run, never as
    /// a fallback for a statement it does not understand.
    Writes {
        /// Servers in the order their first row or partition was seen.
        servers: Vec<String>,
        partitions: Vec<u32>,
    },
}

impl Route {
    /// The one server that runs the statement; `None` for `Any`, and for
    /// `Scatter` and `Writes` (which never reach a single backend).
    pub fn server(&self) -> Option<&str> {
        match self {
            Route::Partitions { server, .. } | Route::Server(server) => Some(server),
            Route::Any | Route::Scatter { .. } | Route::Writes { .. } => None,
        }
    }

    pub fn partitions(&self) -> &[u32] {
        match self {
            Route::Partitions { partitions, .. }
            | Route::Scatter { partitions, .. }
            | Route::Writes { partitions, .. } => partitions,
            _ => &[],
        }
    }

    /// A route over `partitions`, given each one's owner: one server's
    /// partitions, or a scatter over their owners (in the order first seen).
    fn over_partitions(mut partitions: Vec<u32>, owners: Vec<String>) -> Route {
        partitions.sort_unstable();
        partitions.dedup();
        let mut servers: Vec<String> = Vec::new();
        for owner in owners {
            if !servers.contains(&owner) {
                servers.push(owner);
            }
        }
        if servers.len() == 1 {
            Route::Partitions {
                server: servers.remove(0),
                partitions,
            }
        } else {
            Route::Scatter {
                servers,
                partitions,
            }
        }
    }

    /// The route covering both, if one server can run both, or both are
    /// partitions a scatter read can cover.
    pub fn merge(self, other: Route) -> Result<Route, (String, String)> {
        match (self, other) {
            (Route::Any, r) | (r, Route::Any) => Ok(r),
            // A write across servers is the request's only statement on a
            // server (its parts run in their own transaction).
            (Route::Writes { servers, .. }, other) | (other, Route::Writes { servers, .. }) => {
                Err((servers.join(", "), other.into_parts().0.join(", ")))
            }
            (
                a @ (Route::Scatter { .. } | Route::Partitions { .. }),
                b @ (Route::Scatter { .. } | Route::Partitions { .. }),
            ) if matches!(a, Route::Scatter { .. }) || matches!(b, Route::Scatter { .. }) => {
                let (servers_a, partitions_a) = a.into_parts();
                let (servers_b, partitions_b) = b.into_parts();
                Ok(Route::over_partitions(
                    partitions_a.into_iter().chain(partitions_b).collect(),
                    servers_a.into_iter().chain(servers_b).collect(),
                ))
            }
            (Route::Scatter { servers, .. }, other) | (other, Route::Scatter { servers, .. }) => {
                Err((
                    servers.join(", "),
                    other.server().unwrap_or_default().to_string(),
                ))
            }
            (a, b) => {
                let (sa, sb) = (
                    a.server().unwrap_or_default().to_string(),
                    b.server().unwrap_or_default().to_string(),
                );
                if sa != sb {
                    return Err((sa, sb));
                }
                let mut partitions: Vec<u32> = a
                    .partitions()
                    .iter()
                    .chain(b.partitions())
                    .copied()
                    .collect();
                partitions.sort_unstable();
                partitions.dedup();
                Ok(if partitions.is_empty() {
                    Route::Server(sa)
                } else {
                    Route::Partitions {
                        server: sa,
                        partitions,
                    }
                })
            }
        }
    }
}

impl Route {
    fn into_parts(self) -> (Vec<String>, Vec<u32>) {
        match self {
            Route::Scatter {
                servers,
                partitions,
            }
            | Route::Writes {
                servers,
                partitions,
            } => (servers, partitions),
            Route::Partitions { server, partitions } => (vec![server], partitions),
            Route::Server(server) => (vec![server], Vec::new()),
            Route::Any => (Vec::new(), Vec::new()),
        }
    }
}

/// A client-visible routing failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RouteError {
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl RouteError {
    pub fn new(
        code: &'static str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> RouteError {
        RouteError {
            code,
            message: message.into(),
            hint: Some(hint.into()),
        }
    }
}

/// Bind parameters with the types the client declared at Parse.
pub struct Params<'a> {
    pub bind: &'a Bind,
    pub types: &'a [u32],
}

/// Routing either needs the Bind parameters, or is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Route(Route),
    NeedsParams,
}

/// Routes one data statement. With `scatter` allowed, a read-only
/// statement whose sharded tables' keys are not fixed to one server routes
/// to a `Scatter` over the servers that own the partitions it reads. With
/// `writes` allowed, an INSERT ... VALUES, UPDATE or DELETE of a sharded
/// table that one server cannot run routes to `Writes` (see `writes`);
/// whatever one server can run routes as it does without. A write to a
/// reference table routes to `Writes` over every serving server (see
/// `reference`) with `writes` allowed, and is refused without.
pub fn route_data(
    statement: &DataStatement,
    map: &ClusterMap,
    literals: &[Literal],
    params: Option<&Params<'_>>,
    scatter: bool,
    writes: bool,
) -> Result<Resolution, RouteError> {
    route_hinted(
        statement,
        map,
        literals,
        params,
        scatter,
        writes,
        &Hint::default(),
    )
}

/// `route_data` with a routing hint (see `hint`): a sharded table whose
/// key the statement does not fix routes to the hinted key's partition,
/// and a statement without sharded tables to the hinted group's.
pub fn route_hinted(
    statement: &DataStatement,
    map: &ClusterMap,
    literals: &[Literal],
    params: Option<&Params<'_>>,
    scatter: bool,
    writes: bool,
    hint: &Hint,
) -> Result<Resolution, RouteError> {
    if let Some(table) = reference::written_reference(statement, map) {
        return if writes {
            reference::route_reference_write(statement, map, table)
        } else {
            Err(reference::refused_here(table))
        };
    }
    if statement.unparsed.is_none() && crate::analyze::ddl::may_be_ddl(&statement.words) {
        // DDL of a sharded or reference table must reach every server: the
        // simple-protocol session runs it (`session::ddl`) before routing.
        // Anywhere else it is refused, never sent to one server.
        if let Some(table) = statement.tables.iter().find(|t| {
            t.schema.is_none()
                && matches!(
                    map.tables.get(&t.name).map(|d| &d.kind),
                    Some(TableKind::Sharded { .. } | TableKind::Reference)
                )
        }) {
            return Err(RouteError::new(
                "0A000",
                format!(
                    "this schema statement names \"{}\", a sharded or reference table, and must run on every server; shardline does that only for CREATE/DROP/ALTER INDEX, ALTER TABLE, TRUNCATE, COMMENT, GRANT/REVOKE, CREATE/DROP TRIGGER and CREATE/DROP RULE sent as a statement of their own",
                    table.name
                ),
                "send it on its own (one simple Query, or one statement bound in its extended-protocol request), or run it on each server directly",
            ));
        }
    }
    match route_one(statement, map, literals, params, scatter, hint) {
        // A hint's error stands: a hinted statement never fans out.
        Err(_) if writes && hint.is_empty() && writes::applies(statement, map) => {
            writes::route_write(statement, map, literals, params)
        }
        routed => routed,
    }
}

fn route_one(
    statement: &DataStatement,
    map: &ClusterMap,
    literals: &[Literal],
    params: Option<&Params<'_>>,
    scatter: bool,
    hint: &Hint,
) -> Result<Resolution, RouteError> {
    let scatter = scatter && statement.read_only;
    if let Some(why) = &statement.unparsed {
        let mentioned: Vec<&str> = statement
            .words
            .iter()
            .filter(|w| map.tables.contains_key(w.as_str()))
            .map(String::as_str)
            .collect();
        if mentioned.is_empty() {
            // Touches no table shardline manages (utility statements, or SQL
            // Postgres will reject itself): any server answers the same,
            // unless a hint names the partition (a procedure call).
            return Ok(Resolution::Route(hinted_group(map, hint)?));
        }
        if let Some(server) = hint.server(map)? {
            // A maintenance statement (VACUUM of a sharded table) on the
            // hinted server, held while any of its partitions is blocked.
            let partitions = (0..map.assignments.len() as u32)
                .filter(|p| owner_of(map, *p).is_ok_and(|o| o == server))
                .collect();
            return Ok(Resolution::Route(Route::Partitions {
                server: server.to_string(),
                partitions,
            }));
        }
        return Err(RouteError::new(
            "0A000",
            format!(
                "shardline cannot analyse this statement, which mentions {}: {why}",
                mentioned.join(", ")
            ),
            "rewrite it in a simpler form, run it on a server directly, or name the server with SET shardline.server",
        ));
    }
    let mut route = Route::Any;
    let mut needs_params = false;
    for table in &statement.tables {
        if table.is_catalog() {
            continue;
        }
        let table_route = match route_table(statement, table, map, literals, params, scatter, hint)?
        {
            Some(r) => r,
            None => {
                needs_params = true;
                continue;
            }
        };
        route = route.merge(table_route).map_err(|(a, b)| {
            if scatter {
                RouteError::new(
                    "0A000",
                    format!("statement reads partitions on servers {a} together with a table that lives only on server {b}"),
                    "read the unsharded table in a statement of its own",
                )
            } else {
                RouteError::new(
                    "0A000",
                    format!("statement touches data on servers {a} and {b}; shardline runs each statement on one server"),
                    "split it into statements that each touch one key's data",
                )
            }
        })?;
    }
    if let Some(copy) = &statement.copy {
        if copy.from_stdin {
            if let Some(name) = &copy.table {
                if matches!(
                    map.tables.get(name).map(|t| &t.kind),
                    Some(TableKind::Sharded { .. })
                ) {
                    return Err(RouteError::new(
                        "0A000",
                        format!("COPY FROM STDIN into sharded table {name:?} is not supported yet"),
                        "insert the rows with INSERT statements, or COPY into each server directly",
                    ));
                }
            }
        }
    }
    if needs_params {
        return Ok(Resolution::NeedsParams);
    }
    if route == Route::Any {
        return Ok(Resolution::Route(hinted_group(map, hint)?));
    }
    Ok(Resolution::Route(route))
}

/// Where a statement that touches no sharded table runs: the hinted
/// group's partition of the hinted key, or any server.
fn hinted_group(map: &ClusterMap, hint: &Hint) -> Result<Route, RouteError> {
    if let Some(server) = hint.server(map)? {
        return Ok(Route::Server(server.to_string()));
    }
    Ok(match hint.group_partition(map)? {
        Some(partition) => Route::Partitions {
            server: owner_of(map, partition)?.to_string(),
            partitions: vec![partition],
        },
        None => Route::Any,
    })
}

/// The route for one table, or `None` when a Bind parameter is needed.
fn route_table(
    statement: &DataStatement,
    table: &TableUse,
    map: &ClusterMap,
    literals: &[Literal],
    params: Option<&Params<'_>>,
    scatter: bool,
    hint: &Hint,
) -> Result<Option<Route>, RouteError> {
    let def = known_table(map, table)?;
    match &def.kind {
        // Read (a write of one never gets here: see `route_data`), so any
        // server's copy answers.
        TableKind::Reference => Ok(Some(Route::Any)),
        TableKind::Unsharded { home } => Ok(Some(Route::Server(home.clone()))),
        TableKind::Sharded {
            group,
            key_column,
            embedded_id,
        } => {
            let key_type = if *embedded_id {
                KeyType::Bigint
            } else {
                map.groups
                    .get(group)
                    .map_or(KeyType::Bigint, |g| g.key_type)
            };
            let exprs = key_exprs(statement, table, key_column, map)?;
            let hinted = hint.partition(map, group)?;
            let hinted_server = hint.server(map)?;
            if let (Some(partition), true) = (hinted, exprs.is_empty()) {
                let owner = owner_of(map, partition)?;
                if let Some(server) = hinted_server.filter(|s| *s != owner) {
                    return Err(hint::elsewhere(partition, owner, server));
                }
                return Ok(Some(Route::Partitions {
                    server: owner.to_string(),
                    partitions: vec![partition],
                }));
            }
            if let (Some(server), true) = (hinted_server, exprs.is_empty()) {
                // The server's own partitions (held like any while they move).
                let partitions: Vec<u32> = (0..map.assignments.len() as u32)
                    .filter(|p| owner_of(map, *p).is_ok_and(|o| o == server))
                    .collect();
                return Ok(Some(Route::Partitions {
                    server: server.to_string(),
                    partitions,
                }));
            }
            if exprs.is_empty() && scatter {
                let partitions: Vec<u32> = (0..map.assignments.len() as u32).collect();
                let owners = map.assignments.iter().map(|a| a.owner.clone()).collect();
                return Ok(Some(Route::over_partitions(partitions, owners)));
            }
            if exprs.is_empty() {
                return Err(RouteError::new(
                    "0A000",
                    format!(
                        "statement on sharded table \"{}\" does not fix its key column \"{key_column}\"",
                        table.name
                    ),
                    format!(
                        "add `WHERE {key_column} = <value>` (or `= $1`, or `IN (...)`); \
                         reads across partitions need `SET shardline.scatter = on` (this session or the proxy has it off)"
                    ),
                ));
            }
            let Some(partitions) =
                key_partitions(&exprs, key_type, &table.name, map, literals, params)?
            else {
                return Ok(None);
            };
            if partitions.is_empty() {
                // `key = ANY('{}')`: no row of this table can match, on any server.
                return Ok(Some(Route::Any));
            }
            if let Some(partition) = hinted.filter(|p| partitions != [*p]) {
                return Err(hint::conflict(&table.name, partition, &partitions));
            }
            if let Some(server) = hinted_server {
                for p in &partitions {
                    let owner = owner_of(map, *p)?;
                    if owner != server {
                        return Err(hint::elsewhere(*p, owner, server));
                    }
                }
                return Ok(Some(Route::Partitions {
                    server: server.to_string(),
                    partitions,
                }));
            }
            if scatter {
                let mut owners = Vec::with_capacity(partitions.len());
                for p in &partitions {
                    owners.push(owner_of(map, *p)?.to_string());
                }
                return Ok(Some(Route::over_partitions(partitions, owners)));
            }
            let mut server: Option<&str> = None;
            for p in &partitions {
                let owner = owner_of(map, *p)?;
                match server {
                    None => server = Some(owner),
                    Some(first) if first != owner => {
                        return Err(RouteError::new(
                            "0A000",
                            format!(
                                "the keys of \"{}\" in this statement live on servers {first} and {owner}; shardline runs each statement on one server",
                                table.name
                            ),
                            "send one statement per key, or per server (reads across servers need `SET shardline.scatter = on`)",
                        ))
                    }
                    Some(_) => {}
                }
            }
            let server = server.unwrap_or_default().to_string();
            Ok(Some(Route::Partitions { server, partitions }))
        }
    }
}

/// The partitions (sorted, without repeats) of the keys `exprs` give
/// `table`'s key column; `None` when a Bind parameter is needed.
fn key_partitions(
    exprs: &[&KeyExpr],
    key_type: KeyType,
    table: &str,
    map: &ClusterMap,
    literals: &[Literal],
    params: Option<&Params<'_>>,
) -> Result<Option<Vec<u32>>, RouteError> {
    let mut partitions: Vec<u32> = Vec::with_capacity(exprs.len());
    for expr in exprs {
        let Some(keys) = evaluate_keys(expr, key_type, literals, params)? else {
            return Ok(None);
        };
        for key in keys {
            partitions.push(key_partition(map, table, &key)?);
        }
    }
    partitions.sort_unstable();
    partitions.dedup();
    Ok(Some(partitions))
}

/// The partition of `table` that holds `key`; a key the map cannot place
/// (out of a range, not in a list) is the client's error.
fn key_partition(map: &ClusterMap, table: &str, key: &KeyValue) -> Result<u32, RouteError> {
    map.partition_of(table, key).map_err(|e| {
        RouteError::new(
            "22023",
            format!("cannot route key {key} of \"{table}\": {e}"),
            "check the key value",
        )
    })
}

/// For a read whose key comes as one array parameter (`key = ANY($n)`):
/// the parameter's index and its value for each server, holding only the
/// keys that server owns. `None` when the keys come any other way (the
/// servers then get the statement's keys as they are).
pub fn array_param_by_server(
    statement: &DataStatement,
    map: &ClusterMap,
    bind: &Bind,
) -> Option<(usize, BTreeMap<String, Bytes>)> {
    let mut found: Option<(usize, &str, KeyType)> = None;
    for table in &statement.tables {
        let Some(TableKind::Sharded {
            group,
            key_column,
            embedded_id,
        }) = map.tables.get(&table.name).map(|t| &t.kind)
        else {
            continue;
        };
        let key_type = if *embedded_id {
            KeyType::Bigint
        } else {
            map.groups
                .get(group)
                .map_or(KeyType::Bigint, |g| g.key_type)
        };
        let exprs = key_exprs(statement, table, key_column, map).ok()?;
        let [KeyExpr::Array(inner)] = exprs.as_slice() else {
            return None;
        };
        let KeyExpr::Param(index) = inner.as_ref() else {
            return None;
        };
        match found {
            Some((seen, _, _)) if seen != *index => return None,
            _ => found = Some((*index, table.name.as_str(), key_type)),
        }
    }
    let (index, table, key_type) = found?;
    let bytes = bind.params.get(index)?.as_ref()?;
    let owner = |key: &KeyValue| {
        let partition = map.partition_of(table, key).ok()?;
        owner_of(map, partition).ok().map(str::to_string)
    };
    let split = keys::split_array(bytes, bind.is_binary(index), key_type, owner).ok()??;
    Some((index, split))
}

/// The map's definition of `table`; 42P01 for a table it does not know
/// (or one in another schema than `public`).
fn known_table<'m>(
    map: &'m ClusterMap,
    table: &TableUse,
) -> Result<&'m shardmap::Table, RouteError> {
    map.tables
        .get(&table.name)
        .filter(|_| table.schema.is_none())
        .ok_or_else(|| {
            let qualified = match &table.schema {
                Some(schema) => format!("{schema}.{}", table.name),
                None => table.name.clone(),
            };
            RouteError::new(
                "42P01",
                format!("relation \"{qualified}\" is not in the shardline map"),
                "declare it with `shardctl table add`, or query it on a server directly",
            )
        })
}

fn owner_of(map: &ClusterMap, partition: u32) -> Result<&str, RouteError> {
    map.assignments
        .get(partition as usize)
        .map(|a| a.owner.as_str())
        .ok_or_else(|| {
            RouteError::new(
                "XX000",
                format!("partition {partition} has no owner in the map"),
                "check `shardctl map`",
            )
        })
}

/// The expressions giving `table`'s key in this statement.
fn key_exprs<'s>(
    statement: &'s DataStatement,
    table: &TableUse,
    key_column: &str,
    map: &ClusterMap,
) -> Result<Vec<&'s KeyExpr>, RouteError> {
    let mut exprs = Vec::new();
    for equality in &statement.equalities {
        let applies = match &equality.column.qualifier {
            None => true,
            Some(q) => Some(q) == table.alias.as_ref() || *q == table.name,
        };
        if applies && equality.column.column == key_column {
            exprs.extend(equality.values.iter());
        }
    }
    if let Some(insert) = statement.insert.as_ref().filter(|i| i.table == table.name) {
        if insert.from_query {
            return Err(RouteError::new(
                "0A000",
                format!(
                    "INSERT ... SELECT into sharded table \"{}\" cannot be routed",
                    table.name
                ),
                "insert with VALUES and the key as a literal or parameter",
            ));
        }
        let index = insert_key_index(insert, key_column, map)?;
        for row in &insert.rows {
            match row.get(index).and_then(Option::as_ref) {
                Some(expr) => exprs.push(expr),
                None => {
                    return Err(RouteError::new(
                        "0A000",
                        format!(
                        "the value of key column \"{key_column}\" must be a literal or a parameter"
                    ),
                        "compute the key in the application, or with the shardline id generator",
                    ))
                }
            }
        }
    }
    Ok(exprs)
}

/// Where the key column is among an INSERT's values.
fn insert_key_index(
    insert: &InsertRows,
    key_column: &str,
    map: &ClusterMap,
) -> Result<usize, RouteError> {
    let table = &insert.table;
    if insert.columns.is_empty() {
        // No column list: the values follow the table's columns, as the
        // map recorded them when the table was created.
        let recorded = map
            .columns
            .get(table)
            .and_then(|c| shardmap::ddl::column_names(c));
        recorded.and_then(|names| names.iter().position(|c| c == key_column)).ok_or_else(|| {
            RouteError::new(
                "0A000",
                format!("INSERT into sharded table \"{table}\" names no columns, and the shard map does not record its columns"),
                format!("list the columns: INSERT INTO {table} ({key_column}, ...) VALUES (...), or create the table with `shardctl table create` so its columns are known"),
            )
        })
    } else {
        insert.columns.iter().position(|c| c == key_column).ok_or_else(|| {
            RouteError::new(
                "0A000",
                format!("INSERT into sharded table \"{table}\" must name its key column \"{key_column}\""),
                format!("list the columns: INSERT INTO {table} ({key_column}, ...) VALUES (...)"),
            )
        })
    }
}

/// The map the routing unit tests start from: `servers` (8 partitions),
/// `users` sharded by `user_id` (bigint hash), the reference table
/// `countries`, and `settings` unsharded on `b`.
#[cfg(test)]
pub(crate) fn test_map(servers: &[&str]) -> ClusterMap {
    use shardmap::{Endpoint, Group, Server, Table};
    let servers = servers
        .iter()
        .map(|n| Server::active(n, Endpoint::parse("postgres://h:1/d").expect("url")))
        .collect();
    let mut map = ClusterMap::new("t", 8, servers).expect("map");
    map.declare(Group::hash("users", KeyType::Bigint).table("users", "user_id"));
    map.declare_table(Table::reference("countries"));
    map.declare_table(Table::unsharded("settings", "b"));
    map
}

#[cfg(test)]
mod tests;
