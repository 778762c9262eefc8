//! Where DDL of a sharded or reference table runs: on every serving server
//! (a sharded table's parent is on every server, and Postgres applies DDL
//! on a partitioned parent to its leaves; a reference table is on every
//! server too), as the client wrote it. DDL that concerns neither is not
//! planned here and routes as any statement (an unsharded table's home).
//!
//! Refused, with what to do instead: DDL that would break sharding
//! (dropping, renaming or retyping a sharding key; dropping or renaming a
//! table of the map; changing its partitioning), DDL of a sharded table
//! while a partition is being moved, DDL while a server is joining, and DDL
//! mixing tables of the map with others.

use shardmap::{ClusterMap, PartitionState, TableKind};

use super::RouteError;
use crate::analyze::ddl::Ddl;

/// How to run one DDL statement across servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdlPlan {
    /// `CREATE INDEX`, `ALTER TABLE`, ... for messages.
    pub what: String,
    /// Every serving server, in name order.
    pub servers: Vec<String>,
    /// Runs in one transaction over the servers (committed with two-phase
    /// commit); false for `CONCURRENTLY`, which runs server by server.
    pub transactional: bool,
    /// Tables whose column list the map records and this DDL changes: after
    /// it commits, the map's list is read back from a server's catalog.
    pub refresh_columns: Vec<String>,
}

/// The plan of `ddl`, or `None` when it concerns no sharded or reference
/// table (it then routes as before).
pub fn plan_ddl(ddl: &Ddl, map: &ClusterMap) -> Result<Option<DdlPlan>, RouteError> {
    let mut mapped = Vec::new();
    let mut others = Vec::new();
    let mut sharded = ddl.on_index;
    for table in &ddl.tables {
        let kind = map
            .tables
            .get(&table.name)
            .filter(|_| table.schema.is_none())
            .map(|t| &t.kind);
        match kind {
            Some(TableKind::Sharded { key_column, .. }) => {
                sharded = true;
                if let Some(column) = ddl.key_sensitive.iter().find(|c| *c == key_column) {
                    return Err(RouteError::new(
                        "0A000",
                        format!(
                            "{} would drop, rename or retype column \"{column}\", the sharding key of table \"{}\"",
                            ddl.what, table.name
                        ),
                        "the key decides which server holds each row: to change it, create a new table with `shardctl table add` and `shardctl table create` and copy the rows",
                    ));
                }
                mapped.push(table.name.as_str());
            }
            Some(TableKind::Reference) => mapped.push(table.name.as_str()),
            _ => others.push(table.name.as_str()),
        }
    }
    if mapped.is_empty() && !ddl.on_index {
        return Ok(None);
    }
    if !others.is_empty() {
        return Err(RouteError::new(
            "0A000",
            format!(
                "{} names tables of the shard map ({}) together with {}, which live on one server or none",
                ddl.what,
                mapped.join(", "),
                others.join(", ")
            ),
            "send one statement for the sharded and reference tables and another for the others",
        ));
    }
    if let Some((what, hint)) = &ddl.refusal {
        return Err(RouteError::new(
            "0A000",
            format!(
                "{} is refused: {what} (\"{}\")",
                ddl.what,
                mapped.join("\", \"")
            ),
            hint.clone(),
        ));
    }
    if let Some(joining) = map.joining_server() {
        return Err(RouteError::new(
            "55006",
            format!(
                "{} cannot run now: server {} is joining (its tables are being created and copied)",
                ddl.what, joining.name
            ),
            "retry once `shardctl server add` has finished",
        ));
    }
    if sharded {
        // Logical replication, which copies a moving partition's leaves to
        // their new server, copies no DDL: the target's leaves were created
        // from the parent as it was when the move began, so a column added
        // now would be missing there (and the ATTACH at cutover would fail),
        // an index would be missing on the moved rows. Every sharded table
        // has a leaf in every partition, so any move counts.
        if let Some((partition, job)) =
            map.assignments
                .iter()
                .enumerate()
                .find_map(|(p, a)| match &a.state {
                    PartitionState::Serving => None,
                    PartitionState::Moving { job } | PartitionState::Blocked { job } => {
                        Some((p, job))
                    }
                })
        {
            return Err(RouteError::new(
                "55006",
                format!(
                    "{} on sharded table \"{}\" cannot run while partition {partition} is being moved (job {job}): logical replication copies no DDL, so the moved rows would miss it",
                    ddl.what,
                    mapped.first().copied().unwrap_or("(index)")
                ),
                format!("retry after the move has finished (`shardctl move status {job}`, or `shardctl status`)"),
            ));
        }
    }
    let servers: Vec<String> = map.serving_servers().map(|s| s.name.clone()).collect();
    if servers.is_empty() {
        return Err(RouteError::new(
            "57P03",
            "the shard map has no serving servers",
            "add a server with `shardctl server add`",
        ));
    }
    let refresh_columns = if ddl.changes_columns {
        mapped
            .iter()
            .filter(|t| map.columns.contains_key(**t))
            .map(|t| t.to_string())
            .collect()
    } else {
        Vec::new()
    };
    Ok(Some(DdlPlan {
        what: ddl.what.clone(),
        servers,
        transactional: !ddl.concurrently,
        refresh_columns,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyze::ddl::analyze_ddl;
    use crate::analyze::lexer::lex;
    use shardmap::ServerState;

    fn map() -> ClusterMap {
        let mut map = crate::route::test_map(&["a", "b", "c"]);
        map.columns.insert(
            "users".into(),
            "user_id bigint PRIMARY KEY, name text".into(),
        );
        map
    }

    fn plan(map: &ClusterMap, sql: &str) -> Result<Option<DdlPlan>, RouteError> {
        let ddl = analyze_ddl(sql, &lex(sql).words).expect("ddl");
        plan_ddl(&ddl, map)
    }

    #[test]
    fn ddl_of_map_tables_runs_everywhere() {
        let map = map();
        let p = plan(&map, "ALTER TABLE users ADD COLUMN email text")
            .expect("plans")
            .expect("ours");
        assert_eq!(p.servers, ["a", "b", "c"]);
        assert!(p.transactional);
        assert_eq!(p.refresh_columns, ["users"]);
        let p = plan(&map, "CREATE INDEX CONCURRENTLY ON countries (name)")
            .expect("plans")
            .expect("ours");
        assert!(!p.transactional && p.refresh_columns.is_empty());
        assert!(plan(&map, "DROP INDEX users_name")
            .expect("plans")
            .is_some());
        assert_eq!(plan(&map, "CREATE INDEX ON settings (x)"), Ok(None));
        assert_eq!(plan(&map, "ALTER TABLE nope ADD COLUMN x int"), Ok(None));
    }

    #[test]
    fn refusals() {
        let mut map = map();
        let code = |map: &ClusterMap, sql: &str| plan(map, sql).expect_err(sql).code;
        assert_eq!(code(&map, "ALTER TABLE users DROP COLUMN user_id"), "0A000");
        assert_eq!(
            code(&map, "ALTER TABLE users ALTER COLUMN user_id TYPE text"),
            "0A000"
        );
        assert_eq!(code(&map, "DROP TABLE countries"), "0A000");
        assert_eq!(code(&map, "ALTER TABLE users RENAME TO people"), "0A000");
        assert_eq!(code(&map, "TRUNCATE users, settings"), "0A000");
        map.assignments[3].state = PartitionState::Moving { job: "j7".into() };
        let e = plan(&map, "CREATE INDEX ON users (name)").expect_err("moving");
        assert_eq!(e.code, "55006");
        assert!(e.message.contains("j7") && e.hint.as_deref().unwrap_or("").contains("j7"));
        // Reference tables are not moved: their DDL goes on.
        assert!(plan(&map, "CREATE INDEX ON countries (name)").is_ok());
        map.assignments[3].state = PartitionState::Serving;
        map.servers.get_mut("c").expect("c").state = ServerState::Joining;
        assert_eq!(code(&map, "CREATE INDEX ON countries (name)"), "55006");
    }
}
