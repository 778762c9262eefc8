//! The client's transaction as the proxy sees it: held back until its first
//! routed statement, bound to one backend, or aborted by a routing error.
use bytes::BytesMut;

use crate::analyze::Command;
use crate::wire::messages;

use super::client::SessionError;
use super::Session;

/// The client's transaction, as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tx {
    Idle,
    /// BEGIN was acknowledged but not sent yet: it goes to the server of the
    /// first statement that has a route, followed by `prelude`'s other parts.
    Deferred {
        prelude: Vec<String>,
        /// BEGIN READ ONLY: may run on a read replica.
        read_only: bool,
    },
    /// Open on the held backend.
    Bound,
    /// Failed without a backend holding it (a routing error): everything
    /// but COMMIT/ROLLBACK fails until the client ends it.
    Aborted,
}

pub(super) fn is_tx_control(command: Option<&Command>) -> bool {
    matches!(
        command,
        Some(Command::Begin { .. } | Command::Commit | Command::Rollback)
    )
}

/// COMMIT (END) or ROLLBACK (ABORT).
pub(super) fn ends_transaction(command: Option<&Command>) -> bool {
    matches!(command, Some(Command::Commit | Command::Rollback))
}

/// The CommandComplete tag Postgres gives a transaction-scoped statement.
pub(super) fn transaction_scoped_tag(sql: &str) -> String {
    let mut words = sql.split_whitespace().map(|w| w.to_uppercase());
    match words.next().as_deref() {
        Some("SAVEPOINT") => "SAVEPOINT".into(),
        Some("RELEASE") => "RELEASE".into(),
        Some("ROLLBACK") => "ROLLBACK".into(),
        Some("SET") => "SET".into(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

impl Session {
    /// A routing failure inside a transaction aborts it, as any error would in Postgres.
    /// Closes the held backend if it is in the middle of an extended-protocol
    /// sequence (messages sent, Sync not yet): it may hold messages that must
    /// not run, and closing the connection rolls back what it had begun, its
    /// transaction included. Returns whether it did.
    pub(super) fn close_mid_sequence_backend(&mut self) -> bool {
        if !self
            .lease
            .as_mut()
            .is_some_and(|l| l.backend().pending_sync)
        {
            return false;
        }
        if let Some(mut lease) = self.lease.take() {
            lease.backend().broken = true;
        }
        self.set_cancel_target(None);
        if self.tx == Tx::Bound {
            self.tx = Tx::Aborted;
            self.tx_settings.clear();
        }
        true
    }

    pub(super) async fn fail_transaction(&mut self) {
        // Legs on other servers roll back now: nothing of a failed
        // transaction may be committed anywhere.
        self.roll_back_legs().await;
        match self.tx {
            Tx::Idle => {}
            Tx::Deferred { .. } | Tx::Aborted => self.tx = Tx::Aborted,
            Tx::Bound => {
                if self.close_mid_sequence_backend() {
                    return;
                }
                // Roll the backend back now, so nothing of it can be committed.
                if let Some(mut lease) = self.lease.take() {
                    let mut out = BytesMut::new();
                    messages::query("ROLLBACK", &mut out);
                    // A failure marks the connection broken: it is closed.
                    let _ = lease.backend().exchange(&out, |_| {}).await;
                }
                self.set_cancel_target(None);
                self.tx = Tx::Aborted;
                self.tx_settings.clear();
            }
        }
    }

    pub(super) async fn aborted_error(&mut self) -> Result<(), SessionError> {
        self.client.error(
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
            None,
        );
        self.ready().await
    }

    /// Whether a one-statement request can be sent a second time unseen if a
    /// kept statement's plan went stale: no backend is kept for the client
    /// (no open transaction, no unsynced request), and it runs in an
    /// implicit transaction or is the first statement of a held-back one —
    /// which is then rolled back and begun again with it (nothing ran in it).
    pub(super) fn can_resend(&self) -> bool {
        matches!(self.tx, Tx::Idle | Tx::Deferred { .. }) && self.lease.is_none() && !self.unsynced
    }

    /// Counts a catalog change before a statement that may change the
    /// columns prepared statements return is sent (it is counted again
    /// when its transaction ends): a transaction that reads the table after
    /// it, even while the DDL waits for its lock, prepares its statements
    /// again rather than running a plan the DDL is about to make stale.
    pub(super) fn count_catalog_change_sent(&self, command: &Command) {
        if let Command::Data(data) = command {
            if crate::analyze::ddl::may_change_result_columns(&data.words) {
                self.shared.pools.count_catalog_change();
            }
        }
    }

    /// Whether a statement that returns rows may run kept prepared inside
    /// the session's open transaction, where a stale plan could not be
    /// retried unseen: on the held connection of a primary, not broken, and
    /// then only as prepared under the catalog and search_path of now
    /// (`PreparedStatements::has_current`: prepared again otherwise, in the
    /// same request). A change made behind the proxy's back fails the
    /// statement as Postgres fails a client's own prepared statement (see
    /// `relay`).
    pub(super) fn keeps_rows_in_transaction(&self) -> bool {
        self.tx == Tx::Bound
            && self.legs.is_empty()
            && self.lease.as_ref().is_some_and(|lease| lease.keeps_rows())
    }
}
