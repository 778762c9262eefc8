use super::*;

struct Map;

impl TableInfo for Map {
    fn sharded(&self, name: &str) -> Option<(&str, &str)> {
        match name {
            "users" | "photos" => Some(("user_id", "users")),
            "orgs" => Some(("org_id", "orgs")),
            _ => None,
        }
    }
    fn is_reference(&self, name: &str) -> bool {
        name == "countries"
    }
}

fn analyzed(sql: &str) -> WriteText {
    analyze_write(sql, &Map).unwrap_or_else(|r| panic!("{sql}: refused: {r}"))
}

fn refusal(sql: &str) -> Refusal {
    match analyze_write(sql, &Map) {
        Ok(text) => panic!("{sql}: accepted as {text:?}"),
        Err(r) => r,
    }
}

#[test]
fn rows_are_cut_from_the_text_and_parameters_renumbered() {
    let sql = "INSERT INTO users (user_id, name) VALUES ($1, $2), /* ) , ( $9 */ ($3, 'a ($9), b'), \
               ($4, $2) ON CONFLICT (user_id) DO UPDATE SET name = EXCLUDED.name || $5 RETURNING user_id, $6::text";
    let text = analyzed(sql);
    assert_eq!(text.kind, WriteKind::Insert);
    assert_eq!(text.table, "users");
    assert_eq!(text.rows.len(), 3);
    assert!(text.returning);
    assert!(
        !text.may_skip_rows,
        "DO UPDATE without WHERE returns every row"
    );
    assert_eq!(
        text.params.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 1, 4, 5],
        "$9 in a comment and in a string are not parameters"
    );
    let (first_and_last, params) = text.render(sql, &[0, 2]);
    assert_eq!(
        first_and_last,
        "INSERT INTO users (user_id, name) VALUES ($1, $2), ($3, $2) ON CONFLICT (user_id) \
         DO UPDATE SET name = EXCLUDED.name || $4 RETURNING user_id, $5::text"
    );
    assert_eq!(params, vec![0, 1, 3, 4, 5]);
    let (middle, params) = text.render(sql, &[1]);
    assert_eq!(
        middle,
        "INSERT INTO users (user_id, name) VALUES ($1, 'a ($9), b') ON CONFLICT (user_id) \
         DO UPDATE SET name = EXCLUDED.name || $2 RETURNING user_id, $3::text"
    );
    assert_eq!(params, vec![2, 4, 5]);
    let (all, params) = text.render(sql, &[0, 1, 2]);
    assert!(
        all.contains("VALUES ($1, $2), ($3, 'a ($9), b'), ($4, $2) ON CONFLICT"),
        "{all}"
    );
    assert_eq!(params, vec![0, 1, 2, 3, 4, 5]);
}

#[test]
fn multi_line_and_multibyte_text_is_cut_at_the_right_bytes() {
    let sql = "INSERT INTO users (name, user_id)\nVALUES ('é—ü', 1),\n  (E'\\'x', $1)\nRETURNING *";
    let text = analyzed(sql);
    assert_eq!(text.rows.len(), 2);
    assert_eq!(
        text.render(sql, &[1]),
        (
            "INSERT INTO users (name, user_id)\nVALUES (E'\\'x', $1)\nRETURNING *".to_string(),
            vec![0]
        )
    );
    assert_eq!(
        text.render(sql, &[0]),
        (
            "INSERT INTO users (name, user_id)\nVALUES ('é—ü', 1)\nRETURNING *".to_string(),
            vec![]
        )
    );
}

#[test]
fn rows_that_may_return_nothing_are_flagged() {
    let skip = |sql: &str| analyzed(sql).may_skip_rows;
    assert!(skip(
        "INSERT INTO users (user_id) VALUES (1), (2) ON CONFLICT DO NOTHING"
    ));
    assert!(skip(
        "INSERT INTO users (user_id, n) VALUES (1, 1) ON CONFLICT (user_id) DO UPDATE SET n = 2 WHERE users.n < 5"
    ));
    assert!(!skip("INSERT INTO users (user_id) VALUES (1), (2)"));
    assert!(!analyzed("INSERT INTO users (user_id) VALUES (1)").returning);
}

#[test]
fn updates_and_deletes_keep_their_text() {
    let text = analyzed("UPDATE users SET name = $2 WHERE name = $1 RETURNING user_id");
    assert_eq!((text.kind, text.returning), (WriteKind::Update, true));
    assert!(text.rows.is_empty());
    assert_eq!(
        text.params.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
        vec![1, 0]
    );
    let text = analyzed("DELETE FROM users u WHERE u.name LIKE 'a%'");
    assert_eq!((text.kind, text.returning), (WriteKind::Delete, false));
    assert_eq!(
        analyzed("DELETE FROM users WHERE true").render("DELETE FROM users WHERE true", &[]),
        ("DELETE FROM users WHERE true".to_string(), vec![])
    );
    assert_eq!(WriteKind::Update.command_tag(7), "UPDATE 7");
    assert_eq!(WriteKind::Insert.command_tag(3), "INSERT 0 3");
    assert_eq!(WriteKind::Delete.command_tag(0), "DELETE 0");
}

#[test]
fn updating_the_sharding_key_is_refused() {
    for sql in [
        "UPDATE users SET user_id = user_id + 1",
        "UPDATE users SET name = 'x', user_id = $1 WHERE name = 'y'",
        "UPDATE users SET (name, user_id) = ('x', 2)",
        "UPDATE users u SET \"user_id\" = 3",
    ] {
        let r = refusal(sql);
        assert!(r.message.contains("sharding key \"user_id\""), "{sql}: {r}");
        assert!(
            r.message.contains("move to another partition"),
            "{sql}: {r}"
        );
        assert!(r.hint.contains("DELETE"), "{sql}: {r}");
    }
}

#[test]
fn joins_must_be_reference_tables_or_co_located_on_the_key() {
    analyzed("UPDATE users SET name = c.name FROM countries c WHERE c.code = users.country");
    analyzed(
        "UPDATE users u SET name = p.title FROM photos p WHERE p.user_id = u.user_id AND p.id = 3",
    );
    analyzed("DELETE FROM users USING photos p WHERE users.user_id = p.user_id AND p.flagged");
    analyzed("UPDATE users SET n = 1 FROM pg_catalog.pg_class c WHERE c.relname = users.name");
    let r = refusal("UPDATE users SET name = p.title FROM photos p WHERE p.id = users.photo");
    assert!(
        r.message.contains("\"users\" joined with \"photos\""),
        "{r}"
    );
    assert!(r.hint.contains("users.user_id = p.user_id"), "{r}");
    let r = refusal("DELETE FROM users USING orgs o WHERE o.org_id = users.org");
    assert!(
        r.message.contains("\"orgs\" is sharded by another key"),
        "{r}"
    );
    let r = refusal("UPDATE users SET name = s.v FROM settings s WHERE s.k = users.name");
    assert!(
        r.message
            .contains("\"settings\" is neither sharded nor a reference table"),
        "{r}"
    );
    let r =
        refusal("UPDATE users SET n = 1 FROM countries c LEFT JOIN photos p ON p.user_id = c.id");
    assert!(r.message.contains("outer join"), "{r}");
}

#[test]
fn subqueries_may_read_reference_tables_only() {
    analyzed(
        "UPDATE users SET country = (SELECT code FROM countries WHERE name = 'x') WHERE name = 'y'",
    );
    analyzed(
        "INSERT INTO users (user_id, c) VALUES (1, (SELECT code FROM countries LIMIT 1)), (2, 'x')",
    );
    analyzed("DELETE FROM users WHERE name IN (WITH x AS (SELECT 'a' AS n) SELECT n FROM x)");
    let r = refusal("DELETE FROM users WHERE name IN (SELECT title FROM photos)");
    assert!(r.message.contains("reads sharded table \"photos\""), "{r}");
    let r =
        refusal("INSERT INTO users (user_id, n) VALUES (1, (SELECT count(*) FROM users)), (2, 0)");
    assert!(r.message.contains("reads sharded table \"users\""), "{r}");
    let r = refusal("UPDATE users SET name = 'x' WHERE name = (SELECT v FROM settings)");
    assert!(
        r.message
            .contains("\"settings\", which is not on every server"),
        "{r}"
    );
    let r = refusal("INSERT INTO users (user_id) VALUES (1) RETURNING (SELECT max(n) FROM photos)");
    assert!(r.message.contains("\"photos\""), "{r}");
}

#[test]
fn shapes_without_rows_to_split_are_refused() {
    let r = refusal("INSERT INTO users (user_id) SELECT user_id FROM photos");
    assert!(r.message.contains("INSERT ... SELECT"), "{r}");
    let r = refusal("INSERT INTO users DEFAULT VALUES");
    assert!(r.message.contains("DEFAULT VALUES"), "{r}");
    let r = refusal("INSERT INTO users (user_id) VALUES (1), (2) LIMIT 1");
    assert!(r.message.contains("LIMIT"), "{r}");
    let r = refusal("INSERT INTO countries (code) VALUES ('x'), ('y')");
    assert!(r.message.contains("reference table"), "{r}");
    let r = refusal("UPDATE settings SET v = 1");
    assert!(r.message.contains("not a sharded table"), "{r}");
    let r = refusal("SELECT * FROM users");
    assert!(r.message.contains("only INSERT, UPDATE and DELETE"), "{r}");
    let r = refusal("INSERT INTO users (user_id) VALUES (1); DELETE FROM users");
    assert!(r.message.contains("one statement"), "{r}");
    let r = refusal("INSERT INTO users (user_id VALUES (1)");
    assert!(r.message.contains("cannot analyse"), "{r}");
}
