use crate::analyze::Analyzer;

fn parameterized(sql: &str) -> Option<(String, Vec<usize>)> {
    let analyzer = Analyzer::new(10);
    let analyzed = analyzer.analyze(sql);
    analyzed
        .analysis
        .parameterized()
        .map(|p| (p.text.clone(), p.negated.clone()))
}

fn text(sql: &str) -> Option<String> {
    parameterized(sql).map(|(text, _)| text)
}

#[test]
fn pgbench_tpcb_statements_are_parameterized() {
    assert_eq!(
        parameterized("UPDATE pgbench_accounts SET abalance = abalance + -4023 WHERE aid = 12345;"),
        Some((
            "UPDATE pgbench_accounts SET abalance = abalance + -$1 WHERE aid = $2".into(),
            vec![0]
        ))
    );
    assert_eq!(
        parameterized("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 12345, -4023, CURRENT_TIMESTAMP);"),
        Some((
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ($1, $2, $3, -$4, CURRENT_TIMESTAMP)".into(),
            vec![3]
        ))
    );
}

#[test]
fn arithmetic_operands_and_values_rows_qualify() {
    assert_eq!(
        text("update t set n = n * 2 + m - 1 where k = 3"),
        Some("update t set n = n * $1 + m - $2 where k = $3".into())
    );
    assert_eq!(
        text("update t set n = n * 2 + 1 where k = 3"),
        None,
        "a literal's left neighbour is a literal: taken as constants (conservatively)"
    );
    assert_eq!(
        text("insert into t values (1, 2), (3, -4)"),
        Some("insert into t values ($1, $2), ($3, -$4)".into())
    );
    assert_eq!(
        text("select * from (values (1), (2)) v(x) where x > 1"),
        Some("select * from (values ($1), ($2)) v(x) where x > $3".into())
    );
    assert_eq!(
        text("select * from t where (a - 1) * 2 = b"),
        Some("select * from t where (a - $1) * $2 = b".into()),
        "a binary minus after an operand"
    );
    assert_eq!(
        text("select * from t where k = 1 and -2 < j"),
        None,
        "after a keyword a sign starts a value"
    );
    assert_eq!(
        text("select * from t where j -> 2 = k"),
        Some("select * from t where j -> $1 = k".into())
    );
}

#[test]
fn constants_read_as_written_stay() {
    // A type modifier is a constant, not an expression.
    assert_eq!(text("insert into t values (5::numeric(10, 2))"), None);
    assert_eq!(text("insert into t values (5::numeric(10, -2))"), None);
    // Function arguments (could be a type modifier in another spelling).
    assert_eq!(text("insert into t values (round(5, 2))"), None);
    // The column list is not a row.
    assert_eq!(text("insert into t (a) select 1"), None);
    // A signed constant after a keyword: a position, a LIMIT, a value.
    assert_eq!(text("select * from t where k = 1 order by -2"), None);
    assert_eq!(text("select * from t order by a, -2"), None);
    assert_eq!(
        text("select * from t where k = -1 order by a"),
        None,
        "no signs at all where ORDER BY may read them"
    );
    assert_eq!(text("select * from t fetch first -1 rows only"), None);
    assert_eq!(text("select -1 from t"), None);
    assert_eq!(text("select * from t limit 5"), None);
    // Expressions of constants are folded by the planner, errors included.
    assert_eq!(text("select * from t where k = 1 + 2"), None);
    assert_eq!(text("select k / 0 from t where j = 10 / 0"), None);
    assert_eq!(text("update t set v = 5 * -3 where k = 1"), None);
    // An IN list is not a row.
    assert_eq!(text("select * from t where k in (1, 2)"), None);
}

#[test]
fn a_negated_literal_is_recorded() {
    assert_eq!(
        parameterized("select * from t where k = -1 and j = 2"),
        Some(("select * from t where k = -$1 and j = $2".into(), vec![0]))
    );
}
