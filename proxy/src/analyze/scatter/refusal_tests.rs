//! Statements the scatter planner must refuse, and what it tells the user.

use super::tests::Map;
use super::*;

/// Refuses `sql`, with a message containing `why` and a hint.
fn refused(sql: &str, why: &str) -> Refusal {
    match plan(sql, &Map) {
        Ok(plan) => panic!("{sql}: planned, expected a refusal about {why:?}: {plan:?}"),
        Err(refusal) => {
            assert!(
                refusal.message.contains(why),
                "{sql}: the message should say {why:?}: {}",
                refusal.message
            );
            assert!(
                refusal.hint.ends_with('.'),
                "{sql}: hint: {:?}",
                refusal.hint
            );
            refusal
        }
    }
}

#[test]
fn window_functions() {
    refused(
        "SELECT photo_id, rank() OVER (ORDER BY likes) FROM photos",
        "window functions (rank() OVER)",
    );
    refused(
        "SELECT sum(likes) OVER (PARTITION BY user_id) FROM photos",
        "window functions (sum() OVER)",
    );
    refused(
        "SELECT photo_id FROM photos ORDER BY row_number() OVER (ORDER BY likes)",
        "window functions (row_number() OVER)",
    );
    refused(
        "SELECT photo_id FROM photos WINDOW w AS (ORDER BY likes)",
        "window functions",
    );
}

#[test]
fn set_operations() {
    for op in ["UNION", "UNION ALL", "INTERSECT", "EXCEPT"] {
        refused(
            &format!("SELECT user_id FROM photos {op} SELECT user_id FROM users"),
            op.split(' ').next().unwrap_or(op),
        );
    }
}

#[test]
fn subqueries_and_ctes_over_sharded_tables() {
    for sql in [
        "SELECT photo_id FROM photos WHERE user_id IN (SELECT user_id FROM users WHERE vip)",
        "SELECT photo_id FROM photos p WHERE EXISTS (SELECT 1 FROM users u WHERE u.user_id = p.user_id)",
        "SELECT (SELECT count(*) FROM users) FROM photos",
        "WITH recent AS (SELECT * FROM photos WHERE taken > now() - interval '1 day') \
         SELECT * FROM recent JOIN users USING (user_id)",
        "SELECT * FROM (SELECT user_id, count(*) AS n FROM photos GROUP BY 1) s",
        "SELECT photo_id FROM photos p, LATERAL (SELECT * FROM users u WHERE u.user_id = p.user_id) x",
    ] {
        refused(sql, "subquery or CTE that reads sharded table");
    }
}

#[test]
fn writes_locks_and_other_statements() {
    refused("SELECT * INTO archive FROM photos", "SELECT ... INTO");
    refused("SELECT * FROM photos FOR UPDATE", "FOR UPDATE/SHARE");
    refused(
        "SELECT * FROM photos FOR SHARE SKIP LOCKED",
        "FOR UPDATE/SHARE",
    );
    refused("UPDATE photos SET likes = 0", "only a single SELECT");
    refused(
        "SELECT 1 FROM photos; SELECT 2 FROM photos",
        "only a single SELECT",
    );
    refused("SELEC * FROM photos", "does not parse");
    refused("VALUES (1)", "cannot run this statement");
    refused(
        "SELECT * FROM photos FETCH FIRST 3 ROWS ONLY",
        "FETCH FIRST",
    );
}

#[test]
fn volatile_functions_in_order_group_and_distinct() {
    refused(
        "SELECT * FROM photos ORDER BY random()",
        "random() in ORDER BY",
    );
    refused(
        "SELECT random() AS r FROM photos ORDER BY r",
        "random() in ORDER BY",
    );
    refused(
        "SELECT count(*) FROM photos GROUP BY likes > random()",
        "random() in GROUP BY",
    );
    refused(
        "SELECT DISTINCT caption, clock_timestamp() FROM photos",
        "clock_timestamp() in SELECT DISTINCT",
    );
    refused(
        "SELECT nextval('s') AS n, count(*) FROM photos GROUP BY 1",
        "nextval() in GROUP BY",
    );
    refused(
        "SELECT country, country || txid_current(), count(*) FROM photos GROUP BY country",
        "txid_current()",
    );
}

#[test]
fn limits_that_are_not_constants_or_parameters() {
    refused("SELECT * FROM photos LIMIT 1 + 1", "LIMIT 1 + 1");
    refused("SELECT * FROM photos LIMIT (SELECT 3)", "LIMIT (SELECT 3)");
    refused("SELECT * FROM photos OFFSET $1 * 2", "OFFSET $1 * 2");
    refused("SELECT * FROM photos LIMIT 2.5", "LIMIT 2.5");
}

#[test]
fn joins_of_sharded_tables_need_equal_keys_in_one_group() {
    let r = refused(
        "SELECT * FROM photos JOIN user_follow ON photos.photo_id = user_follow.user_id",
        "join \"photos\" and \"user_follow\" on photos.user_id = user_follow.follower_id",
    );
    assert!(
        r.hint.contains("photos.user_id = user_follow.follower_id"),
        "{}",
        r.hint
    );
    refused(
        "SELECT * FROM photos p, user_follow f WHERE p.user_id = f.follower_id OR p.likes > 3",
        "join \"photos\" and \"user_follow\" on p.user_id = f.follower_id",
    );
    refused(
        "SELECT * FROM photos CROSS JOIN users",
        "join \"photos\" and \"users\" on photos.user_id = users.user_id",
    );
    refused(
        "SELECT * FROM photos p JOIN orgs o ON o.org_id = p.user_id",
        "different co-location groups (\"users\" and \"orgs\")",
    );
    refused(
        "SELECT * FROM users u LEFT JOIN photos p ON p.caption = u.name",
        "in the ON clause of the LEFT JOIN on u.user_id = p.user_id",
    );
    refused(
        "SELECT * FROM users u LEFT JOIN photos p ON p.caption = u.name WHERE p.user_id = u.user_id",
        "in the ON clause of the LEFT JOIN",
    );
    // Two ON equalities do not tie the preserved tables to each other.
    refused(
        "SELECT * FROM users u JOIN user_follow f ON f.since = u.created \
         LEFT JOIN photos p ON p.user_id = u.user_id AND p.user_id = f.follower_id",
        "join \"users\" and \"user_follow\"",
    );
    refused(
        "SELECT * FROM users u FULL JOIN photos p ON p.user_id = u.user_id CROSS JOIN user_follow",
        "join \"users\" and \"user_follow\"",
    );
    refused(
        "SELECT * FROM photos p NATURAL JOIN users u",
        "join \"photos\" and \"users\"",
    );
}

#[test]
fn outer_joins_that_keep_reference_rows() {
    refused(
        "SELECT * FROM countries c LEFT JOIN photos p ON p.country = c.code",
        "LEFT JOIN that keeps the unmatched rows of reference tables",
    );
    refused(
        "SELECT * FROM photos p RIGHT JOIN countries c ON p.country = c.code",
        "RIGHT JOIN that keeps the unmatched rows of reference tables",
    );
    refused(
        "SELECT * FROM photos p FULL JOIN countries c ON p.country = c.code",
        "FULL JOIN that keeps the unmatched rows of reference tables",
    );
}

#[test]
fn tables_that_are_not_everywhere() {
    refused(
        "SELECT * FROM photos JOIN audit_log a ON true",
        "\"audit_log\" in a statement",
    );
    refused("SELECT * FROM other.photos", "\"other.photos\"");
    refused("SELECT * FROM countries", "no sharded table is read");
}

#[test]
fn aggregates_that_cannot_be_combined() {
    for (sql, name, why) in [
        ("SELECT string_agg(caption, ',') FROM photos", "string_agg", "only the server holding all rows"),
        ("SELECT country, array_agg(photo_id) FROM photos GROUP BY 1", "array_agg", "all rows"),
        ("SELECT stddev(likes) FROM photos", "stddev", "all rows"),
        ("SELECT variance(likes) FROM photos", "variance", "all rows"),
        ("SELECT json_agg(caption) FROM photos", "json_agg", "all rows"),
        (
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY likes) FROM photos",
            "percentile_cont",
            "WITHIN GROUP",
        ),
        ("SELECT count(DISTINCT country) FROM photos", "count", "DISTINCT over anything but the sharding key"),
        ("SELECT sum(DISTINCT likes) FROM photos", "sum", "DISTINCT"),
        ("SELECT avg(DISTINCT likes) FROM photos", "avg", "DISTINCT"),
        (
            "SELECT count(*) FILTER (WHERE likes > 1) + mode() WITHIN GROUP (ORDER BY likes) FROM photos",
            "mode",
            "WITHIN GROUP",
        ),
        ("SELECT max(likes ORDER BY taken) FROM photos", "max", "ORDER BY inside"),
        ("SELECT country, grouping(country) FROM photos GROUP BY country", "grouping", "all rows"),
    ] {
        let refusal = refused(sql, &format!("cannot combine {name}() across servers"));
        assert!(refusal.message.contains(why), "{sql}: {}", refusal.message);
        assert!(refusal.hint.contains("count(DISTINCT sharding key)"), "{}", refusal.hint);
    }
}

#[test]
fn grouped_shapes_that_cannot_be_combined() {
    refused(
        "SELECT DISTINCT ON (user_id) user_id, photo_id FROM photos ORDER BY user_id, taken",
        "DISTINCT ON",
    );
    refused(
        "SELECT DISTINCT count(*) FROM photos GROUP BY country",
        "SELECT DISTINCT over groups that span servers",
    );
    refused(
        "SELECT count(*) FROM photos HAVING max(likes) > likes",
        "column likes must appear",
    );
    refused(
        "SELECT *, count(*) FROM photos GROUP BY country",
        "the columns of * are not known",
    );
    refused(
        "SELECT country, count(*) * (SELECT rate FROM currencies LIMIT 1) FROM photos GROUP BY country",
        "cannot compute a subquery over combined results",
    );
    refused(
        "SELECT (SELECT max(p.likes) FROM countries LIMIT 1) FROM photos p",
        "max() over columns of the outer statement",
    );
    refused(
        "SELECT photo_id FROM photos p JOIN countries c ON c.code = p.country \
         ORDER BY (SELECT count(c.code) FROM currencies)",
        "count() over columns of the outer statement",
    );
    refused(
        "SELECT count(*) FROM photos GROUP BY ROLLUP (country)",
        "ROLLUP",
    );
    refused(
        "SELECT count(*) FROM photos GROUP BY GROUPING SETS ((country), ())",
        "GROUPING SETS",
    );
    refused(
        "SELECT 1 FROM photos HAVING true",
        "HAVING without GROUP BY",
    );
    refused(
        "SELECT DISTINCT country FROM photos ORDER BY city",
        "ORDER BY expressions must appear in the select list",
    );
}

#[test]
fn order_by_that_cannot_be_merged() {
    refused(
        "SELECT * FROM photos ORDER BY 2",
        "with * in the select list",
    );
    refused(
        "SELECT photo_id FROM photos ORDER BY 3",
        "position 3 is not in the select list",
    );
    refused(
        "SELECT photo_id FROM photos ORDER BY likes USING >",
        "USING >",
    );
    refused(
        "SELECT likes AS x, -likes AS x FROM photos ORDER BY x",
        "ORDER BY \"x\" is ambiguous",
    );
}
