//! Short constructors for servers, groups, tables and their rules, so that
//! tests, fuzzers and examples declare a map in a few lines instead of
//! nested struct literals:
//!
//! ```
//! # use shardmap::{ClusterMap, Endpoint, Group, KeyType, Server, Table};
//! let primary = Endpoint::parse("postgres://app@10.0.0.1/photos")?;
//! let mut map = ClusterMap::new("demo", 8, vec![Server::active("pg1", primary)])?;
//! map.declare(
//!     Group::hash("users", KeyType::Bigint)
//!         .table("users", "user_id")
//!         .embedded_table("photos", "photo_id"),
//! );
//! map.declare_table(Table::reference("countries"));
//! map.declare_table(Table::unsharded("settings", "pg1"));
//! map.validate()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! They only build values: `ClusterMap::validate` still judges the result,
//! so a test can build a broken map on purpose.

use crate::keys::KeyType;
use crate::model::{
    ClusterMap, Endpoint, Group, ListRule, Method, RangeRule, Server, ServerState, Table, TableKind,
};

impl Server {
    /// An active server without replicas or region.
    pub fn active(name: &str, primary: Endpoint) -> Server {
        Server {
            name: name.into(),
            primary,
            replicas: Vec::new(),
            region: None,
            state: ServerState::Active,
        }
    }
}

impl Group {
    /// A group that hashes its keys like `PARTITION BY HASH`.
    pub fn hash(name: &str, key_type: KeyType) -> Group {
        Group::with_method(name, key_type, Method::Hash)
    }

    /// A group that sends explicit key ranges to partitions.
    pub fn range(name: &str, key_type: KeyType, ranges: Vec<RangeRule>) -> Group {
        Group::with_method(name, key_type, Method::Range { ranges })
    }

    /// A group that sends listed values to partitions, and the rest to
    /// `default` (or nowhere).
    pub fn list(
        name: &str,
        key_type: KeyType,
        lists: Vec<ListRule>,
        default: Option<u32>,
    ) -> Group {
        Group::with_method(name, key_type, Method::List { lists, default })
    }

    fn with_method(name: &str, key_type: KeyType, method: Method) -> Group {
        Group {
            name: name.into(),
            key_type,
            method,
        }
    }

    /// This group with `table` sharded in it by `key_column`.
    pub fn table(self, table: &str, key_column: &str) -> GroupWithTables {
        GroupWithTables::from(self).table(table, key_column)
    }

    /// This group with `table` sharded in it by `key_column`, which holds
    /// embedded ids made for this group's partitions.
    pub fn embedded_table(self, table: &str, key_column: &str) -> GroupWithTables {
        GroupWithTables::from(self).embedded_table(table, key_column)
    }
}

/// A co-location group and the tables sharded in it, to declare together
/// with [`ClusterMap::declare`].
#[derive(Debug, Clone, PartialEq)]
pub struct GroupWithTables {
    pub group: Group,
    pub tables: Vec<Table>,
}

impl From<Group> for GroupWithTables {
    fn from(group: Group) -> GroupWithTables {
        GroupWithTables {
            group,
            tables: Vec::new(),
        }
    }
}

impl GroupWithTables {
    /// Adds `table`, sharded by `key_column`.
    pub fn table(self, table: &str, key_column: &str) -> GroupWithTables {
        self.sharded(table, key_column, false)
    }

    /// Adds `table`, sharded by `key_column` holding embedded ids.
    pub fn embedded_table(self, table: &str, key_column: &str) -> GroupWithTables {
        self.sharded(table, key_column, true)
    }

    fn sharded(mut self, table: &str, key_column: &str, embedded_id: bool) -> GroupWithTables {
        let kind = TableKind::Sharded {
            group: self.group.name.clone(),
            key_column: key_column.into(),
            embedded_id,
        };
        self.tables.push(Table::of_kind(table, kind));
        self
    }
}

impl Table {
    /// A small table copied to every server.
    pub fn reference(name: &str) -> Table {
        Table::of_kind(name, TableKind::Reference)
    }

    /// A table that lives whole on server `home`.
    pub fn unsharded(name: &str, home: &str) -> Table {
        Table::of_kind(name, TableKind::Unsharded { home: home.into() })
    }

    fn of_kind(name: &str, kind: TableKind) -> Table {
        Table {
            name: name.into(),
            kind,
        }
    }
}

impl RangeRule {
    /// Keys in `[from, to)` go to `partition`; `None` is unbounded.
    pub fn new(from: Option<&str>, to: Option<&str>, partition: u32) -> RangeRule {
        RangeRule {
            from: from.map(Into::into),
            to: to.map(Into::into),
            partition,
        }
    }
}

impl ListRule {
    /// Keys equal to one of `values` go to `partition`.
    pub fn new(values: &[&str], partition: u32) -> ListRule {
        ListRule {
            values: values.iter().map(|v| v.to_string()).collect(),
            partition,
        }
    }
}

impl ClusterMap {
    /// Puts a group and its tables into the map, replacing any of the same
    /// names.
    pub fn declare(&mut self, declared: impl Into<GroupWithTables>) {
        let GroupWithTables { group, tables } = declared.into();
        self.groups.insert(group.name.clone(), group);
        for table in tables {
            self.declare_table(table);
        }
    }

    /// Puts a table into the map, replacing any of the same name.
    pub fn declare_table(&mut self, table: Table) {
        self.tables.insert(table.name.clone(), table);
    }
}
