//! Two-phase commit recovery against real etcd and three real Postgres
//! servers. Prepared transactions are made by hand (BEGIN; INSERT; PREPARE
//! TRANSACTION), as a proxy's commit path leaves them when it dies between
//! steps, with and without a commit record, for dead and live proxies.
//! Recovery must commit exactly what the records say, roll back the rest
//! (presumed abort), never touch a live proxy's transactions, and leave no
//! record of a resolved gid behind — called as a library, at a proxy's
//! start, and by the rebalancer leader.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use settings::Credentials;
use shardline_tests::move_jobs::test_config;
use shardline_tests::{eventually, TestCluster, TestProxy};
use shardmap::proxies::ProxyRecord;
use shardmap::ClusterMap;
use twophase::{Decision, DecisionStore, Gid, RecordError, Recovery, Scope, ServerReport};

struct Setup {
    cluster: TestCluster,
    name: &'static str,
    etcd: Client,
    map: ClusterMap,
    /// Server names in the map, in the test cluster's order.
    servers: Vec<String>,
    clients: Vec<tokio_postgres::Client>,
    decisions: DecisionStore,
}

async fn setup(name: &'static str) -> Setup {
    let cluster = TestCluster::start(3);
    let (_, saved) = cluster.init_map(name, 8).await;
    let servers: Vec<String> = cluster
        .cluster
        .servers
        .iter()
        .map(|s| s.name().to_string())
        .collect();
    let mut clients = Vec::new();
    for index in 0..servers.len() {
        let client = cluster.connect(index).await;
        client
            .batch_execute("CREATE TABLE t (gid text PRIMARY KEY)")
            .await
            .expect("create table");
        let max: String = client
            .query_one("SHOW max_prepared_transactions", &[])
            .await
            .expect("show")
            .get(0);
        assert_ne!(max, "0", "the dev cluster must allow prepared transactions");
        clients.push(client);
    }
    let etcd = shardmap::store::connect(&cluster.etcd())
        .await
        .expect("etcd");
    let decisions = DecisionStore::new(etcd.clone(), name);
    Setup {
        cluster,
        name,
        etcd,
        map: saved.map,
        servers,
        clients,
        decisions,
    }
}

impl Setup {
    /// Registers proxy `id` with a lease of its own, as a live proxy does.
    async fn register(&self, id: &str) -> i64 {
        let lease = self
            .etcd
            .lease_client()
            .grant(60, None)
            .await
            .expect("lease")
            .id();
        let record = ProxyRecord {
            id: id.into(),
            listen: "127.0.0.1:1".into(),
            started_unix_ms: shardmap::store::now_unix_ms(),
            version: "test".into(),
            acked_map_version: 1,
        };
        shardmap::proxies::register(
            &self.etcd,
            self.name,
            &record,
            lease,
            Duration::from_secs(5),
        )
        .await
        .expect("register");
        lease
    }

    /// The proxy holding `lease` dies: etcd drops its registration.
    async fn kill(&self, lease: i64) {
        self.etcd
            .lease_client()
            .revoke(lease)
            .await
            .expect("revoke");
    }

    /// Inserts a row named after `gid` on each of `servers` in a transaction
    /// left prepared under `gid`.
    async fn prepare(&self, gid: &str, servers: &[usize]) {
        for &index in servers {
            self.clients[index]
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO t VALUES ('{gid}'); PREPARE TRANSACTION '{gid}'"
                ))
                .await
                .unwrap_or_else(|e| panic!("prepare {gid} on server {index}: {e}"));
        }
    }

    async fn column(&self, index: usize, sql: &str) -> Vec<String> {
        self.clients[index]
            .query(sql, &[])
            .await
            .expect("query")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    /// Committed rows of server `index`.
    async fn rows(&self, index: usize) -> Vec<String> {
        self.column(index, "SELECT gid FROM t ORDER BY gid").await
    }

    /// Prepared transactions still waiting on server `index`.
    async fn prepared(&self, index: usize) -> Vec<String> {
        self.column(index, "SELECT gid FROM pg_prepared_xacts ORDER BY gid")
            .await
    }

    fn participants(&self, servers: &[usize]) -> Vec<String> {
        servers.iter().map(|&i| self.servers[i].clone()).collect()
    }

    async fn recover(&self, scope: Scope) -> twophase::RecoveryReport {
        let credentials = Credentials::default();
        let run = Recovery {
            cluster: self.name,
            map: &self.map,
            credentials: &credentials,
            scope,
            actor: "test".into(),
            server_timeout: Duration::from_secs(5),
        };
        twophase::recover(&self.etcd, &run).await.expect("recovery")
    }

    async fn recorded(&self, gid: &Gid) -> Option<Decision> {
        self.decisions
            .decision(gid)
            .await
            .expect("read decision")
            .map(|r| r.decision)
    }
}

fn sorted(mut gids: Vec<String>) -> Vec<String> {
    gids.sort();
    gids
}

fn report(committed: usize, rolled_back: usize, left_alone: usize) -> ServerReport {
    ServerReport {
        committed,
        rolled_back,
        left_alone,
        error: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_follows_the_decisions_and_spares_live_proxies() {
    let s = setup("tpc_lib").await;

    // A proxy that dies mid-commit: A was recorded as committed and prepared
    // everywhere, B prepared on two servers but never recorded, F committed
    // everywhere but its record not yet forgotten.
    let dead = s.register("p-dead").await;
    let a = Gid::new("p-dead", dead, 1).expect("gid");
    let b = Gid::new("p-dead", dead, 2).expect("gid");
    let f = Gid::new("p-dead", dead, 3).expect("gid");
    s.prepare(a.as_str(), &[0, 1, 2]).await;
    s.decisions
        .record_commit(&a, &s.participants(&[0, 1, 2]))
        .await
        .expect("record A");
    s.prepare(b.as_str(), &[0, 1]).await;
    s.decisions
        .record_commit(&f, &s.participants(&[1]))
        .await
        .expect("record F");
    s.kill(dead).await;
    let late = Gid::new("p-dead", dead, 4).expect("gid");
    assert!(
        matches!(
            s.decisions
                .record_commit(&late, &s.participants(&[0]))
                .await,
            Err(RecordError::NotRegistered { .. })
        ),
        "a proxy whose lease is gone must not be able to record a commit"
    );

    // A live proxy: C recorded and prepared on two servers, D prepared only
    // (it may be about to record its commit).
    let live = s.register("p-live").await;
    let c = Gid::new("p-live", live, 1).expect("gid");
    let d = Gid::new("p-live", live, 2).expect("gid");
    s.prepare(c.as_str(), &[1, 2]).await;
    s.decisions
        .record_commit(&c, &s.participants(&[1, 2]))
        .await
        .expect("record C");
    s.prepare(d.as_str(), &[0]).await;
    // The same proxy id in an earlier incarnation (another lease): dead.
    let e = Gid::new("p-live", live + 1_000_000, 1).expect("gid");
    s.prepare(e.as_str(), &[2]).await;
    assert!(matches!(
        s.decisions.record_commit(&e, &s.participants(&[2])).await,
        Err(RecordError::NotRegistered { .. })
    ));
    // Not shardline's, or not a valid shardline gid: never touched.
    s.prepare("other_app_1", &[0]).await;
    s.prepare("sl_garbage", &[1]).await;

    let first = s.recover(Scope::DeadWriters).await;
    assert_eq!(first.servers[&s.servers[0]], report(1, 1, 1), "{first}");
    assert_eq!(first.servers[&s.servers[1]], report(1, 1, 2), "{first}");
    assert_eq!(first.servers[&s.servers[2]], report(1, 1, 1), "{first}");
    // A and F (commit), B and E (abort, recorded by recovery before rolling back).
    assert_eq!(first.records_deleted, 4, "{first}");

    let a_row = vec![a.to_string()];
    for index in 0..3 {
        assert_eq!(
            s.rows(index).await,
            a_row,
            "server {index}: only A is committed"
        );
    }
    assert_eq!(
        s.prepared(0).await,
        sorted(vec!["other_app_1".into(), d.to_string()])
    );
    assert_eq!(
        s.prepared(1).await,
        sorted(vec!["sl_garbage".into(), c.to_string()])
    );
    assert_eq!(s.prepared(2).await, vec![c.to_string()]);
    for gid in [&a, &b, &e, &f] {
        assert_eq!(s.recorded(gid).await, None, "record of {gid} left behind");
    }
    assert_eq!(s.recorded(&c).await, Some(Decision::Commit));

    // Nothing left to do: a second run changes nothing.
    let second = s.recover(Scope::DeadWriters).await;
    assert_eq!(second.committed() + second.rolled_back(), 0, "{second}");
    assert_eq!(second.left_alone(), 4, "{second}");
    assert_eq!(second.records_deleted, 0, "{second}");

    // The record is create-only: a second commit of C fails clearly, and a
    // transaction settled as aborted can no longer be committed.
    match s
        .decisions
        .record_commit(&c, &s.participants(&[1, 2]))
        .await
    {
        Err(RecordError::AlreadyDecided { decision, .. }) => assert_eq!(decision, Decision::Commit),
        other => panic!("recording C twice: {other:?}"),
    }
    let g = Gid::new("p-live", live, 3).expect("gid");
    assert_eq!(
        s.decisions.settle(&g, "test").await.expect("settle"),
        Decision::Abort
    );
    match s.decisions.record_commit(&g, &s.participants(&[0])).await {
        Err(RecordError::AlreadyDecided { decision, .. }) => assert_eq!(decision, Decision::Abort),
        other => panic!("committing a settled transaction: {other:?}"),
    }
    assert_eq!(
        s.decisions.settle(&c, "test").await.expect("settle"),
        Decision::Commit
    );

    // The live proxy finishes C itself, then forgets it.
    for index in [1, 2] {
        s.clients[index]
            .batch_execute(&format!("COMMIT PREPARED {}", c.literal()))
            .await
            .expect("commit C");
    }
    s.decisions.forget(&c).await.expect("forget");
    assert_eq!(s.recorded(&c).await, None);
    assert_eq!(s.rows(2).await, sorted(vec![a.to_string(), c.to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_proxy_and_the_rebalancer_leader_recover() {
    let s = setup("tpc_daemons").await;

    // A real proxy's registry hands out ids of its current registration,
    // which its commit records are guarded by.
    let proxy = TestProxy::start(&s.cluster, s.name, |_| {}).await;
    let gids = proxy
        .shared
        .liveness
        .gids()
        .expect("a registered proxy has a generator");
    let registered = shardmap::proxies::list(&s.etcd, s.name)
        .await
        .expect("proxies");
    let own = registered
        .iter()
        .find(|p| p.key.ends_with(&format!("/{}", gids.proxy_id())))
        .expect("the proxy's registration");
    assert_eq!(gids.incarnation(), own.lease);
    let first = gids.next();
    assert_eq!(Gid::parse(first.as_str()).expect("parses"), first);
    s.decisions
        .record_commit(&first, &s.participants(&[0, 1]))
        .await
        .expect("a live proxy records its commit");
    s.decisions.forget(&first).await.expect("forget");
    drop(proxy);

    // A proxy crashed and restarts at once: its old lease is still alive,
    // yet what it left is its own to finish.
    let old = s.register("p-restart").await;
    let x = Gid::new("p-restart", old, 1).expect("gid");
    let y = Gid::new("p-restart", old, 2).expect("gid");
    s.prepare(x.as_str(), &[0, 1]).await;
    s.decisions
        .record_commit(&x, &s.participants(&[0, 1]))
        .await
        .expect("record X");
    s.prepare(y.as_str(), &[2]).await;
    // Another live proxy's transaction, in flight.
    let other = s.register("p-other").await;
    let z = Gid::new("p-other", other, 1).expect("gid");
    s.prepare(z.as_str(), &[0]).await;

    let at_start = proxy::recovery::at_start(
        &s.cluster.etcd(),
        s.name,
        "p-restart",
        &s.map,
        &Credentials::default(),
    )
    .await
    .expect("recovery at start ran");
    assert_eq!(at_start.committed(), 2, "{at_start}");
    assert_eq!(at_start.rolled_back(), 1, "{at_start}");
    assert_eq!(at_start.left_alone(), 1, "{at_start}");
    assert_eq!(at_start.records_deleted, 2, "{at_start}");
    assert_eq!(s.rows(0).await, vec![x.to_string()]);
    assert_eq!(s.rows(1).await, vec![x.to_string()]);
    assert!(s.rows(2).await.is_empty());
    assert_eq!(s.prepared(0).await, vec![z.to_string()]);
    assert!(s.prepared(2).await.is_empty());

    // A proxy that dies and never comes back: the rebalancer leader finishes
    // its transactions once its registration is gone.
    let gone = s.register("p-gone").await;
    let w = Gid::new("p-gone", gone, 1).expect("gid");
    let v = Gid::new("p-gone", gone, 2).expect("gid");
    s.prepare(w.as_str(), &[0, 2]).await;
    s.decisions
        .record_commit(&w, &s.participants(&[0, 2]))
        .await
        .expect("record W");
    s.prepare(v.as_str(), &[1]).await;

    let mut config = test_config(&s.cluster, s.name);
    config.twophase_recovery_interval_ms = 200;
    let metrics = Arc::new(rebalancer::metrics::Metrics::default());
    let daemon = tokio::spawn(rebalancer::daemon::run_with_metrics(
        config,
        "r1".into(),
        metrics.clone(),
    ));
    // While p-gone is registered the leader leaves W and V alone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.prepared(1).await,
        vec![v.to_string()],
        "a live proxy's transaction was touched"
    );
    s.kill(gone).await;
    let (setup, w_ref, v_ref) = (&s, &w, &v);
    let finished = eventually(Duration::from_secs(30), || async move {
        let (s, w, v) = (setup, w_ref, v_ref);
        s.prepared(1).await.is_empty()
            && s.prepared(2).await.is_empty()
            && s.recorded(w).await.is_none()
            && s.recorded(v).await.is_none()
    })
    .await;
    daemon.abort();
    assert!(
        finished,
        "the rebalancer leader did not recover p-gone's transactions"
    );
    assert_eq!(s.rows(0).await, sorted(vec![w.to_string(), x.to_string()]));
    assert_eq!(s.rows(1).await, vec![x.to_string()]);
    assert_eq!(s.rows(2).await, vec![w.to_string()]);
    assert_eq!(metrics.twophase_committed.load(Ordering::Relaxed), 2);
    assert_eq!(metrics.twophase_rolled_back.load(Ordering::Relaxed), 1);
    assert_eq!(
        s.prepared(0).await,
        vec![z.to_string()],
        "the live proxy's transaction must still wait for it"
    );
}
