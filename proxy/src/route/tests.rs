use super::*;
use crate::analyze::{Analyzer, Command};

fn map() -> ClusterMap {
    super::test_map(&["a", "b"])
}

fn route(sql: &str) -> Result<Resolution, RouteError> {
    let analyzer = Analyzer::new(10);
    let analyzed = analyzer.analyze(sql);
    let Command::Data(data) = &analyzed.analysis.commands[0] else {
        panic!("not data: {sql}")
    };
    route_data(data, &map(), &analyzed.literals, None, false, false)
}

fn owner_of(key: i64) -> String {
    let m = map();
    let p = m
        .partition_of("users", &KeyValue::Int(key))
        .expect("partition");
    m.owner_of(p).expect("owner").name.clone()
}

#[test]
fn literal_keys_route_to_their_owner() {
    let r = route("SELECT * FROM users WHERE user_id = 42").expect("routes");
    let Resolution::Route(Route::Partitions { server, .. }) = r else {
        panic!("{r:?}")
    };
    assert_eq!(server, owner_of(42));
    let r = route("select * from users u where u.user_id = -7").expect("routes");
    assert_eq!(
        r.clone(),
        Resolution::Route(Route::Partitions {
            server: owner_of(-7),
            partitions: match r {
                Resolution::Route(Route::Partitions { partitions, .. }) => partitions,
                _ => vec![],
            }
        })
    );
}

#[test]
fn insert_without_columns_finds_the_key_by_the_recorded_columns() {
    let sql = "INSERT INTO users VALUES ('ann', 42)";
    let error = route(sql).expect_err("columns unknown");
    assert!(
        error.message.contains("does not record its columns"),
        "{error:?}"
    );
    let analyzer = Analyzer::new(10);
    let analyzed = analyzer.analyze(sql);
    let Command::Data(data) = &analyzed.analysis.commands[0] else {
        panic!("not data")
    };
    let mut with_columns = map();
    with_columns.columns.insert(
        "users".into(),
        "name text, user_id bigint PRIMARY KEY".into(),
    );
    let r =
        route_data(data, &with_columns, &analyzed.literals, None, false, false).expect("routes");
    let Resolution::Route(Route::Partitions { server, .. }) = r else {
        panic!("{r:?}")
    };
    assert_eq!(server, owner_of(42));
}

#[test]
fn params_defer_routing() {
    assert_eq!(
        route("SELECT * FROM users WHERE user_id = $1"),
        Ok(Resolution::NeedsParams)
    );
}

#[test]
fn unroutable_statements_are_errors() {
    let e = route("SELECT * FROM users").expect_err("no key");
    assert_eq!(e.code, "0A000");
    assert!(
        e.message
            .contains("does not fix its key column \"user_id\""),
        "{}",
        e.message
    );
    assert_eq!(
        route("SELECT * FROM nope WHERE id = 1")
            .expect_err("unknown")
            .code,
        "42P01"
    );
    assert_eq!(
        route("UPDATE countries SET name = 'x'")
            .expect_err("reference write")
            .code,
        "0A000"
    );
    assert_eq!(
        route("SELECT * FROM users WHERE user_id = 'abc'")
            .expect_err("bad key")
            .code,
        "22P02"
    );
    assert_eq!(
        route("INSERT INTO users VALUES (1)")
            .expect_err("no columns")
            .code,
        "0A000"
    );
}

#[test]
fn other_tables() {
    assert_eq!(
        route("SELECT * FROM countries"),
        Ok(Resolution::Route(Route::Any))
    );
    assert_eq!(
        route("SELECT * FROM settings"),
        Ok(Resolution::Route(Route::Server("b".into())))
    );
    assert_eq!(route("SELECT now()"), Ok(Resolution::Route(Route::Any)));
    assert_eq!(
        route("SELECT relname FROM pg_class"),
        Ok(Resolution::Route(Route::Any))
    );
}

#[test]
fn multi_key_statements_route_only_when_one_server_owns_all() {
    // Keys on one server route there; keys on two are refused.
    let mut same = Vec::new();
    let mut other = None;
    for k in 0..100 {
        if owner_of(k) == owner_of(0) {
            same.push(k);
        } else if other.is_none() {
            other = Some(k);
        }
    }
    let sql = format!(
        "SELECT * FROM users WHERE user_id IN ({}, {})",
        same[0], same[1]
    );
    assert!(matches!(
        route(&sql),
        Ok(Resolution::Route(Route::Partitions { .. }))
    ));
    let sql = format!(
        "SELECT * FROM users WHERE user_id IN ({}, {})",
        same[0],
        other.expect("another server")
    );
    assert_eq!(route(&sql).expect_err("two servers").code, "0A000");
}

#[test]
fn arrays_of_keys_route_to_their_owners() {
    let mut keys = Vec::new();
    let mut owners = std::collections::BTreeSet::new();
    for k in 0..40 {
        if owners.insert(owner_of(k)) || keys.len() < 4 {
            keys.push(k);
        }
    }
    let list = keys
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let analyzer = Analyzer::new(10);
    let analyzed = analyzer.analyze(&format!(
        "SELECT * FROM users WHERE user_id = ANY('{{{list}}}'::bigint[])"
    ));
    let Command::Data(data) = &analyzed.analysis.commands[0] else {
        panic!("not data")
    };
    let strict = route_data(data, &map(), &analyzed.literals, None, false, false);
    assert_eq!(strict.expect_err("two servers, scatter off").code, "0A000");
    let scatter = route_data(data, &map(), &analyzed.literals, None, true, false).expect("routes");
    let Resolution::Route(Route::Scatter { servers, .. }) = scatter else {
        panic!("{scatter:?}")
    };
    assert_eq!(servers.len(), 2);
    let empty = analyzer.analyze("SELECT * FROM users WHERE user_id = ANY('{}')");
    let Command::Data(data) = &empty.analysis.commands[0] else {
        panic!("not data")
    };
    assert_eq!(
        route_data(data, &map(), &empty.literals, None, true, false),
        Ok(Resolution::Route(Route::Any))
    );
}
