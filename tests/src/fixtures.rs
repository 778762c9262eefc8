//! The data the tests start from and read back: tables created on the
//! servers where the map places them, the `users`/`events` schema of the move
//! tests, and where those rows and users are.

use std::collections::BTreeMap;

use shardmap::{Change, ClusterMap, Group, KeyType, KeyValue, MapStore};

use crate::TestCluster;

/// Creates `table` with `columns` on the servers that should hold it,
/// following the map: a sharded table as a partitioned parent on every
/// server with the leaves of the partitions that server owns; a reference
/// table everywhere; an unsharded table on its home.
pub async fn create_table(cluster: &TestCluster, map: &ClusterMap, table: &str, columns: &str) {
    for (index, server) in cluster.cluster.servers.iter().enumerate() {
        let statements = shardmap::ddl::create_statements(map, table, columns, server.name())
            .unwrap_or_else(|e| panic!("DDL for {table}: {e}"));
        if !statements.is_empty() {
            cluster
                .connect(index)
                .await
                .batch_execute(&statements.join(";\n"))
                .await
                .unwrap_or_else(|e| panic!("create {table}: {e}"));
        }
    }
}

/// A new map of `partitions` over the cluster's servers, then the test's
/// groups and tables declared by `declare` in a change of their own, as
/// `shardctl` would make it (so the schema arrives at version 2).
pub async fn init_schema(
    cluster: &TestCluster,
    name: &str,
    partitions: u32,
    declare: impl Fn(&mut ClusterMap),
) -> (MapStore, ClusterMap) {
    let (store, _) = cluster.init_map(name, partitions).await;
    let saved = store
        .update("test", |map| {
            declare(map);
            Ok(Change::new("test-schema", "the test's groups and tables"))
        })
        .await
        .expect("declare the schema");
    (store, saved.map)
}

/// `users(id, n)` and `events(user_id, seq, payload)`, both sharded by user id.
pub async fn setup_schema(
    cluster: &TestCluster,
    name: &str,
    partitions: u32,
) -> (MapStore, ClusterMap) {
    let (store, map) = init_schema(cluster, name, partitions, |map| {
        map.declare(
            Group::hash("users", KeyType::Bigint)
                .table("users", "id")
                .table("events", "user_id"),
        );
    })
    .await;
    create_table(
        cluster,
        &map,
        "users",
        "id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0",
    )
    .await;
    create_table(
        cluster,
        &map,
        "events",
        "user_id bigint NOT NULL, seq bigint NOT NULL, payload text, PRIMARY KEY (user_id, seq)",
    )
    .await;
    (store, map)
}

/// The rows `sql` returns on each server, each with that server's name.
pub async fn rows_on_every_server(
    cluster: &TestCluster,
    sql: &str,
) -> Vec<(tokio_postgres::Row, String)> {
    let mut found = Vec::new();
    for (index, server) in cluster.cluster.servers.iter().enumerate() {
        let rows = cluster
            .connect(index)
            .await
            .query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql} on {}: {e}", server.name()));
        found.extend(rows.into_iter().map(|row| (row, server.name().to_string())));
    }
    found
}

/// `(user_id, seq)` of every event row on every server, with the server
/// each was found on.
pub async fn all_events(cluster: &TestCluster) -> Vec<((i64, i64), String)> {
    rows_on_every_server(cluster, "SELECT user_id, seq FROM events")
        .await
        .into_iter()
        .map(|(row, server)| ((row.get(0), row.get(1)), server))
        .collect()
}

/// `id -> (n, server)` for every users row on every server.
pub async fn all_users(cluster: &TestCluster) -> BTreeMap<i64, Vec<(i64, String)>> {
    let mut users: BTreeMap<i64, Vec<(i64, String)>> = BTreeMap::new();
    for (row, server) in rows_on_every_server(cluster, "SELECT id, n FROM users").await {
        users
            .entry(row.get(0))
            .or_default()
            .push((row.get(1), server));
    }
    users
}

/// The server owning user `id` in `map`.
pub fn owner_of(map: &ClusterMap, id: i64) -> String {
    let partition = map
        .partition_of("users", &KeyValue::Int(id))
        .expect("partition of a user id");
    map.assignments[partition as usize].owner.clone()
}

/// A users id in `partition`, among `0..limit`.
pub fn user_in_partition(map: &ClusterMap, partition: u32, limit: i64) -> i64 {
    (0..limit)
        .find(|id| map.partition_of("users", &KeyValue::Int(*id)).ok() == Some(partition))
        .expect("a user in the partition")
}

/// One key of `table` owned by each server, in the cluster's server order.
pub fn key_per_server(cluster: &TestCluster, map: &ClusterMap, table: &str) -> Vec<i64> {
    let servers = cluster.map_servers();
    let mut keys: Vec<Option<i64>> = vec![None; servers.len()];
    for key in 1..100_000i64 {
        let partition = map
            .partition_of(table, &KeyValue::Int(key))
            .expect("partition");
        let owner = map.owner_of(partition).expect("owner").name.clone();
        let index = cluster.server_index(&owner);
        if keys[index].is_none() {
            keys[index] = Some(key);
        }
        if keys.iter().all(Option::is_some) {
            break;
        }
    }
    keys.into_iter()
        .map(|key| key.expect("a key on every server"))
        .collect()
}

/// Prepared transactions left on all of the cluster's servers.
pub async fn prepared_left(cluster: &TestCluster) -> i64 {
    let mut total = 0;
    for index in 0..cluster.cluster.servers.len() {
        let row = cluster
            .connect(index)
            .await
            .query_one("SELECT count(*) FROM pg_prepared_xacts", &[])
            .await
            .expect("pg_prepared_xacts");
        total += row.get::<_, i64>(0);
    }
    total
}

/// Checks that the rows of `table` whose `note` column is `note` have
/// exactly the keys `keys` in `key_column`, each once, each on its owner
/// (read on every server directly).
pub async fn check_placement(
    cluster: &TestCluster,
    map: &ClusterMap,
    table: &str,
    key_column: &str,
    note: &str,
    keys: &[i64],
) {
    let mut found = Vec::new();
    for index in 0..cluster.cluster.servers.len() {
        let rows = cluster
            .connect(index)
            .await
            .query(
                &format!("SELECT {key_column} FROM {table} WHERE note = $1"),
                &[&note],
            )
            .await
            .expect("rows on the server");
        for row in rows {
            let key: i64 = row.get(0);
            let partition = map
                .partition_of(table, &KeyValue::Int(key))
                .expect("partition");
            let owner = map.owner_of(partition).expect("owner").name.clone();
            assert_eq!(
                cluster.server_index(&owner),
                index,
                "{note}: key {key} is on the wrong server"
            );
            found.push(key);
        }
    }
    found.sort_unstable();
    let mut want = keys.to_vec();
    want.sort_unstable();
    assert_eq!(found.len(), want.len(), "{note}: rows stored");
    assert!(
        found == want,
        "{note}: the stored keys differ from the keys sent"
    );
}

/// The rows of a simple Query, as text (NULL as `NULL`).
pub async fn text_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// Leaves another client's session state on every server's pooled
/// connection (for a proxy with one connection per server), in a way the
/// proxy does not track exactly: a table `elsewhere.<table>` (`columns`)
/// made on each server directly, then, through `client`, a SET of
/// `search_path = elsewhere, public` inside a multi-statement Query that
/// reads `table` by each of `keys` of `key_column` (one per server).
pub async fn leave_untracked_search_path(
    cluster: &TestCluster,
    client: &tokio_postgres::Client,
    (table, columns): (&str, &str),
    key_column: &str,
    keys: &[i64],
) {
    for index in 0..cluster.cluster.servers.len() {
        cluster
            .connect(index)
            .await
            .batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS elsewhere; CREATE TABLE elsewhere.{table} ({columns})"
            ))
            .await
            .expect("a second table of that name on the server");
    }
    for key in keys {
        client
            .batch_execute(&format!(
                "SET search_path TO elsewhere, public; SELECT * FROM {table} WHERE {key_column} = {key}"
            ))
            .await
            .expect("a SET the proxy does not track exactly");
    }
}
