use super::*;
use crate::analyze::lexer::lex;

fn data(sql: &str) -> DataStatement {
    let lexed = lex(sql);
    match analyze(&lexed.shape, &lexed.words) {
        Command::Data(d) => d,
        other => panic!("{sql}: expected data statement, got {other:?}"),
    }
}

#[test]
fn select_with_literal_key() {
    let d = data("SELECT abalance FROM pgbench_accounts WHERE aid = 42");
    assert!(d.read_only);
    assert_eq!(d.tables.len(), 1);
    assert_eq!(d.tables[0].name, "pgbench_accounts");
    assert_eq!(d.equalities[0].column.column, "aid");
    assert_eq!(d.equalities[0].values, vec![KeyExpr::Literal(0)]);
}

#[test]
fn params_in_lists_casts_and_negation() {
    let d = data("select * from users u where u.user_id in ($1, -5) and (status = $2::text)");
    assert_eq!(
        d.equalities[0].column,
        ColumnRef {
            qualifier: Some("u".into()),
            column: "user_id".into()
        }
    );
    assert_eq!(
        d.equalities[0].values,
        vec![
            KeyExpr::Param(0),
            KeyExpr::Negate(Box::new(KeyExpr::Literal(0)))
        ]
    );
    assert_eq!(d.equalities[1].values, vec![KeyExpr::Param(1)]);
    assert_eq!(d.tables[0].alias.as_deref(), Some("u"));
}

#[test]
fn or_branches_are_not_keys() {
    let d = data("select * from users where user_id = 1 or user_id = 2");
    assert!(d.equalities.is_empty());
}

#[test]
fn writes_and_insert_rows() {
    let d =
        data("INSERT INTO users (user_id, name) VALUES ($1, 'a'), (7, $2) ON CONFLICT DO NOTHING");
    assert!(!d.read_only);
    let ins = d.insert.expect("insert");
    assert_eq!(ins.columns, vec!["user_id", "name"]);
    assert_eq!(ins.rows[0][0], Some(KeyExpr::Param(0)));
    assert_eq!(ins.rows[1][0], Some(KeyExpr::Literal(1)));
    let u = data("UPDATE users SET name = 'x' WHERE user_id = $1");
    assert!(!u.read_only);
    assert_eq!(u.equalities[0].values, vec![KeyExpr::Param(0)]);
    let l = data("SELECT * FROM users WHERE user_id = 1 FOR UPDATE");
    assert!(!l.read_only);
}

#[test]
fn written_tables_are_the_targets() {
    let names =
        |sql: &str| -> Vec<String> { data(sql).written.into_iter().map(|t| t.name).collect() };
    assert_eq!(
        names("INSERT INTO countries (code) VALUES ('de')"),
        ["countries"]
    );
    assert_eq!(
        names("UPDATE countries c SET name = u.name FROM users u WHERE u.id = 1"),
        ["countries"]
    );
    assert_eq!(names("DELETE FROM countries USING users"), ["countries"]);
    assert_eq!(
        names("WITH x AS (DELETE FROM countries RETURNING *) SELECT * FROM x, users"),
        ["countries"]
    );
    assert_eq!(names("COPY countries FROM STDIN"), ["countries"]);
    assert!(names("COPY countries TO STDOUT").is_empty());
    assert!(names("SELECT * FROM countries FOR UPDATE").is_empty());
}

#[test]
fn ctes_functions_and_catalogs_are_not_user_tables() {
    let d =
        data("WITH x AS (SELECT 1) SELECT * FROM x, generate_series(1, 3), pg_catalog.pg_class c");
    assert_eq!(d.tables.len(), 1);
    assert!(d.tables[0].is_catalog());
}

#[test]
fn outer_join_conditions_are_ignored() {
    let d = data("select * from a left join b on a.k = 1 join c on c.k = 2");
    let columns: Vec<&str> = d
        .equalities
        .iter()
        .map(|e| e.column.qualifier.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(columns, vec!["c"]);
}

#[test]
fn session_commands_by_keyword() {
    let cmd = |sql: &str| {
        let l = lex(sql);
        analyze(&l.shape, &l.words)
    };
    assert_eq!(
        cmd("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY"),
        Command::Begin { read_only: true }
    );
    assert_eq!(
        cmd("start transaction"),
        Command::Begin { read_only: false }
    );
    assert_eq!(cmd("ROLLBACK TO SAVEPOINT a"), Command::TransactionScoped);
    assert_eq!(cmd("rollback"), Command::Rollback);
    assert_eq!(
        cmd("SET search_path TO app, public"),
        Command::Set {
            name: "search_path".into(),
            value: "app, public".into()
        }
    );
    assert_eq!(
        cmd("set session statement_timeout = 5000"),
        Command::Set {
            name: "statement_timeout".into(),
            value: "$100001".into()
        }
    );
    assert_eq!(
        cmd("SET TIME ZONE 'UTC'"),
        Command::Set {
            name: "timezone".into(),
            value: "'UTC'".into()
        }
    );
    assert_eq!(
        cmd("set local work_mem = '1MB'"),
        Command::TransactionScoped
    );
    assert_eq!(cmd("RESET ALL"), Command::Reset { name: None });
    assert_eq!(
        cmd("RESET shardline.key"),
        Command::Reset {
            name: Some("shardline.key".into())
        }
    );
    assert_eq!(
        cmd("DEALLOCATE PREPARE s1"),
        Command::Deallocate {
            name: Some("s1".into())
        }
    );
    assert!(matches!(cmd("LISTEN x"), Command::Unsupported(_)));
    assert_eq!(cmd(""), Command::Empty);
}

#[test]
fn set_parsing_survives_multibyte_text() {
    // Found by the fuzzer: byte-offset slicing inside a multi-byte character.
    for sql in [
        "SET x =  AND \u{e000}",
        "SET \u{e000}\u{e000} TO 1",
        "SET x T\u{e9}",
        "SET TIME ZON\u{e9}",
    ] {
        let l = lex(sql);
        let _ = analyze(&l.shape, &l.words);
    }
}

#[test]
fn unparseable_statements_keep_their_words() {
    let d = data("SELEC * FRM users");
    assert!(d.unparsed.is_some());
    assert!(d.words.contains(&"users".to_string()));
}
