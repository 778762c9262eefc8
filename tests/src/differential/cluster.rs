//! The suite's cluster: four Postgres servers and etcd, a map placing the
//! sharded tables on the first three, the fourth holding the same tables
//! unpartitioned (the reference), and loading the data on both sides.

use shardmap::{Change, ClusterMap, Group, KeyType, KeyValue, Table as MapTable};

use super::data::{self, Dataset};
use crate::TestCluster;

/// The cluster of the suite: shard servers in the map, a reference server
/// outside it, and the schema on both.
pub struct DiffCluster {
    pub cluster: TestCluster,
    pub map: ClusterMap,
    /// Index of the reference server in `cluster`.
    pub reference: usize,
    /// Indexes of the servers the map places partitions on.
    pub shards: Vec<usize>,
}

const SHARD_SERVERS: usize = 3;

/// The sharded and reference tables of the suite, with their columns.
const TABLES: [(&str, &str); 3] = [
    ("users", data::USERS_COLUMNS),
    ("orders", data::ORDERS_COLUMNS),
    ("countries", data::COUNTRIES_COLUMNS),
];

impl DiffCluster {
    /// Starts etcd and four Postgres servers, initialises map `name` of
    /// `partitions` partitions over the first three, declares `users` and
    /// `orders` (group `users`, bigint hash) and the reference table
    /// `countries`, and creates the tables on all four.
    pub async fn start(name: &str, partitions: u32) -> DiffCluster {
        let cluster = TestCluster::start(SHARD_SERVERS + 1);
        let servers = cluster.map_servers();
        let store = cluster.store(name).await;
        let map = ClusterMap::new(name, partitions, servers[..SHARD_SERVERS].to_vec())
            .expect("a valid map over the shard servers");
        store
            .initialize(map, "test")
            .await
            .expect("initialise the map");
        let saved = store
            .update("test", |map| {
                map.declare(
                    Group::hash("users", KeyType::Bigint)
                        .table("users", "user_id")
                        .table("orders", "user_id"),
                );
                map.declare_table(MapTable::reference("countries"));
                Ok(Change::new(
                    "test-schema",
                    "the differential suite's tables",
                ))
            })
            .await
            .expect("declare the schema");
        let setup = DiffCluster {
            map: saved.map,
            reference: SHARD_SERVERS,
            shards: (0..SHARD_SERVERS).collect(),
            cluster,
        };
        for (table, columns) in TABLES {
            for &index in &setup.shards {
                let server = setup.cluster.cluster.servers[index].name().to_string();
                let statements =
                    shardmap::ddl::create_statements(&setup.map, table, columns, &server)
                        .unwrap_or_else(|e| panic!("DDL of {table}: {e}"));
                setup.execute(index, &statements.join(";\n")).await;
            }
            setup
                .execute(
                    setup.reference,
                    &format!("CREATE TABLE {table} ({columns})"),
                )
                .await;
        }
        setup
    }

    async fn execute(&self, index: usize, sql: &str) {
        self.cluster
            .connect(index)
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("on server {index}: {e}\n{sql}"));
    }

    /// The index of the server owning sharding key `key` of `users`.
    pub fn owner(&self, key: i64) -> usize {
        let partition = self
            .map
            .partition_of("users", &KeyValue::Int(key))
            .expect("a partition for every bigint");
        self.cluster
            .server_index(&self.map.assignments[partition as usize].owner)
    }

    /// Inserts every row of `data` on the reference and each sharded row on
    /// the server owning its key (the reference table on every server).
    pub async fn load(&self, data: &Dataset) {
        let mut statements: Vec<(usize, String)> = Vec::new();
        for (table, rows) in [("users", &data.users), ("orders", &data.orders)] {
            for &shard in &self.shards {
                let owned = rows.iter().filter(|row| self.owner(row.key) == shard);
                for insert in data::insert_statements(table, owned) {
                    statements.push((shard, insert));
                }
            }
            for insert in data::insert_statements(table, rows.iter()) {
                statements.push((self.reference, insert));
            }
        }
        for index in self.shards.iter().chain([&self.reference]) {
            for insert in data::insert_statements("countries", data.countries.iter()) {
                statements.push((*index, insert));
            }
        }
        for (index, sql) in statements {
            self.execute(index, &sql).await;
        }
        for index in self.shards.iter().chain([&self.reference]) {
            self.execute(*index, "ANALYZE").await;
        }
    }

    /// `count(*)` of `table` on each shard server, in shard order.
    pub async fn counts_per_shard(&self, table: &str) -> Vec<i64> {
        let mut counts = Vec::new();
        for &index in &self.shards {
            let row = self
                .cluster
                .connect(index)
                .await
                .query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap_or_else(|e| panic!("count {table} on server {index}: {e}"));
            counts.push(row.get(0));
        }
        counts
    }

    /// Connection string of the reference server.
    pub fn reference_conninfo(&self) -> String {
        self.cluster.cluster.servers[self.reference]
            .state()
            .conninfo()
    }
}
