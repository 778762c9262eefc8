//! The differential suite's schema and its deterministic data: `users` and
//! `orders` sharded by user id in one co-location group, the reference table
//! `countries`, and rows drawn from a seeded RNG as SQL literals, so the same
//! seed gives the same rows on the shard servers and on the reference server.
//!
//! Values repeat on purpose (names, countries, scores, timestamps) so that
//! GROUP BY, DISTINCT and ORDER BY ties have real work to do, and every
//! nullable column is NULL in roughly one row in eight.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// Columns of `users`; the key is `user_id`. `nick` sorts bytewise and
/// `title` by ICU's English rules, unlike the database's default C.UTF-8, so
/// a merge that ignores a column's collation shows up as a difference.
pub const USERS_COLUMNS: &str = "user_id bigint PRIMARY KEY, name text, \
     nick text COLLATE \"C\", title text COLLATE \"en-x-icu\", country text, \
     score numeric(12,3), rating float8, active bool, born date, created timestamptz, \
     uid uuid, prefs jsonb, tags text[], small int2, medium int4, big int8, lucky int4[]";

/// Columns of `orders`, co-located with `users` by `user_id`.
pub const ORDERS_COLUMNS: &str = "user_id bigint NOT NULL, order_id bigint NOT NULL, \
     amount numeric, placed timestamptz, status text, PRIMARY KEY (user_id, order_id)";

/// Columns of the reference table `countries` (a copy on every server).
pub const COUNTRIES_COLUMNS: &str = "code text PRIMARY KEY, name text, region text";

/// Names with mixed case, accents, other scripts, spaces and quotes, few
/// enough that many users share one.
pub const NAMES: &[&str] = &[
    "alice",
    "Alice",
    "ALICE",
    "bob",
    "Bob Smith",
    "bob smith",
    " leading space",
    "trailing space ",
    "Zoë",
    "zoe",
    "Émile",
    "émile",
    "Ünal",
    "Ødegaard",
    "ÅSA",
    "åsa",
    "李雷",
    "東京",
    "Мария",
    "o'brien",
    "O'Brien",
    "d\"quote",
    "a_b%c",
    "Ångström",
    "zz top",
    "Zz Top",
    "123abc",
    "",
    "mixed CASE",
    "back\\slash",
];

/// Country codes users have: some without a `countries` row, one in lower case.
pub const USER_COUNTRIES: &[&str] = &[
    "DE", "FR", "US", "GB", "JP", "BR", "IN", "SE", "ÅL", "de", "XX", "NO",
];

/// The rows of `countries`: (code, name, region).
pub const COUNTRIES: &[(&str, &str, Option<&str>)] = &[
    ("DE", "Germany", Some("EU")),
    ("FR", "France", Some("EU")),
    ("US", "United States", Some("NA")),
    ("GB", "United Kingdom", Some("EU")),
    ("JP", "Japan", Some("APAC")),
    ("BR", "Brasil", Some("LATAM")),
    ("IN", "India", Some("APAC")),
    ("SE", "Sverige", Some("EU")),
    ("ÅL", "Åland", None),
    ("CA", "Canada", Some("NA")),
];

pub const TAGS: &[&str] = &["a", "b", "new", "vip", "Ünicode", "with space", "Zed"];
pub const STATUSES: &[&str] = &["new", "paid", "shipped", "cancelled", "Refunded"];
pub const THEMES: &[&str] = &["dark", "light", "Solarized"];

/// One row as a parenthesised list of SQL literals, and its sharding key.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: i64,
    pub values: String,
}

/// The generated data, plus samples of its values for the query generator
/// (so predicates select some rows rather than none).
#[derive(Debug, Clone)]
pub struct Dataset {
    pub users: Vec<Row>,
    pub orders: Vec<Row>,
    pub countries: Vec<Row>,
    pub user_ids: Vec<i64>,
    pub uids: Vec<String>,
    pub scores: Vec<String>,
    pub created: Vec<String>,
    pub amounts: Vec<String>,
}

pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// NULL with probability `null_probability`, else `value`.
fn maybe(
    rng: &mut StdRng,
    null_probability: f64,
    value: impl FnOnce(&mut StdRng) -> String,
) -> String {
    if rng.random_bool(null_probability) {
        "NULL".to_string()
    } else {
        value(rng)
    }
}

fn pick<'a>(rng: &mut StdRng, values: &[&'a str]) -> &'a str {
    values.choose(rng).copied().unwrap_or_default()
}

/// A timestamp literal in 2020–2025 with microseconds; one in four comes from
/// a small set of instants so that ties exist.
fn timestamp(rng: &mut StdRng) -> String {
    let seconds: i64 = if rng.random_bool(0.25) {
        1_600_000_000 + 3_600 * rng.random_range(0..40)
    } else {
        rng.random_range(1_577_836_800..1_767_225_600)
    };
    let micros: u32 = if rng.random_bool(0.5) {
        0
    } else {
        rng.random_range(0..1_000_000)
    };
    format!("to_timestamp({seconds}) + interval '{micros} microseconds'")
}

fn uuid(rng: &mut StdRng) -> String {
    let bytes: [u8; 16] = rng.random();
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

fn prefs(rng: &mut StdRng) -> String {
    let mut fields = Vec::new();
    if rng.random_bool(0.8) {
        fields.push(format!("\"theme\": \"{}\"", pick(rng, THEMES)));
    }
    if rng.random_bool(0.6) {
        fields.push(format!("\"n\": {}", rng.random_range(-5..20)));
    }
    if rng.random_bool(0.3) {
        fields.push(format!("\"beta\": {}", rng.random_bool(0.5)));
    }
    if rng.random_bool(0.2) {
        fields.push(format!(
            "\"langs\": [\"{}\", \"{}\"]",
            pick(rng, TAGS),
            pick(rng, TAGS)
        ));
    }
    quote(&format!("{{{}}}", fields.join(", ")))
}

fn text_array(rng: &mut StdRng) -> String {
    let length = rng.random_range(0..4);
    let elements: Vec<String> = (0..length)
        .map(|_| {
            if rng.random_bool(0.05) {
                "NULL".to_string()
            } else {
                quote(pick(rng, TAGS))
            }
        })
        .collect();
    format!("ARRAY[{}]::text[]", elements.join(", "))
}

fn score(rng: &mut StdRng) -> String {
    match rng.random_range(0..4) {
        0 => format!(
            "{}.{}",
            rng.random_range(0..50),
            ["0", "5", "25", "125"].choose(rng).copied().unwrap_or("0")
        ),
        1 => format!(
            "-{}.{:03}",
            rng.random_range(0..1000),
            rng.random_range(0..1000)
        ),
        _ => format!(
            "{}.{:03}",
            rng.random_range(0..100_000),
            rng.random_range(0..1000)
        ),
    }
}

/// An amount in 0–500 whose display scale depends on its value (0, 2 or 3
/// digits), so that its text does not sort like its value ("100" < "99.50"
/// as text) while equal amounts still print alike.
fn amount(rng: &mut StdRng) -> String {
    let cents: i64 = rng.random_range(0..50_000);
    if cents % 100 == 0 {
        (cents / 100).to_string()
    } else if cents % 7 == 0 {
        format!("{}.{:02}0", cents / 100, cents % 100)
    } else {
        format!("{}.{:02}", cents / 100, cents % 100)
    }
}

/// Mostly ordinary floats, with the values a float comparison gets wrong:
/// NaN (greatest in Postgres), infinities, and -0 (equal to 0).
fn rating(rng: &mut StdRng) -> String {
    match rng.random_range(0..50) {
        0 => "'NaN'".to_string(),
        1 => "'Infinity'".to_string(),
        2 => "'-Infinity'".to_string(),
        3 => "'-0'".to_string(),
        4..=12 => format!("{:.1}", rng.random_range(0..10) as f64 / 2.0),
        _ => format!(
            "{:e}",
            rng.random_range(-1.0e3..1.0e4) * rng.random::<f64>()
        ),
    }
}

/// About `users` users and three orders per user on average, all from `seed`.
pub fn generate(seed: u64, users: usize) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = Dataset {
        users: Vec::new(),
        orders: Vec::new(),
        countries: Vec::new(),
        user_ids: Vec::new(),
        uids: Vec::new(),
        scores: Vec::new(),
        created: Vec::new(),
        amounts: Vec::new(),
    };
    let mut next_order_id: i64 = 1;
    for index in 0..users {
        // Mostly small ids, some beyond the int4 range (hashed differently).
        let user_id = if index % 10 == 9 {
            10_000_000_000 + index as i64 * 7
        } else {
            index as i64 + 1
        };
        let uid = uuid(&mut rng);
        let score = maybe(&mut rng, 0.12, score);
        let created = maybe(&mut rng, 0.08, timestamp);
        let values = [
            user_id.to_string(),
            maybe(&mut rng, 0.1, |r| quote(pick(r, NAMES))),
            maybe(&mut rng, 0.1, |r| quote(pick(r, NAMES))),
            maybe(&mut rng, 0.1, |r| quote(pick(r, NAMES))),
            maybe(&mut rng, 0.1, |r| quote(pick(r, USER_COUNTRIES))),
            score.clone(),
            maybe(&mut rng, 0.12, rating),
            maybe(&mut rng, 0.15, |r| r.random_bool(0.6).to_string()),
            maybe(&mut rng, 0.1, |r| {
                format!("date '1940-01-01' + {}", r.random_range(0..25_000))
            }),
            created.clone(),
            maybe(&mut rng, 0.05, |_| quote(&uid)),
            maybe(&mut rng, 0.1, prefs),
            maybe(&mut rng, 0.12, text_array),
            maybe(&mut rng, 0.12, |r| r.random_range(-3i16..10).to_string()),
            maybe(&mut rng, 0.12, |r| r.random_range(0i32..50).to_string()),
            maybe(&mut rng, 0.12, |r| {
                (r.random_range(-1_000_000i64..1_000_000) * 1_000_003).to_string()
            }),
            maybe(&mut rng, 0.2, |r| {
                let numbers: Vec<String> = (0..r.random_range(0..4))
                    .map(|_| r.random_range(0..9).to_string())
                    .collect();
                format!("ARRAY[{}]::int4[]", numbers.join(", "))
            }),
        ];
        data.users.push(Row {
            key: user_id,
            values: format!("({})", values.join(", ")),
        });
        data.user_ids.push(user_id);
        data.uids.push(uid);
        if score != "NULL" {
            data.scores.push(score);
        }
        if created != "NULL" {
            data.created.push(created);
        }
        for _ in 0..rng.random_range(0..7) {
            let amount = maybe(&mut rng, 0.08, amount);
            let values = [
                user_id.to_string(),
                next_order_id.to_string(),
                amount.clone(),
                maybe(&mut rng, 0.08, timestamp),
                maybe(&mut rng, 0.1, |r| quote(pick(r, STATUSES))),
            ];
            data.orders.push(Row {
                key: user_id,
                values: format!("({})", values.join(", ")),
            });
            if amount != "NULL" {
                data.amounts.push(amount);
            }
            next_order_id += 1;
        }
    }
    for (code, name, region) in COUNTRIES {
        data.countries.push(Row {
            key: 0,
            values: format!(
                "({}, {}, {})",
                quote(code),
                quote(name),
                region.map(quote).unwrap_or_else(|| "NULL".into())
            ),
        });
    }
    data
}

/// `INSERT` statements for `rows` of `table`, a few hundred rows each.
pub fn insert_statements<'a>(table: &str, rows: impl Iterator<Item = &'a Row>) -> Vec<String> {
    let rows: Vec<&Row> = rows.collect();
    rows.chunks(250)
        .map(|chunk| {
            let values: Vec<&str> = chunk.iter().map(|row| row.values.as_str()).collect();
            format!("INSERT INTO {table} VALUES {}", values.join(",\n"))
        })
        .collect()
}
