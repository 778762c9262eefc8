//! Reads across servers through the real proxy and 3 real Postgres servers:
//! each merge (concatenation, sorted, combined aggregates) answers what the
//! rows on the servers add up to, in the simple and the extended protocol;
//! keys spanning servers go only to their servers; a transaction's scatter
//! read sees its own writes; `SET shardline.scatter = off` restores the
//! strict refusal; shapes the proxy cannot merge exactly are refused.

use shardline_tests::fixtures::{create_table, init_schema};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{ClusterMap, Group, KeyType, KeyValue, Table};

const CLUSTER: &str = "scatter";
const PARTITIONS: u32 = 16;
const USERS: i64 = 300;

async fn setup(cluster: &TestCluster) -> ClusterMap {
    let (_store, map) = init_schema(cluster, CLUSTER, PARTITIONS, |map| {
        map.declare(
            Group::hash("users", KeyType::Bigint)
                .table("users", "user_id")
                .table("orders", "user_id"),
        );
        map.declare_table(Table::reference("countries"));
    })
    .await;
    create_table(
        cluster,
        &map,
        "users",
        "user_id bigint PRIMARY KEY, name text, country text, score numeric(10,2), rating float8",
    )
    .await;
    create_table(
        cluster,
        &map,
        "orders",
        "user_id bigint, order_id bigint, amount int4, PRIMARY KEY (user_id, order_id)",
    )
    .await;
    create_table(
        cluster,
        &map,
        "countries",
        "code text PRIMARY KEY, name text",
    )
    .await;
    map
}

fn owner(map: &ClusterMap, key: i64) -> String {
    let partition = map
        .partition_of("users", &KeyValue::Int(key))
        .expect("partition");
    map.owner_of(partition).expect("owner").name.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_across_servers_merge_like_one_postgres() {
    let cluster = TestCluster::start(3);
    let map = setup(&cluster).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;
    for (code, name) in [("DE", "Germany"), ("FR", "France"), ("US", "United States")] {
        for index in 0..3 {
            cluster
                .connect(index)
                .await
                .execute("INSERT INTO countries VALUES ($1, $2)", &[&code, &name])
                .await
                .expect("reference row");
        }
    }
    let countries = ["DE", "FR", "US"];
    for id in 1..=USERS {
        let country = countries[(id % 3) as usize];
        let score = format!("{}.{:02}", id % 17, id % 100);
        client
            .batch_execute(&format!(
                "INSERT INTO users (user_id, name, country, score, rating) VALUES ({id}, 'user {id:03}', '{country}', {score}, {}); \
                 INSERT INTO orders (user_id, order_id, amount) VALUES ({id}, 1, {}), ({id}, 2, {})",
                id as f64 / 8.0,
                id % 50,
                id % 7
            ))
            .await
            .expect("insert");
    }
    let servers: std::collections::BTreeSet<String> = (1..=USERS).map(|k| owner(&map, k)).collect();
    assert_eq!(servers.len(), 3, "users spread over every server");

    let one = |sql: &'static str| {
        let client = &client;
        async move {
            let rows = client
                .simple_query(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            rows.into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                        (0..row.len())
                            .map(|i| row.get(i).unwrap_or("NULL").to_string())
                            .collect::<Vec<_>>()
                            .join("|"),
                    ),
                    _ => None,
                })
                .collect::<Vec<String>>()
        }
    };
    // Concatenation.
    assert_eq!(one("SELECT user_id FROM users").await.len(), USERS as usize);
    // Sorted merge with LIMIT/OFFSET applied once.
    assert_eq!(
        one("SELECT user_id, name FROM users ORDER BY user_id DESC LIMIT 3 OFFSET 2").await,
        vec!["298|user 298", "297|user 297", "296|user 296"]
    );
    assert_eq!(
        one("SELECT name FROM users ORDER BY country, user_id LIMIT 2").await,
        vec!["user 003", "user 006"]
    );
    // Aggregates combined.
    assert_eq!(
        one("SELECT count(*) FROM users").await,
        vec![USERS.to_string()]
    );
    assert_eq!(
        one("SELECT country, count(*), sum(score), min(user_id), max(rating) FROM users GROUP BY country ORDER BY country").await,
        vec![
            format!("DE|100|{}|3|37.5", sum_scores(|id| id % 3 == 0)),
            format!("FR|100|{}|1|37.25", sum_scores(|id| id % 3 == 1)),
            format!("US|100|{}|2|37.375", sum_scores(|id| id % 3 == 2)),
        ]
    );
    assert_eq!(
        one("SELECT avg(amount) FROM orders").await,
        one_postgres_average(&cluster).await
    );
    assert_eq!(
        one("SELECT country FROM users GROUP BY country HAVING count(*) > 99 ORDER BY 1 DESC")
            .await,
        vec!["US", "FR", "DE"]
    );
    assert_eq!(
        one("SELECT DISTINCT country FROM users ORDER BY country").await,
        vec!["DE", "FR", "US"]
    );
    // Joins pushed down: co-located on the key, and with a reference table.
    assert_eq!(
        one("SELECT count(*) FROM users u JOIN orders o ON o.user_id = u.user_id WHERE o.amount = 0").await,
        vec![(1..=USERS).map(|id| [id % 50, id % 7].iter().filter(|a| **a == 0).count()).sum::<usize>().to_string()]
    );
    assert_eq!(
        one("SELECT c.name, count(*) FROM users u JOIN countries c ON c.code = u.country GROUP BY c.name ORDER BY 1").await,
        vec!["France|100", "Germany|100", "United States|100"]
    );

    // Extended protocol, binary results, keys spanning servers.
    let keys: Vec<i64> = vec![5, 17, 42, 99, 250];
    let rows = client
        .query(
            "SELECT user_id, rating FROM users WHERE user_id = ANY($1) ORDER BY rating DESC LIMIT $2",
            &[&keys, &3_i64],
        )
        .await
        .expect("extended scatter");
    let got: Vec<(i64, f64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(250, 31.25), (99, 12.375), (42, 5.25)]);
    let count: i64 = client
        .query_one("SELECT count(*) FROM orders WHERE amount > $1", &[&10_i32])
        .await
        .expect("extended aggregate")
        .get(0);
    assert_eq!(count, (1..=USERS).filter(|id| id % 50 > 10).count() as i64);

    // A parameter only the combining query uses (HAVING), and `*` with ORDER BY.
    let groups = client
        .query(
            "SELECT country, count(*) FROM users GROUP BY country HAVING count(*) > $1 AND min(user_id) < $2 ORDER BY country",
            &[&99_i64, &3_i64],
        )
        .await
        .expect("HAVING with parameters");
    let groups: Vec<(String, i64)> = groups.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        groups,
        vec![("FR".to_string(), 100), ("US".to_string(), 100)]
    );
    assert_eq!(
        one("SELECT * FROM orders ORDER BY user_id DESC, order_id LIMIT 2").await,
        vec![
            format!("{USERS}|1|{}", USERS % 50),
            format!("{USERS}|2|{}", USERS % 7)
        ]
    );

    // A transaction's scatter read sees its own uncommitted write.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute("UPDATE users SET country = 'XX' WHERE user_id = 7")
        .await
        .expect("update in transaction");
    assert_eq!(
        one("SELECT user_id FROM users WHERE country = 'XX'").await,
        vec!["7"]
    );
    client.batch_execute("ROLLBACK").await.expect("rollback");
    assert!(one("SELECT user_id FROM users WHERE country = 'XX'")
        .await
        .is_empty());

    // Shapes that cannot be merged exactly are refused, with the reason.
    for (sql, reason) in [
        (
            "SELECT user_id, rank() OVER (ORDER BY score) FROM users",
            "window",
        ),
        ("SELECT count(DISTINCT country) FROM users", "DISTINCT"),
        (
            "SELECT user_id FROM users ORDER BY random() LIMIT 3",
            "random",
        ),
        (
            "SELECT * FROM users u JOIN orders o ON o.order_id = u.user_id",
            "user_id",
        ),
    ] {
        let err = client.simple_query(sql).await.expect_err(sql);
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.code().code(), "0A000", "{sql}: {}", db.message());
        assert!(
            format!("{} {}", db.message(), db.hint().unwrap_or("")).contains(reason),
            "{sql}: {}",
            db.message()
        );
    }

    // The opt-out.
    client
        .batch_execute("SET shardline.scatter = off")
        .await
        .expect("opt out");
    let err = client
        .simple_query("SELECT count(*) FROM users")
        .await
        .expect_err("strict");
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("0A000"));
    client
        .batch_execute("SET shardline.scatter = on")
        .await
        .expect("opt in");
    assert_eq!(
        one("SELECT count(*) FROM users").await,
        vec![USERS.to_string()]
    );
}

fn sum_scores(include: impl Fn(i64) -> bool) -> String {
    let cents: i64 = (1..=USERS)
        .filter(|id| include(*id))
        .map(|id| (id % 17) * 100 + id % 100)
        .sum();
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// The average Postgres itself computes over all order amounts (its
/// numeric division decides the digits).
async fn one_postgres_average(cluster: &TestCluster) -> Vec<String> {
    let values: Vec<String> = (1..=USERS)
        .flat_map(|id| [id % 50, id % 7])
        .map(|a| format!("({a})"))
        .collect();
    let sql = format!(
        "SELECT avg(a)::text FROM (VALUES {}) v(a)",
        values.join(",")
    );
    let row = cluster
        .connect(0)
        .await
        .query_one(&sql, &[])
        .await
        .expect("reference average");
    vec![row.get::<_, String>(0)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scatter_reads_use_replicas_under_the_single_server_rules() {
    let mut cluster = TestCluster::start(2);
    let replica = tokio::task::block_in_place(|| cluster.cluster.add_replica(0)).expect("replica");
    let primary_name = cluster.cluster.servers[0].name().to_string();
    let (store, _) = cluster.init_map("scatter-replicas", PARTITIONS).await;
    let saved = store
        .update("test", |map| {
            let server = map
                .servers
                .get_mut(&primary_name)
                .ok_or("first server missing")?;
            server
                .replicas
                .push(shardmap::Endpoint::parse(&replica.url()).map_err(|e| e.to_string())?);
            map.declare(Group::hash("users", KeyType::Bigint).table("users", "user_id"));
            Ok(shardmap::Change::new(
                "replica",
                "the first server has a replica",
            ))
        })
        .await
        .expect("add the replica to the map");
    create_table(
        &cluster,
        &saved.map,
        "users",
        "user_id bigint PRIMARY KEY, name text",
    )
    .await;
    let proxy = TestProxy::start(&cluster, "scatter-replicas", |_| {}).await;
    let client = proxy.connect().await;
    for id in 1..=40_i64 {
        client
            .execute("INSERT INTO users (user_id, name) VALUES ($1, 'r')", &[&id])
            .await
            .expect("insert");
    }
    let on_primaries = read_with_recovery(&client).await.expect("scatter read");
    assert_eq!(on_primaries.len(), 40);
    assert!(
        on_primaries.iter().all(|(_, replica)| !replica),
        "by default reads use the primaries"
    );
    client
        .batch_execute("SET shardline.read_replica = on")
        .await
        .expect("opt in");
    let rows = eventually_all_rows(&client, &saved.map, &primary_name).await;
    for (id, from_replica) in rows {
        assert_eq!(
            from_replica,
            owner(&saved.map, id) == primary_name,
            "user {id}: rows of the server with a replica come from the replica, the others from their primary"
        );
    }
}

/// Each row's key, and whether the server that answered for it is a replica.
async fn read_with_recovery(
    client: &tokio_postgres::Client,
) -> Result<Vec<(i64, bool)>, tokio_postgres::Error> {
    let rows = client
        .query("SELECT user_id, pg_is_in_recovery() FROM users", &[])
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, bool>(1)))
        .collect())
}

/// Reads until the replica has replayed every row (it lags the primary).
async fn eventually_all_rows(
    client: &tokio_postgres::Client,
    map: &ClusterMap,
    primary_name: &str,
) -> Vec<(i64, bool)> {
    let on_replica = (1..=40_i64)
        .filter(|id| owner(map, *id) == primary_name)
        .count();
    assert!(on_replica > 0 && on_replica < 40, "keys on both servers");
    for _ in 0..100 {
        // Until the replica has replayed the table and its rows, it answers
        // with an error or fewer rows.
        if let Ok(rows) = read_with_recovery(client).await {
            if rows.len() == 40 {
                return rows;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the replica did not catch up with the primary's rows");
}
