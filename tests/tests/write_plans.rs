//! The planner of writes across servers (`proxy::route::writes`) against
//! real Postgres servers, without the proxy (its session does not run these
//! plans yet): each server's part of a multi-row INSERT runs on that server
//! as planned, with `ON CONFLICT` and `RETURNING` kept and parameters
//! renumbered and typed from the client's statement; rows land on their
//! owners only; RETURNING rows put back by `returning_order` come in VALUES
//! order; an UPDATE's parts together update every matching row once.

use bytes::Bytes;
use proxy::analyze::{Analyzed, Analyzer, Command, DataStatement};
use proxy::route::writes::{plan_write, WritePlan};
use proxy::route::Params;
use proxy::wire::messages::Bind;
use shardline_tests::fixtures::{create_table, init_schema, owner_of};
use shardline_tests::TestCluster;
use shardmap::{ClusterMap, Group, KeyType};
use tokio_postgres::types::{ToSql, Type};

async fn setup(cluster: &TestCluster) -> ClusterMap {
    let (_store, map) = init_schema(cluster, "writes", 8, |map| {
        map.declare(Group::hash("users", KeyType::Bigint).table("users", "id"));
    })
    .await;
    create_table(cluster, &map, "users", "id bigint PRIMARY KEY, name text").await;
    map
}

fn analyze(sql: &str) -> (Analyzed, DataStatement) {
    let analyzed = Analyzer::new(10).analyze(sql);
    let Command::Data(data) = &analyzed.analysis.commands[0] else {
        panic!("not a data statement: {sql}")
    };
    let data = data.clone();
    (analyzed, data)
}

/// A Bind of text values, as a driver would send it.
fn text_bind(values: &[String]) -> Bind {
    Bind {
        portal: String::new(),
        statement: String::new(),
        param_formats: Vec::new(),
        params: values
            .iter()
            .map(|v| Some(Bytes::from(v.clone())))
            .collect(),
        result_formats: Bytes::from_static(&[0, 0]),
    }
}

fn plan_of(map: &ClusterMap, sql: &str, bind: Option<&Bind>) -> WritePlan {
    let (analyzed, data) = analyze(sql);
    let params = bind.map(|bind| Params { bind, types: &[] });
    plan_write(sql, &data, map, &analyzed.literals, params.as_ref())
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

/// Which servers hold a user row with this id and name, asked directly.
async fn holders(cluster: &TestCluster, id: i64) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for (index, server) in cluster.cluster.servers.iter().enumerate() {
        let client = cluster.connect(index).await;
        for row in client
            .query("SELECT name FROM users WHERE id = $1", &[&id])
            .await
            .expect("read back")
        {
            found.push((server.name().to_string(), row.get(0)));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_parts_run_on_their_owners_and_return_rows_in_values_order() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    let keys: Vec<i64> = (1..=6).collect();
    let values: Vec<String> = keys.iter().map(|k| format!("({k}, 'n{k}')")).collect();
    for suffix in [
        "",
        " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name || '!'",
    ] {
        let sql = format!(
            "INSERT INTO users (id, name) VALUES {}{suffix} RETURNING id, name",
            values.join(", ")
        );
        let plan = plan_of(&map, &sql, None);
        assert!(plan.parts.len() >= 2, "keys 1..6 span several servers");
        let mut returned = Vec::new();
        for part in &plan.parts {
            assert!(part.sql.ends_with(&format!("{suffix} RETURNING id, name")));
            let client = cluster.connect(cluster.server_index(&part.server)).await;
            let rows = client
                .query(&part.sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{} on {}: {e}", part.sql, part.server));
            returned.push(
                rows.iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
                    .collect::<Vec<_>>(),
            );
        }
        let counts: Vec<usize> = returned.iter().map(Vec::len).collect();
        let order = plan.returning_order(&counts).expect("every row returned");
        let ids: Vec<i64> = order.iter().map(|&(p, k)| returned[p][k].0).collect();
        assert_eq!(ids, keys, "RETURNING rows in VALUES order");
        assert_eq!(
            plan.command_tag(counts.iter().sum::<usize>() as u64),
            "INSERT 0 6"
        );
    }
    for key in keys {
        assert_eq!(
            holders(&cluster, key).await,
            vec![(owner_of(&map, key), format!("n{key}!"))],
            "user {key} once, on its owner, updated by ON CONFLICT"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renumbered_parameters_take_the_types_of_the_clients_statement() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    // Row 1 on one server, rows 0 and 2 elsewhere: row 1's part uses the
    // client's $1 (a bigint key in row 0) only in RETURNING, where Postgres
    // alone would take it for text.
    let lone = 100_i64;
    let others: Vec<i64> = (101..200)
        .filter(|k| owner_of(&map, *k) != owner_of(&map, lone))
        .take(2)
        .collect();
    let (k0, k2) = (others[0], others[1]);
    let sql = "INSERT INTO users (id, name) VALUES ($1, $2), ($3, 'fixed'), ($4, $2) RETURNING id, $1 AS first";
    let texts = [
        k0.to_string(),
        "shared".into(),
        lone.to_string(),
        k2.to_string(),
    ];
    let bind = text_bind(&texts);
    let plan = plan_of(&map, sql, Some(&bind));
    let values: Vec<Box<dyn ToSql + Sync>> = vec![
        Box::new(k0),
        Box::new("shared".to_string()),
        Box::new(lone),
        Box::new(k2),
    ];
    // The types the server infers for the client's statement (what a
    // Describe of it returns).
    let described = cluster
        .connect(0)
        .await
        .prepare(sql)
        .await
        .expect("describe the client's statement");
    let inferred: Vec<u32> = described.params().iter().map(Type::oid).collect();
    assert_eq!(inferred, vec![20, 25, 20, 20]);
    let lone_part = plan
        .parts
        .iter()
        .find(|p| p.rows == vec![1])
        .expect("row 1 alone on its server");
    assert_eq!(
        lone_part.sql,
        "INSERT INTO users (id, name) VALUES ($2, 'fixed') RETURNING id, $1 AS first",
        "the client's $1 and $3 stay in their order as $1 and $2"
    );
    let lone_client = cluster
        .connect(cluster.server_index(&lone_part.server))
        .await;
    let untyped = lone_client
        .prepare(&lone_part.sql)
        .await
        .expect("the part prepares without declared types");
    assert_eq!(
        untyped.params(),
        &[Type::TEXT, Type::INT8],
        "left alone, the server would read the client's bigint $1 as text"
    );

    let mut returned = Vec::new();
    for part in &plan.parts {
        let types: Vec<Type> = part
            .param_types(&inferred)
            .into_iter()
            .map(|oid| Type::from_oid(oid).expect("a built-in type"))
            .collect();
        let client = cluster.connect(cluster.server_index(&part.server)).await;
        let statement = client
            .prepare_typed(&part.sql, &types)
            .await
            .unwrap_or_else(|e| panic!("{} on {}: {e}", part.sql, part.server));
        let picked: Vec<&(dyn ToSql + Sync)> =
            part.params.iter().map(|&i| values[i].as_ref()).collect();
        let rows = client
            .query(&statement, &picked)
            .await
            .unwrap_or_else(|e| panic!("{} on {}: {e}", part.sql, part.server));
        // The Bind the session would send carries the same values.
        assert_eq!(part.bind(&bind).params.len(), part.params.len());
        returned.push(
            rows.iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
                .collect::<Vec<_>>(),
        );
    }
    let counts: Vec<usize> = returned.iter().map(Vec::len).collect();
    let order = plan.returning_order(&counts).expect("every row returned");
    let rows: Vec<(i64, i64)> = order.iter().map(|&(p, k)| returned[p][k]).collect();
    assert_eq!(rows, vec![(k0, k0), (lone, k0), (k2, k0)]);
    assert_eq!(
        holders(&cluster, lone).await,
        vec![(owner_of(&map, lone), "fixed".to_string())]
    );
    assert_eq!(
        holders(&cluster, k2).await,
        vec![(owner_of(&map, k2), "shared".to_string())]
    );

    // An UPDATE without a key: its parts together update each row once.
    let update = "UPDATE users SET name = name || '?' WHERE name <> $1";
    let plan = plan_of(&map, update, Some(&text_bind(&["none".to_string()])));
    let mut updated = 0;
    for part in &plan.parts {
        assert_eq!((part.sql.as_str(), part.params.clone()), (update, vec![0]));
        let client = cluster.connect(cluster.server_index(&part.server)).await;
        updated += client
            .execute(update, &[&"none".to_string()])
            .await
            .expect("update part");
    }
    assert_eq!(plan.command_tag(updated), "UPDATE 3");
}
