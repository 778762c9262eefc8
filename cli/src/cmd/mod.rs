//! shardctl's commands, one module per group of the command line:
//!
//! - [`init`]: create the map;
//! - [`servers`], [`groups`], [`tables`], [`partitions`]: change the map;
//! - [`map`], [`history`]: read it;
//! - [`erase`]: delete every row of one key (an erasure request);
//! - [`moves`]: move, rebalance, drain, cancel (jobs for the rebalancer);
//! - [`status`], [`prune`]: read and clean up the job records;
//! - [`dev`]: a local cluster for development.
//!
//! Each takes the [`crate::context::Context`] and its own arguments.

pub mod dev;
pub mod erase;
pub mod groups;
pub mod history;
pub mod init;
pub mod join;
pub mod map;
pub mod moves;
pub mod partitions;
pub mod prune;
pub mod servers;
pub mod status;
pub mod tables;
