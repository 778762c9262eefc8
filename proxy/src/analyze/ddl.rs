//! DDL the proxy may run on every server: what a schema statement applies
//! to and what it changes, from the statement's own text (sqlparser; DDL is
//! rare, so it is parsed each time rather than through the shape cache,
//! whose literal markers some DDL grammar does not accept: `COMMENT ... IS
//! 'text'`). Nothing here knows the map: `route::ddl` decides with it.
//!
//! Recognised: CREATE [UNIQUE] INDEX [CONCURRENTLY], DROP INDEX, ALTER
//! INDEX, ALTER TABLE, TRUNCATE, COMMENT ON TABLE/COLUMN, GRANT/REVOKE on
//! tables, CREATE/DROP TRIGGER, CREATE/DROP RULE, DROP TABLE. Anything else is not DDL to
//! this module and is routed as before.

use sqlparser::ast::{
    AlterColumnOperation, AlterTableOperation, CommentObject, GrantObjects, ObjectName, ObjectType,
    Statement,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::statement::{table_use, TableUse};

/// A schema statement, as far as running it on several servers goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ddl {
    /// Its leading words, upper case (`CREATE INDEX`), for messages.
    pub what: String,
    /// The tables it applies to.
    pub tables: Vec<TableUse>,
    /// It names an index, not a table (DROP INDEX, ALTER INDEX): it runs
    /// wherever sharded and reference tables live.
    pub on_index: bool,
    /// `CONCURRENTLY`: Postgres runs it only outside a transaction block.
    pub concurrently: bool,
    /// It changes what the map records of the table: its columns (added,
    /// dropped, renamed, retyped, defaults, NOT NULL) or its constraints.
    pub changes_columns: bool,
    /// Columns it drops, renames or retypes (refused if one is a sharding key).
    pub key_sensitive: Vec<String>,
    /// Why it may not run on a table of the map at all (dropping or renaming
    /// the table, changing its partitioning): message and hint.
    pub refusal: Option<(String, String)>,
}

impl Ddl {
    fn new(what: &str, tables: Vec<TableUse>) -> Ddl {
        Ddl {
            what: what.to_string(),
            tables,
            on_index: false,
            concurrently: false,
            changes_columns: false,
            key_sensitive: Vec::new(),
            refusal: None,
        }
    }
}

/// Whether a statement with these words (lower case, as the lexer gives
/// them) may be DDL: a cheap test before anything is parsed.
pub fn may_be_ddl(words: &[String]) -> bool {
    matches!(
        words.first().map(String::as_str),
        Some("create" | "alter" | "drop" | "comment" | "grant" | "revoke" | "truncate")
    )
}

/// Whether a statement with these words (lower case) may change the
/// columns a prepared statement returns: ALTER and DROP of anything, and
/// CREATE OR REPLACE, CREATE VIEW and CREATE RULE (not CREATE TABLE, which
/// transactions that use temporary tables run all the time). The session
/// counts such a statement as a catalog change before it sends it
/// (`pool::Budgets::count_catalog_change`).
pub fn may_change_result_columns(words: &[String]) -> bool {
    let word = |at: usize| words.get(at).map(String::as_str);
    match word(0) {
        Some("alter" | "drop") => true,
        Some("create") => matches!(word(1), Some("or" | "view" | "rule" | "recursive")),
        _ => false,
    }
}

/// The DDL in `sql` (one statement), if it is DDL this module knows.
/// `words` are the statement's words as the lexer gives them (lower case).
pub fn analyze_ddl(sql: &str, words: &[String]) -> Option<Ddl> {
    if !may_be_ddl(words) {
        return None;
    }
    if words.len() > 3 && words[..3] == ["drop", "index", "concurrently"] {
        // sqlparser does not parse this form; it names only indexes.
        return Some(Ddl {
            on_index: true,
            concurrently: true,
            ..Ddl::new("DROP INDEX", Vec::new())
        });
    }
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    if statements.len() != 1 {
        return None;
    }
    let tables = |names: &[ObjectName]| names.iter().map(|n| table_use(n, None)).collect();
    let concurrently = words.iter().take(4).any(|w| w == "concurrently");
    let ddl = match statements.remove(0) {
        Statement::CreateIndex(index) => Ddl {
            concurrently: index.concurrently,
            ..Ddl::new("CREATE INDEX", vec![table_use(&index.table_name, None)])
        },
        Statement::AlterTable(alter) => alter_table(&alter.name, &alter.operations, words),
        Statement::AlterIndex { .. } => Ddl {
            on_index: true,
            ..Ddl::new("ALTER INDEX", Vec::new())
        },
        Statement::Drop {
            object_type: ObjectType::Index,
            ..
        } => Ddl {
            on_index: true,
            concurrently,
            ..Ddl::new("DROP INDEX", Vec::new())
        },
        Statement::Drop {
            object_type: ObjectType::Table,
            names,
            ..
        } => Ddl {
            refusal: Some((
                "dropping a table of the shard map".into(),
                "remove it from the map with `shardctl table remove`, then drop it on each server directly".into(),
            )),
            ..Ddl::new("DROP TABLE", tables(&names))
        },
        Statement::Truncate(truncate) => Ddl::new(
            "TRUNCATE",
            truncate
                .table_names
                .iter()
                .map(|t| table_use(&t.name, None))
                .collect(),
        ),
        Statement::Comment {
            object_type,
            object_name,
            ..
        } => match object_type {
            CommentObject::Table => Ddl::new("COMMENT", vec![table_use(&object_name, None)]),
            CommentObject::Column => {
                let mut parts = object_name.0.clone();
                parts.pop();
                Ddl::new("COMMENT", vec![table_use(&ObjectName(parts), None)])
            }
            _ => return None,
        },
        Statement::Grant(grant) => match &grant.objects {
            Some(GrantObjects::Tables(names)) => Ddl::new("GRANT", tables(names)),
            _ => return None,
        },
        Statement::Revoke(revoke) => match &revoke.objects {
            Some(GrantObjects::Tables(names)) => Ddl::new("REVOKE", tables(names)),
            _ => return None,
        },
        Statement::CreateTrigger(trigger) => {
            Ddl::new("CREATE TRIGGER", vec![table_use(&trigger.table_name, None)])
        }
        Statement::DropTrigger(trigger) => Ddl::new(
            "DROP TRIGGER",
            trigger
                .table_name
                .iter()
                .map(|n| table_use(n, None))
                .collect(),
        ),
        // Run on every server like a trigger: the rule's actions run where
        // the rows are.
        Statement::CreateRule(rule) => {
            Ddl::new("CREATE RULE", vec![table_use(&rule.table_name, None)])
        }
        Statement::DropRule(rule) => {
            Ddl::new("DROP RULE", vec![table_use(&rule.table_name, None)])
        }
        _ => return None,
    };
    Some(ddl)
}

fn alter_table(name: &ObjectName, operations: &[AlterTableOperation], words: &[String]) -> Ddl {
    let mut ddl = Ddl::new("ALTER TABLE", vec![table_use(name, None)]);
    let partitioning = || {
        Some((
            "changing the partitioning of a table of the shard map".to_string(),
            "shardline attaches and detaches the leaves itself when it moves partitions (`shardctl move`)".to_string(),
        ))
    };
    if words.windows(2).any(|w| w[0] == "set" && w[1] == "schema") {
        ddl.refusal = Some((
            "moving a table of the shard map to another schema".into(),
            "shardline routes tables of the public schema: create the table anew with `shardctl table create`".into(),
        ));
    }
    for operation in operations {
        match operation {
            AlterTableOperation::AddColumn { .. } => ddl.changes_columns = true,
            AlterTableOperation::DropColumn { column_names, .. } => {
                ddl.changes_columns = true;
                ddl.key_sensitive
                    .extend(column_names.iter().map(super::statement::ident_name));
            }
            AlterTableOperation::RenameColumn {
                old_column_name, ..
            } => {
                ddl.changes_columns = true;
                ddl.key_sensitive
                    .push(super::statement::ident_name(old_column_name));
            }
            AlterTableOperation::AlterColumn { column_name, op } => {
                ddl.changes_columns = true;
                if matches!(op, AlterColumnOperation::SetDataType { .. }) {
                    ddl.key_sensitive
                        .push(super::statement::ident_name(column_name));
                }
            }
            AlterTableOperation::AddConstraint { .. }
            | AlterTableOperation::DropConstraint { .. }
            | AlterTableOperation::RenameConstraint { .. }
            | AlterTableOperation::ValidateConstraint { .. }
            | AlterTableOperation::DropPrimaryKey { .. }
            | AlterTableOperation::DropForeignKey { .. } => ddl.changes_columns = true,
            AlterTableOperation::RenameTable { .. } => {
                ddl.refusal = Some((
                    "renaming a table of the shard map".into(),
                    "the map names its tables: create the new table with `shardctl table add` and `shardctl table create`, and copy the rows".into(),
                ));
            }
            AlterTableOperation::AttachPartition { .. }
            | AlterTableOperation::AttachPartitionOf { .. }
            | AlterTableOperation::DetachPartition { .. }
            | AlterTableOperation::DetachPartitionOf { .. }
            | AlterTableOperation::Inherit { .. }
            | AlterTableOperation::NoInherit { .. } => ddl.refusal = partitioning(),
            _ => {}
        }
    }
    ddl
}

#[cfg(test)]
mod tests {
    #[test]
    fn statements_that_may_change_result_columns() {
        let words =
            |sql: &str| -> Vec<String> { sql.split_whitespace().map(str::to_string).collect() };
        for sql in [
            "alter table t alter column a type bigint",
            "drop table t",
            "drop view v",
            "create or replace view v as select 1",
            "create view v as select 1",
            "create rule r as on insert to t do nothing",
        ] {
            assert!(may_change_result_columns(&words(sql)), "{sql}");
        }
        for sql in [
            "create table t (a int)",
            "create temp table t (a int)",
            "create index on t (a)",
            "select 1",
            "truncate t",
            "",
        ] {
            assert!(!may_change_result_columns(&words(sql)), "{sql}");
        }
    }

    use super::*;
    use crate::analyze::lexer::lex;

    fn ddl(sql: &str) -> Option<Ddl> {
        analyze_ddl(sql, &lex(sql).words)
    }

    fn names(d: &Ddl) -> Vec<&str> {
        d.tables.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn indexes() {
        let d = ddl("CREATE INDEX users_name ON users (name) WHERE n > 5").expect("ddl");
        assert_eq!(names(&d), ["users"]);
        assert!(!d.concurrently && !d.changes_columns);
        let d = ddl("create unique index concurrently if not exists i on public.Users (n)")
            .expect("ddl");
        assert_eq!(names(&d), ["users"]);
        assert!(d.concurrently);
        let d = ddl("DROP INDEX IF EXISTS users_name").expect("ddl");
        assert!(d.on_index && !d.concurrently);
        let d = ddl("DROP INDEX CONCURRENTLY IF EXISTS users_name").expect("ddl");
        assert!(d.on_index && d.concurrently);
        assert!(ddl("ALTER INDEX a RENAME TO b").expect("ddl").on_index);
    }

    #[test]
    fn alter_table() {
        let d = ddl("ALTER TABLE users ADD COLUMN email text DEFAULT 'x'").expect("ddl");
        assert_eq!(names(&d), ["users"]);
        assert!(d.changes_columns && d.key_sensitive.is_empty() && d.refusal.is_none());
        let d = ddl("ALTER TABLE users DROP COLUMN user_id, RENAME COLUMN Name TO n").expect("ddl");
        assert_eq!(d.key_sensitive, ["user_id", "name"]);
        let d = ddl("ALTER TABLE users ALTER COLUMN user_id TYPE text").expect("ddl");
        assert_eq!(d.key_sensitive, ["user_id"]);
        let d = ddl("ALTER TABLE users ALTER COLUMN n SET DEFAULT 3").expect("ddl");
        assert!(d.changes_columns && d.key_sensitive.is_empty());
        assert!(ddl("ALTER TABLE users RENAME TO people")
            .expect("ddl")
            .refusal
            .is_some());
        assert!(ddl("ALTER TABLE users DETACH PARTITION users_p1")
            .expect("ddl")
            .refusal
            .is_some());
        assert!(ddl("ALTER TABLE users SET SCHEMA other")
            .map(|d| d.refusal.is_some())
            .unwrap_or(true));
        assert!(
            !ddl("ALTER TABLE users ENABLE TRIGGER t")
                .expect("ddl")
                .changes_columns
        );
    }

    #[test]
    fn other_statements() {
        assert_eq!(
            names(&ddl("TRUNCATE users, countries").expect("ddl")),
            ["users", "countries"]
        );
        assert_eq!(
            names(&ddl("COMMENT ON COLUMN users.name IS 'the name'").expect("ddl")),
            ["users"]
        );
        assert_eq!(
            names(&ddl("GRANT SELECT ON users TO app").expect("ddl")),
            ["users"]
        );
        let d = ddl("CREATE OR REPLACE RULE echo AS ON INSERT TO public.users \
                     DO INSTEAD SELECT NEW.id, 2")
        .expect("ddl");
        assert_eq!((d.what.as_str(), names(&d)), ("CREATE RULE", vec!["users"]));
        let d = ddl("DROP RULE IF EXISTS echo ON users CASCADE").expect("ddl");
        assert_eq!((d.what.as_str(), names(&d)), ("DROP RULE", vec!["users"]));
        assert!(d.refusal.is_none() && !d.changes_columns);
        assert!(ddl("DROP TABLE users").expect("ddl").refusal.is_some());
        assert!(ddl("SELECT 1").is_none());
        assert!(ddl("CREATE TABLE x (a int)").is_none());
        assert!(ddl("INSERT INTO users VALUES (1)").is_none());
    }
}
