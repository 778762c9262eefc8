//! Property tests (a fuzzer that runs on stable Rust): arbitrary bytes and
//! SQL-like text through the frame decoder, the message decoders, the lexer
//! and the statement analyser must never panic, and must respect their
//! invariants. `PROPTEST_CASES` raises the number of cases for long runs
//! (bench/fuzz.sh runs them for as long as asked).

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proxy::analyze::{lex, Analyzer, Command};
use proxy::route::route_data;
use proxy::wire::frame::{next_frame, next_startup_packet};
use proxy::wire::messages::{query_text, Bind, Parse, Target};
use shardmap::{ClusterMap, Endpoint, Group, KeyType, Server};

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(2000);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// SQL-ish text: keywords, identifiers, literals, quotes, comments, params.
fn sqlish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("SELECT ".to_string()),
        Just("INSERT INTO users (user_id, name) VALUES (".to_string()),
        Just(" FROM users WHERE user_id = ".to_string()),
        Just(" AND ".to_string()),
        Just(" OR ".to_string()),
        Just(" IN (".to_string()),
        Just(")".to_string()),
        Just(", ".to_string()),
        Just("'".to_string()),
        Just("''".to_string()),
        Just("E'\\\\'".to_string()),
        Just("$$".to_string()),
        Just("$q$".to_string()),
        Just("--".to_string()),
        Just("/*".to_string()),
        Just("*/".to_string()),
        Just("\"".to_string()),
        Just(";".to_string()),
        Just("::bigint".to_string()),
        Just("BEGIN".to_string()),
        Just("SET x = ".to_string()),
        Just("-".to_string()),
        "\\$[0-9]{1,6}".prop_map(|s| s),
        "[0-9]{1,25}(\\.[0-9]{0,5})?(e[+-]?[0-9]{1,3})?".prop_map(|s| s),
        "[a-zA-Z_][a-zA-Z0-9_]{0,10}".prop_map(|s| s),
        any::<char>().prop_map(|c| c.to_string()),
    ];
    prop::collection::vec(token, 0..40).prop_map(|tokens| tokens.concat())
}

fn map() -> ClusterMap {
    let server = Server::active("a", Endpoint::parse("postgres://h:1/d").expect("url"));
    let mut map = ClusterMap::new("f", 8, vec![server]).expect("map");
    map.declare(Group::hash("users", KeyType::Bigint).table("users", "user_id"));
    map
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn frames_never_panic_and_respect_lengths(bytes in prop::collection::vec(any::<u8>(), 0..2048), max in 5usize..4096) {
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        let mut consumed = 0;
        while let Ok(Some(frame)) = next_frame(&mut buf, max) {
            prop_assert!(frame.raw.len() >= 5 && frame.raw.len() <= max + 1);
            consumed += frame.raw.len();
            let body = frame.body();
            let _ = Parse::decode(body.clone());
            let _ = Bind::decode(body.clone());
            let _ = Target::decode(body.clone(), "Describe");
            let _ = query_text(&body);
        }
        prop_assert_eq!(consumed + buf.len(), before);
        let mut startup = BytesMut::from(&bytes[..]);
        let _ = next_startup_packet(&mut startup, 10_000);
    }

    #[test]
    fn bind_decoding_of_arbitrary_bodies_never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(bind) = Bind::decode(Bytes::from(body)) {
            for i in 0..bind.params.len() + 2 {
                let _ = bind.is_binary(i);
            }
            let mut out = BytesMut::new();
            bind.encode_with_statement("sl_x", &mut out);
            let frame = next_frame(&mut out, 1 << 20).expect("re-encoded Bind frames").expect("complete");
            let again = Bind::decode(frame.body()).expect("re-encoded Bind decodes");
            prop_assert_eq!(again.params, bind.params);
        }
    }

    #[test]
    fn lexer_and_analyser_never_panic(sql in sqlish()) {
        let lexed = lex(&sql);
        prop_assert!(lexed.statements.iter().all(|s| s.shape.end <= lexed.shape.len()));
        let analyzer = Analyzer::new(64);
        let analyzed = analyzer.analyze(&sql);
        let map = map();
        for command in &analyzed.analysis.commands {
            if let Command::Data(data) = command {
                let _ = route_data(data, &map, &analyzed.literals, None, false, false);
                let _ = route_data(data, &map, &analyzed.literals, None, true, true);
                // The write planner sees the text as the client sent it, too.
                let _ = proxy::route::writes::plan_write(&sql, data, &map, &analyzed.literals, None);
            }
        }
        // The scatter planner sees the text as the client sent it.
        let _ = proxy::analyze::scatter::plan(&sql, &FuzzTables);
    }

    #[test]
    fn literals_survive_the_shape(key in any::<i64>(), name in "[^\\x00]{0,20}") {
        // A statement's key literal is found again whatever the value.
        let sql = format!("SELECT * FROM users WHERE user_id = {key} AND name = '{}'", name.replace('\'', "''"));
        let analyzer = Analyzer::new(64);
        let analyzed = analyzer.analyze(&sql);
        let Command::Data(data) = &analyzed.analysis.commands[0] else { panic!("data statement") };
        let routed = route_data(data, &map(), &analyzed.literals, None, false, false);
        prop_assert!(routed.is_ok(), "{:?}", routed);
    }

    #[test]
    fn arbitrary_unicode_never_panics(sql in "\\PC{0,200}") {
        let analyzer = Analyzer::new(64);
        let analyzed = analyzer.analyze(&sql);
        let _ = analyzed.analysis.parameterized();
    }

    #[test]
    fn parameterized_text_has_parameters_where_the_literals_were(sql in sqlish()) {
        let analyzer = Analyzer::new(64);
        let analyzed = analyzer.analyze(&sql);
        if let Some(parameterized) = analyzed.analysis.parameterized() {
            // Lexed again: no literal is left, and there are parameters iff
            // there were literals.
            let again = lex(&parameterized.text);
            prop_assert!(again.literals.is_empty(), "{:?}", parameterized.text);
            prop_assert_eq!(again.has_params, parameterized.params > 0);
            prop_assert_eq!(parameterized.params, analyzed.literals.len());
        }
    }

    #[test]
    fn integer_keys_become_parameters_of_their_own_type(key in 0i64..=i64::MAX) {
        let sql = format!("SELECT * FROM users WHERE user_id = {key}");
        let analyzer = Analyzer::new(64);
        let analyzed = analyzer.analyze(&sql);
        let parameterized = analyzed.analysis.parameterized().expect("eligible");
        prop_assert_eq!(parameterized.text.as_str(), "SELECT * FROM users WHERE user_id = $1");
        let expected = if key <= i64::from(i32::MAX) { 23 } else { 20 };
        prop_assert_eq!(proxy::analyze::integer_literal_type(&analyzed.literals[0]), Some(expected));
    }
}

/// The planner's view of the fuzzed schema: `users` sharded, `countries` a
/// reference table.
struct FuzzTables;

impl proxy::analyze::scatter::TableInfo for FuzzTables {
    fn sharded(&self, name: &str) -> Option<(&str, &str)> {
        (name == "users").then_some(("user_id", "users"))
    }

    fn is_reference(&self, name: &str) -> bool {
        name == "countries"
    }
}
