//! The photo feed (issue 11): a photo-sharing schema on three shard servers
//! answers the feed — whom a user follows (one server), then the photos of
//! those users newest first, 20 per page, next pages by keyset (a scatter) —
//! through the proxy exactly as one plain Postgres holding every row does.
//!
//! A fourth server of the test cluster is that reference: it is not in the map
//! and holds the same rows in unpartitioned tables. The reference is itself
//! checked first against the feed computed in memory from the demo data, so a
//! difference through the proxy is the proxy's. Both protocols are compared:
//! tokio-postgres prepared statements (extended, binary results) and simple
//! queries with the values written as literals (`= ANY('{1,2,3}')`).

use std::collections::BTreeSet;

use shardline_examples::feed::{
    self, all_pages_simple, describe_error, simple_rows, DemoData, FeedStatements, Photo, TextRow,
    PAGE_SIZE,
};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{Change, ClusterMap, KeyValue};

const CLUSTER: &str = "photo-feed";
const PARTITIONS: u32 = 16;
const SHARD_SERVERS: usize = 3;
/// Index of the single-Postgres reference in the test cluster.
const REFERENCE: usize = SHARD_SERVERS;
const USERS: i64 = 90;
const FOLLOWS_PER_USER: i64 = 16;
/// Users whose feeds are compared.
const VIEWERS: [i64; 3] = [1, 2, 45];

struct Feed {
    cluster: TestCluster,
    map: ClusterMap,
    data: DemoData,
}

impl Feed {
    /// Three shard servers with the feed's tables where the map places them,
    /// each loaded directly with the rows it owns, and the reference with all rows.
    async fn start() -> Feed {
        let cluster = TestCluster::start(SHARD_SERVERS + 1);
        let shard_servers = cluster.map_servers()[..SHARD_SERVERS].to_vec();
        let store = cluster.store(CLUSTER).await;
        let map = ClusterMap::new(CLUSTER, PARTITIONS, shard_servers).expect("valid map");
        store.initialize(map, "test").await.expect("init the map");
        let map = store
            .update("test", |map| {
                feed::declare_tables(map);
                for (table, columns) in feed::TABLES {
                    map.columns.insert(table.into(), columns.into());
                }
                Ok(Change::new("test-schema", "the photo feed's tables"))
            })
            .await
            .expect("declare the feed's tables")
            .map;
        let data = DemoData::generate(&map, 1..=USERS, FOLLOWS_PER_USER).expect("demo data");
        let feed = Feed { cluster, map, data };
        for index in 0..SHARD_SERVERS {
            let name = feed.server_name(index);
            let ddl = feed::shard_ddl(&feed.map, &name).expect("DDL of the feed's tables");
            let rows = feed
                .data
                .owned_by(&feed.map, &name)
                .expect("rows per server");
            feed.create_and_load(index, &ddl, &rows).await;
        }
        feed.create_and_load(REFERENCE, &feed::single_server_ddl(), &feed.data)
            .await;
        feed
    }

    fn server_name(&self, index: usize) -> String {
        self.cluster.cluster.servers[index].name().to_string()
    }

    async fn create_and_load(&self, index: usize, ddl: &[String], rows: &DemoData) {
        let client = self.cluster.connect(index).await;
        client
            .batch_execute(&ddl.join(";\n"))
            .await
            .unwrap_or_else(|e| panic!("creating the feed's tables on server {index}: {e}"));
        rows.insert(&client)
            .await
            .unwrap_or_else(|e| panic!("loading server {index}: {}", describe_error(&e)));
    }

    fn owner(&self, user: i64) -> String {
        let partition = self
            .map
            .partition_of("users", &KeyValue::Int(user))
            .expect("partition of a user");
        self.map.assignments[partition as usize].owner.clone()
    }
}

/// Photos in `pages`, in order.
fn ids<T>(pages: &[Vec<T>], id: impl Fn(&T) -> i64) -> Vec<i64> {
    pages.iter().flatten().map(id).collect()
}

fn text_id(row: &TextRow) -> i64 {
    row.first()
        .cloned()
        .flatten()
        .and_then(|id| id.parse().ok())
        .expect("photo_id as text is a bigint")
}

fn sorted(mut rows: Vec<TextRow>) -> Vec<TextRow> {
    rows.sort();
    rows
}

/// Fails with each page's sizes and the first page that differs.
fn assert_same_pages<T: PartialEq + std::fmt::Debug>(
    what: &str,
    through_proxy: &[Vec<T>],
    reference: &[Vec<T>],
) {
    let sizes = |pages: &[Vec<T>]| pages.iter().map(Vec::len).collect::<Vec<_>>();
    assert_eq!(
        sizes(through_proxy),
        sizes(reference),
        "{what}: page sizes through the proxy differ from the reference"
    );
    for (number, (got, want)) in through_proxy.iter().zip(reference).enumerate() {
        assert_eq!(
            got,
            want,
            "{what}: page {} differs from the reference",
            number + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_through_the_proxy_equals_one_postgres() {
    let feed = Feed::start().await;

    // Every server holds photos of every viewer's followees, so each page is
    // a merge of all three servers' rows.
    for viewer in VIEWERS {
        let followees = feed.data.followees(viewer);
        let servers: BTreeSet<String> = followees.iter().map(|u| feed.owner(*u)).collect();
        assert_eq!(
            servers.len(),
            SHARD_SERVERS,
            "user {viewer}'s followees live on {servers:?}: the demo data must spread them over every server"
        );
        for index in 0..SHARD_SERVERS {
            let stored: i64 = feed
                .cluster
                .connect(index)
                .await
                .query_one(
                    "SELECT count(*) FROM photos WHERE user_id = ANY($1)",
                    &[&followees],
                )
                .await
                .expect("count a server's photos")
                .get(0);
            assert!(
                stored > 0,
                "server {} holds no photo of user {viewer}'s followees",
                feed.server_name(index)
            );
        }
    }
    let mut stored_photos = 0_i64;
    for index in 0..SHARD_SERVERS {
        let client = feed.cluster.connect(index).await;
        let row = client
            .query_one("SELECT count(*) FROM photos", &[])
            .await
            .expect("count photos");
        stored_photos += row.get::<_, i64>(0);
    }
    assert_eq!(
        stored_photos,
        feed.data.photos.len() as i64,
        "the shard servers together hold each photo once"
    );

    let reference = feed.cluster.connect(REFERENCE).await;
    let reference_statements = FeedStatements::prepare(&reference)
        .await
        .expect("prepare on the reference");
    let proxy = TestProxy::start(&feed.cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;

    let mut failures = Vec::new();
    let mut cases = Vec::new();
    for viewer in VIEWERS {
        // Step 1: one server through the proxy, in both protocols, and the reference.
        let followees = feed::followees(&reference, viewer)
            .await
            .expect("followees on the reference");
        assert_eq!(followees, feed.data.followees(viewer));
        match feed::followees(&client, viewer).await {
            Ok(through_proxy) => assert_eq!(
                through_proxy, followees,
                "user {viewer}'s followees through the proxy"
            ),
            Err(e) => failures.push(format!(
                "user {viewer}, step 1 ({}): {}",
                feed::FOLLOWEES,
                describe_error(&e)
            )),
        }
        let step_one = feed::FOLLOWEES.replace("$1", &viewer.to_string());
        let reference_text = simple_rows(&reference, &step_one)
            .await
            .expect("step 1 on the reference");
        match simple_rows(&client, &step_one).await {
            Ok(rows) => assert_eq!(
                sorted(rows),
                sorted(reference_text),
                "user {viewer}'s followees through the proxy, simple protocol"
            ),
            Err(e) => failures.push(format!("user {viewer}, step 1, simple protocol: {e}")),
        }
        let expected = feed.data.feed(&followees);
        assert!(
            expected.len() > 2 * PAGE_SIZE && expected.len() % PAGE_SIZE != 0,
            "user {viewer}'s feed has {} photos: the demo data must give two full pages and a partial third",
            expected.len()
        );
        cases.push((format!("user {viewer}"), followees));
    }
    // Edges: nobody followed (an empty array), and followees who all live on
    // one server (the statement still reaches every server).
    cases.push(("a user following nobody".to_string(), Vec::new()));
    let first_server = feed.server_name(0);
    let on_one_server: Vec<i64> = feed
        .data
        .followees(VIEWERS[0])
        .into_iter()
        .filter(|user| feed.owner(*user) == first_server)
        .collect();
    assert!(
        !on_one_server.is_empty(),
        "user {} follows someone on {first_server}",
        VIEWERS[0]
    );
    cases.push((format!("followees all on {first_server}"), on_one_server));

    for (case, followees) in &cases {
        // Step 2, extended protocol: the reference equals the feed computed here.
        let expected = feed.data.feed(followees);
        let reference_pages = reference_statements
            .all_pages(&reference, followees)
            .await
            .expect("pages on the reference");
        let expected_pages: Vec<Vec<Photo>> = expected
            .chunks(PAGE_SIZE)
            .map(<[Photo]>::to_vec)
            .chain(std::iter::once(Vec::new()))
            .collect();
        assert_eq!(
            reference_pages, expected_pages,
            "{case}: the reference's pages are not the demo data's feed"
        );
        let servers: BTreeSet<String> = followees.iter().map(|u| feed.owner(*u)).collect();
        println!(
            "{case}: {} followees on {} servers, {} photos in pages of {:?}",
            followees.len(),
            servers.len(),
            expected.len(),
            reference_pages.iter().map(Vec::len).collect::<Vec<_>>()
        );
        match FeedStatements::prepare(&client).await {
            Ok(statements) => match statements.all_pages(&client, followees).await {
                Ok(pages) => assert_same_pages(
                    &format!("{case}, extended protocol"),
                    &pages,
                    &reference_pages,
                ),
                Err(e) => failures.push(format!(
                    "{case}, pages with prepared statements: {}",
                    describe_error(&e)
                )),
            },
            Err(e) => failures.push(format!(
                "{case}, preparing the pages through the proxy: {}",
                describe_error(&e)
            )),
        }

        // Step 2, simple protocol with literal values.
        let reference_text = all_pages_simple(&reference, followees)
            .await
            .expect("simple-protocol pages on the reference");
        assert_eq!(
            ids(&reference_text, text_id),
            ids(&reference_pages, |p| p.photo_id),
            "{case}: the reference's simple-protocol pages hold other photos than its extended ones"
        );
        match all_pages_simple(&client, followees).await {
            Ok(pages) => {
                assert_same_pages(&format!("{case}, simple protocol"), &pages, &reference_text)
            }
            Err(e) => failures.push(format!("{case}, simple protocol: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "the proxy refused or failed parts of the feed:\n  {}",
        failures.join("\n  ")
    );
}

/// Page 1 read inside a transaction that has just inserted `photo`, then
/// page 1 again after ROLLBACK.
async fn first_page_around_a_new_photo(
    client: &tokio_postgres::Client,
    followees: &[i64],
    photo: &Photo,
) -> Result<(Vec<Photo>, Vec<Photo>), String> {
    let fail = |step: &str, e: tokio_postgres::Error| format!("{step}: {}", describe_error(&e));
    let statements = FeedStatements::prepare(client)
        .await
        .map_err(|e| fail("prepare", e))?;
    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| fail("BEGIN", e))?;
    photo
        .insert(client)
        .await
        .map_err(|e| fail("insert the new photo", e))?;
    let inside = statements
        .page(client, followees, None)
        .await
        .map_err(|e| fail("page 1 inside the transaction", e))?;
    client
        .batch_execute("ROLLBACK")
        .await
        .map_err(|e| fail("ROLLBACK", e))?;
    let after = statements
        .page(client, followees, None)
        .await
        .map_err(|e| fail("page 1 after ROLLBACK", e))?;
    Ok((inside, after))
}

/// A transaction that posts a photo and then reads the feed sees the new
/// photo first — the scatter's part on the server the transaction wrote to
/// runs on the transaction's own backend — and after ROLLBACK the photo is
/// gone; as on the single-Postgres reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_read_in_a_transaction_sees_its_own_new_photo() {
    let feed = Feed::start().await;
    let reference = feed.cluster.connect(REFERENCE).await;
    let proxy = TestProxy::start(&feed.cluster, CLUSTER, |_| {}).await;
    let client = proxy.connect().await;

    let viewer = VIEWERS[0];
    let followees = feed.data.followees(viewer);
    let poster = followees[0];
    let newest = feed
        .data
        .photos
        .iter()
        .map(|photo| photo.created)
        .max()
        .expect("the demo data has photos");
    let photo = Photo::new(
        &feed.map,
        poster,
        // The poster's photos so far are numbered 0..count.
        feed.data
            .photos
            .iter()
            .filter(|p| p.user_id == poster)
            .count() as i64,
        newest + std::time::Duration::from_secs(1),
        "posted inside a transaction".to_string(),
    )
    .expect("a new photo id");

    let (inside, after) = first_page_around_a_new_photo(&reference, &followees, &photo)
        .await
        .expect("the transaction on the reference");
    assert_eq!(
        inside.first(),
        Some(&photo),
        "the reference shows the new photo first"
    );
    assert_eq!(
        inside[1..],
        after[..PAGE_SIZE - 1],
        "then the page as before"
    );
    assert!(
        !after.contains(&photo),
        "ROLLBACK removed the photo on the reference"
    );

    let through_proxy = first_page_around_a_new_photo(&client, &followees, &photo)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the transaction through the proxy, as user {poster} on {}: {e}",
                feed.owner(poster)
            )
        });
    assert_eq!(
        through_proxy.0, inside,
        "page 1 inside the transaction through the proxy differs from the reference"
    );
    assert_eq!(
        through_proxy.1, after,
        "page 1 after ROLLBACK through the proxy differs from the reference"
    );
}
