//! Plans the scatter planner makes for each statement shape it accepts.

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::*;

/// users, photos and user_follow share the `users` group; orgs has its own;
/// countries and currencies are reference tables.
pub(super) struct Map;

impl TableInfo for Map {
    fn sharded(&self, name: &str) -> Option<(&str, &str)> {
        match name {
            "users" | "photos" => Some(("user_id", "users")),
            "user_follow" => Some(("follower_id", "users")),
            "orgs" => Some(("org_id", "orgs")),
            _ => None,
        }
    }
    fn is_reference(&self, name: &str) -> bool {
        matches!(name, "countries" | "currencies")
    }
}

fn parses(sql: &str) {
    if let Err(e) = Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        panic!("does not re-parse: {sql}\n{e}");
    }
}

/// The final query with the proxy's tokens filled in the way the proxy
/// would for int8 partial columns.
pub(super) fn substituted(final_sql: &str, partial_columns: usize) -> String {
    let row: Vec<String> = (1..=partial_columns).map(|n| n.to_string()).collect();
    let mut text = final_sql.replace(ROWS_TOKEN, &format!("({})", row.join(", ")));
    let names: Vec<String> = (1..=partial_columns).map(|n| format!("c{n}")).collect();
    text = text.replace(COLLATED_TOKEN, &names.join(", "));
    for k in 1..=partial_columns {
        text = text.replace(&format!("__SL_TYPE_c{k}__"), "numeric");
        for c in 1..=partial_columns {
            text = text.replace(
                &format!("__SL_AVG_c{k}_c{c}__"),
                &format!("(sum(c{k})::numeric / NULLIF(sum(c{c}), 0))"),
            );
        }
    }
    assert!(!text.contains("__SL_"), "a token is left: {text}");
    text
}

/// A combine's partial query without the collation probes that follow its
/// columns (checked once, in `combined_columns_carry_their_collations`).
pub(super) fn without_probes(partial_sql: &str) -> String {
    const PROBE: &str = ", pg_collation_for(CASE WHEN false THEN ";
    let mut text = partial_sql.to_string();
    while let Some(start) = text.find(PROBE) {
        let mut depth = 0usize;
        let mut end = None;
        for (i, c) in text[start + 2..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(start + 2 + i + 1);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(end) = end else { break };
        text.replace_range(start..end, "");
    }
    text
}

#[test]
fn combined_columns_carry_their_collations() {
    let p = plan_of("SELECT country, count(*) FROM photos GROUP BY country");
    assert_eq!(
        p.partial_sql,
        "SELECT country, count(*), pg_collation_for(CASE WHEN false THEN ((country))::TEXT END), \
         pg_collation_for(CASE WHEN false THEN ((count(*)))::TEXT END) FROM photos GROUP BY country"
    );
    let Merge::Combine { final_sql, .. } = &p.merge else {
        panic!("combine expected")
    };
    assert!(
        final_sql.contains(
            "FROM (SELECT __SL_COLLATED__ FROM (VALUES __SL_ROWS__) AS _v(c1, c2)) AS _sl(c1, c2)"
        ),
        "{final_sql}"
    );
}

/// Plans `sql`, checking what every plan must satisfy.
pub(super) fn plan_of(sql: &str) -> ScatterPlan {
    let plan = plan(sql, &Map).unwrap_or_else(|r| panic!("{sql}: refused: {r}"));
    parses(&plan.partial_sql);
    if let Merge::Combine {
        final_sql,
        partial_columns,
    } = &plan.merge
    {
        assert!(!final_sql.contains("LIMIT") && !final_sql.contains("OFFSET"));
        assert_eq!(plan.hidden, 0);
        parses(&substituted(final_sql, *partial_columns));
    }
    plan
}

fn final_sql(plan: &ScatterPlan) -> &str {
    match &plan.merge {
        Merge::Combine { final_sql, .. } => final_sql,
        other => panic!("expected Combine, got {other:?}"),
    }
}

fn keys(plan: &ScatterPlan) -> Vec<(bool, bool)> {
    match &plan.merge {
        Merge::Sorted { keys } => keys.iter().map(|k| (k.descending, k.nulls_first)).collect(),
        other => panic!("expected Sorted, got {other:?}"),
    }
}

#[test]
fn plain_rows_are_concatenated_and_keep_parameters() {
    let p = plan_of("SELECT photo_id, taken FROM photos WHERE taken > $1 AND likes >= $2");
    assert_eq!(p.merge, Merge::Concat);
    assert_eq!(
        p.partial_sql,
        "SELECT photo_id, taken FROM photos WHERE taken > $1 AND likes >= $2"
    );
    assert_eq!((p.visible, p.hidden, p.limit, p.offset), (2, 0, None, None));

    let star = plan_of("SELECT * FROM photos");
    assert_eq!((star.visible, star.hidden), (0, 0), "* has unknown width");
}

#[test]
fn limit_and_offset_are_pushed_as_their_sum_and_applied_once() {
    let p = plan_of("SELECT photo_id FROM photos LIMIT 10 OFFSET 5");
    assert_eq!(p.partial_sql, "SELECT photo_id FROM photos LIMIT 15");
    assert_eq!(
        (p.limit, p.offset),
        (Some(Bound::Const(10)), Some(Bound::Const(5)))
    );

    let p = plan_of("SELECT photo_id FROM photos WHERE likes > $3 LIMIT $1 OFFSET $2");
    assert!(
        p.partial_sql
            .ends_with("WHERE likes > $3 LIMIT CAST($1 AS INT8) + CAST($2 AS INT8)"),
        "{}",
        p.partial_sql
    );
    assert_eq!(
        (p.limit, p.offset),
        (Some(Bound::Param(0)), Some(Bound::Param(1)))
    );

    let p = plan_of("SELECT photo_id FROM photos LIMIT $1::int8");
    assert!(
        p.partial_sql.ends_with("LIMIT CAST($1 AS INT8)"),
        "{}",
        p.partial_sql
    );

    for unlimited in [
        "SELECT photo_id FROM photos LIMIT ALL",
        "SELECT photo_id FROM photos LIMIT NULL",
    ] {
        let p = plan_of(unlimited);
        assert_eq!(p.partial_sql, "SELECT photo_id FROM photos");
        assert_eq!(p.limit, None);
    }
    let p = plan_of("SELECT photo_id FROM photos OFFSET 3");
    assert_eq!(p.partial_sql, "SELECT photo_id FROM photos");
    assert_eq!((p.limit, p.offset), (None, Some(Bound::Const(3))));

    let p = plan_of("SELECT photo_id FROM photos LIMIT 9223372036854775807 OFFSET 1");
    assert_eq!(
        p.partial_sql, "SELECT photo_id FROM photos",
        "a sum past int8 is no limit"
    );
}

#[test]
fn order_by_becomes_a_merge_on_hidden_key_columns() {
    let p = plan_of("SELECT photo_id, taken FROM photos ORDER BY taken DESC, photo_id LIMIT 20");
    assert_eq!(
        p.partial_sql,
        "SELECT photo_id, taken, (taken) AS _sl_k0, (SELECT pg_collation_for(CASE WHEN false THEN ((taken))::TEXT END)) AS _sl_c0, \
         (photo_id) AS _sl_k1, (SELECT pg_collation_for(CASE WHEN false THEN ((photo_id))::TEXT END)) AS _sl_c1 \
         FROM photos ORDER BY taken DESC, photo_id LIMIT 20"
    );
    assert_eq!(keys(&p), vec![(true, true), (false, false)]);
    assert_eq!((p.visible, p.hidden), (2, 4));
    assert_eq!(p.limit, Some(Bound::Const(20)));
}

#[test]
fn order_by_aliases_positions_and_expressions_resolve_like_postgres() {
    let p = plan_of(
        "SELECT lower(caption) AS c, user_id FROM photos \
         ORDER BY c NULLS FIRST, 2 DESC NULLS LAST, likes * 2 ASC",
    );
    assert_eq!(keys(&p), vec![(false, true), (true, false), (false, false)]);
    assert!(
        p.partial_sql.contains("(lower(caption)) AS _sl_k0"),
        "{}",
        p.partial_sql
    );
    assert!(p.partial_sql.contains("(user_id) AS _sl_k1"));
    assert!(p.partial_sql.contains("(likes * 2) AS _sl_k2"));
    assert!(
        p.partial_sql
            .ends_with("ORDER BY c NULLS FIRST, 2 DESC NULLS LAST, likes * 2 ASC"),
        "the ORDER BY is kept as written: {}",
        p.partial_sql
    );
    assert_eq!((p.visible, p.hidden), (2, 6));

    // A bare name that is no output column is an input column.
    let p = plan_of("SELECT photo_id FROM photos ORDER BY taken");
    assert!(p.partial_sql.contains("(taken) AS _sl_k0"));
    // An output name wins over the input column of that name.
    let p = plan_of("SELECT -likes AS likes FROM photos ORDER BY likes");
    assert!(
        p.partial_sql.contains("(-likes) AS _sl_k0"),
        "{}",
        p.partial_sql
    );
    // Output names include the ones Postgres makes up.
    let p = plan_of("SELECT upper(caption) FROM photos ORDER BY upper DESC");
    assert!(
        p.partial_sql.contains("(upper(caption)) AS _sl_k0"),
        "{}",
        p.partial_sql
    );
    // With *, an expression key is fine (hidden columns come after *).
    let p = plan_of("SELECT * FROM photos ORDER BY taken COLLATE \"C\" DESC");
    assert!(p
        .partial_sql
        .contains("(SELECT pg_collation_for(CASE WHEN false THEN ((taken COLLATE \"C\"))::TEXT END)) AS _sl_c0"));
    assert_eq!((p.visible, p.hidden), (0, 2));
}

#[test]
fn co_located_joins_and_reference_tables_run_on_every_server() {
    for sql in [
        "SELECT p.photo_id, u.name FROM photos p JOIN users u ON p.user_id = u.user_id",
        "SELECT p.photo_id FROM photos p, users u WHERE u.user_id = p.user_id AND u.name = $1",
        "SELECT photo_id FROM photos JOIN users USING (user_id)",
        "SELECT f.user_id FROM user_follow f JOIN photos p ON p.user_id = f.follower_id \
         JOIN users u ON (u.user_id = p.user_id AND u.active)",
        "SELECT p.photo_id, c.name FROM photos p JOIN countries c ON c.code = p.country",
        "SELECT p.photo_id FROM photos p LEFT JOIN countries c ON c.code = p.country",
        "SELECT u.name, p.photo_id FROM users u LEFT JOIN photos p ON p.user_id = u.user_id",
        "SELECT u.name FROM users u FULL JOIN photos p ON p.user_id = u.user_id",
        "SELECT u.name FROM photos p RIGHT JOIN users u ON p.user_id = u.user_id",
        "SELECT p.photo_id FROM photos p CROSS JOIN generate_series(1, 3) AS g(n)",
        "SELECT a.photo_id FROM photos a JOIN photos b ON a.user_id = b.user_id",
        "SELECT photo_id FROM photos WHERE country IN (SELECT code FROM countries WHERE eu)",
        "WITH eu AS (SELECT code FROM countries WHERE eu) \
         SELECT photo_id FROM photos JOIN eu ON eu.code = photos.country",
        "SELECT photo_id, (SELECT name FROM countries c WHERE c.code = photos.country) FROM photos",
        "SELECT photo_id FROM public.photos",
        // A subquery's own aggregate does not make the statement an aggregate.
        "SELECT photo_id, (SELECT max(c.name) FROM countries c WHERE c.code = p.country) \
         FROM photos p",
    ] {
        assert_eq!(plan_of(sql).merge, Merge::Concat, "{sql}");
    }
}

#[test]
fn grouping_by_the_sharding_key_runs_any_aggregate_on_the_servers() {
    let p = plan_of(
        "SELECT user_id, count(*), string_agg(caption, ',' ORDER BY taken) FROM photos \
         GROUP BY user_id HAVING count(*) > $1 ORDER BY 2 DESC LIMIT 5",
    );
    assert_eq!(keys(&p), vec![(true, true)]);
    assert_eq!(
        p.partial_sql,
        "SELECT user_id, count(*), string_agg(caption, ',' ORDER BY taken), \
         (count(*)) AS _sl_k0, (SELECT pg_collation_for(CASE WHEN false THEN ((count(*)))::TEXT END)) AS _sl_c0 FROM photos \
         GROUP BY user_id HAVING count(*) > $1 ORDER BY 2 DESC LIMIT 5"
    );
    assert_eq!((p.visible, p.hidden), (3, 2));

    // Any co-located table's key will do, qualified or not.
    for sql in [
        "SELECT f.follower_id, count(*) FROM user_follow f \
         JOIN users u ON u.user_id = f.follower_id GROUP BY f.follower_id",
        "SELECT follower_id, max(since) FROM user_follow GROUP BY 1",
        "SELECT user_id, stddev(likes) FROM photos GROUP BY user_id, country",
    ] {
        assert_eq!(plan_of(sql).merge, Merge::Concat, "{sql}");
    }
    // The key of an outer join's optional side is NULL on many servers.
    let p = plan_of(
        "SELECT p.user_id, count(*) FROM users u LEFT JOIN photos p ON p.user_id = u.user_id \
         GROUP BY p.user_id",
    );
    assert!(matches!(p.merge, Merge::Combine { .. }));
}

#[test]
fn plain_aggregates_combine_partials() {
    let p = plan_of("SELECT count(*) FROM photos WHERE likes > $1");
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT count(*) FROM photos WHERE likes > $1"
    );
    assert_eq!(
        final_sql(&p),
        "SELECT CAST(sum(c1) AS INT8) AS \"count\" FROM (SELECT __SL_COLLATED__ FROM (VALUES __SL_ROWS__) AS _v(c1)) AS _sl(c1)"
    );
    assert_eq!(p.visible, 1);
}

#[test]
fn grouped_aggregates_combine_by_kind() {
    let p = plan_of(
        "SELECT country, count(*), sum(likes), avg(likes), min(taken), max(taken), \
         bool_and(public), every(public), bool_or(public) \
         FROM photos GROUP BY country ORDER BY 3 DESC LIMIT 10 OFFSET $1",
    );
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT country, count(*), sum(likes), count(likes), min(taken), max(taken), \
         bool_and(public), every(public), bool_or(public) FROM photos GROUP BY country"
    );
    assert_eq!(
        final_sql(&p),
        "SELECT c1 AS \"country\", CAST(sum(c2) AS INT8) AS \"count\", \
         CAST(sum(c3) AS __SL_TYPE_c3__) AS \"sum\", __SL_AVG_c3_c4__ AS \"avg\", \
         min(c5) AS \"min\", max(c6) AS \"max\", bool_and(c7) AS \"bool_and\", \
         bool_and(c8) AS \"every\", bool_or(c9) AS \"bool_or\" \
         FROM (SELECT __SL_COLLATED__ FROM (VALUES __SL_ROWS__) AS _v(c1, c2, c3, c4, c5, c6, c7, c8, c9)) AS _sl(c1, c2, c3, c4, c5, c6, c7, c8, c9) \
         GROUP BY c1 ORDER BY 3 DESC"
    );
    assert_eq!(
        (p.limit, p.offset),
        (Some(Bound::Const(10)), Some(Bound::Param(0)))
    );
    assert_eq!(p.visible, 9);
    assert!(matches!(
        p.merge,
        Merge::Combine {
            partial_columns: 9,
            ..
        }
    ));
}

#[test]
fn aggregates_inside_expressions_having_and_order_by() {
    let p = plan_of(
        "SELECT country, round(avg(likes), 2) AS a, sum(likes) * 2, count(*) + 1 \
         FROM photos GROUP BY 1 HAVING sum(likes) > $1 AND country <> 'xx' ORDER BY a, count(*) DESC",
    );
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT country, sum(likes), count(likes), count(*) FROM photos GROUP BY country"
    );
    let f = final_sql(&p);
    assert!(f.contains("round(__SL_AVG_c2_c3__, 2) AS \"a\""), "{f}");
    assert!(
        f.contains("CAST(sum(c2) AS __SL_TYPE_c2__) * 2 AS \"?column?\""),
        "{f}"
    );
    assert!(
        f.contains("CAST(sum(c4) AS INT8) + 1 AS \"?column?\""),
        "{f}"
    );
    assert!(
        f.ends_with(
            "GROUP BY c1 HAVING CAST(sum(c2) AS __SL_TYPE_c2__) > $1 AND c1 <> 'xx' \
             ORDER BY 2, CAST(sum(c4) AS INT8) DESC"
        ),
        "{f}"
    );
}

#[test]
fn filter_and_distinct_key_aggregates_stay_in_the_partial() {
    let p = plan_of(
        "SELECT count(*) FILTER (WHERE likes > 10), count(DISTINCT user_id), \
         sum(DISTINCT photos.user_id), max(DISTINCT likes) FROM photos",
    );
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT count(*) FILTER (WHERE likes > 10), count(DISTINCT user_id), \
         sum(DISTINCT photos.user_id), max(DISTINCT likes) FROM photos"
    );
    let f = final_sql(&p);
    assert!(
        f.starts_with("SELECT CAST(sum(c1) AS INT8) AS \"count\", CAST(sum(c2) AS INT8)"),
        "{f}"
    );
    assert!(!f.contains("FILTER") && !f.contains("DISTINCT"), "{f}");
}

#[test]
fn group_by_aliases_positions_and_dependent_items() {
    let p = plan_of(
        "SELECT date_trunc('day', taken) AS day, count(*) FROM photos GROUP BY day ORDER BY day",
    );
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT date_trunc('day', taken), count(*) FROM photos GROUP BY date_trunc('day', taken)"
    );
    assert!(
        final_sql(&p).ends_with("GROUP BY c1 ORDER BY 1"),
        "{}",
        final_sql(&p)
    );

    // `caption` is read as a column, so GROUP BY caption is the column, not the alias.
    let p = plan_of("SELECT lower(caption) AS caption, count(*) FROM photos GROUP BY caption");
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT caption, lower(caption), count(*) FROM photos GROUP BY caption"
    );
    assert!(
        final_sql(&p).contains("GROUP BY c1, c2"),
        "{}",
        final_sql(&p)
    );
    assert!(final_sql(&p).starts_with("SELECT c2 AS \"caption\""));

    // Items computed from the groups are partial columns grouped by too.
    let p = plan_of("SELECT country, upper(country), count(*) FROM photos GROUP BY country");
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT country, upper(country), count(*) FROM photos GROUP BY country"
    );
    assert!(final_sql(&p).contains("GROUP BY c1, c2"));

    // Case differences do not matter to Postgres, nor to the matching.
    let p = plan_of("SELECT LOWER(Country), COUNT(*) FROM photos GROUP BY lower(country)");
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT lower(country), COUNT(*) FROM photos GROUP BY lower(country)"
    );
}

#[test]
fn constants_without_group_by_are_computed_once_by_the_final_query() {
    let p = plan_of("SELECT 'total' AS label, count(*), now(), $1::text FROM photos");
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT count(*) FROM photos"
    );
    assert_eq!(
        final_sql(&p),
        "SELECT 'total' AS \"label\", CAST(sum(c1) AS INT8) AS \"count\", now() AS \"now\", \
         $1::TEXT AS \"text\" FROM (SELECT __SL_COLLATED__ FROM (VALUES __SL_ROWS__) AS _v(c1)) AS _sl(c1)"
    );
}

#[test]
fn final_columns_keep_the_names_one_server_would_send() {
    let p = plan_of(
        "SELECT country AS \"Country\", count(*) AS N, sum(likes)::int8 FROM photos GROUP BY 1",
    );
    let f = final_sql(&p);
    assert!(
        f.starts_with("SELECT c1 AS \"Country\", CAST(sum(c2) AS INT8) AS \"n\", "),
        "{f}"
    );
    assert!(f.contains("::INT8 AS \"sum\""), "{f}");
}

#[test]
fn distinct_is_combined_by_a_final_distinct() {
    let p = plan_of("SELECT DISTINCT country, city AS town FROM photos ORDER BY town DESC LIMIT 3");
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT DISTINCT country, city AS town FROM photos"
    );
    assert_eq!(
        final_sql(&p),
        "SELECT DISTINCT c1 AS \"country\", c2 AS \"town\" \
         FROM (SELECT __SL_COLLATED__ FROM (VALUES __SL_ROWS__) AS _v(c1, c2)) AS _sl(c1, c2) ORDER BY 2 DESC"
    );
    assert_eq!((p.visible, p.limit), (2, Some(Bound::Const(3))));
    let p = plan_of("SELECT DISTINCT country FROM photos ORDER BY country");
    assert!(final_sql(&p).ends_with("ORDER BY 1"));

    // Per-server groups, then DISTINCT across servers.
    let p = plan_of("SELECT DISTINCT count(*) AS n FROM photos GROUP BY user_id ORDER BY 1");
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT DISTINCT count(*) AS n FROM photos GROUP BY user_id"
    );
    assert!(final_sql(&p).ends_with("ORDER BY 1"));
}

#[test]
fn aggregates_only_in_order_by_still_combine() {
    let p = plan_of("SELECT country FROM photos GROUP BY country ORDER BY count(*) DESC LIMIT 3");
    assert_eq!(
        without_probes(&p.partial_sql),
        "SELECT country, count(*) FROM photos GROUP BY country"
    );
    assert_eq!(
        final_sql(&p),
        "SELECT c1 AS \"country\" FROM (SELECT __SL_COLLATED__ FROM (VALUES __SL_ROWS__) AS _v(c1, c2)) AS _sl(c1, c2) \
         GROUP BY c1 ORDER BY CAST(sum(c2) AS INT8) DESC"
    );
    assert_eq!((p.visible, p.limit), (1, Some(Bound::Const(3))));
}
