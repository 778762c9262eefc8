//! Driving and observing partition moves: a rebalancer daemon inside the
//! test process, submitting jobs and waiting for them, the leader, and what a
//! move must not leave behind on the servers.

use std::time::Duration;

use rebalancer::config::RebalancerConfig;
use shardmap::jobs::Job;
use shardmap::{ClusterMap, JobStore, Phase};

use crate::fixtures::rows_on_every_server;
use crate::TestCluster;

/// Rebalancer settings for tests: quick cutover retries.
pub fn test_config(cluster: &TestCluster, name: &str) -> RebalancerConfig {
    let mut config = RebalancerConfig {
        cluster: name.into(),
        ..RebalancerConfig::default()
    };
    config.etcd = cluster.etcd();
    config.leader_ttl_seconds = 3;
    config.backend = cluster.backend_credentials();
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

/// Waits until `id` leads the cluster's rebalancers.
pub async fn wait_leader(cluster: &TestCluster, name: &str, id: &str, timeout: Duration) -> bool {
    let client = shardmap::store::connect(&cluster.etcd())
        .await
        .expect("etcd");
    let election = shardmap::store::EtcdPaths::new(name).election();
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

/// The job store of cluster `name` on the test etcd.
pub async fn jobs(cluster: &TestCluster, name: &str) -> JobStore {
    let client = shardmap::store::connect(&cluster.etcd())
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

/// A server of `map` other than `owner`.
pub fn other_server(map: &ClusterMap, owner: &str) -> String {
    map.servers
        .keys()
        .find(|s| *s != owner)
        .expect("another server")
        .clone()
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
    let sql = "SELECT 'slot', slot_name::text FROM pg_replication_slots \
               UNION ALL SELECT 'publication', pubname::text FROM pg_publication \
               UNION ALL SELECT 'subscription', subname::text FROM pg_subscription \
               UNION ALL SELECT 'detached table', c.relname::text FROM pg_class c \
                 WHERE c.relkind = 'r' AND c.relname ~ '_p[0-9]+' \
                 AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid)";
    rows_on_every_server(cluster, sql)
        .await
        .into_iter()
        .map(|(row, server)| {
            let (kind, name): (String, String) = (row.get(0), row.get(1));
            format!("{server}: {kind} {name}")
        })
        .collect()
}
