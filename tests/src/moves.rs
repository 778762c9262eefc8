//! Helpers for the rebalancer tests: a schema of two co-located sharded
//! tables, a rebalancer daemon (in this process, or as a real process for
//! crash tests), job submission, and checks run directly on the servers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rebalancer::config::RebalancerConfig;
use shardmap::jobs::Job;
use shardmap::{ClusterMap, Group, JobStore, KeyType, KeyValue, MapStore, Phase};

use crate::{create_table, TestCluster};

/// `users(id, n)` and `events(user_id, seq, payload)`, both sharded by user id.
pub async fn setup_schema(
    cluster: &TestCluster,
    name: &str,
    partitions: u32,
) -> (MapStore, ClusterMap) {
    let (store, _) = cluster.init_map(name, partitions).await;
    let saved = store
        .update("test", |map| {
            map.declare(
                Group::hash("users", KeyType::Bigint)
                    .table("users", "id")
                    .table("events", "user_id"),
            );
            Ok(shardmap::Change::new("test-schema", "users and events"))
        })
        .await
        .expect("declare the schema");
    create_table(
        cluster,
        &saved.map,
        "users",
        "id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0",
    )
    .await;
    create_table(
        cluster,
        &saved.map,
        "events",
        "user_id bigint NOT NULL, seq bigint NOT NULL, payload text, PRIMARY KEY (user_id, seq)",
    )
    .await;
    (store, saved.map)
}

/// Rebalancer settings for tests: quick cutover retries.
pub fn test_config(cluster: &TestCluster, name: &str) -> RebalancerConfig {
    let mut config = RebalancerConfig {
        cluster: name.into(),
        ..RebalancerConfig::default()
    };
    config.etcd.endpoints = cluster.etcd_endpoints();
    config.leader_ttl_seconds = 3;
    config
}

/// A rebalancer daemon running in this process; stops when dropped.
pub struct InProcessRebalancer {
    task: tokio::task::JoinHandle<()>,
}

impl InProcessRebalancer {
    pub fn start(config: RebalancerConfig, id: &str) -> InProcessRebalancer {
        InProcessRebalancer {
            task: tokio::spawn(rebalancer::daemon::run(config, id.to_string())),
        }
    }
}

impl Drop for InProcessRebalancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `shardline-rebalancer` binary of this build. `cargo test --workspace`
/// builds it (the rebalancer package has integration tests of its own); a
/// narrower `cargo test` run builds it here.
pub fn rebalancer_binary() -> PathBuf {
    workspace_binary("rebalancer", "shardline-rebalancer")
}

/// A binary of this workspace's build (built here if a narrow test run did
/// not build it).
pub fn workspace_binary(package: &str, name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .to_path_buf();
    let binary = profile_dir.join(name);
    if !binary.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", package, "--bin", name])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cannot build {name}");
    }
    binary
}

/// Runs `shardctl` against `cluster`/`name`; returns stdout, panics on failure.
pub fn shardctl(cluster: &TestCluster, name: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(workspace_binary("shardctl", "shardctl"))
        .args(args)
        .env("SHARDLINE_ETCD", cluster.etcd_endpoints().join(","))
        .env("SHARDLINE_CLUSTER", name)
        .env("SHARDLINE_ACTOR", "test")
        .env_remove("SHARDLINE_CONFIG")
        .output()
        .expect("run shardctl");
    assert!(
        output.status.success(),
        "shardctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A `shardline-rebalancer` process; killed (SIGKILL) when dropped.
pub struct RebalancerProcess {
    pub child: std::process::Child,
    pub id: String,
}

impl RebalancerProcess {
    /// Starts one with `config`, crashing at `failpoint` if given.
    pub fn start(
        config: &RebalancerConfig,
        id: &str,
        failpoint: Option<&str>,
        dir: &std::path::Path,
    ) -> RebalancerProcess {
        let path = dir.join(format!("{id}.toml"));
        let text = format!(
            "cluster = {:?}\nleader_ttl_seconds = {}\n[etcd]\nendpoints = [{:?}]\n",
            config.cluster,
            config.leader_ttl_seconds,
            config.etcd.endpoints.join(",")
        );
        std::fs::write(&path, text).expect("write rebalancer config");
        let mut command = std::process::Command::new(rebalancer_binary());
        command
            .arg("--config")
            .arg(&path)
            .args(["--id", id])
            .env("SHARDLINE_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(point) = failpoint {
            command.env("SHARDLINE_FAILPOINT", point);
        }
        RebalancerProcess {
            child: command.spawn().expect("start shardline-rebalancer"),
            id: id.to_string(),
        }
    }

    /// Waits for the process to end by itself; `None` on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RebalancerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `id` leads the cluster's rebalancers.
pub async fn wait_leader(cluster: &TestCluster, name: &str, id: &str, timeout: Duration) -> bool {
    let client = shardmap::store::connect(&cluster.etcd_endpoints())
        .await
        .expect("etcd");
    let election = shardmap::store::Keys::new(name).election();
    crate::eventually(timeout, || {
        let client = client.clone();
        let election = election.clone();
        async move {
            rebalancer::leader::current_leader(&client, &election)
                .await
                .ok()
                .flatten()
                .as_deref()
                == Some(id)
        }
    })
    .await
}

pub async fn jobs(cluster: &TestCluster, name: &str) -> JobStore {
    let client = shardmap::store::connect(&cluster.etcd_endpoints())
        .await
        .expect("etcd");
    JobStore::new(client, name)
}

/// Submits a move of `partition` to `to`; returns the job id.
pub async fn submit(jobs: &JobStore, map: &ClusterMap, partition: u32, to: &str) -> String {
    let from = &map.assignments[partition as usize].owner;
    let job = Job::new(partition, from, to, "move");
    jobs.create(&job).await.expect("create job");
    job.id
}

/// Waits until job `id` is terminal; returns it.
pub async fn wait_terminal(jobs: &JobStore, id: &str, timeout: Duration) -> Job {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let stored = jobs.get(id).await.expect("read job").expect("job exists");
        if stored.job.phase.is_terminal() {
            return stored.job;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "job {id} not finished after {timeout:?}: phase {}, last error {:?}",
                stored.job.phase, stored.job.last_error
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the job finished as `expected`.
pub fn assert_phase(job: &Job, expected: Phase) {
    assert_eq!(
        job.phase, expected,
        "job {} ended {} (last error {:?})",
        job.id, job.phase, job.last_error
    );
}

/// Slots, publications, subscriptions of moves, and standalone tables that
/// look like leaves, on every server (`server: kind name`).
pub async fn leftovers(cluster: &TestCluster) -> Vec<String> {
    let mut found = Vec::new();
    for (index, server) in cluster.cluster.servers.iter().enumerate() {
        let client = cluster.connect(index).await;
        let rows = client
            .query(
                "SELECT 'slot', slot_name::text FROM pg_replication_slots \
                 UNION ALL SELECT 'publication', pubname::text FROM pg_publication \
                 UNION ALL SELECT 'subscription', subname::text FROM pg_subscription \
                 UNION ALL SELECT 'detached table', c.relname::text FROM pg_class c \
                   WHERE c.relkind = 'r' AND c.relname ~ '_p[0-9]+' \
                   AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)",
                &[],
            )
            .await
            .expect("list leftovers");
        for row in rows {
            let kind: String = row.get(0);
            let name: String = row.get(1);
            found.push(format!("{}: {kind} {name}", server.name()));
        }
    }
    found
}

/// `(user_id, seq)` of every event row on every server, with the server
/// each was found on.
pub async fn all_events(cluster: &TestCluster) -> Vec<((i64, i64), String)> {
    let mut rows = Vec::new();
    for (index, server) in cluster.cluster.servers.iter().enumerate() {
        let client = cluster.connect(index).await;
        for row in client
            .query("SELECT user_id, seq FROM events", &[])
            .await
            .expect("read events")
        {
            rows.push(((row.get(0), row.get(1)), server.name().to_string()));
        }
    }
    rows
}

/// `id -> (n, server)` for every users row on every server.
pub async fn all_users(cluster: &TestCluster) -> BTreeMap<i64, Vec<(i64, String)>> {
    let mut users: BTreeMap<i64, Vec<(i64, String)>> = BTreeMap::new();
    for (index, server) in cluster.cluster.servers.iter().enumerate() {
        let client = cluster.connect(index).await;
        for row in client
            .query("SELECT id, n FROM users", &[])
            .await
            .expect("read users")
        {
            users
                .entry(row.get(0))
                .or_default()
                .push((row.get(1), server.name().to_string()));
        }
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

/// Percentile `q` (0..=1) of `values` (sorted in place).
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    values[index]
}

/// A server of `map` other than `owner`.
pub fn other_server(map: &ClusterMap, owner: &str) -> String {
    map.servers
        .keys()
        .find(|s| *s != owner)
        .expect("another server")
        .clone()
}

/// A users id in `partition`, among `0..limit`.
pub fn user_in_partition(map: &ClusterMap, partition: u32, limit: i64) -> i64 {
    (0..limit)
        .find(|id| map.partition_of("users", &KeyValue::Int(*id)).ok() == Some(partition))
        .expect("a user in the partition")
}

/// Waits until job `id` satisfies `done`; returns whether it did in time.
pub async fn wait_job(
    jobs: &JobStore,
    id: &str,
    timeout: Duration,
    done: impl Fn(&Job) -> bool,
) -> bool {
    let done = &done;
    crate::eventually(timeout, || async move {
        jobs.get(id)
            .await
            .ok()
            .flatten()
            .is_some_and(|stored| done(&stored.job))
    })
    .await
}
