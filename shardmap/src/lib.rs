//! shardmap: the model of a shardline cluster and its home in etcd.
//!
//! - [`model`]: partitions, servers, co-location groups, tables; validation;
//!   key → partition lookup.
//! - [`builder`]: short constructors for servers, groups and tables.
//! - [`pghash`]: Postgres's hash-partition function, so that the proxy and
//!   Postgres agree on every row's partition.
//! - [`embedded`]: ids that carry their partition, and their generator.
//! - [`store`]: the map in etcd, changed only by compare-and-swap, with history.
//! - [`cache`]: an in-memory map that follows etcd's watch.
//! - [`jobs`]: partition moves as durable job records.
//! - [`proxies`]: proxy registrations and their acknowledgements.
//! - [`access`]: turning on etcd authentication for a cluster (dev, tests).
//!
//! Nothing here talks to Postgres.

pub mod access;
pub mod builder;
pub mod cache;
pub mod ddl;
pub mod embedded;
pub mod jobs;
pub mod keys;
pub mod model;
pub mod pghash;
pub mod proxies;
pub mod store;

pub use cache::MapCache;
pub use jobs::{Job, JobStore, Phase, StoredJob};
pub use keys::{KeyError, KeyType, KeyValue};
pub use model::{
    Assignment, ClusterMap, Endpoint, Group, InvalidMap, ListRule, LookupError, Method,
    PartitionState, RangeRule, Server, ServerState, Table, TableKind,
};
pub use store::{Change, HistoryEntry, MapStore, StoreError, Versioned};
