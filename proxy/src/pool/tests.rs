//! Unit tests of how waiting clients are served: budgets, claims and
//! queues only, with no server behind the pools.

use super::*;

fn pool_in(budget: &Arc<Budget>, config: &PoolConfig) -> Arc<Pool> {
    let endpoint = Endpoint {
        host: "127.0.0.1".into(),
        port: 9,
        dbname: "postgres".into(),
        user: "postgres".into(),
    };
    Pool::in_budget(
        "pg1".into(),
        endpoint,
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
    let budget = Arc::new(Budget::new(config.size));
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
