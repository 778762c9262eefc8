//! Unit tests of how waiting clients are served: budgets, claims and
//! queues only, with no server behind the pools.

use super::*;

fn endpoint(port: u16) -> Endpoint {
    Endpoint {
        host: "127.0.0.1".into(),
        port,
        dbname: "postgres".into(),
        user: "postgres".into(),
    }
}

fn pool_in(budget: &Arc<Budget>, config: &PoolConfig) -> Arc<Pool> {
    Pool::in_budget(
        "pg1".into(),
        endpoint(9),
        None,
        None,
        Err("no server in this test".into()),
        config.clone(),
        budget.clone(),
    )
}

/// A budget of one connection, its permit held by the test, and a pool
/// of it whose `wait` runs in a task; returns once that client is queued.
/// The task tells what the wait ended with.
async fn a_client_waiting_for_the_only_permit() -> (
    Arc<Budget>,
    Arc<Pool>,
    OwnedSemaphorePermit,
    tokio::task::JoinHandle<&'static str>,
) {
    let config = PoolConfig {
        size: 1,
        checkout_timeout: Duration::from_secs(5),
        ..PoolConfig::default()
    };
    let budget = Arc::new(Budget::new(config.size, None));
    let here = pool_in(&budget, &config);
    let held = budget
        .permits
        .clone()
        .try_acquire_owned()
        .expect("the budget's one permit");
    let waiter = tokio::spawn({
        let here = here.clone();
        async move {
            match here.wait().await {
                Ok(Found::Room(_)) => "room",
                Ok(Found::Idle(_)) => "an idle connection",
                Err(_) => "an error",
            }
        }
    });
    while here.waiting_here() == 0 {
        tokio::task::yield_now().await;
    }
    (budget, here, held, waiter)
}

/// Another thread hands a waiting client the room of a connection it
/// closed; before the client's task runs, its own pool drops the client's
/// settled entry (and with it the sender of the other channel). The client
/// must take the room, not report the pool exhausted: it did, at once,
/// for most of 100 `pgbench -S` clients on two serving threads.
#[tokio::test(flavor = "current_thread")]
async fn room_handed_over_is_taken_after_the_local_entry_is_dropped() {
    let (budget, here, held, waiter) = a_client_waiting_for_the_only_permit().await;
    let there = pool_in(&budget, &here.config);
    let started = Instant::now();
    budget.give_room_elsewhere(&there, held);
    assert_eq!(
        here.waiting_here(),
        0,
        "handing over the room settles the claim"
    );
    here.forget_settled_waiters();
    let got = waiter.await.expect("the waiting task ends");
    assert_eq!(got, "room");
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// A permit returned to the budget reaches a client that waits with no
/// connection of its own pool to come back.
#[tokio::test(flavor = "current_thread")]
async fn a_permit_returned_to_the_budget_reaches_a_waiting_client() {
    let (_budget, here, held, waiter) = a_client_waiting_for_the_only_permit().await;
    drop(held);
    let got = waiter.await.expect("the waiting task ends");
    assert_eq!(got, "room", "room from the budget");
    assert_eq!(here.waiting_here(), 0);
    assert_eq!(here.waiting_in_all_threads(), 0);
}

/// A pool whose server left the map is dropped, but stays in the budget's
/// list of members until another pool joins: it must not count as a thread
/// with a share, or the live pools' shares shrink and they give their
/// connections away to waiting clients too early.
#[tokio::test(flavor = "current_thread")]
async fn a_dropped_pool_holds_no_share_of_the_budget() {
    let config = PoolConfig {
        size: 4,
        ..PoolConfig::default()
    };
    let budget = Arc::new(Budget::new(config.size, None));
    let here = pool_in(&budget, &config);
    let there = pool_in(&budget, &config);
    // Two live pools: a share of 2 each. With one connection leased,
    // returning a second one leaves `here` within its share.
    here.leased.fetch_add(1, Ordering::Relaxed);
    assert!(!here.holds_more_than_its_share());
    // A third returned connection is more than an even split of 4 by 2.
    here.leased.fetch_add(1, Ordering::Relaxed);
    assert!(here.holds_more_than_its_share());
    here.leased.fetch_sub(1, Ordering::Relaxed);
    // `there` goes away, and no pool joins after it: `here` is alone, its
    // share the whole budget.
    drop(there);
    assert_eq!(budget.members.lock().map(|m| m.len()).unwrap_or(0), 2);
    here.leased.fetch_add(2, Ordering::Relaxed);
    assert!(
        !here.holds_more_than_its_share(),
        "4 of 4 for the only live pool"
    );
    here.leased.fetch_add(1, Ordering::Relaxed);
    assert!(here.holds_more_than_its_share(), "5 of 4");
    here.leased.fetch_sub(4, Ordering::Relaxed);
}

/// Changes committed in the background on a server, counted by one serving
/// thread's pool of it: the rule change reaches the other threads' pools
/// of that server (one budget per server holds the count) and no other
/// server's; the catalog change reaches every primary's pool (one count
/// for the proxy), and no replica's.
#[test]
fn committed_changes_are_counted_for_their_server_and_the_whole_catalog() {
    let config = PoolConfig::default();
    let budgets = Budgets::default();
    let of_thread = |server: &str, port: u16, primary: bool| {
        pool_in(
            &budgets.for_pool(server, &endpoint(port), config.size, primary),
            &config,
        )
    };
    let (here, there, elsewhere, replica) = (
        of_thread("pg1", 9, true),
        of_thread("pg1", 9, true),
        of_thread("pg2", 10, true),
        of_thread("pg1/replica0", 11, false),
    );
    here.count_committed_changes();
    let rules = |pool: &Pool| pool.budget.rule_changes.load(Ordering::Acquire);
    assert_eq!(
        (
            rules(&here),
            rules(&there),
            rules(&elsewhere),
            rules(&replica)
        ),
        (1, 1, 0, 0)
    );
    let catalog = |pool: &Pool| {
        (pool.budget.catalog_changes.as_ref()).map(|count| count.load(Ordering::Acquire))
    };
    assert_eq!(
        (
            catalog(&here),
            catalog(&there),
            catalog(&elsewhere),
            catalog(&replica)
        ),
        (Some(1), Some(1), Some(1), None)
    );
}
