//! The seeded query generator: random read-only SELECTs over the suite's
//! schema (plain selects, DISTINCT, aggregates with GROUP BY and HAVING,
//! co-located joins, joins with the reference table), with WHERE predicates
//! over every typed column. A query is marked order-sensitive only when its
//! ORDER BY is total (it ends with a unique key), and LIMIT/OFFSET appear
//! only then, since otherwise the rows chosen are not determined.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

use super::compare::Order;
use super::data::{quote, Dataset, STATUSES, TAGS, THEMES, USER_COUNTRIES};
use super::DiffQuery;

/// What a column or expression holds, for choosing predicates, aggregates and
/// ORDER BY keys that make sense for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Numeric,
    Float,
    Text,
    Bool,
    Date,
    Timestamp,
    Uuid,
    Json,
    Array,
    /// `*` or `alias.*`: every column.
    Star,
}

impl Kind {
    /// Kinds a merge can order by. jsonb and arrays are left out: they have
    /// no order a client relies on.
    fn sortable(self) -> bool {
        !matches!(self, Kind::Json | Kind::Array | Kind::Star)
    }
}

/// A select-list item of `users` (`{p}` is the table alias prefix).
const USER_ITEMS: &[(&str, Kind)] = &[
    ("{p}*", Kind::Star),
    ("{p}user_id", Kind::Int),
    ("{p}name", Kind::Text),
    ("{p}nick", Kind::Text),
    ("{p}title", Kind::Text),
    ("{p}country", Kind::Text),
    ("{p}score", Kind::Numeric),
    ("{p}rating", Kind::Float),
    ("{p}active", Kind::Bool),
    ("{p}born", Kind::Date),
    ("{p}created", Kind::Timestamp),
    ("{p}uid", Kind::Uuid),
    ("{p}prefs", Kind::Json),
    ("{p}tags", Kind::Array),
    ("{p}small", Kind::Int),
    ("{p}medium", Kind::Int),
    ("{p}big", Kind::Int),
    ("{p}lucky", Kind::Array),
    ("upper({p}name)", Kind::Text),
    ("length({p}name)", Kind::Int),
    ("coalesce({p}country, '--')", Kind::Text),
    ("{p}score * 2", Kind::Numeric),
    ("round({p}score)", Kind::Numeric),
    ("{p}rating * 0.5", Kind::Float),
    ("extract(year from {p}born)", Kind::Numeric),
    ("{p}created::date", Kind::Date),
    ("date_trunc('month', {p}created)", Kind::Timestamp),
    ("{p}prefs->>'theme'", Kind::Text),
    ("({p}prefs->>'n')::int", Kind::Int),
    ("{p}prefs->'langs'", Kind::Json),
    ("{p}tags[1]", Kind::Text),
    ("cardinality({p}tags)", Kind::Int),
    ("{p}uid::text", Kind::Text),
    ("{p}small + {p}medium", Kind::Int),
    ("{p}big % 7", Kind::Int),
    ("NOT {p}active", Kind::Bool),
    ("{p}name || '/' || coalesce({p}country, '')", Kind::Text),
];

const ORDER_ITEMS: &[(&str, Kind)] = &[
    ("{p}*", Kind::Star),
    ("{p}user_id", Kind::Int),
    ("{p}order_id", Kind::Int),
    ("{p}amount", Kind::Numeric),
    ("{p}placed", Kind::Timestamp),
    ("{p}status", Kind::Text),
    ("{p}amount * 1.19", Kind::Numeric),
    ("upper({p}status)", Kind::Text),
    ("{p}placed::date", Kind::Date),
    ("{p}order_id % 10", Kind::Int),
];

const COUNTRY_ITEMS: &[(&str, Kind)] = &[
    ("{p}code", Kind::Text),
    ("{p}name", Kind::Text),
    ("{p}region", Kind::Text),
];

/// Low-cardinality grouping expressions of `users`.
const USER_GROUPS: &[&str] = &[
    "{p}country",
    "{p}active",
    "{p}small",
    "{p}medium % 5",
    "{p}prefs->>'theme'",
    "cardinality({p}tags)",
    "date_trunc('year', {p}created)",
    "{p}score > 1000",
];

/// Grouping by the sharding key is here too: such groups never span servers.
const ORDER_GROUPS: &[&str] = &[
    "{p}status",
    "{p}order_id % 4",
    "{p}amount > 250",
    "{p}user_id",
];

/// Aggregates of `users` columns.
const USER_AGGREGATES: &[&str] = &[
    "count(*)",
    "count({p}score)",
    "count({p}prefs)",
    "sum({p}score)",
    "sum({p}medium)",
    "sum({p}big)",
    "sum({p}small)",
    "sum({p}rating)",
    "min({p}score)",
    "max({p}score)",
    "min({p}name)",
    "max({p}nick)",
    "min({p}title)",
    "min({p}born)",
    "max({p}created)",
    "min({p}rating)",
    "max({p}uid::text)",
    "avg({p}score)",
    "avg({p}medium)",
    "avg({p}rating)",
    "avg({p}big)",
    "bool_and({p}active)",
    "bool_or({p}active)",
    "count(DISTINCT {p}user_id)",
    "count(*) FILTER (WHERE {p}active)",
    "sum({p}medium) FILTER (WHERE {p}small > 3)",
    "sum({p}score * 2)",
    "max(length({p}name))",
];

const ORDER_AGGREGATES: &[&str] = &[
    "count(*)",
    "count({p}amount)",
    "sum({p}amount)",
    "min({p}amount)",
    "max({p}placed)",
    "avg({p}amount)",
    "max({p}status)",
];

/// A table in a FROM clause: its alias prefix, items, unique key.
struct Source {
    prefix: &'static str,
    items: &'static [(&'static str, Kind)],
}

const USERS: Source = Source {
    prefix: "",
    items: USER_ITEMS,
};

fn expand(template: &str, prefix: &str) -> String {
    template.replace("{p}", prefix)
}

struct Generator<'d> {
    rng: StdRng,
    data: &'d Dataset,
}

impl Generator<'_> {
    fn chance(&mut self, probability: f64) -> bool {
        self.rng.random_bool(probability)
    }

    fn pick<T: Copy>(&mut self, values: &[T]) -> T {
        *values
            .choose(&mut self.rng)
            .expect("the generator's lists are not empty")
    }

    fn sample(&mut self, values: &[String]) -> String {
        values
            .choose(&mut self.rng)
            .cloned()
            .unwrap_or_else(|| "NULL".into())
    }

    fn user_ids(&mut self, count: usize) -> Vec<String> {
        let data = self.data;
        (0..count)
            .map(|_| self.pick(&data.user_ids).to_string())
            .collect()
    }

    /// One predicate over `users` columns.
    fn user_predicate(&mut self, p: &str) -> String {
        let data = self.data;
        let choice = self.rng.random_range(0..34);
        let text = match choice {
            0 => format!("{{p}}country = {}", quote(self.pick(USER_COUNTRIES))),
            1 => {
                let codes: Vec<String> = (0..3).map(|_| quote(self.pick(USER_COUNTRIES))).collect();
                format!("{{p}}country IN ({})", codes.join(", "))
            }
            2 => "{p}country IS NULL".into(),
            3 => format!("{{p}}country <> {}", quote(self.pick(USER_COUNTRIES))),
            4 => format!("{{p}}score > {}", self.sample(&data.scores)),
            5 => {
                let (a, b) = (
                    self.rng.random_range(-500..500),
                    self.rng.random_range(500..60_000),
                );
                format!("{{p}}score BETWEEN {a} AND {b}.5")
            }
            6 => "{p}score IS NULL".into(),
            7 => format!("{{p}}rating > {}", self.rng.random_range(-2..6)),
            8 => format!("{{p}}rating <= {}.5", self.rng.random_range(0..5)),
            9 => "{p}active".into(),
            10 => "NOT {p}active".into(),
            11 => "{p}active IS NULL".into(),
            12 => format!(
                "{{p}}born < date '{}-06-15'",
                self.rng.random_range(1945..2005)
            ),
            13 => format!("{{p}}created > {}", self.sample(&data.created)),
            14 => format!("{{p}}uid = {}", quote(&self.sample(&data.uids))),
            15 => format!("{{p}}uid < {}", quote(&self.sample(&data.uids))),
            16 => format!("{{p}}prefs @> '{{\"theme\": \"{}\"}}'", self.pick(THEMES)),
            17 => "{p}prefs ? 'beta'".into(),
            18 => format!(
                "({{p}}prefs->>'n')::int > {}",
                self.rng.random_range(-3..15)
            ),
            19 => format!("{} = ANY({{p}}tags)", quote(self.pick(TAGS))),
            20 => format!(
                "{{p}}tags && ARRAY[{}, {}]",
                quote(self.pick(TAGS)),
                quote(self.pick(TAGS))
            ),
            21 => "{p}tags IS NULL OR cardinality({p}tags) = 0".into(),
            22 => format!("{{p}}small = {}", self.rng.random_range(-3..10)),
            23 => format!(
                "{{p}}small IN ({}, {})",
                self.rng.random_range(-3..10),
                self.rng.random_range(-3..10)
            ),
            24 => format!("{{p}}medium % {} = 0", self.rng.random_range(2..7)),
            25 => format!(
                "{{p}}big > {}",
                self.rng.random_range(-500_000_000i64..500_000_000)
            ),
            26 => format!(
                "{{p}}name LIKE {}",
                quote(&format!("{}%", self.pick(&["A", "a", "b", "Z", "É", "o'"])))
            ),
            27 => format!(
                "{{p}}name ILIKE {}",
                quote(&format!("%{}%", self.pick(&["o", "ä", "e", " ", "_"])))
            ),
            28 => format!(
                "{{p}}title >= {}",
                quote(self.pick(&["a", "B", "m", "Z", "é"]))
            ),
            29 => format!(
                "{{p}}nick < {}",
                quote(self.pick(&["a", "B", "m", "Z", "é"]))
            ),
            30 => format!("{{p}}user_id < {}", self.rng.random_range(10..2000)),
            31 => {
                let count = self.rng.random_range(2..40);
                format!("{{p}}user_id IN ({})", self.user_ids(count).join(", "))
            }
            32 => {
                let count = self.rng.random_range(2..40);
                format!(
                    "{{p}}user_id = ANY(ARRAY[{}]::int8[])",
                    self.user_ids(count).join(", ")
                )
            }
            _ => format!("{{p}}lucky @> ARRAY[{}]", self.rng.random_range(0..9)),
        };
        expand(&text, p)
    }

    fn order_predicate(&mut self, p: &str) -> String {
        let data = self.data;
        let text = match self.rng.random_range(0..8) {
            0 => format!("{{p}}amount > {}", self.sample(&data.amounts)),
            1 => format!("{{p}}status = {}", quote(self.pick(STATUSES))),
            2 => "{p}status IS NULL".into(),
            3 => format!("{{p}}placed < {}", self.sample(&data.created)),
            4 => format!("{{p}}order_id % {} = 1", self.rng.random_range(2..9)),
            5 => format!("{{p}}status IN ('paid', {})", quote(self.pick(STATUSES))),
            6 => {
                let count = self.rng.random_range(2..30);
                format!("{{p}}user_id IN ({})", self.user_ids(count).join(", "))
            }
            _ => format!(
                "{{p}}amount BETWEEN {} AND {}",
                self.rng.random_range(0..200),
                self.rng.random_range(200..500)
            ),
        };
        expand(&text, p)
    }

    /// 0–3 predicates from `choose`, joined with AND/OR, as a WHERE clause.
    fn where_clause(&mut self, mut choose: impl FnMut(&mut Self) -> String) -> String {
        let count = self.rng.random_range(0..4);
        if count == 0 {
            return String::new();
        }
        let mut clause = choose(self);
        for _ in 1..count {
            let next = choose(self);
            clause = if self.chance(0.3) {
                format!("({clause}) OR ({next})")
            } else {
                format!("({clause}) AND ({next})")
            };
        }
        format!(" WHERE {clause}")
    }

    /// A sort key: `expression [ASC|DESC] [NULLS FIRST|LAST]`.
    fn sort_key(&mut self, expression: &str) -> String {
        let direction = self.pick(&["", " ASC", " DESC"]);
        let nulls = self.pick(&["", "", " NULLS FIRST", " NULLS LAST"]);
        format!("{expression}{direction}{nulls}")
    }

    fn sortable_items(&mut self, sources: &[&Source], count: usize) -> Vec<String> {
        let mut keys = Vec::new();
        while keys.len() < count {
            let source = self.pick(sources);
            let (template, kind) = self.pick(source.items);
            if kind.sortable() {
                keys.push(expand(template, source.prefix));
            }
        }
        keys
    }

    fn select_list(&mut self, sources: &[&Source]) -> Vec<String> {
        let count = self.rng.random_range(1..6);
        (0..count)
            .map(|i| {
                let source = self.pick(sources);
                let (template, kind) = self.pick(source.items);
                let item = expand(template, source.prefix);
                if kind != Kind::Star && self.chance(0.3) {
                    format!("{item} AS c{i}")
                } else {
                    item
                }
            })
            .collect()
    }

    /// `ORDER BY` (and LIMIT/OFFSET when the order is total) for rows whose
    /// unique key is `unique`.
    fn ordering(&mut self, sources: &[&Source], unique: &[&str]) -> (String, Order) {
        let roll = self.rng.random_range(0..100);
        if roll < 35 {
            return (String::new(), Order::Unordered);
        }
        let count = self.rng.random_range(0..3);
        let mut keys: Vec<String> = self
            .sortable_items(sources, count)
            .iter()
            .map(|k| self.sort_key(k))
            .collect();
        if roll < 60 {
            if keys.is_empty() {
                keys = self.sortable_items(sources, 1);
            }
            return (format!(" ORDER BY {}", keys.join(", ")), Order::Unordered);
        }
        for key in unique {
            keys.push(self.sort_key(key));
        }
        let mut clause = format!(" ORDER BY {}", keys.join(", "));
        if self.chance(0.6) {
            clause.push_str(&format!(" LIMIT {}", self.rng.random_range(0..60)));
        }
        if self.chance(0.3) {
            clause.push_str(&format!(" OFFSET {}", self.rng.random_range(0..100)));
        }
        (clause, Order::Total)
    }

    fn plain_users(&mut self) -> (String, Order) {
        let list = self.select_list(&[&USERS]);
        let filter = self.where_clause(|g| g.user_predicate(""));
        let (ordering, order) = self.ordering(&[&USERS], &["user_id"]);
        (
            format!("SELECT {} FROM users{filter}{ordering}", list.join(", ")),
            order,
        )
    }

    fn plain_orders(&mut self) -> (String, Order) {
        let orders = Source {
            prefix: "",
            items: ORDER_ITEMS,
        };
        let list = self.select_list(&[&orders]);
        let filter = self.where_clause(|g| g.order_predicate(""));
        let (ordering, order) = self.ordering(&[&orders], &["user_id", "order_id"]);
        (
            format!("SELECT {} FROM orders{filter}{ordering}", list.join(", ")),
            order,
        )
    }

    /// orders ⋈ users on the sharding key, inner or users LEFT JOIN orders.
    fn co_located_join(&mut self) -> (String, Order) {
        let users = Source {
            prefix: "u.",
            items: USER_ITEMS,
        };
        let orders = Source {
            prefix: "o.",
            items: ORDER_ITEMS,
        };
        let list = self.select_list(&[&users, &orders]);
        let (from, unique): (&str, &[&str]) = match self.rng.random_range(0..3) {
            0 => (
                "orders o JOIN users u ON o.user_id = u.user_id",
                &["o.user_id", "o.order_id"],
            ),
            1 => (
                "users u JOIN orders o ON u.user_id = o.user_id",
                &["o.user_id", "o.order_id"],
            ),
            _ => (
                "users u LEFT JOIN orders o ON o.user_id = u.user_id",
                &["u.user_id", "o.order_id"],
            ),
        };
        let filter = self.where_clause(|g| {
            if g.chance(0.5) {
                g.user_predicate("u.")
            } else {
                g.order_predicate("o.")
            }
        });
        let (ordering, order) = self.ordering(&[&users, &orders], unique);
        (
            format!("SELECT {} FROM {from}{filter}{ordering}", list.join(", ")),
            order,
        )
    }

    /// users joined with the reference table `countries`.
    fn reference_join(&mut self) -> (String, Order) {
        let users = Source {
            prefix: "u.",
            items: USER_ITEMS,
        };
        let countries = Source {
            prefix: "c.",
            items: COUNTRY_ITEMS,
        };
        let list = self.select_list(&[&users, &countries]);
        let join = self.pick(&["JOIN", "LEFT JOIN"]);
        let filter = self.where_clause(|g| {
            if g.chance(0.2) {
                format!(
                    "c.region = {}",
                    quote(g.pick(&["EU", "NA", "APAC", "LATAM"]))
                )
            } else {
                g.user_predicate("u.")
            }
        });
        let (ordering, order) = self.ordering(&[&users, &countries], &["u.user_id"]);
        (
            format!(
                "SELECT {} FROM users u {join} countries c ON c.code = u.country{filter}{ordering}",
                list.join(", ")
            ),
            order,
        )
    }

    fn distinct(&mut self) -> (String, Order) {
        let count = self.rng.random_range(1..3);
        let columns: Vec<String> = (0..count)
            .map(|_| expand(self.pick(USER_GROUPS), ""))
            .collect();
        let filter = self.where_clause(|g| g.user_predicate(""));
        if self.chance(0.5) {
            let keys: Vec<String> = columns.iter().map(|c| self.sort_key(c)).collect();
            let limit = if self.chance(0.4) {
                format!(" LIMIT {}", self.rng.random_range(1..10))
            } else {
                String::new()
            };
            (
                format!(
                    "SELECT DISTINCT {} FROM users{filter} ORDER BY {}{limit}",
                    columns.join(", "),
                    keys.join(", ")
                ),
                Order::Total,
            )
        } else {
            (
                format!("SELECT DISTINCT {} FROM users{filter}", columns.join(", ")),
                Order::Unordered,
            )
        }
    }

    /// Aggregates over users, orders, or their join, with or without GROUP BY.
    fn aggregate(&mut self) -> (String, Order) {
        // `hidden`: an aggregate for HAVING and ORDER BY that the select list may lack.
        let (from, groups, aggregates, filter, hidden): (&str, Vec<&str>, Vec<&str>, String, &str) =
            match self.rng.random_range(0..4) {
                0 | 1 => (
                    "users",
                    USER_GROUPS.to_vec(),
                    USER_AGGREGATES.to_vec(),
                    self.where_clause(|g| g.user_predicate("")),
                    "max(score)",
                ),
                2 => (
                    "orders",
                    ORDER_GROUPS.to_vec(),
                    ORDER_AGGREGATES.to_vec(),
                    self.where_clause(|g| g.order_predicate("")),
                    "sum(amount)",
                ),
                _ => {
                    let mut groups = vec!["u.country", "o.status", "u.active"];
                    groups.push("c.region");
                    let aggregates = vec![
                        "count(*)",
                        "sum(o.amount)",
                        "avg(o.amount)",
                        "max(u.score)",
                        "count(DISTINCT u.user_id)",
                        "min(o.placed)",
                    ];
                    let filter = self.where_clause(|g| g.order_predicate("o."));
                    (
                    "orders o JOIN users u ON u.user_id = o.user_id LEFT JOIN countries c ON c.code = u.country",
                    groups,
                    aggregates,
                    filter,
                    "sum(o.amount)",
                )
                }
            };
        let group_count = self.rng.random_range(0..3);
        let mut group_by: Vec<String> = Vec::new();
        while group_by.len() < group_count {
            let group = expand(self.pick(&groups), "");
            if !group_by.contains(&group) {
                group_by.push(group);
            }
        }
        let aggregate_count = self.rng.random_range(1..5);
        let chosen: Vec<String> = (0..aggregate_count)
            .map(|_| expand(self.pick(&aggregates), ""))
            .collect();
        let mut list = group_by.clone();
        list.extend(chosen.iter().cloned());
        let mut sql = format!("SELECT {} FROM {from}{filter}", list.join(", "));
        if !group_by.is_empty() {
            sql.push_str(&format!(" GROUP BY {}", group_by.join(", ")));
            if self.chance(0.3) {
                let having = match self.rng.random_range(0..4) {
                    0 => format!("count(*) > {}", self.rng.random_range(1..60)),
                    1 => format!("count(*) BETWEEN 2 AND {}", self.rng.random_range(10..400)),
                    2 => format!("{hidden} > {}", self.rng.random_range(0..2000)),
                    _ => format!("{} IS NOT NULL", chosen[0]),
                };
                sql.push_str(&format!(" HAVING {having}"));
            }
        }
        // Every group has its own grouping values, so ordering by all of them is total.
        if !group_by.is_empty() && self.chance(0.6) {
            let mut keys: Vec<String> = Vec::new();
            match self.rng.random_range(0..5) {
                0 => keys.push(self.sort_key(&chosen[0])),
                1 => keys.push(self.sort_key(hidden)),
                _ => {}
            }
            if self.chance(0.25) {
                // By position: the grouping expressions come first in the select list.
                keys.extend((1..=group_by.len()).map(|p| self.sort_key(&p.to_string())));
            } else {
                keys.extend(group_by.iter().map(|g| self.sort_key(g)));
            }
            sql.push_str(&format!(" ORDER BY {}", keys.join(", ")));
            if self.chance(0.4) {
                sql.push_str(&format!(" LIMIT {}", self.rng.random_range(1..8)));
            }
            return (sql, Order::Total);
        }
        (sql, Order::Unordered)
    }
}

/// `count` queries from `seed` over `data`'s schema and values.
pub fn generate(seed: u64, count: usize, data: &Dataset) -> Vec<DiffQuery> {
    let mut generator = Generator {
        rng: StdRng::seed_from_u64(seed ^ 0x5CA7_7E12),
        data,
    };
    (0..count)
        .map(|index| {
            let (sql, order) = match generator.rng.random_range(0..100) {
                0..=24 => generator.plain_users(),
                25..=36 => generator.plain_orders(),
                37..=61 => generator.aggregate(),
                62..=71 => generator.distinct(),
                72..=87 => generator.co_located_join(),
                _ => generator.reference_join(),
            };
            let query = DiffQuery::new(format!("generated #{index}"), &sql, order);
            if sql.contains("title") {
                // ICU-collated: the proxy may refuse to merge it, never answer wrongly.
                query.may_refuse()
            } else {
                query
            }
        })
        .collect()
}
