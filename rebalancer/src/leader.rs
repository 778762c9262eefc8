//! Leader election with etcd's election API. Every rebalancer campaigns; the
//! one holding the election key acts. Leadership is bound to a lease the
//! leader keeps alive; it counts as held only until
//! `last answered keep-alive sent + TTL - SAFETY_MARGIN`, because etcd may
//! elect a successor once the lease expires. Every etcd write of the leader
//! is also guarded by its election key ([`Leadership::guard`]), so a write
//! from a deposed leader fails instead of landing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, LeaderKey};
use tracing::{info, warn};

use crate::MoveError;

/// Stop acting this long before the lease could expire (at most; a third
/// of the TTL for short leases).
pub const SAFETY_MARGIN: Duration = Duration::from_secs(2);

fn margin(ttl: Duration) -> Duration {
    SAFETY_MARGIN.min(ttl / 3)
}

/// Held leadership. Cheap to clone; all clones see the same validity.
/// When the last clone is dropped the lease is no longer kept alive (it
/// expires after its TTL and another rebalancer is elected).
#[derive(Clone)]
pub struct Leadership {
    key: Vec<u8>,
    revision: i64,
    valid_until: Arc<Mutex<Instant>>,
    keeper: Arc<Keeper>,
}

struct Keeper(tokio::task::JoinHandle<()>);

impl Keeper {
    fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Leadership {
    /// The compare that holds only while this leadership does.
    pub fn guard(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.revision)
    }

    /// Whether this process may still act as leader.
    pub fn is_valid(&self) -> bool {
        let until = *self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        Instant::now() < until && !self.keeper.is_finished()
    }

    /// `Err(NotLeader)` unless [`is_valid`](Self::is_valid): call before every action.
    pub fn check(&self) -> Result<(), MoveError> {
        if self.is_valid() {
            Ok(())
        } else {
            Err(MoveError::NotLeader)
        }
    }

    /// Waits until leadership is lost.
    pub async fn lost(&self) {
        while self.is_valid() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Campaigns until elected (blocks while another process leads).
pub async fn campaign(
    client: &Client,
    election: &str,
    id: &str,
    ttl_seconds: i64,
) -> Result<Leadership, MoveError> {
    let mut lease_client = client.lease_client();
    let sent = Instant::now();
    let lease = lease_client
        .grant(ttl_seconds, None)
        .await
        .map_err(|e| MoveError::Etcd(e.to_string()))?;
    let lease_id = lease.id();
    let ttl = Duration::from_secs(lease.ttl().max(1) as u64);
    let valid_until = Arc::new(Mutex::new(
        (sent + ttl).checked_sub(margin(ttl)).unwrap_or(sent),
    ));
    // Keep the lease alive while campaigning too: the campaign may wait long.
    let keeper = Keeper(tokio::spawn(keep_alive(
        client.clone(),
        lease_id,
        ttl,
        valid_until.clone(),
    )));
    let mut election_client = client.election_client();
    let response = election_client
        .campaign(election, id, lease_id)
        .await
        .map_err(|e| MoveError::Etcd(e.to_string()))?;
    let leader: LeaderKey = response
        .leader()
        .cloned()
        .ok_or_else(|| MoveError::Etcd("etcd answered a campaign without a leader key".into()))?;
    info!(id, "elected rebalancer leader");
    Ok(Leadership {
        key: leader.key().to_vec(),
        revision: leader.rev(),
        valid_until,
        keeper: Arc::new(keeper),
    })
}

async fn keep_alive(client: Client, lease: i64, ttl: Duration, valid_until: Arc<Mutex<Instant>>) {
    let mut lease_client = client.lease_client();
    let Ok((mut keeper, mut responses)) = lease_client.keep_alive(lease).await else {
        warn!("cannot keep the leader lease alive");
        return;
    };
    // Several keep-alives per validity window, so one slow answer does not
    // cost the leadership.
    let period = (ttl / 5).max(Duration::from_millis(200));
    loop {
        tokio::time::sleep(period).await;
        let sent = Instant::now();
        let answered = tokio::time::timeout(period, async {
            keeper.keep_alive().await.ok()?;
            responses.message().await.ok()?
        })
        .await;
        match answered {
            Ok(Some(response)) if response.ttl() > 0 => {
                let until = (sent + Duration::from_secs(response.ttl() as u64))
                    .checked_sub(margin(ttl))
                    .unwrap_or(sent);
                *valid_until.lock().unwrap_or_else(|e| e.into_inner()) = until;
            }
            Ok(_) => {
                warn!("the leader lease expired");
                return;
            }
            Err(_) => warn!("etcd did not answer a lease keep-alive in time"),
        }
    }
}

/// The current leader's id, if any.
pub async fn current_leader(client: &Client, election: &str) -> Result<Option<String>, MoveError> {
    let mut election_client = client.election_client();
    match election_client.leader(election).await {
        Ok(response) => Ok(response
            .kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
        // etcd answers "election: no leader" as an error.
        Err(e) if e.to_string().contains("no leader") => Ok(None),
        Err(e) => Err(MoveError::Etcd(e.to_string())),
    }
}
