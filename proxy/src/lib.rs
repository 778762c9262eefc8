//! The shardline proxy: speaks the Postgres wire protocol to clients, routes
//! each statement to the server owning its key's partition, pools backend
//! connections. Depends on `shardmap` only; never on `rebalancer`.
//!
//! Not built yet: the wire protocol, routing and pooling are issue 3.
