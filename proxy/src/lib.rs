//! The shardline proxy: speaks the Postgres wire protocol to clients, routes
//! each statement to the server owning its key's partition, pools backend
//! connections. Depends on `shardmap` (and `twophase`, shared with the
//! rebalancer); never on `rebalancer`.

pub mod allocator;
pub mod analyze;
pub mod auth;
pub mod backend;
pub mod cancel;
pub mod config;
pub mod context;
pub mod copy;
pub mod failpoint;
pub mod liveness;
pub mod login_limits;
pub mod merge;
pub mod metrics;
pub mod outbox;
pub mod pool;
pub mod recovery;
pub mod registry;
pub mod residency;
pub mod route;
pub mod scrape;
pub mod server;
pub mod session;
pub mod tls;
pub mod two_phase;
pub mod wire;
