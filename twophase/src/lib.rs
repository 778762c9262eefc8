//! twophase: what a transaction that wrote on several servers needs to
//! commit atomically with PREPARE TRANSACTION / COMMIT PREPARED, and to be
//! finished by someone else when its proxy dies. Used by the proxy (commit
//! path, recovery at start) and the rebalancer leader (periodic recovery);
//! they share it here because they never import each other.
//!
//! - [`gid`]: global transaction ids `sl_<proxy>_<incarnation>_<seq>` and
//!   their generator.
//! - [`decisions`]: decision records in etcd; recording `commit` is the
//!   commit point (presumed abort: no record means abort).
//! - [`recovery`]: resolving the prepared transactions of dead proxies on
//!   every server by their recorded decision.
//!
//! The commit path, in order: [`GidGenerator::next`] → PREPARE TRANSACTION
//! on every participant → [`DecisionStore::record_commit`] → COMMIT PREPARED
//! everywhere → [`DecisionStore::forget`]. Any failure before the record is
//! written: ROLLBACK PREPARED where prepared.

pub mod decisions;
pub mod gid;
pub mod recovery;

pub use decisions::{Decision, DecisionRecord, DecisionStore, RecordError, StoredDecision};
pub use gid::{Gid, GidError, GidGenerator, GID_PREFIX};
pub use recovery::{recover, Recovery, RecoveryReport, Scope, ServerReport};
