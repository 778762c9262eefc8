//! The shardline rebalancer: plans and runs partition moves (copy with logical
//! replication, catch up, cut over, verify, clean up) as durable jobs in etcd.
//! Depends on `shardmap` only; never on `proxy`.
//!
//! Not built yet: moves are issue 4.
