//! Runnable examples live in `examples/examples/`: `cargo run -p shardline-examples --example NAME`.
//! Modules here hold what an example shares with the integration tests.

pub mod feed;
