//! Runnable examples live in `examples/examples/`: `cargo run -p shardline-examples --example NAME`.
