//! Measures how fast a map change reaches a watching cache: for N changes,
//! the time from the moment etcd acknowledged the compare-and-swap write to
//! the moment the cache (its own etcd connection, its own task) applied it.
//! Baseline in the same run: the write's own round trip. Prints median and p99
//! of both and their ratio. Usage: watch-latency [CHANGES] (default 1000).

use std::time::{Duration, Instant};

use shardline_tests::latency::percentile;
use shardline_tests::TestCluster;
use shardmap::{Change, MapCache};
use tokio::sync::mpsc;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let changes: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let cluster = TestCluster::start(0);
    let (store, first) = cluster.init_map("latency", 1024).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cache = MapCache::spawn_observed(cluster.etcd(), "latency", Some(tx));
    anyhow::ensure!(
        cache
            .wait_for_version(first.map.version, Duration::from_secs(10))
            .await
            .is_some(),
        "the cache never loaded the map"
    );
    while rx.try_recv().is_ok() {}

    let mut write_rtt = Vec::with_capacity(changes);
    let mut propagation = Vec::with_capacity(changes);
    let mut total = Vec::with_capacity(changes);
    let mut current = store.load().await?;
    for i in 0..changes {
        let mut next = current.map.clone();
        next.assignments[i % 1024].region = None;
        let started = Instant::now();
        let saved = store
            .compare_and_swap(
                &current,
                next,
                "bench",
                &Change::new("bench", i.to_string()),
            )
            .await?;
        let acknowledged = Instant::now();
        loop {
            let seen = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await?
                .ok_or_else(|| anyhow::anyhow!("cache stopped"))?;
            if seen.map.version >= saved.map.version {
                break;
            }
        }
        let visible = Instant::now();
        write_rtt.push(ms(acknowledged - started));
        propagation.push(ms(visible - acknowledged));
        total.push(ms(visible - started));
        current = saved;
    }
    let (w50, w99) = (
        percentile(&mut write_rtt, 0.5),
        percentile(&mut write_rtt, 0.99),
    );
    let (p50, p99) = (
        percentile(&mut propagation, 0.5),
        percentile(&mut propagation, 0.99),
    );
    println!(
        "changes: {changes} (map of 1024 partitions, {} bytes JSON)",
        serde_json_len(&current.map)
    );
    println!("etcd CAS write round trip  : median {w50:.3} ms  p99 {w99:.3} ms");
    println!("write ack -> watcher applied: median {p50:.3} ms  p99 {p99:.3} ms");
    println!(
        "ratio propagation/write    : median {:.2}  p99 {:.2}",
        p50 / w50,
        p99 / w99
    );
    println!(
        "write start -> visible     : median {:.3} ms  p99 {:.3} ms",
        percentile(&mut total, 0.5),
        percentile(&mut total, 0.99)
    );
    Ok(())
}

fn serde_json_len(map: &shardmap::ClusterMap) -> usize {
    serde_json::to_vec(map).map(|v| v.len()).unwrap_or(0)
}
