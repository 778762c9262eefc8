//! The physical layout of a sharded table on a server, as SQL: the parent's
//! `PARTITION BY` clause and the leaf tables of each logical partition.
//! Text only — running it is the caller's business (tests, rebalancer).

use crate::embedded::IdLayout;
use crate::keys::{KeyType, KeyValue};
use crate::model::{ClusterMap, Method, TableKind};

/// A leaf table of one logical partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub name: String,
    /// `FOR VALUES ...` or `DEFAULT`.
    pub bound: String,
}

impl Leaf {
    /// `CREATE TABLE leaf PARTITION OF parent bound`.
    pub fn create_sql(&self, parent: &str) -> String {
        format!(
            "CREATE TABLE {} PARTITION OF {parent} {}",
            self.name, self.bound
        )
    }
}

fn literal(key_type: KeyType, text: &str) -> Result<String, String> {
    match key_type.parse_value(text).map_err(|e| e.to_string())? {
        KeyValue::Int(v) => Ok(v.to_string()),
        KeyValue::Text(v) => Ok(format!("'{}'", v.replace('\'', "''"))),
        KeyValue::Uuid(v) => Ok(format!("'{v}'")),
    }
}

/// The `PARTITION BY` clause of a sharded table's parent.
pub fn partition_clause(map: &ClusterMap, table: &str) -> Result<String, String> {
    let (key_column, method) = sharding(map, table)?;
    Ok(match method {
        Layout::Hash => format!("PARTITION BY HASH ({key_column})"),
        Layout::Range(_) | Layout::Embedded(_) => format!("PARTITION BY RANGE ({key_column})"),
        Layout::List(_) => format!("PARTITION BY LIST ({key_column})"),
    })
}

enum Layout<'m> {
    Hash,
    Range(&'m Method),
    List(&'m Method),
    Embedded(IdLayout),
}

fn sharding<'m>(map: &'m ClusterMap, table: &str) -> Result<(&'m str, Layout<'m>), String> {
    let def = map
        .tables
        .get(table)
        .ok_or_else(|| format!("table {table:?} is not in the map"))?;
    let TableKind::Sharded {
        group,
        key_column,
        embedded_id,
    } = &def.kind
    else {
        return Err(format!("table {table:?} is not sharded"));
    };
    let group = map
        .groups
        .get(group)
        .ok_or_else(|| format!("group {group:?} is not in the map"))?;
    let embedded = || {
        IdLayout::new(map.partitions)
            .map(Layout::Embedded)
            .ok_or("too many partitions for embedded ids".to_string())
    };
    let layout = if *embedded_id {
        embedded()?
    } else {
        match &group.method {
            Method::Hash => Layout::Hash,
            Method::Range { .. } => Layout::Range(&group.method),
            Method::List { .. } => Layout::List(&group.method),
            Method::Embedded => embedded()?,
        }
    };
    Ok((key_column, layout))
}

/// The leaves of `table` holding logical partition `partition` (none when no
/// key maps to it, several for a partition with several ranges).
pub fn leaves(map: &ClusterMap, table: &str, partition: u32) -> Result<Vec<Leaf>, String> {
    let (_, layout) = sharding(map, table)?;
    let key_type = map
        .tables
        .get(table)
        .and_then(|t| match &t.kind {
            TableKind::Sharded { group, .. } => map.groups.get(group).map(|g| g.key_type),
            _ => None,
        })
        .unwrap_or(KeyType::Bigint);
    let name = format!("{table}_p{partition}");
    match layout {
        Layout::Hash => Ok(vec![Leaf {
            name,
            bound: format!(
                "FOR VALUES WITH (MODULUS {}, REMAINDER {partition})",
                map.partitions
            ),
        }]),
        Layout::Embedded(ids) => {
            let (from, to) = ids
                .partition_bounds(partition)
                .ok_or_else(|| format!("partition {partition} is out of range"))?;
            let to = to.map_or("MAXVALUE".to_string(), |t| t.to_string());
            Ok(vec![Leaf {
                name,
                bound: format!("FOR VALUES FROM ({from}) TO ({to})"),
            }])
        }
        Layout::Range(Method::Range { ranges }) => {
            let mut leaves = Vec::new();
            for rule in ranges.iter().filter(|r| r.partition == partition) {
                let from = match &rule.from {
                    Some(v) => literal(key_type, v)?,
                    None => "MINVALUE".into(),
                };
                let to = match &rule.to {
                    Some(v) => literal(key_type, v)?,
                    None => "MAXVALUE".into(),
                };
                let name = if leaves.is_empty() {
                    name.clone()
                } else {
                    format!("{name}_{}", leaves.len())
                };
                leaves.push(Leaf {
                    name,
                    bound: format!("FOR VALUES FROM ({from}) TO ({to})"),
                });
            }
            Ok(leaves)
        }
        Layout::List(Method::List { lists, default }) => {
            let mut values = Vec::new();
            for rule in lists.iter().filter(|r| r.partition == partition) {
                for v in &rule.values {
                    values.push(literal(key_type, v)?);
                }
            }
            let mut leaves = Vec::new();
            if !values.is_empty() {
                leaves.push(Leaf {
                    name: name.clone(),
                    bound: format!("FOR VALUES IN ({})", values.join(", ")),
                });
            }
            if *default == Some(partition) {
                leaves.push(Leaf {
                    name: format!("{name}_default"),
                    bound: "DEFAULT".into(),
                });
            }
            Ok(leaves)
        }
        Layout::Range(_) | Layout::List(_) => Err("inconsistent layout".into()),
    }
}

/// The column names of a column list as given to `shardctl table create`
/// (`"user_id bigint PRIMARY KEY, name text, PRIMARY KEY (a, b)"`), in
/// order: table constraints are skipped, quoted names unquoted, plain
/// names folded to lower case as Postgres does. `None` if the list cannot
/// be read that way.
pub fn column_names(columns: &str) -> Option<Vec<String>> {
    const CONSTRAINTS: [&str; 7] = [
        "constraint",
        "primary",
        "unique",
        "check",
        "foreign",
        "exclude",
        "like",
    ];
    let mut names = Vec::new();
    for element in split_top_level(columns)? {
        let element = element.trim();
        if element.is_empty() {
            return None;
        }
        let name = if let Some(rest) = element.strip_prefix('"') {
            // A quoted name: `""` stands for one quote.
            let mut name = String::new();
            let mut chars = rest.chars().peekable();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        name.push('"');
                    }
                    '"' => break,
                    c => name.push(c),
                }
            }
            name
        } else {
            let word: String = element
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
                .collect();
            let word = word.to_lowercase();
            if word.is_empty() {
                return None;
            }
            if CONSTRAINTS.contains(&word.as_str()) {
                continue;
            }
            word
        };
        names.push(name);
    }
    Some(names)
}

/// A query returning one row and one text column: `table`'s column list
/// as it is now in the catalog of the server that runs it, in the form
/// `shardctl table create --columns` takes and the map records (`columns`):
/// each column in order (dropped ones left out) with its type, collation
/// when not the type's default, DEFAULT or GENERATED ... STORED, identity and
/// NOT NULL; a column whose default is its own sequence (`serial`) as the
/// serial type, so a new server creates its sequence too; then the table's
/// primary key, unique, check, foreign-key and exclusion constraints by
/// name. After DDL changes a table's columns, the map's list is replaced
/// by this, so `INSERT` without a column list and `shardctl server add`
/// follow the table. Indexes that are not constraints are not part of it.
pub fn column_list_query(table: &str) -> String {
    let relation = format!(
        "'public.\"{}\"'::regclass",
        table.replace('\'', "''").replace('"', "\"\"")
    );
    format!(
        "SELECT string_agg(def, ', ' ORDER BY kind, n) FROM (\
         SELECT 0 AS kind, a.attnum::int AS n, \
           quote_ident(a.attname) || ' ' || \
           CASE WHEN serial.seq IS NOT NULL AND a.attidentity = '' \
                 AND format_type(a.atttypid, a.atttypmod) IN ('bigint', 'integer', 'smallint') \
             THEN CASE format_type(a.atttypid, a.atttypmod) WHEN 'bigint' THEN 'bigserial' \
                  WHEN 'integer' THEN 'serial' ELSE 'smallserial' END \
             ELSE format_type(a.atttypid, a.atttypmod) END \
           || CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation \
                THEN ' COLLATE ' || quote_ident(coll.collname) ELSE '' END \
           || CASE WHEN a.attgenerated = 's' THEN ' GENERATED ALWAYS AS (' || pg_get_expr(d.adbin, d.adrelid) || ') STORED' \
                WHEN d.adbin IS NOT NULL AND serial.seq IS NULL THEN ' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid) \
                ELSE '' END \
           || CASE a.attidentity WHEN 'a' THEN ' GENERATED ALWAYS AS IDENTITY' \
                WHEN 'd' THEN ' GENERATED BY DEFAULT AS IDENTITY' ELSE '' END \
           || CASE WHEN a.attnotnull AND serial.seq IS NULL THEN ' NOT NULL' ELSE '' END AS def \
         FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
         LEFT JOIN pg_collation coll ON coll.oid = a.attcollation \
         LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
         LEFT JOIN LATERAL (SELECT pg_get_serial_sequence({relation}::text, a.attname) AS seq \
           WHERE a.attidentity = '' AND pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%') serial ON true \
         WHERE a.attrelid = {relation} AND a.attnum > 0 AND NOT a.attisdropped \
         UNION ALL \
         SELECT 1, (row_number() OVER (ORDER BY c.conname))::int, \
           'CONSTRAINT ' || quote_ident(c.conname) || ' ' || pg_get_constraintdef(c.oid) \
         FROM pg_constraint c WHERE c.conrelid = {relation} AND c.contype IN ('p', 'u', 'c', 'f', 'x')\
         ) cols"
    )
}

/// `text` split at commas outside parentheses, quotes and string literals.
fn split_top_level(text: &str) -> Option<Vec<&str>> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    let mut quote: Option<char> = None;
    for (at, c) in text.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => {
                depth -= 1;
                if depth < 0 {
                    return None;
                }
            }
            (None, ',') if depth == 0 => {
                parts.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    if depth != 0 || quote.is_some() {
        return None;
    }
    parts.push(&text[start..]);
    Some(parts)
}

/// The function a proxy in degraded mode calls before a request's first
/// statement on each partition (`check_owner(parents, leaves)`): it locks
/// each parent in ACCESS SHARE mode, which a DETACH PARTITION waits for
/// until the transaction ends, then checks that each leaf is attached to
/// its parent, reading the catalog with the transaction's snapshot. A leaf
/// detached (or attached only after a REPEATABLE READ snapshot was taken)
/// raises an error, and the proxy holds the request instead of reading a
/// stale copy. Installed with every sharded table (`create_statements`),
/// so every server that can own a partition has it.
///
/// It lives in `public` under a prefixed name rather than in a schema of its
/// own: a schema named like a role (say `shardline`) would come first in that
/// role's default `search_path` and catch its unqualified CREATE TABLEs.
pub const OWNER_CHECK_FUNCTION: &str = r#"CREATE OR REPLACE FUNCTION public.shardline_check_owner(parents text[], leaves text[]) RETURNS void
LANGUAGE plpgsql AS $shardline$
DECLARE
  i int;
  parent regclass;
BEGIN
  FOR i IN 1 .. coalesce(array_length(parents, 1), 0) LOOP
    parent := to_regclass(parents[i]);
    IF parent IS NULL THEN
      RAISE EXCEPTION 'shardline: table % does not exist on this server', parents[i] USING ERRCODE = '55006';
    END IF;
    EXECUTE format('LOCK TABLE %s IN ACCESS SHARE MODE', parent);
  END LOOP;
  FOR i IN 1 .. coalesce(array_length(parents, 1), 0) LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits
                   WHERE inhparent = to_regclass(parents[i]) AND inhrelid = to_regclass(leaves[i])) THEN
      RAISE EXCEPTION 'shardline: partition % of % is not attached on this server', leaves[i], parents[i] USING ERRCODE = '55006';
    END IF;
  END LOOP;
END
$shardline$"#;

/// The leaf that stands for `partition` in an ownership check: the first
/// sharded table's (by name) that has one. A move detaches and attaches all
/// of a partition's leaves in one transaction each, so one leaf attached
/// means all are, and a lock on its parent holds off that transaction.
/// `None` when no table has a leaf for it (no key maps to it: any server
/// gives the same empty answer).
pub fn owner_leaf(map: &ClusterMap, partition: u32) -> Option<(String, String)> {
    map.tables
        .iter()
        .find_map(|(name, table)| match table.kind {
            TableKind::Sharded { .. } => leaves(map, name, partition)
                .ok()?
                .into_iter()
                .next()
                .map(|leaf| (name.clone(), leaf.name)),
            _ => None,
        })
}

/// The statements creating `table` (with `columns`, the SQL column list) on
/// `server`: for a sharded table the ownership check function
/// (`OWNER_CHECK_FUNCTION`), the partitioned parent and the leaves of the
/// partitions `server` owns; a reference table everywhere; an unsharded table
/// on its home only (elsewhere: nothing).
pub fn create_statements(
    map: &ClusterMap,
    table: &str,
    columns: &str,
    server: &str,
) -> Result<Vec<String>, String> {
    let def = map
        .tables
        .get(table)
        .ok_or_else(|| format!("table {table:?} is not in the map"))?;
    let mut statements = Vec::new();
    match &def.kind {
        TableKind::Sharded { .. } => {
            statements.push(OWNER_CHECK_FUNCTION.to_string());
            statements.push(format!(
                "CREATE TABLE {table} ({columns}) {}",
                partition_clause(map, table)?
            ));
            for (partition, assignment) in map.assignments.iter().enumerate() {
                if assignment.owner == server {
                    for leaf in leaves(map, table, partition as u32)? {
                        statements.push(leaf.create_sql(table));
                    }
                }
            }
        }
        TableKind::Reference => statements.push(format!("CREATE TABLE {table} ({columns})")),
        TableKind::Unsharded { home } => {
            if home == server {
                statements.push(format!("CREATE TABLE {table} ({columns})"));
            }
        }
    }
    Ok(statements)
}

#[cfg(test)]
mod tests {

    #[test]
    fn column_names_in_order_without_constraints() {
        assert_eq!(
            column_names(
                "photo_id bigint PRIMARY KEY, User_Id bigint NOT NULL, \"Cap, tion\" text DEFAULT 'a,b', \
                 amount numeric(10, 2), PRIMARY KEY (photo_id, user_id), CONSTRAINT c CHECK (amount > 0)"
            ),
            Some(vec![
                "photo_id".to_string(),
                "user_id".to_string(),
                "Cap, tion".to_string(),
                "amount".to_string()
            ])
        );
        assert_eq!(column_names("a int, (b int"), None);
        assert_eq!(column_names("a int,, b int"), None);
    }

    use super::*;
    use crate::model::{Endpoint, Group, ListRule, RangeRule, Server};

    /// A map of one server where table `t` is sharded by `k` in `group`.
    fn map_with(group: Group, embedded_id: bool) -> ClusterMap {
        let server = Server::active("a", Endpoint::parse("postgres://h:1/d").expect("url"));
        let mut map = ClusterMap::new("t", 4, vec![server]).expect("map");
        map.declare(if embedded_id {
            group.embedded_table("t", "k")
        } else {
            group.table("t", "k")
        });
        map
    }

    #[test]
    fn hash_and_embedded_leaves() {
        let map = map_with(Group::hash("g", KeyType::Bigint), false);
        assert_eq!(
            partition_clause(&map, "t").as_deref(),
            Ok("PARTITION BY HASH (k)")
        );
        assert_eq!(
            leaves(&map, "t", 3).expect("leaves")[0].create_sql("t"),
            "CREATE TABLE t_p3 PARTITION OF t FOR VALUES WITH (MODULUS 4, REMAINDER 3)"
        );
        let map = map_with(Group::hash("g", KeyType::Bigint), true);
        assert_eq!(
            partition_clause(&map, "t").as_deref(),
            Ok("PARTITION BY RANGE (k)")
        );
        assert!(leaves(&map, "t", 3).expect("leaves")[0]
            .bound
            .ends_with("TO (MAXVALUE)"));
    }

    #[test]
    fn range_and_list_leaves() {
        let ranges = vec![
            RangeRule::new(None, Some("100"), 1),
            RangeRule::new(Some("500"), None, 1),
        ];
        let map = map_with(Group::range("g", KeyType::Bigint, ranges), false);
        let l = leaves(&map, "t", 1).expect("leaves");
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].bound, "FOR VALUES FROM (MINVALUE) TO (100)");
        assert_eq!(l[1].bound, "FOR VALUES FROM (500) TO (MAXVALUE)");
        assert!(leaves(&map, "t", 0).expect("leaves").is_empty());
        let lists = vec![ListRule::new(&["DE", "it's"], 2)];
        let map = map_with(Group::list("g", KeyType::Text, lists, Some(2)), false);
        let l = leaves(&map, "t", 2).expect("leaves");
        assert_eq!(l[0].bound, "FOR VALUES IN ('DE', 'it''s')");
        assert_eq!(l[1].bound, "DEFAULT");
    }
}
