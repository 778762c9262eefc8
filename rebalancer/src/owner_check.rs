//! Keeps degraded mode's ownership check (`public.shardline_check_owner`, see
//! [`shardmap::ddl::OWNER_CHECK_FUNCTION`]) on every server of the map: it
//! comes with every table `shardctl` creates and with every move's target,
//! but tables made otherwise (declared with `shardctl table add`, or older
//! than the function) and servers added since would lack it, and a proxy cut
//! off from etcd could then serve nothing there. The leader installs it
//! where it is missing, once it leads and every minute after.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::mover::MoveContext;
use crate::pg::Pg;

const EVERY: Duration = Duration::from_secs(60);

/// Runs while `context.leader` leads; the caller aborts it when leadership ends.
pub async fn run_while_leading(context: Arc<MoveContext>) {
    while context.leader.is_valid() {
        match context.store.load().await {
            Ok(versioned) => {
                for server in versioned.map.servers.values() {
                    match Pg::connect(server, &context.credentials, "shardline-rebalancer").await {
                        Ok(pg) => match pg.ensure_owner_check().await {
                            Ok(true) => {
                                info!(server = %server.name, "installed the ownership check function")
                            }
                            Ok(false) => {}
                            Err(e) => {
                                warn!(server = %server.name, error = %e, "cannot install the ownership check function")
                            }
                        },
                        Err(e) => {
                            debug!(server = %server.name, error = %e, "server unreachable; its ownership check is looked at next round")
                        }
                    }
                }
            }
            Err(e) => debug!(error = %e, "cannot read the map to install the ownership check"),
        }
        tokio::time::sleep(EVERY).await;
    }
}
