//! What the rebalancer does on a Postgres server, one function per fact or
//! action. Every action is idempotent (it checks the catalogs first), so a
//! step interrupted by a crash can simply run again.

use std::time::Duration;

use shardmap::ddl::Leaf;
use shardmap::{ClusterMap, Server, TableKind};
use tokio_postgres::Client;

use crate::MoveError;

/// A connection to one server.
pub struct Pg {
    pub server: String,
    pub client: Client,
}

/// The passwords and TLS settings every connection the rebalancer (and
/// shardctl) opens uses (never from etcd).
pub use settings::Credentials;

/// libpq conninfo for `server`, as a subscription on another server uses it.
/// It carries the same TLS settings as our own connections to `server`;
/// their file paths are opened by the *subscribing* server's Postgres, so
/// the CA and client certificate must be at those paths on its machine,
/// readable by the user it runs as.
pub fn conninfo(server: &Server, credentials: &Credentials) -> Result<String, MoveError> {
    let e = &server.primary;
    let mut info = format!(
        "host={} port={} user={} dbname={} application_name=shardline_move",
        quote_conninfo(&e.host),
        e.port,
        quote_conninfo(&e.user),
        quote_conninfo(&e.dbname)
    );
    let tls = credentials
        .tls_for_server(&server.name)
        .map_err(MoveError::Unreachable)?;
    info.push_str(&tls.conninfo_keywords(quote_conninfo));
    if let Some(password) = credentials.password_for_server(&server.name) {
        info.push_str(&format!(" password={}", quote_conninfo(password)));
    }
    Ok(info)
}

fn quote_conninfo(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// A string as an SQL literal.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// An SQL identifier, quoted only when needed.
pub fn ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

impl Pg {
    pub async fn connect(
        server: &Server,
        credentials: &Credentials,
        application: &str,
    ) -> Result<Pg, MoveError> {
        let e = &server.primary;
        let mut config = tokio_postgres::Config::new();
        config
            .host(&e.host)
            .port(e.port)
            .user(&e.user)
            .dbname(&e.dbname)
            .application_name(application)
            .connect_timeout(Duration::from_secs(5))
            .keepalives_idle(Duration::from_secs(10));
        if let Some(password) = credentials.password_for_server(&server.name) {
            config.password(password);
        }
        let tls = credentials
            .tls_for_server(&server.name)
            .map_err(MoveError::Unreachable)?;
        let (client, connection) = pgtls::connect(config, &tls).await.map_err(|e| {
            MoveError::Unreachable(format!(
                "cannot connect to server {} at {}: {e}",
                server.name, server.primary,
            ))
        })?;
        let name = server.name.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(server = %name, error = %e, "rebalancer connection closed");
            }
        });
        Ok(Pg {
            server: server.name.clone(),
            client,
        })
    }

    fn fail(&self, what: &str, e: tokio_postgres::Error) -> MoveError {
        MoveError::from_pg(&self.server, what, e)
    }

    pub async fn execute(&self, what: &str, sql: &str) -> Result<(), MoveError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| self.fail(what, e))
    }

    /// Installs `public.shardline_check_owner` unless present (see
    /// [`shardmap::ddl::OWNER_CHECK_FUNCTION`]); true if it installed it.
    /// Two moves installing it at once may collide: the loser retries its
    /// step.
    pub async fn ensure_owner_check(&self) -> Result<bool, MoveError> {
        let present = self
            .client
            .query_one(
                "SELECT to_regprocedure('public.shardline_check_owner(text[], text[])') IS NOT NULL",
                &[],
            )
            .await
            .and_then(|row| row.try_get::<_, bool>(0))
            .map_err(|e| self.fail("looking for the ownership check function", e))?;
        if present {
            return Ok(false);
        }
        self.client
            .batch_execute(shardmap::ddl::OWNER_CHECK_FUNCTION)
            .await
            .map(|()| true)
            .map_err(|e| {
                MoveError::Retry(format!(
                    "installing the ownership check function on {}: {}",
                    self.server,
                    settings::error_chain(&e)
                ))
            })
    }

    async fn query_one_i64(&self, what: &str, sql: &str) -> Result<i64, MoveError> {
        let row = self
            .client
            .query_one(sql, &[])
            .await
            .map_err(|e| self.fail(what, e))?;
        row.try_get::<_, i64>(0).map_err(|e| self.fail(what, e))
    }

    async fn exists(&self, what: &str, sql: &str) -> Result<bool, MoveError> {
        let rows = self
            .client
            .query(sql, &[])
            .await
            .map_err(|e| self.fail(what, e))?;
        Ok(!rows.is_empty())
    }

    pub async fn table_exists(&self, table: &str) -> Result<bool, MoveError> {
        self.exists(
            "looking up a table",
            &format!(
                "SELECT 1 FROM pg_class WHERE oid = to_regclass({})",
                literal(&ident(table))
            ),
        )
        .await
    }

    /// Whether `leaf` is a partition of `parent` here.
    pub async fn attached(&self, parent: &str, leaf: &str) -> Result<bool, MoveError> {
        self.exists(
            "looking up a partition",
            &format!(
                "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass({}) AND inhparent = to_regclass({})",
                literal(&ident(leaf)),
                literal(&ident(parent))
            ),
        )
        .await
    }

    /// Total size of `tables` (heap, indexes, TOAST); missing tables count 0.
    pub async fn total_size(&self, tables: &[String]) -> Result<u64, MoveError> {
        if tables.is_empty() {
            return Ok(0);
        }
        let list = tables
            .iter()
            .map(|t| literal(&ident(t)))
            .collect::<Vec<_>>()
            .join(", ");
        let size = self
            .query_one_i64(
                "measuring table sizes",
                &format!(
                    "SELECT coalesce(sum(pg_total_relation_size(to_regclass(t))), 0)::bigint FROM unnest(ARRAY[{list}]) AS t"
                ),
            )
            .await?;
        Ok(size.max(0) as u64)
    }

    /// The partition constraint of `leaf` as Postgres states it, with the
    /// parent's oid replaced by `{parent_oid}`.
    pub async fn partition_constraint(&self, leaf: &str) -> Result<String, MoveError> {
        let sql = format!(
            "SELECT pg_get_partition_constraintdef(to_regclass({})), \
                    (SELECT inhparent::bigint FROM pg_inherits WHERE inhrelid = to_regclass({}))",
            literal(&ident(leaf)),
            literal(&ident(leaf))
        );
        let row = self
            .client
            .query_one(&sql, &[])
            .await
            .map_err(|e| self.fail("reading a partition constraint", e))?;
        let def: Option<String> = row
            .try_get(0)
            .map_err(|e| self.fail("reading a partition constraint", e))?;
        let parent: Option<i64> = row
            .try_get(1)
            .map_err(|e| self.fail("reading a partition constraint", e))?;
        let (Some(def), Some(parent)) = (def, parent) else {
            return Err(MoveError::Fatal(format!(
                "{leaf} on server {} is not an attached partition",
                self.server
            )));
        };
        Ok(def.replace(&format!("'{parent}'::oid"), "'{parent_oid}'::oid"))
    }

    pub async fn oid_of(&self, table: &str) -> Result<i64, MoveError> {
        self.query_one_i64(
            "looking up a table",
            &format!(
                "SELECT coalesce(to_regclass({})::oid::bigint, 0)",
                literal(&ident(table))
            ),
        )
        .await
    }

    /// Creates `leaf` as a standalone copy of `parent`'s shape (columns,
    /// defaults, constraints, indexes), with a validated CHECK constraint
    /// equal to its partition bound so that attaching it later needs no scan.
    pub async fn create_detached_leaf(
        &self,
        parent: &str,
        leaf: &str,
        constraint: &str,
    ) -> Result<(), MoveError> {
        let parent_oid = self.oid_of(parent).await?;
        if parent_oid == 0 {
            return Err(MoveError::Fatal(format!(
                "table {parent} does not exist on server {}: create it there first (`shardctl table create`)",
                self.server
            )));
        }
        let check = constraint.replace("{parent_oid}", &parent_oid.to_string());
        let sql = format!(
            "BEGIN;\n\
             CREATE TABLE IF NOT EXISTS {leaf} (LIKE {parent} INCLUDING ALL);\n\
             ALTER TABLE {leaf} DROP CONSTRAINT IF EXISTS shardline_bound;\n\
             ALTER TABLE {leaf} ADD CONSTRAINT shardline_bound CHECK ({check});\n\
             COMMIT;",
            leaf = ident(leaf),
            parent = ident(parent),
        );
        self.execute("creating a target leaf", &sql).await
    }

    pub async fn publication_exists(&self, name: &str) -> Result<bool, MoveError> {
        self.exists(
            "looking up a publication",
            &format!(
                "SELECT 1 FROM pg_publication WHERE pubname = {}",
                literal(name)
            ),
        )
        .await
    }

    pub async fn create_publication(&self, name: &str, leaves: &[String]) -> Result<(), MoveError> {
        if self.publication_exists(name).await? {
            return Ok(());
        }
        let tables = leaves
            .iter()
            .map(|l| ident(l))
            .collect::<Vec<_>>()
            .join(", ");
        self.execute(
            "creating the publication",
            &format!("CREATE PUBLICATION {} FOR TABLE {tables}", ident(name)),
        )
        .await
    }

    pub async fn drop_publication(&self, name: &str) -> Result<(), MoveError> {
        self.execute(
            "dropping the publication",
            &format!("DROP PUBLICATION IF EXISTS {}", ident(name)),
        )
        .await
    }

    pub async fn subscription_exists(&self, name: &str) -> Result<bool, MoveError> {
        self.exists(
            "looking up a subscription",
            &format!(
                "SELECT 1 FROM pg_subscription WHERE subname = {}",
                literal(name)
            ),
        )
        .await
    }

    /// Subscribes to `publication` at `source_conninfo`: creates the slot
    /// on the source and starts the initial copy.
    pub async fn create_subscription(
        &self,
        name: &str,
        source_conninfo: &str,
    ) -> Result<(), MoveError> {
        if self.subscription_exists(name).await? {
            return Ok(());
        }
        self.execute(
            "creating the subscription",
            &format!(
                "CREATE SUBSCRIPTION {sub} CONNECTION {conn} PUBLICATION {sub} \
                 WITH (copy_data = true, create_slot = true, slot_name = {slot})",
                sub = ident(name),
                conn = literal(source_conninfo),
                slot = literal(name),
            ),
        )
        .await
    }

    /// Drops the subscription. With `drop_slot`, Postgres also drops its slot
    /// on the source (which must be reachable); without, the slot is left
    /// for [`Pg::drop_slot`] on the source.
    pub async fn drop_subscription(&self, name: &str, drop_slot: bool) -> Result<(), MoveError> {
        if !self.subscription_exists(name).await? {
            return Ok(());
        }
        let sub = ident(name);
        let sql = if drop_slot {
            format!("DROP SUBSCRIPTION {sub}")
        } else {
            format!(
                "ALTER SUBSCRIPTION {sub} DISABLE;\n\
                 ALTER SUBSCRIPTION {sub} SET (slot_name = NONE);\n\
                 DROP SUBSCRIPTION {sub};"
            )
        };
        self.execute("dropping the subscription", &sql).await
    }

    /// Makes the subscriber flush each applied transaction before
    /// confirming it. Set just before the cutover: with asynchronous commit
    /// (the default for subscriptions) the subscriber confirms the source's
    /// final position only after its WAL writer's next flush and its next
    /// status message, which adds hundreds of milliseconds to the hold.
    pub async fn subscription_confirm_promptly(&self, name: &str) -> Result<(), MoveError> {
        self.execute(
            "tuning the subscription",
            &format!(
                "ALTER SUBSCRIPTION {} SET (synchronous_commit = 'on')",
                ident(name)
            ),
        )
        .await
    }

    /// Whether every table of the subscription finished its initial copy.
    pub async fn subscription_synced(&self, name: &str) -> Result<bool, MoveError> {
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE r.srsubstate NOT IN ('r', 's')) \
                     FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid \
                     WHERE s.subname = {}",
                    literal(name)
                ),
                &[],
            )
            .await
            .map_err(|e| self.fail("reading the subscription state", e))?;
        let tables: i64 = row
            .try_get(0)
            .map_err(|e| self.fail("reading the subscription state", e))?;
        let pending: i64 = row
            .try_get(1)
            .map_err(|e| self.fail("reading the subscription state", e))?;
        Ok(tables > 0 && pending == 0)
    }

    /// Errors the subscription's workers hit so far (apply + initial copy).
    pub async fn subscription_errors(&self, name: &str) -> Result<i64, MoveError> {
        self.query_one_i64(
            "reading subscription statistics",
            &format!(
                "SELECT coalesce(sum(apply_error_count + sync_error_count), 0)::bigint \
                 FROM pg_stat_subscription_stats WHERE subname = {}",
                literal(name)
            ),
        )
        .await
    }

    pub async fn slot_exists(&self, name: &str) -> Result<bool, MoveError> {
        self.exists(
            "looking up a replication slot",
            &format!(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = {}",
                literal(name)
            ),
        )
        .await
    }

    /// WAL bytes between the source's flush position and what the slot's
    /// subscriber confirmed (`None` without the slot).
    pub async fn slot_lag(&self, name: &str) -> Result<Option<u64>, MoveError> {
        let rows = self
            .client
            .query(
                &format!(
                    "SELECT coalesce(pg_wal_lsn_diff(pg_current_wal_flush_lsn(), confirmed_flush_lsn), 0)::bigint \
                     FROM pg_replication_slots WHERE slot_name = {}",
                    literal(name)
                ),
                &[],
            )
            .await
            .map_err(|e| self.fail("reading replication lag", e))?;
        match rows.first() {
            Some(row) => {
                let lag: i64 = row
                    .try_get(0)
                    .map_err(|e| self.fail("reading replication lag", e))?;
                Ok(Some(lag.max(0) as u64))
            }
            None => Ok(None),
        }
    }

    /// Whether the slot's subscriber confirmed everything up to `lsn`.
    pub async fn slot_reached(&self, name: &str, lsn: &str) -> Result<bool, MoveError> {
        self.exists(
            "reading the slot position",
            &format!(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = {} AND confirmed_flush_lsn >= {}::pg_lsn",
                literal(name),
                literal(lsn)
            ),
        )
        .await
    }

    /// Drops the slot if it exists and no subscriber is attached to it.
    pub async fn drop_slot(&self, name: &str) -> Result<(), MoveError> {
        self.execute(
            "dropping the replication slot",
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = {} AND NOT active",
                literal(name)
            ),
        )
        .await?;
        if self.slot_exists(name).await? {
            // Still streaming to a subscriber: end that walsender first.
            self.execute(
                "stopping the slot's sender",
                &format!(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                     WHERE slot_name = {} AND active",
                    literal(name)
                ),
            )
            .await?;
            return Err(MoveError::Retry(format!(
                "replication slot {name} on {} was still in use; retrying its removal",
                self.server
            )));
        }
        Ok(())
    }

    pub async fn flush_lsn(&self) -> Result<String, MoveError> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(|e| self.fail("reading the WAL position", e))?;
        row.try_get(0)
            .map_err(|e| self.fail("reading the WAL position", e))
    }

    /// Detaches every `(parent, leaf)` that is attached, in one transaction
    /// that waits at most `lock_timeout` for its locks.
    pub async fn detach(
        &self,
        leaves: &[(String, String)],
        lock_timeout: Duration,
    ) -> Result<(), MoveError> {
        let mut statements = Vec::new();
        for (parent, leaf) in leaves {
            if self.attached(parent, leaf).await? {
                statements.push(format!(
                    "ALTER TABLE {} DETACH PARTITION {};",
                    ident(parent),
                    ident(leaf)
                ));
            }
        }
        self.in_locked_transaction("detaching leaves", statements, lock_timeout)
            .await
    }

    /// Attaches every `(parent, leaf, bound)` not attached yet, in one transaction.
    pub async fn attach(
        &self,
        leaves: &[(String, Leaf)],
        lock_timeout: Duration,
    ) -> Result<(), MoveError> {
        let mut statements = Vec::new();
        for (parent, leaf) in leaves {
            if !self.attached(parent, &leaf.name).await? {
                statements.push(format!(
                    "ALTER TABLE {} ATTACH PARTITION {} {};",
                    ident(parent),
                    ident(&leaf.name),
                    leaf.bound
                ));
            }
        }
        self.in_locked_transaction("attaching leaves", statements, lock_timeout)
            .await
    }

    async fn in_locked_transaction(
        &self,
        what: &str,
        statements: Vec<String>,
        lock_timeout: Duration,
    ) -> Result<(), MoveError> {
        if statements.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "BEGIN;\nSET LOCAL lock_timeout = '{}ms';\nSET LOCAL synchronous_commit = on;\n{}\nCOMMIT;",
            lock_timeout.as_millis().max(1),
            statements.join("\n")
        );
        let result = self.execute(what, &sql).await;
        if result.is_err() {
            // Leave the connection usable after a failed transaction.
            let _ = self.client.batch_execute("ROLLBACK").await;
        }
        result
    }

    /// Drops standalone tables (never one that is attached as a partition).
    pub async fn drop_detached(&self, leaves: &[(String, String)]) -> Result<(), MoveError> {
        for (parent, leaf) in leaves {
            if self.attached(parent, leaf).await? {
                return Err(MoveError::Fatal(format!(
                    "refusing to drop {leaf} on {}: it is attached to {parent}",
                    self.server
                )));
            }
            self.execute(
                "dropping a leaf",
                &format!("DROP TABLE IF EXISTS {}", ident(leaf)),
            )
            .await?;
        }
        Ok(())
    }

    /// Row count and an order-independent checksum of `table`'s rows.
    pub async fn checksum(&self, table: &str) -> Result<(i64, i64), MoveError> {
        // Hashing each row with its columns' own hash functions is several
        // times faster than hashing its text form; a table with a column
        // type that has no hash function (json, point...) falls back to text.
        // Both sides of a move have the same types, so they take the same path.
        let by_record = format!(
            "SELECT count(*)::bigint, coalesce(sum(hash_record_extended(t, 0) >> 32), 0)::bigint FROM {} AS t",
            ident(table)
        );
        let by_text = format!(
            "SELECT count(*)::bigint, coalesce(sum(hashtext(t::text)::bigint), 0)::bigint FROM {} AS t",
            ident(table)
        );
        let row = match self.client.query_one(&by_record, &[]).await {
            Ok(row) => row,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION) => {
                self.client
                    .query_one(&by_text, &[])
                    .await
                    .map_err(|e| self.fail("computing a checksum", e))?
            }
            Err(e) => return Err(self.fail("computing a checksum", e)),
        };
        let count: i64 = row
            .try_get(0)
            .map_err(|e| self.fail("computing a checksum", e))?;
        let sum: i64 = row
            .try_get(1)
            .map_err(|e| self.fail("computing a checksum", e))?;
        Ok((count, sum))
    }

    /// Slots, publications and subscriptions of shardline moves on this server.
    pub async fn leftovers(&self) -> Result<Vec<(String, String)>, MoveError> {
        let rows = self
            .client
            .query(
                "SELECT 'slot', slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'shardline\\_%' \
                 UNION ALL SELECT 'publication', pubname::text FROM pg_publication WHERE pubname LIKE 'shardline\\_%' \
                 UNION ALL SELECT 'subscription', subname::text FROM pg_subscription WHERE subname LIKE 'shardline\\_%'",
                &[],
            )
            .await
            .map_err(|e| self.fail("listing replication objects", e))?;
        let mut found = Vec::new();
        for row in rows {
            let kind: String = row
                .try_get(0)
                .map_err(|e| self.fail("listing replication objects", e))?;
            let name: String = row
                .try_get(1)
                .map_err(|e| self.fail("listing replication objects", e))?;
            found.push((kind, name));
        }
        Ok(found)
    }

    /// The server's `max_prepared_transactions`: at 0 it refuses PREPARE
    /// TRANSACTION, so no transaction that writes on several servers can
    /// include it.
    pub async fn max_prepared_transactions(&self) -> Result<i64, MoveError> {
        self.query_one_i64(
            "reading max_prepared_transactions",
            "SELECT current_setting('max_prepared_transactions')::bigint",
        )
        .await
    }

    /// Prepared transactions of shardline (gids `sl_...`) in this database
    /// and the age in seconds of the oldest: recovery resolves those of
    /// dead proxies within seconds, so an old one is in doubt.
    pub async fn shardline_prepared(&self) -> Result<(i64, i64), MoveError> {
        let what = "listing prepared transactions";
        let row = self
            .client
            .query_one(
                "SELECT count(*), coalesce(extract(epoch FROM now() - min(prepared))::bigint, 0) \
                 FROM pg_prepared_xacts WHERE database = current_database() AND starts_with(gid, 'sl_')",
                &[],
            )
            .await
            .map_err(|e| self.fail(what, e))?;
        let count = row.try_get::<_, i64>(0).map_err(|e| self.fail(what, e))?;
        let age = row.try_get::<_, i64>(1).map_err(|e| self.fail(what, e))?;
        Ok((count, age))
    }
}

/// The leaves holding `partition`: `(parent table, leaf)` for every sharded
/// table of the map.
pub fn partition_leaves(
    map: &ClusterMap,
    partition: u32,
) -> Result<Vec<(String, Leaf)>, MoveError> {
    let mut leaves = Vec::new();
    for (name, table) in &map.tables {
        if let TableKind::Sharded { .. } = table.kind {
            for leaf in shardmap::ddl::leaves(map, name, partition).map_err(MoveError::Fatal)? {
                leaves.push((name.clone(), leaf));
            }
        }
    }
    Ok(leaves)
}

/// Size in bytes of every partition (the sum of its leaves on its owner).
/// A server that cannot be reached is an error: a plan without its sizes
/// would be wrong.
pub async fn partition_sizes(
    map: &ClusterMap,
    credentials: &Credentials,
) -> Result<Vec<u64>, MoveError> {
    let mut leaf_partition = std::collections::HashMap::new();
    for partition in 0..map.partitions {
        for (_, leaf) in partition_leaves(map, partition)? {
            leaf_partition.insert(leaf.name, partition);
        }
    }
    let mut sizes = vec![0u64; map.partitions as usize];
    for server in map.servers.values() {
        let pg = Pg::connect(server, credentials, "shardctl").await?;
        let rows = pg
            .client
            .query(
                "SELECT c.relname::text, pg_total_relation_size(c.oid)::bigint \
                 FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid",
                &[],
            )
            .await
            .map_err(|e| pg.fail("measuring partitions", e))?;
        for row in rows {
            let name: String = row
                .try_get(0)
                .map_err(|e| pg.fail("measuring partitions", e))?;
            let bytes: i64 = row
                .try_get(1)
                .map_err(|e| pg.fail("measuring partitions", e))?;
            if let Some(&p) = leaf_partition.get(&name) {
                // Only the owner's copy counts (a target mid-move has one too).
                if map.assignments[p as usize].owner == server.name {
                    sizes[p as usize] += bytes.max(0) as u64;
                }
            }
        }
    }
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(ident("users_p3"), "users_p3");
        assert_eq!(ident("Users"), "\"Users\"");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(ident("1x"), "\"1x\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[test]
    fn conninfo_quotes_values() {
        let server = Server {
            name: "pg1".into(),
            primary: shardmap::Endpoint::parse("postgres://app@db.example:5433/main").expect("url"),
            replicas: vec![],
            region: None,
            state: shardmap::ServerState::Active,
        };
        let credentials = Credentials::with_password(Some(settings::Password::new("p'w d")));
        assert_eq!(
            conninfo(&server, &credentials).expect("valid"),
            "host='db.example' port=5433 user='app' dbname='main' application_name=shardline_move sslmode=prefer password='p\\'w d'"
        );
        let mut credentials = credentials;
        credentials.tls.sslmode = Some(settings::SslMode::VerifyFull);
        credentials.tls.sslrootcert = Some("/etc/ssl/shard ca.crt".into());
        let info = conninfo(&server, &credentials).expect("valid");
        assert!(
            info.contains(" sslmode=verify-full sslrootcert='/etc/ssl/shard ca.crt' password="),
            "{info}"
        );
    }
}
