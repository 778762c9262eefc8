//! Writes to reference tables. Every serving server holds a whole copy of
//! each reference table, so an INSERT, UPDATE or DELETE of one runs, as the
//! client wrote it, on every server — in one transaction over them (the
//! client's, as its legs, or an implicit one committed with two-phase
//! commit), so the copies never differ. `route_reference_write` gives its
//! [`Route::Writes`] (over no partitions: a reference table has none, and a
//! cutover never holds it); `plan_reference_write` gives the [`WritePlan`]
//! the session runs like any write across servers, marked `replicated`:
//! one server's reply stands for all, and the servers' row counts must
//! agree (if they do not, the copies have diverged and the write is rolled
//! back, see [`WritePlan::total`]).
//!
//! While a server is joining (`shardctl server add` copying the reference
//! tables to it), the session holds these writes (see `session::hold`): a
//! write routed to the old servers must not commit after the copy was taken.

use shardmap::{ClusterMap, TableKind};
use sqlparser::ast::Statement;
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::writes::{WriteKind, WritePart, WritePlan};
use super::{known_table, Params, Resolution, Route, RouteError};
use crate::analyze::statement::DataStatement;

/// The reference table `statement` writes, if it writes one (the first,
/// by name). Unparsed statements never count: they stay refused.
pub(super) fn written_reference<'s>(
    statement: &'s DataStatement,
    map: &ClusterMap,
) -> Option<&'s str> {
    if statement.unparsed.is_some() {
        return None;
    }
    statement
        .written
        .iter()
        .filter(|t| t.schema.is_none())
        .find(|t| {
            matches!(
                map.tables.get(&t.name).map(|t| &t.kind),
                Some(TableKind::Reference)
            )
        })
        .map(|t| t.name.as_str())
}

/// The refusal of a reference-table write where writes across servers are
/// not allowed (`shardline.cross_server = refuse`, or a request kind the
/// session does not run them in yet).
pub(super) fn refused_here(table: &str) -> RouteError {
    RouteError::new(
        "0A000",
        format!(
            "writes to reference table \"{table}\" run on every server in one two-phase transaction, \
             and transactions across servers are off here (shardline.cross_server = refuse, or the extended protocol)"
        ),
        "SET shardline.cross_server = '2pc' and send the write as a simple query, or write the table on each server directly",
    )
}

/// The route of a write to reference table `table`: every serving server.
pub(super) fn route_reference_write(
    statement: &DataStatement,
    map: &ClusterMap,
    table: &str,
) -> Result<Resolution, RouteError> {
    if let Some(copy) = &statement.copy {
        if copy.from_stdin {
            return Err(RouteError::new(
                "0A000",
                format!("COPY FROM STDIN into reference table \"{table}\" is not supported yet"),
                "insert the rows with INSERT statements (many rows per INSERT are fine): each runs on every server",
            ));
        }
    }
    let first = statement.words.first().map(String::as_str);
    if !matches!(first, Some("insert" | "update" | "delete")) || statement.copy.is_some() {
        return Err(RouteError::new(
            "0A000",
            format!(
                "only a plain INSERT, UPDATE or DELETE can write reference table \"{table}\" (it runs on every server)"
            ),
            "write the reference table in an INSERT, UPDATE or DELETE of its own (no WITH, MERGE or COPY)",
        ));
    }
    for used in &statement.tables {
        if used.is_catalog() {
            continue;
        }
        let what = match &known_table(map, used)?.kind {
            TableKind::Reference => continue,
            TableKind::Sharded { .. } => "sharded",
            TableKind::Unsharded { .. } => "unsharded",
        };
        return Err(RouteError::new(
            "0A000",
            format!(
                "this statement writes reference table \"{table}\", which runs on every server, \
                 so it cannot also use {what} table \"{}\" (each server has only its own rows of it, or none)",
                used.name
            ),
            "split it: read that table in a statement of its own, then write the reference table with the values",
        ));
    }
    let servers: Vec<String> = map.serving_servers().map(|s| s.name.clone()).collect();
    if servers.is_empty() {
        return Err(RouteError::new(
            "57P03",
            "the shard map has no serving servers",
            "add a server with `shardctl server add`",
        ));
    }
    Ok(Resolution::Route(Route::Writes {
        servers,
        partitions: Vec::new(),
    }))
}

/// What every server runs for a write to a reference table: the client's
/// text and parameters, unchanged, on every serving server.
pub(super) fn plan_reference_write(
    sql: &str,
    statement: &DataStatement,
    map: &ClusterMap,
    params: Option<&Params<'_>>,
) -> Result<WritePlan, RouteError> {
    let Some(table) = written_reference(statement, map) else {
        return Err(RouteError::new(
            "XX000",
            "internal error: a reference-table write plan for a statement that writes no reference table",
            "report this to the shardline developers",
        ));
    };
    let Resolution::Route(Route::Writes { servers, .. }) =
        route_reference_write(statement, map, table)?
    else {
        return Err(RouteError::new(
            "XX000",
            "internal error: a reference-table write did not route to every server",
            "report this to the shardline developers",
        ));
    };
    let (kind, returning) = kind_and_returning(sql).ok_or_else(|| {
        RouteError::new(
            "0A000",
            format!(
                "shardline cannot analyse this write to reference table \"{table}\" to run it on every server"
            ),
            "send one plain INSERT, UPDATE or DELETE",
        )
    })?;
    let bound = params.map_or(0, |p| p.bind.params.len());
    let parts = servers
        .into_iter()
        .map(|server| WritePart {
            server,
            sql: sql.to_string(),
            rows: Vec::new(),
            params: (0..bound).collect(),
            array_param: None,
        })
        .collect();
    Ok(WritePlan {
        kind,
        table: table.to_string(),
        returning,
        rows: 0,
        partitions: Vec::new(),
        parts,
        replicated: true,
    })
}

/// Which write the text is, and whether it has RETURNING.
fn kind_and_returning(sql: &str) -> Option<(WriteKind, bool)> {
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    if statements.len() != 1 {
        return None;
    }
    match statements.remove(0) {
        Statement::Insert(insert) => Some((WriteKind::Insert, insert.returning.is_some())),
        Statement::Update(update) => Some((WriteKind::Update, update.returning.is_some())),
        Statement::Delete(delete) => Some((WriteKind::Delete, delete.returning.is_some())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyze::{Analyzer, Command};
    use crate::route::route_data;
    use shardmap::{ServerState, Table};

    fn map() -> ClusterMap {
        let mut map = crate::route::test_map(&["a", "b", "c"]);
        map.declare_table(Table::reference("currencies"));
        map
    }

    fn analyzed(sql: &str) -> (crate::analyze::Analyzed, DataStatement) {
        let analyzed = Analyzer::new(10).analyze(sql);
        let Command::Data(data) = &analyzed.analysis.commands[0] else {
            panic!("not data: {sql}")
        };
        let data = data.clone();
        (analyzed, data)
    }

    fn route(map: &ClusterMap, sql: &str, writes: bool) -> Result<Resolution, RouteError> {
        let (analyzed, data) = analyzed(sql);
        route_data(&data, map, &analyzed.literals, None, false, writes)
    }

    #[test]
    fn reference_writes_go_to_every_serving_server() {
        let mut map = map();
        for sql in [
            "INSERT INTO countries (code, name) VALUES ('de', 'Germany') RETURNING *",
            "UPDATE countries SET name = c.name FROM currencies c WHERE c.code = countries.code",
            "DELETE FROM countries WHERE code = 'de'",
            "INSERT INTO countries VALUES ('fr', 'France') ON CONFLICT (code) DO UPDATE SET name = EXCLUDED.name",
        ] {
            assert_eq!(
                route(&map, sql, true),
                Ok(Resolution::Route(Route::Writes {
                    servers: vec!["a".into(), "b".into(), "c".into()],
                    partitions: vec![]
                })),
                "{sql}"
            );
        }
        map.servers.get_mut("b").expect("b").state = ServerState::Joining;
        assert_eq!(
            route(&map, "DELETE FROM countries", true),
            Ok(Resolution::Route(Route::Writes {
                servers: vec!["a".into(), "c".into()],
                partitions: vec![]
            }))
        );
    }

    #[test]
    fn reference_reads_go_anywhere_even_in_writes() {
        let map = map();
        assert_eq!(
            route(&map, "SELECT * FROM countries FOR UPDATE", true),
            Ok(Resolution::Route(Route::Any))
        );
        let r = route(
            &map,
            "UPDATE users SET country = c.code FROM countries c WHERE users.user_id = 7 AND c.code = 'de'",
            false,
        );
        assert!(
            matches!(r, Ok(Resolution::Route(Route::Partitions { .. }))),
            "{r:?}"
        );
    }

    #[test]
    fn refusals() {
        let map = map();
        let refused = |sql: &str, writes: bool, words: &[&str]| {
            let e = route(&map, sql, writes).expect_err(sql);
            assert_eq!(e.code, "0A000", "{sql}: {e:?}");
            for word in words {
                assert!(e.message.contains(word), "{sql}: {}", e.message);
            }
        };
        refused(
            "UPDATE countries SET name = 'x'",
            false,
            &["countries", "cross_server"],
        );
        refused(
            "UPDATE countries SET n = u.n FROM users u WHERE u.user_id = 1",
            true,
            &["sharded table \"users\""],
        );
        refused(
            "INSERT INTO countries SELECT * FROM settings",
            true,
            &["unsharded table \"settings\""],
        );
        refused(
            "WITH d AS (DELETE FROM countries RETURNING *) SELECT * FROM d",
            true,
            &["plain INSERT"],
        );
        refused("COPY countries FROM STDIN", true, &["COPY"]);
    }

    #[test]
    fn the_plan_runs_the_text_unchanged_everywhere() {
        let map = map();
        let sql = "UPDATE countries SET name = 'x' WHERE code = 'de' RETURNING code";
        let (analyzed, data) = analyzed(sql);
        let plan = crate::route::writes::plan_write(sql, &data, &map, &analyzed.literals, None)
            .expect("plans");
        assert!(plan.replicated && plan.returning);
        assert_eq!(plan.kind, WriteKind::Update);
        assert_eq!(plan.parts.len(), 3);
        assert!(plan.parts.iter().all(|p| p.sql == sql));
        assert_eq!(plan.total(&[2, 2, 2]), Ok(2));
        let diverged = plan.total(&[2, 1, 2]).expect_err("copies differ");
        assert!(
            diverged.message.contains("a, c: 2") && diverged.message.contains("b: 1"),
            "{}",
            diverged.message
        );
        assert_eq!(plan.returning_order(&[2, 2, 2]), Some(vec![(0, 0), (0, 1)]));
    }
}
