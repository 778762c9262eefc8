use super::*;
use crate::analyze::{Analyzed, Analyzer, Command};
use crate::route::route_data;
use shardmap::{Endpoint, Group, KeyValue, Server, Table};

fn map() -> ClusterMap {
    let servers = ["a", "b"]
        .iter()
        .map(|n| Server::active(n, Endpoint::parse("postgres://h:1/d").expect("url")))
        .collect();
    let mut map = ClusterMap::new("t", 8, servers).expect("map");
    map.declare(
        Group::hash("users", KeyType::Bigint)
            .table("users", "user_id")
            .table("photos", "user_id"),
    );
    map.declare(Group::hash("orgs", KeyType::Bigint).table("orgs", "org_id"));
    map.declare_table(Table::reference("countries"));
    map.declare_table(Table::unsharded("settings", "b"));
    map
}

fn owner(key: i64) -> String {
    let m = map();
    let p = m
        .partition_of("users", &KeyValue::Int(key))
        .expect("partition");
    m.owner_of(p).expect("owner").name.clone()
}

/// Two keys owned by server a and one by server b.
fn keys() -> (i64, i64, i64) {
    let on_a: Vec<i64> = (1..100).filter(|k| owner(*k) == "a").take(2).collect();
    let on_b = (1..100).find(|k| owner(*k) == "b").expect("a key on b");
    (on_a[0], on_a[1], on_b)
}

fn analyze(sql: &str) -> (Analyzed, DataStatement) {
    let analyzed = Analyzer::new(10).analyze(sql);
    let Command::Data(data) = &analyzed.analysis.commands[0] else {
        panic!("not data: {sql}")
    };
    let data = data.clone();
    (analyzed, data)
}

fn route(sql: &str, params: Option<&Params<'_>>, writes: bool) -> Result<Resolution, RouteError> {
    let (analyzed, data) = analyze(sql);
    route_data(&data, &map(), &analyzed.literals, params, true, writes)
}

fn plan(sql: &str, params: Option<&Params<'_>>) -> Result<WritePlan, RouteError> {
    let (analyzed, data) = analyze(sql);
    plan_write(sql, &data, &map(), &analyzed.literals, params)
}

fn bind(values: &[Option<&[u8]>], formats: &[i16]) -> Bind {
    Bind {
        portal: String::new(),
        statement: "s1".into(),
        param_formats: formats.to_vec(),
        params: values
            .iter()
            .map(|v| v.map(Bytes::copy_from_slice))
            .collect(),
        result_formats: Bytes::from_static(&[0, 1, 0, 1]),
    }
}

#[test]
fn multi_row_inserts_route_to_writes_only_when_allowed() {
    let (a1, a2, b1) = keys();
    let sql = format!("INSERT INTO users (user_id, name) VALUES ({a1}, 'x'), ({b1}, 'y')");
    let strict = route(&sql, None, false).expect_err("two servers, writes off");
    assert_eq!(strict.code, "0A000");
    let Resolution::Route(Route::Writes {
        servers,
        partitions,
    }) = route(&sql, None, true).expect("routes")
    else {
        panic!("not a write across servers")
    };
    assert_eq!(servers, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(partitions.len(), 2);
    // Rows all on one server route as they always did.
    let one = format!("INSERT INTO users (user_id, name) VALUES ({a1}, 'x'), ({a2}, 'y')");
    assert_eq!(route(&one, None, true), route(&one, None, false));
    assert!(matches!(
        route(&one, None, true),
        Ok(Resolution::Route(Route::Partitions { .. }))
    ));
    // A parameter key waits for the Bind.
    assert_eq!(
        route("INSERT INTO users (user_id) VALUES ($1), ($2)", None, true),
        Ok(Resolution::NeedsParams)
    );
}

#[test]
fn literal_rows_split_by_owner_in_values_order() {
    let (a1, a2, b1) = keys();
    let sql = format!(
        "INSERT INTO users (user_id, name) VALUES ({a1}, 'one'), ({b1}, 'two'), ({a2}, 'three') \
         ON CONFLICT (user_id) DO UPDATE SET name = EXCLUDED.name RETURNING user_id"
    );
    let plan = plan(&sql, None).expect("plans");
    assert_eq!(
        (plan.kind, plan.rows, plan.returning),
        (WriteKind::Insert, 3, true)
    );
    assert_eq!(plan.parts.len(), 2);
    let (a, b) = (&plan.parts[0], &plan.parts[1]);
    assert_eq!((a.server.as_str(), a.rows.clone()), ("a", vec![0, 2]));
    assert_eq!((b.server.as_str(), b.rows.clone()), ("b", vec![1]));
    let suffix = " ON CONFLICT (user_id) DO UPDATE SET name = EXCLUDED.name RETURNING user_id";
    assert_eq!(
        a.sql,
        format!("INSERT INTO users (user_id, name) VALUES ({a1}, 'one'), ({a2}, 'three'){suffix}")
    );
    assert_eq!(
        b.sql,
        format!("INSERT INTO users (user_id, name) VALUES ({b1}, 'two'){suffix}")
    );
    assert!(a.params.is_empty() && b.params.is_empty());
    // Server a returned its two rows, b its one: back in VALUES order.
    assert_eq!(
        plan.returning_order(&[2, 1]),
        Some(vec![(0, 0), (1, 0), (0, 1)])
    );
    assert_eq!(
        plan.returning_order(&[1, 1]),
        None,
        "a trigger skipped a row"
    );
    assert_eq!(plan.command_tag(3), "INSERT 0 3");
    let (route_servers, route_partitions) = match route(&sql, None, true) {
        Ok(Resolution::Route(Route::Writes {
            servers,
            partitions,
        })) => (servers, partitions),
        other => panic!("{other:?}"),
    };
    let plan_servers: Vec<String> = plan.parts.iter().map(|p| p.server.clone()).collect();
    assert_eq!(
        (route_servers, route_partitions),
        (plan_servers, plan.partitions)
    );
}

#[test]
fn parameters_are_renumbered_per_server_in_text_and_binary() {
    let (a1, a2, b1) = keys();
    let sql = "INSERT INTO users (user_id, name) VALUES ($1, $2), ($3, $4), ($5, $2) RETURNING name, $6::text";
    let (ka, kb, kc) = (a1.to_string(), b1.to_string(), a2.to_string());
    let text = bind(
        &[
            Some(ka.as_bytes()),
            Some(b"shared"),
            Some(kb.as_bytes()),
            Some(b"b's"),
            Some(kc.as_bytes()),
            None,
        ],
        &[],
    );
    let types = [20, 25, 20, 25, 20];
    let plan = plan(
        sql,
        Some(&Params {
            bind: &text,
            types: &types,
        }),
    )
    .expect("plans");
    let (a, b) = (&plan.parts[0], &plan.parts[1]);
    assert_eq!(
        a.sql,
        "INSERT INTO users (user_id, name) VALUES ($1, $2), ($3, $2) RETURNING name, $4::text"
    );
    assert_eq!(a.params, vec![0, 1, 4, 5]);
    assert_eq!(
        b.sql,
        "INSERT INTO users (user_id, name) VALUES ($1, $2) RETURNING name, $3::text"
    );
    assert_eq!(b.params, vec![2, 3, 5]);
    assert_eq!(
        a.param_types(&types),
        vec![20, 25, 20, 0],
        "undeclared types stay 0"
    );
    let bound = b.bind(&text);
    assert_eq!(
        bound.params,
        vec![
            Some(Bytes::from(kb.clone())),
            Some(Bytes::from_static(b"b's")),
            None
        ]
    );
    assert!(bound.param_formats.is_empty());
    assert_eq!(
        (bound.statement.as_str(), &bound.result_formats),
        ("s1", &text.result_formats)
    );

    // Binary keys, text names: the formats follow their values.
    let (ba, bb, bc) = (a1.to_be_bytes(), b1.to_be_bytes(), a2.to_be_bytes());
    let binary = bind(
        &[
            Some(&ba),
            Some(b"shared"),
            Some(&bb),
            Some(b"b's"),
            Some(&bc),
            Some(b"r"),
        ],
        &[1, 0, 1, 0, 1, 0],
    );
    let plan = plan_write(
        sql,
        &analyze(sql).1,
        &map(),
        &[],
        Some(&Params {
            bind: &binary,
            types: &types,
        }),
    )
    .expect("plans");
    let a = &plan.parts[0];
    assert_eq!(a.rows, vec![0, 2]);
    let bound = a.bind(&binary);
    assert_eq!(bound.param_formats, vec![1, 0, 1, 0]);
    assert_eq!(bound.params[2], Some(Bytes::copy_from_slice(&bc)));
    // One format code for all parameters stays one.
    let all_binary = Bind {
        param_formats: vec![1],
        ..binary.clone()
    };
    assert_eq!(plan.parts[1].bind(&all_binary).param_formats, vec![1]);
    // A statement using more parameters than the Bind gives is refused.
    let short = bind(&[Some(&ba), Some(b"x")], &[1, 0]);
    let error = plan_write(
        sql,
        &analyze(sql).1,
        &map(),
        &[],
        Some(&Params {
            bind: &short,
            types: &[],
        }),
    )
    .expect_err("short Bind");
    assert_eq!(error.code, "08P01");
}

#[test]
fn null_and_missing_keys_are_refused() {
    let (a1, _, b1) = keys();
    let sql = "INSERT INTO users (user_id, name) VALUES ($1, 'x'), ($2, 'y')";
    let ka = a1.to_string();
    let null = bind(&[Some(ka.as_bytes()), None], &[]);
    let error = route(
        sql,
        Some(&Params {
            bind: &null,
            types: &[],
        }),
        true,
    )
    .expect_err("NULL key");
    assert_eq!(error.code, "22004", "{error:?}");
    let literal =
        format!("INSERT INTO users (user_id, name) VALUES ({a1}, 'x'), (NULL, 'y'), ({b1}, 'z')");
    let error = route(&literal, None, true).expect_err("NULL key");
    assert_eq!(error.code, "0A000");
    assert!(
        error
            .message
            .contains("VALUES row 2 must be a non-NULL literal"),
        "{error:?}"
    );
    let error =
        route("INSERT INTO users (name) VALUES ('x'), ('y')", None, true).expect_err("no key");
    assert!(
        error.message.contains("must name its key column"),
        "{error:?}"
    );
    let error = route(
        "INSERT INTO users (user_id) SELECT user_id FROM photos",
        None,
        true,
    )
    .expect_err("INSERT ... SELECT");
    assert!(error.message.contains("INSERT ... SELECT"), "{error:?}");
    let error = route("INSERT INTO users DEFAULT VALUES", None, true).expect_err("DEFAULT VALUES");
    assert!(error.message.contains("DEFAULT VALUES"), "{error:?}");
}

#[test]
fn on_conflict_do_nothing_returning_cannot_be_ordered_across_servers() {
    let (a1, a2, b1) = keys();
    let rows = format!("VALUES ({a1}), ({b1}) ON CONFLICT DO NOTHING");
    let error = plan(
        &format!("INSERT INTO users (user_id) {rows} RETURNING user_id"),
        None,
    )
    .expect_err("order unknown");
    assert_eq!(error.code, "0A000");
    assert!(error.message.contains("VALUES order"), "{error:?}");
    let kept = plan(&format!("INSERT INTO users (user_id) {rows}"), None).expect("no RETURNING");
    assert!(kept
        .parts
        .iter()
        .all(|p| p.sql.ends_with(") ON CONFLICT DO NOTHING")));
    let one_server = format!(
        "INSERT INTO users (user_id) VALUES ({a1}), ({a2}) ON CONFLICT DO NOTHING RETURNING *"
    );
    assert_eq!(plan(&one_server, None).expect("one server").parts.len(), 1);
}

#[test]
fn updates_and_deletes_fan_out_to_the_owners() {
    let sql = "UPDATE users SET name = 'x' WHERE name = 'y' RETURNING user_id";
    assert_eq!(
        route(sql, None, false).expect_err("writes off").code,
        "0A000"
    );
    let Resolution::Route(Route::Writes {
        servers,
        partitions,
    }) = route(sql, None, true).expect("routes")
    else {
        panic!("not a write across servers")
    };
    assert_eq!(partitions, (0..8).collect::<Vec<u32>>());
    assert_eq!(servers.len(), 2);
    let fanned = plan(sql, None).expect("plans");
    assert_eq!(fanned.parts.len(), 2);
    assert!(fanned
        .parts
        .iter()
        .all(|p| p.sql == sql && p.rows.is_empty()));
    assert_eq!(
        fanned.returning_order(&[1, 2]),
        Some(vec![(0, 0), (1, 0), (1, 1)])
    );
    assert_eq!(fanned.command_tag(4), "UPDATE 4");
    let error = plan_write(
        "UPDATE users SET user_id = 5 WHERE name = 'y'",
        &analyze("UPDATE users SET user_id = 5 WHERE name = 'y'").1,
        &map(),
        &[],
        None,
    )
    .expect_err("key update");
    assert_eq!(error.code, "0A000");
    assert!(
        error.message.contains("move to another partition"),
        "{error:?}"
    );
    assert!(error.hint.as_deref().is_some_and(|h| h.contains("DELETE")));
    // Joins: co-located on the key, or reference tables; else refused.
    plan(
        "DELETE FROM users USING photos p WHERE p.user_id = users.user_id AND p.bad",
        None,
    )
    .expect("co-located");
    let error =
        plan("DELETE FROM users USING photos p WHERE p.bad", None).expect_err("not on the key");
    assert!(
        error.message.contains("joined on their sharding keys"),
        "{error:?}"
    );
    let error = route(
        "UPDATE users SET n = 1 FROM orgs o WHERE o.org_id = users.org",
        None,
        true,
    )
    .expect_err("other group");
    assert!(error.message.contains("co-location group"), "{error:?}");
    let error = route(
        "DELETE FROM users USING settings s WHERE s.k = users.name",
        None,
        true,
    )
    .expect_err("unsharded");
    assert!(error.message.contains("\"settings\""), "{error:?}");
}

#[test]
fn key_lists_narrow_the_servers_and_arrays_split_per_server() {
    let (a1, a2, b1) = keys();
    let sql = format!("DELETE FROM users WHERE user_id IN ({a1}, {a2}) AND name = 'x'");
    assert!(matches!(
        route(&sql, None, true),
        Ok(Resolution::Route(Route::Partitions { .. }))
    ));
    let sql = "DELETE FROM users WHERE user_id = ANY($1) RETURNING name";
    let array = format!("{{{a1},{b1},{a2}}}");
    let client = bind(&[Some(array.as_bytes())], &[]);
    let params = Params {
        bind: &client,
        types: &[],
    };
    let Ok(Resolution::Route(Route::Writes { servers, .. })) = route(sql, Some(&params), true)
    else {
        panic!("not a write across servers")
    };
    assert_eq!(servers, vec!["a".to_string(), "b".to_string()]);
    let plan = plan(sql, Some(&params)).expect("plans");
    let narrowed: Vec<Bind> = plan.parts.iter().map(|p| p.bind(&client)).collect();
    assert_eq!(
        narrowed[0].params,
        vec![Some(Bytes::from(format!("{{\"{a1}\",\"{a2}\"}}")))]
    );
    assert_eq!(
        narrowed[1].params,
        vec![Some(Bytes::from(format!("{{\"{b1}\"}}")))]
    );
    assert!(plan
        .parts
        .iter()
        .all(|p| p.sql == sql && p.params == vec![0]));
}

#[test]
fn writes_merge_with_nothing_but_any() {
    let writes = Route::Writes {
        servers: vec!["a".into(), "b".into()],
        partitions: vec![1, 2],
    };
    assert_eq!(writes.clone().merge(Route::Any), Ok(writes.clone()));
    assert_eq!(Route::Any.merge(writes.clone()), Ok(writes.clone()));
    let one = Route::Partitions {
        server: "a".into(),
        partitions: vec![1],
    };
    assert_eq!(
        writes.clone().merge(one),
        Err(("a, b".to_string(), "a".to_string()))
    );
    assert!(writes.clone().merge(writes.clone()).is_err());
    assert_eq!(writes.server(), None);
    assert_eq!(writes.partitions(), &[1, 2]);
}
