//! The photo feed of a photo-sharing app on a sharded cluster: the schema
//! (users and user_follow sharded by user id, photos keyed by embedded ids that
//! carry their owner's partition), deterministic demo data, and the feed itself
//! in the two steps an application runs through the proxy:
//!
//! 1. `SELECT followee_id FROM user_follow WHERE follower_id = $1` — one server;
//! 2. the photos of those users, newest first, 20 per page, the next page by
//!    keyset (`(created, photo_id) < (last row)`) — a scatter over every server
//!    that owns a followed user, merged by the proxy.
//!
//! Shared by `examples/photo_feed.rs` (against a dev cluster) and
//! `tests/tests/photo_feed.rs` (proxy against a single-Postgres reference).

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shardmap::embedded::{IdLayout, ID_EPOCH_UNIX_MS};
use shardmap::{ClusterMap, Group, KeyType, KeyValue};
use tokio_postgres::{Client, Row, SimpleQueryMessage, Statement};

/// Rows per feed page (the `LIMIT` of [`FIRST_PAGE`] and [`NEXT_PAGE`]).
pub const PAGE_SIZE: usize = 20;

pub const USERS_COLUMNS: &str = "user_id bigint PRIMARY KEY, name text NOT NULL";
pub const FOLLOWS_COLUMNS: &str =
    "follower_id bigint NOT NULL, followee_id bigint NOT NULL, PRIMARY KEY (follower_id, followee_id)";
pub const PHOTOS_COLUMNS: &str = "photo_id bigint PRIMARY KEY, user_id bigint NOT NULL, \
     created timestamptz NOT NULL, caption text NOT NULL";

/// The feed's tables and their column lists, in creation order.
pub const TABLES: [(&str, &str); 3] = [
    ("users", USERS_COLUMNS),
    ("user_follow", FOLLOWS_COLUMNS),
    ("photos", PHOTOS_COLUMNS),
];

/// Step 1: whom a user follows (routes to the follower's server).
pub const FOLLOWEES: &str = "SELECT followee_id FROM user_follow WHERE follower_id = $1";
/// Step 2, first page: `$1` is the followee ids (bigint[]).
pub const FIRST_PAGE: &str = "SELECT photo_id, user_id, created, caption FROM photos \
     WHERE user_id = ANY($1) ORDER BY created DESC, photo_id DESC LIMIT 20";
/// Step 2, next page: `$2, $3` are `created, photo_id` of the previous page's last row.
pub const NEXT_PAGE: &str = "SELECT photo_id, user_id, created, caption FROM photos \
     WHERE user_id = ANY($1) AND (created, photo_id) < ($2, $3) \
     ORDER BY created DESC, photo_id DESC LIMIT 20";

const INSERT_USER: &str =
    "INSERT INTO users (user_id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING";
const INSERT_FOLLOW: &str = "INSERT INTO user_follow (follower_id, followee_id) VALUES ($1, $2) \
     ON CONFLICT DO NOTHING";
const INSERT_PHOTO: &str = "INSERT INTO photos (photo_id, user_id, created, caption) \
     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

/// The demo photos are taken within one hour after this instant
/// (2026-01-01T00:00:00Z), so that many share a minute and the feed's
/// `photo_id` tie-break matters.
const DEMO_EPOCH_UNIX_S: u64 = 1_767_225_600;
/// Distinct minutes the demo photos fall into.
const DEMO_MINUTES: i64 = 60;
/// At most this many photos per user; the low bits of a photo id hold
/// `user_id * MAX_PHOTOS_PER_USER + n`, which keeps ids unique.
const MAX_PHOTOS_PER_USER: i64 = 8;

/// Declares the feed's tables in `map`: one co-location group `users` (bigint
/// hash), where `user_follow` follows its `follower_id` and `photos` its
/// embedded `photo_id`.
pub fn declare_tables(map: &mut ClusterMap) {
    map.declare(
        Group::hash("users", KeyType::Bigint)
            .table("users", "user_id")
            .table("user_follow", "follower_id")
            .embedded_table("photos", "photo_id"),
    );
}

/// The DDL creating the feed's tables on shard server `server` as `map` places
/// them (parents plus the leaves of the partitions it owns).
pub fn shard_ddl(map: &ClusterMap, server: &str) -> Result<Vec<String>, String> {
    let mut statements = Vec::new();
    for (table, columns) in TABLES {
        statements.extend(shardmap::ddl::create_statements(
            map, table, columns, server,
        )?);
    }
    Ok(statements)
}

/// The DDL of the same tables unpartitioned, for a single-Postgres reference.
pub fn single_server_ddl() -> Vec<String> {
    TABLES
        .iter()
        .map(|(table, columns)| format!("CREATE TABLE {table} ({columns})"))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Photo {
    pub photo_id: i64,
    pub user_id: i64,
    pub created: SystemTime,
    pub caption: String,
}

impl Photo {
    /// Photo number `n` (0..8) of `user_id`, taken at `created` (after the
    /// id epoch, 2025): its id is an embedded id of the user's partition in
    /// `map` whose time field is `created`, and whose low bits hold
    /// `user_id * 8 + n`, so ids are unique without a generator.
    pub fn new(
        map: &ClusterMap,
        user_id: i64,
        n: i64,
        created: SystemTime,
        caption: String,
    ) -> Result<Photo, String> {
        let layout = IdLayout::new(map.partitions).ok_or_else(|| {
            format!(
                "{} partitions is too many for embedded ids: use a cluster of at most {} partitions",
                map.partitions,
                shardmap::embedded::MAX_EMBEDDED_PARTITIONS
            )
        })?;
        let n_fits = (0..MAX_PHOTOS_PER_USER).contains(&n);
        let low_bits_range = 0..1_i64 << layout.low_bits();
        let low = user_id
            .checked_mul(MAX_PHOTOS_PER_USER)
            .and_then(|low| low.checked_add(n))
            .filter(|low| n_fits && low_bits_range.contains(low))
            .ok_or_else(|| {
                format!(
                    "photo {n} of user {user_id} does not fit the {} low bits of photo ids with {} partitions: \
                     use smaller user ids and at most {MAX_PHOTOS_PER_USER} photos per user",
                    layout.low_bits(),
                    map.partitions
                )
            })?;
        let unix_ms = created
            .duration_since(UNIX_EPOCH)
            .map(|since| since.as_millis())
            .unwrap_or(0);
        let millis = u64::try_from(unix_ms)
            .ok()
            .and_then(|ms| ms.checked_sub(ID_EPOCH_UNIX_MS))
            .ok_or_else(|| {
                format!(
                    "photo time {} is before the id epoch (2025-01-01)",
                    utc_text(created)
                )
            })?;
        let partition = map
            .partition_of("users", &KeyValue::Int(user_id))
            .map_err(|e| format!("partition of user {user_id}: {e}"))?;
        Ok(Photo {
            photo_id: layout.compose(partition, millis, low as u64),
            user_id,
            created,
            caption,
        })
    }

    /// Inserts this photo with `client` (kept if already there).
    pub async fn insert(&self, client: &Client) -> Result<u64, tokio_postgres::Error> {
        client
            .execute(
                INSERT_PHOTO,
                &[&self.photo_id, &self.user_id, &self.created, &self.caption],
            )
            .await
    }

    /// A row of [`FIRST_PAGE`] / [`NEXT_PAGE`].
    pub fn from_row(row: &Row) -> Result<Photo, tokio_postgres::Error> {
        Ok(Photo {
            photo_id: row.try_get(0)?,
            user_id: row.try_get(1)?,
            created: row.try_get(2)?,
            caption: row.try_get(3)?,
        })
    }

    /// The keyset position after this photo, for the next page.
    pub fn cursor(&self) -> Cursor {
        Cursor {
            created: self.created,
            photo_id: self.photo_id,
        }
    }
}

/// Where the next page starts: strictly after this `(created, photo_id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created: SystemTime,
    pub photo_id: i64,
}

/// Users, follows and photos, the same on every run for the same map and sizes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DemoData {
    pub users: Vec<(i64, String)>,
    pub follows: Vec<(i64, i64)>,
    pub photos: Vec<Photo>,
}

impl DemoData {
    /// `users`, each following `follows_per_user` others spread over all ids,
    /// and owning 1..=5 photos taken within the demo hour. Photo ids are
    /// embedded ids of the owner's partition in `map`, their time field the
    /// photo's time.
    pub fn generate(
        map: &ClusterMap,
        users: RangeInclusive<i64>,
        follows_per_user: i64,
    ) -> Result<DemoData, String> {
        let (first, last) = (*users.start(), *users.end());
        if first < 1 || last < first {
            return Err(format!(
                "demo users {first}..={last}: give positive ids, first ≤ last"
            ));
        }
        let count = last - first + 1;
        let mut data = DemoData::default();
        for user_id in users {
            data.users.push((user_id, format!("user {user_id}")));
            let mut followees = BTreeSet::new();
            for n in 0..follows_per_user {
                // Steps of 7 and 13 spread one user's followees over the whole
                // id range, hence over every server.
                let followee = first + (user_id * 7 + n * 13) % count;
                if followee != user_id {
                    followees.insert(followee);
                }
            }
            data.follows
                .extend(followees.into_iter().map(|followee| (user_id, followee)));
            for n in 0..1 + user_id % 5 {
                let minute = (user_id * 37 + n * 101) % DEMO_MINUTES;
                // Odd photos get a sub-millisecond part so that timestamps
                // round-trip with microseconds, not only whole seconds.
                let micros = if n % 2 == 1 { user_id % 7 } else { 0 };
                let created = UNIX_EPOCH
                    + Duration::from_secs(DEMO_EPOCH_UNIX_S + minute as u64 * 60)
                    + Duration::from_micros(micros as u64);
                let caption = format!("photo {n} of user {user_id}");
                data.photos
                    .push(Photo::new(map, user_id, n, created, caption)?);
            }
        }
        Ok(data)
    }

    /// The rows that live on `server` according to `map`.
    pub fn owned_by(&self, map: &ClusterMap, server: &str) -> Result<DemoData, String> {
        let owner = |table: &str, key: i64| -> Result<bool, String> {
            let partition = map
                .partition_of(table, &KeyValue::Int(key))
                .map_err(|e| format!("partition of {table} key {key}: {e}"))?;
            Ok(map.assignments[partition as usize].owner == server)
        };
        let mut owned = DemoData::default();
        for user in &self.users {
            if owner("users", user.0)? {
                owned.users.push(user.clone());
            }
        }
        for follow in &self.follows {
            if owner("user_follow", follow.0)? {
                owned.follows.push(*follow);
            }
        }
        for photo in &self.photos {
            if owner("photos", photo.photo_id)? {
                owned.photos.push(photo.clone());
            }
        }
        Ok(owned)
    }

    /// Whom `viewer` follows, in id order.
    pub fn followees(&self, viewer: i64) -> Vec<i64> {
        self.follows
            .iter()
            .filter(|(follower, _)| *follower == viewer)
            .map(|(_, followee)| *followee)
            .collect()
    }

    /// The whole feed of someone following `followees`, newest first,
    /// computed here without SQL.
    pub fn feed(&self, followees: &[i64]) -> Vec<Photo> {
        let followees: BTreeSet<i64> = followees.iter().copied().collect();
        let mut feed: Vec<Photo> = self
            .photos
            .iter()
            .filter(|p| followees.contains(&p.user_id))
            .cloned()
            .collect();
        feed.sort_by_key(|photo| std::cmp::Reverse((photo.created, photo.photo_id)));
        feed
    }

    /// Inserts these rows with `client`, one statement per row (so each names
    /// its key and routes through a proxy); rows already there are kept.
    pub async fn insert(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let insert_user = client.prepare(INSERT_USER).await?;
        for (user_id, name) in &self.users {
            client.execute(&insert_user, &[user_id, name]).await?;
        }
        let insert_follow = client.prepare(INSERT_FOLLOW).await?;
        for (follower, followee) in &self.follows {
            client
                .execute(&insert_follow, &[follower, followee])
                .await?;
        }
        let insert_photo = client.prepare(INSERT_PHOTO).await?;
        for photo in &self.photos {
            client
                .execute(
                    &insert_photo,
                    &[
                        &photo.photo_id,
                        &photo.user_id,
                        &photo.created,
                        &photo.caption,
                    ],
                )
                .await?;
        }
        Ok(())
    }
}

/// Step 1, in the extended protocol: whom `viewer` follows, in id order.
pub async fn followees(client: &Client, viewer: i64) -> Result<Vec<i64>, tokio_postgres::Error> {
    let mut ids = client
        .query(FOLLOWEES, &[&viewer])
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<Vec<i64>, _>>()?;
    ids.sort_unstable();
    Ok(ids)
}

/// The feed's two statements, prepared once per connection and reused for
/// every page (binary results, extended protocol).
pub struct FeedStatements {
    first: Statement,
    next: Statement,
}

impl FeedStatements {
    pub async fn prepare(client: &Client) -> Result<FeedStatements, tokio_postgres::Error> {
        Ok(FeedStatements {
            first: client.prepare(FIRST_PAGE).await?,
            next: client.prepare(NEXT_PAGE).await?,
        })
    }

    /// One page of the photos of `followees`: the first, or the one after `after`.
    pub async fn page(
        &self,
        client: &Client,
        followees: &[i64],
        after: Option<Cursor>,
    ) -> Result<Vec<Photo>, tokio_postgres::Error> {
        let rows = match after {
            None => client.query(&self.first, &[&followees]).await?,
            Some(cursor) => {
                client
                    .query(&self.next, &[&followees, &cursor.created, &cursor.photo_id])
                    .await?
            }
        };
        rows.iter().map(Photo::from_row).collect()
    }

    /// Every page in order until a short one, and after a short page that is
    /// not empty the page after its last row (empty when paging is right):
    /// the feed as a reader scrolls it, one empty page at the end.
    pub async fn all_pages(
        &self,
        client: &Client,
        followees: &[i64],
    ) -> Result<Vec<Vec<Photo>>, tokio_postgres::Error> {
        let mut pages: Vec<Vec<Photo>> = Vec::new();
        let mut after = None;
        loop {
            let page = self.page(client, followees, after).await?;
            let (short, empty) = (page.len() < PAGE_SIZE, page.is_empty());
            if let Some(last) = page.last() {
                after = Some(last.cursor());
            }
            pages.push(page);
            if short {
                if !empty {
                    pages.push(self.page(client, followees, after).await?);
                }
                return Ok(pages);
            }
        }
    }
}

/// A row of the feed as the simple protocol returns it: text, `None` for NULL.
pub type TextRow = Vec<Option<String>>;

/// The page statements with their values written into the SQL, for the simple
/// protocol: the followees as an array literal `'{1,2,3}'`, the keyset cursor
/// as the text the server returned for the previous page's last row.
pub fn simple_page_sql(followees: &[i64], after: Option<(&str, i64)>) -> String {
    let ids: Vec<String> = followees.iter().map(i64::to_string).collect();
    let array = format!("'{{{}}}'", ids.join(","));
    match after {
        None => FIRST_PAGE.replace("$1", &array),
        Some((created, photo_id)) => NEXT_PAGE
            .replace("$1", &array)
            .replace("$2", &quote_literal(created))
            .replace("$3", &photo_id.to_string()),
    }
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Every page in the simple protocol, like [`FeedStatements::all_pages`].
pub async fn all_pages_simple(
    client: &Client,
    followees: &[i64],
) -> Result<Vec<Vec<TextRow>>, String> {
    let mut pages: Vec<Vec<TextRow>> = Vec::new();
    let mut after: Option<(String, i64)> = None;
    loop {
        let sql = simple_page_sql(followees, after.as_ref().map(|(c, id)| (c.as_str(), *id)));
        let page = simple_rows(client, &sql).await?;
        let (short, empty) = (page.len() < PAGE_SIZE, page.is_empty());
        if let Some(last) = page.last() {
            let field = |i: usize| {
                last.get(i)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| format!("{sql}: a row without column {i}"))
            };
            let photo_id = field(0)?;
            let photo_id = photo_id
                .parse()
                .map_err(|e| format!("{sql}: photo_id {photo_id:?} is not a bigint: {e}"))?;
            after = Some((field(2)?, photo_id));
        }
        pages.push(page);
        if short {
            if let (false, Some((created, photo_id))) = (empty, &after) {
                let sql = simple_page_sql(followees, Some((created, *photo_id)));
                pages.push(simple_rows(client, &sql).await?);
            }
            return Ok(pages);
        }
    }
}

/// The rows of one simple Query, as text.
pub async fn simple_rows(client: &Client, sql: &str) -> Result<Vec<TextRow>, String> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| format!("{sql}: {}", describe_error(&e)))?;
    Ok(messages
        .iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_string))
                    .collect(),
            ),
            _ => None,
        })
        .collect())
}

/// A Postgres error with its SQLSTATE, detail and hint when the server sent
/// them (the proxy's refusals say why in the hint).
pub fn describe_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => error.to_string(),
    }
}

/// `at` as `YYYY-MM-DD HH:MM:SS.ffffff` UTC, for printing without a date library.
pub fn utc_text(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:06}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardmap::{Endpoint, Server};

    fn map() -> ClusterMap {
        let servers = (1..=3)
            .map(|i| {
                let url = format!("postgres://app@10.0.0.{i}:5432/photos");
                Server::active(&format!("pg{i}"), Endpoint::parse(&url).expect("url"))
            })
            .collect();
        let mut map = ClusterMap::new("feed", 16, servers).expect("map");
        declare_tables(&mut map);
        map.validate().expect("valid map");
        map
    }

    #[test]
    fn photos_live_with_their_owner_and_ids_are_unique() {
        let map = map();
        let data = DemoData::generate(&map, 1..=90, 16).expect("demo data");
        let mut ids = BTreeSet::new();
        for photo in &data.photos {
            assert!(
                ids.insert(photo.photo_id),
                "duplicate id {}",
                photo.photo_id
            );
            assert_eq!(
                map.partition_of("photos", &KeyValue::Int(photo.photo_id)),
                map.partition_of("users", &KeyValue::Int(photo.user_id)),
                "photo {} is not in its owner's partition",
                photo.photo_id
            );
        }
        let split: usize = map
            .servers
            .keys()
            .map(|s| data.owned_by(&map, s).expect("split").photos.len())
            .sum();
        assert_eq!(
            split,
            data.photos.len(),
            "every photo has exactly one server"
        );
    }

    #[test]
    fn feed_is_newest_first_with_ties_broken_by_id() {
        let data = DemoData::generate(&map(), 1..=90, 16).expect("demo data");
        let feed = data.feed(&data.followees(1));
        assert!(
            feed.len() > 2 * PAGE_SIZE,
            "user 1's feed spans three pages"
        );
        assert!(
            feed.windows(2).any(|w| w[0].created == w[1].created),
            "the demo data has photos taken at the same instant, so the tie-break is exercised"
        );
        for pair in feed.windows(2) {
            assert!((pair[0].created, pair[0].photo_id) > (pair[1].created, pair[1].photo_id));
        }
    }

    #[test]
    fn photo_ids_that_could_collide_are_refused() {
        let map = map();
        let at = UNIX_EPOCH + Duration::from_secs(DEMO_EPOCH_UNIX_S);
        let made = |user_id, n, created| Photo::new(&map, user_id, n, created, String::new());
        let first = made(5, 0, at).expect("photo 0 of user 5");
        let second = made(5, 1, at).expect("photo 1 of user 5");
        assert_ne!(first.photo_id, second.photo_id);
        assert!(
            made(5, MAX_PHOTOS_PER_USER, at).is_err(),
            "n past the per-user room"
        );
        assert!(made(1 << 20, 0, at).is_err(), "a user id past the low bits");
        assert!(
            made(5, 0, UNIX_EPOCH).is_err(),
            "a time before the id epoch"
        );
    }

    #[test]
    fn simple_sql_writes_values_as_literals() {
        let sql = simple_page_sql(&[3, 1], Some(("2026-01-01 00:05:00+00", 42)));
        assert!(sql.contains("user_id = ANY('{3,1}')"), "{sql}");
        assert!(
            sql.contains("(created, photo_id) < ('2026-01-01 00:05:00+00', 42)"),
            "{sql}"
        );
        assert!(!sql.contains('$'), "{sql}");
    }

    #[test]
    fn utc_text_matches_known_instants() {
        assert_eq!(utc_text(UNIX_EPOCH), "1970-01-01 00:00:00.000000");
        let demo = UNIX_EPOCH + Duration::from_secs(DEMO_EPOCH_UNIX_S) + Duration::from_micros(5);
        assert_eq!(utc_text(demo), "2026-01-01 00:00:00.000005");
        let leap_day = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723);
        assert_eq!(utc_text(leap_day), "2000-02-29 01:02:03.000000");
    }
}
