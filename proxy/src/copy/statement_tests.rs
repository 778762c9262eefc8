//! Reading COPY statements: both option syntaxes, defaults, quoting, and
//! what is refused (Postgres's own errors, and the proxy's 0A000).

use super::{parse_copy_in, ColumnSet, CopyFormat, CopyIn, CopyRefusal};

fn parse(sql: &str) -> CopyIn {
    parse_copy_in(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

fn refused(sql: &str) -> CopyRefusal {
    match parse_copy_in(sql) {
        Ok(copy) => panic!("{sql} was accepted: {copy:?}"),
        Err(refusal) => refusal,
    }
}

#[test]
fn plain_text_defaults() {
    let copy = parse("COPY photos FROM STDIN");
    assert_eq!(
        (copy.schema, copy.table.as_str(), copy.columns),
        (None, "photos", None)
    );
    let o = copy.options;
    assert_eq!(o.format, CopyFormat::Text);
    assert_eq!(
        (o.delimiter, o.null.as_str(), o.header),
        (b'\t', "\\N", false)
    );
}

#[test]
fn parenthesised_options() {
    let copy = parse(
        "copy public.\"Photos\" (user_id, \"Caption\") from stdin with \
         (format csv, header true, delimiter ';', null 'NULL', quote '''', escape E'\\\\', \
          force_not_null (user_id), force_null (\"Caption\"), encoding 'utf-8');",
    );
    assert_eq!(copy.schema.as_deref(), Some("public"));
    assert_eq!(copy.table, "Photos");
    assert_eq!(
        copy.columns,
        Some(vec!["user_id".to_string(), "Caption".to_string()])
    );
    let o = copy.options;
    assert_eq!(o.format, CopyFormat::Csv);
    assert!(o.header);
    assert_eq!((o.delimiter, o.quote, o.escape), (b';', b'\'', b'\\'));
    assert_eq!(o.null, "NULL");
    assert_eq!(o.force_not_null, ColumnSet::Columns(vec!["user_id".into()]));
    assert!(o.force_null.contains("Caption"));
}

#[test]
fn csv_defaults_and_header_values() {
    let o = parse("COPY t FROM STDIN (FORMAT csv)").options;
    assert_eq!(
        (o.delimiter, o.null.as_str(), o.quote, o.escape),
        (b',', "", b'"', b'"')
    );
    assert!(
        parse("COPY t FROM STDIN (FORMAT csv, HEADER)")
            .options
            .header
    );
    assert!(
        parse("COPY t FROM STDIN (FORMAT csv, HEADER 1)")
            .options
            .header
    );
    assert!(
        !parse("COPY t FROM STDIN (FORMAT csv, HEADER off)")
            .options
            .header
    );
    assert!(parse("COPY t FROM STDIN (HEADER 'ON')").options.header);
    let o = parse("COPY t FROM STDIN (FORMAT csv, QUOTE '|')").options;
    assert_eq!(o.escape, b'|', "the escape defaults to the quote");
}

#[test]
fn old_syntax() {
    let o = parse(
        "COPY t (a, b) FROM STDIN WITH CSV HEADER DELIMITER AS ',' NULL AS '' QUOTE AS '\"' \
         FORCE NOT NULL a, b",
    )
    .options;
    assert_eq!(o.format, CopyFormat::Csv);
    assert!(o.header);
    assert_eq!(
        o.force_not_null,
        ColumnSet::Columns(vec!["a".into(), "b".into()])
    );
    assert_eq!(
        parse("COPY BINARY t FROM STDIN").options.format,
        CopyFormat::Binary
    );
    assert_eq!(
        parse("COPY t FROM STDIN BINARY").options.format,
        CopyFormat::Binary
    );
    assert_eq!(
        parse("COPY t FROM stdin USING DELIMITERS '|'")
            .options
            .delimiter,
        b'|'
    );
    assert_eq!(
        parse("COPY t FROM STDIN DELIMITER E'\\t'")
            .options
            .delimiter,
        b'\t'
    );
    assert_eq!(parse("COPY t FROM STDIN NULL $$x$$").options.null, "x");
}

#[test]
fn comments_and_case() {
    let copy = parse("/* load */ Copy T -- the table\n (A) From StdIn (Format 'binary')");
    assert_eq!(
        (copy.table.as_str(), copy.columns),
        ("t", Some(vec!["a".to_string()]))
    );
    assert_eq!(copy.options.format, CopyFormat::Binary);
}

#[test]
fn what_the_proxy_will_not_split() {
    for sql in [
        "COPY t TO STDOUT",
        "COPY (SELECT 1) TO STDOUT",
        "COPY t FROM '/tmp/x.csv'",
        "COPY t FROM PROGRAM 'cat x'",
        "COPY t FROM STDIN WHERE k > 1",
        "COPY t FROM STDIN (FREEZE)",
        "COPY t FROM STDIN WITH FREEZE",
        "COPY t FROM STDIN (FORMAT csv, HEADER match)",
        "COPY t FROM STDIN (ENCODING 'LATIN1')",
        "COPY t FROM STDIN (DEFAULT 'x')",
        "COPY t FROM STDIN; SELECT 1",
        "COPY db.s.t FROM STDIN",
        "COPY t FROM STDIN (DELIMITER U&'\\0009')",
    ] {
        let refusal = refused(sql);
        assert_eq!(refusal.code, "0A000", "{sql}: {refusal:?}");
        assert!(refusal.hint.is_some(), "{sql}: a hint says what to do");
    }
    assert!(parse_copy_in("COPY t FROM STDIN (FREEZE false)").is_ok());
}

#[test]
fn what_postgres_rejects() {
    for (sql, code, message) in [
        (
            "COPY t FROM STDIN (FORMAT csv, FORMAT text)",
            "42601",
            "conflicting or redundant options",
        ),
        (
            "COPY BINARY t FROM STDIN CSV",
            "42601",
            "conflicting or redundant options",
        ),
        (
            "COPY t FROM STDIN (FORMAT json)",
            "22023",
            "COPY format \"json\" not recognized",
        ),
        (
            "COPY t FROM STDIN (BOGUS 1)",
            "42601",
            "option \"bogus\" not recognized",
        ),
        (
            "COPY t FROM STDIN (DELIMITER 'ab')",
            "0A000",
            "COPY delimiter must be a single one-byte character",
        ),
        (
            "COPY t FROM STDIN (DELIMITER E'\\n')",
            "22023",
            "COPY delimiter cannot be newline or carriage return",
        ),
        (
            "COPY t FROM STDIN (DELIMITER 'x')",
            "22023",
            "COPY delimiter cannot be \"x\"",
        ),
        (
            "COPY t FROM STDIN (FORMAT binary, HEADER)",
            "0A000",
            "cannot specify HEADER in BINARY mode",
        ),
        (
            "COPY t FROM STDIN (FORMAT binary, DELIMITER ',')",
            "42601",
            "cannot specify DELIMITER in BINARY mode",
        ),
        (
            "COPY t FROM STDIN (QUOTE '\"')",
            "0A000",
            "COPY quote available only in CSV mode",
        ),
        (
            "COPY t FROM STDIN (FORMAT csv, QUOTE ',')",
            "22023",
            "COPY delimiter and quote must be different",
        ),
        (
            "COPY t FROM STDIN (FORCE_NOT_NULL (a))",
            "0A000",
            "COPY force not null available only in CSV mode",
        ),
        (
            "COPY t FROM STDIN (FORMAT csv, FORCE_NOT_NULL a)",
            "22023",
            "argument to option \"force_not_null\" must be a list of column names",
        ),
        (
            "COPY t FROM STDIN (FORMAT csv, FORCE_QUOTE *)",
            "0A000",
            "COPY force quote only available using COPY TO",
        ),
        (
            "COPY t FROM STDIN (NULL 'a\tb')",
            "0A000",
            "COPY delimiter must not appear in the NULL specification",
        ),
        (
            "COPY t FROM STDIN (HEADER maybe)",
            "42601",
            "header requires a Boolean value or \"match\"",
        ),
        (
            "COPY t FROM STDIN (DELIMITER)",
            "42601",
            "delimiter requires a parameter",
        ),
        (
            "COPY t FROM STDIN (FORMAT csv, NULL '\"')",
            "0A000",
            "CSV quote character must not appear in the NULL specification",
        ),
    ] {
        let refusal = refused(sql);
        assert_eq!(
            (refusal.code, refusal.message.as_str()),
            (code, message),
            "{sql}"
        );
    }
    let refusal = refused("COPY t FROM STDIN WITH OIDS");
    assert_eq!(refusal.code, "42601");
    assert_eq!(
        refused("COPY t FROM STDIN (FORMAT csv").message,
        "syntax error at end of input"
    );
}

#[test]
fn row_columns_are_checked_against_the_table() {
    let table = ["id".to_string(), "k".to_string(), "v".to_string()];
    assert_eq!(
        parse("COPY t FROM STDIN").row_columns(&table).expect("all"),
        table.to_vec()
    );
    assert_eq!(
        parse("COPY t (v, k) FROM STDIN")
            .row_columns(&table)
            .expect("listed"),
        vec!["v".to_string(), "k".to_string()]
    );
    let e = parse("COPY t (k, nope) FROM STDIN")
        .row_columns(&table)
        .expect_err("unknown");
    assert_eq!(
        (e.code, e.message.as_str()),
        ("42703", "column \"nope\" of relation \"t\" does not exist")
    );
    let e = parse("COPY t (k, k) FROM STDIN")
        .row_columns(&table)
        .expect_err("twice");
    assert_eq!(
        (e.code, e.message.as_str()),
        ("42701", "column \"k\" specified more than once")
    );
}

#[test]
fn the_key_must_be_copied() {
    let columns = ["v".to_string(), "k".to_string()];
    assert_eq!(super::key_position(&columns, "k", "t").expect("present"), 1);
    let e = super::key_position(&columns, "user_id", "t").expect_err("absent");
    assert_eq!(e.code, "0A000");
    assert!(e.hint.is_some_and(|h| h.contains("user_id")));
}
