//! shardline's hash partitioning must put every key in exactly the partition
//! Postgres puts it in: insert keys into real `PARTITION BY HASH` tables and
//! compare each row's leaf (tableoid) with `group_partition`.

use rand::{Rng, SeedableRng};
use shardline_tests::TestCluster;
use shardmap::model::group_partition;
use shardmap::{Group, KeyType, KeyValue};

const MODULUS: u32 = 64;
const KEYS_PER_TYPE: usize = 10_000;

async fn create_hash_table(client: &tokio_postgres::Client, table: &str, sql_type: &str) {
    let mut ddl = format!("CREATE TABLE {table} (k {sql_type}) PARTITION BY HASH (k);");
    for r in 0..MODULUS {
        ddl.push_str(&format!(
            "CREATE TABLE {table}_p{r} PARTITION OF {table} FOR VALUES WITH (MODULUS {MODULUS}, REMAINDER {r});"
        ));
    }
    client
        .batch_execute(&ddl)
        .await
        .expect("create hash-partitioned table");
}

/// Reads back every row's key (as text) and leaf, and checks our partition
/// function against Postgres's choice. Returns the number of rows checked.
async fn check_agreement(client: &tokio_postgres::Client, table: &str, key_type: KeyType) -> usize {
    let group = Group::hash("g", key_type);
    let rows = client
        .query(
            &format!("SELECT k::text, tableoid::regclass::text FROM {table}"),
            &[],
        )
        .await
        .expect("read back");
    let mut mismatches = Vec::new();
    for row in &rows {
        let key_text: String = row.get(0);
        let leaf: String = row.get(1);
        let postgres_partition: u32 = leaf
            .rsplit_once("_p")
            .and_then(|(_, r)| r.parse().ok())
            .unwrap_or_else(|| panic!("unexpected leaf name {leaf}"));
        let key = key_type
            .parse_value(&key_text)
            .expect("Postgres's text form parses");
        let ours = group_partition(&group, MODULUS, &key).expect("hash never fails on a valid key");
        if ours != postgres_partition {
            mismatches.push(format!(
                "{key_text:?}: postgres {postgres_partition}, shardline {ours}"
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} {key_type} keys disagree, e.g. {:?}",
        mismatches.len(),
        rows.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    rows.len()
}

/// Asks Postgres whether each key's remainder modulo `modulus` is the one
/// shardline computes, in one query per table.
async fn check_remainders<T>(
    client: &tokio_postgres::Client,
    table: &str,
    key_type: KeyType,
    modulus: u32,
    sql_type: &str,
    keys: &[T],
) where
    T: tokio_postgres::types::ToSql + Sync + ToString,
{
    let group = Group::hash("g", key_type);
    let remainders: Vec<i32> = keys
        .iter()
        .map(|k| {
            let key = key_type.parse_value(&k.to_string()).expect("key parses");
            group_partition(&group, modulus, &key).expect("hash") as i32
        })
        .collect();
    let sql = format!(
        "SELECT count(*) FILTER (WHERE NOT satisfies_hash_partition('{table}'::regclass, {modulus}, r, k)) \
         FROM unnest($1::{sql_type}[], $2::int[]) AS t(k, r)"
    );
    let row = client
        .query_one(&sql, &[&keys, &remainders])
        .await
        .expect("satisfies_hash_partition over all keys");
    let wrong: i64 = row.get(0);
    assert_eq!(
        wrong, 0,
        "{wrong} {key_type} keys get another remainder modulo {modulus} in Postgres"
    );
}

fn random_text(rng: &mut impl Rng) -> String {
    const ALPHABET: &[char] = &[
        'a', 'Z', '0', ' ', '-', '_', 'é', 'ß', '中', '文', '😀', '\'', '"', '\\',
    ];
    let len = rng.random_range(0..40);
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_shardline_agree_on_hash_partitions() {
    let cluster = TestCluster::start(1);
    let client = cluster.connect(0).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5ead);

    // bigint: edges, small values, and the whole 64-bit range.
    create_hash_table(&client, "h_bigint", "bigint").await;
    let mut bigints: Vec<i64> = vec![
        0,
        1,
        -1,
        i64::MIN,
        i64::MAX,
        i64::from(i32::MIN),
        i64::from(i32::MAX) + 1,
    ];
    bigints.extend((0..KEYS_PER_TYPE / 2).map(|i| i as i64 - 2000));
    while bigints.len() < KEYS_PER_TYPE {
        bigints.push(rng.random());
    }
    client
        .execute(
            "INSERT INTO h_bigint SELECT unnest($1::bigint[])",
            &[&bigints],
        )
        .await
        .expect("insert bigints");

    create_hash_table(&client, "h_int", "integer").await;
    let mut ints: Vec<i32> = vec![0, 1, -1, i32::MIN, i32::MAX];
    while ints.len() < KEYS_PER_TYPE {
        ints.push(rng.random());
    }
    client
        .execute("INSERT INTO h_int SELECT unnest($1::integer[])", &[&ints])
        .await
        .expect("insert ints");

    create_hash_table(&client, "h_smallint", "smallint").await;
    let smallints: Vec<i16> = (i16::MIN..=i16::MAX).step_by(7).collect();
    client
        .execute(
            "INSERT INTO h_smallint SELECT unnest($1::smallint[])",
            &[&smallints],
        )
        .await
        .expect("insert smallints");

    create_hash_table(&client, "h_text", "text").await;
    let mut texts: Vec<String> = vec![
        String::new(),
        "a".into(),
        "user-42".into(),
        "x".repeat(1000),
    ];
    while texts.len() < KEYS_PER_TYPE {
        texts.push(random_text(&mut rng));
    }
    client
        .execute("INSERT INTO h_text SELECT unnest($1::text[])", &[&texts])
        .await
        .expect("insert texts");

    create_hash_table(&client, "h_uuid", "uuid").await;
    let mut uuids: Vec<uuid::Uuid> = vec![uuid::Uuid::nil(), uuid::Uuid::max()];
    while uuids.len() < KEYS_PER_TYPE {
        uuids.push(uuid::Uuid::from_bytes(rng.random()));
    }
    client
        .execute("INSERT INTO h_uuid SELECT unnest($1::uuid[])", &[&uuids])
        .await
        .expect("insert uuids");

    assert_eq!(
        check_agreement(&client, "h_bigint", KeyType::Bigint).await,
        KEYS_PER_TYPE
    );
    assert_eq!(
        check_agreement(&client, "h_int", KeyType::Int).await,
        KEYS_PER_TYPE
    );
    assert_eq!(
        check_agreement(&client, "h_smallint", KeyType::Smallint).await,
        smallints.len()
    );
    assert_eq!(
        check_agreement(&client, "h_text", KeyType::Text).await,
        KEYS_PER_TYPE
    );
    assert_eq!(
        check_agreement(&client, "h_uuid", KeyType::Uuid).await,
        KEYS_PER_TYPE
    );

    // MODULUS 64 exercises only the low 6 bits of the hash; clusters use up to
    // 16384 partitions. Postgres's satisfies_hash_partition() checks a key
    // against any (modulus, remainder) pair without leaf tables.
    for modulus in [1024_u32, 16384] {
        check_remainders(
            &client,
            "h_bigint",
            KeyType::Bigint,
            modulus,
            "bigint",
            &bigints,
        )
        .await;
        check_remainders(&client, "h_int", KeyType::Int, modulus, "integer", &ints).await;
        check_remainders(&client, "h_text", KeyType::Text, modulus, "text", &texts).await;
        check_remainders(&client, "h_uuid", KeyType::Uuid, modulus, "uuid", &uuids).await;
    }

    // A literal from the SQL side too: the value Postgres's own
    // satisfies_hash_partition() accepts must be the remainder we compute.
    let group = Group::hash("g", KeyType::Bigint);
    for key in [42_i64, -7, 1 << 40] {
        let ours = group_partition(&group, MODULUS, &KeyValue::Int(key)).expect("hash");
        let row = client
            .query_one(
                "SELECT satisfies_hash_partition('h_bigint'::regclass, $1::int, $2::int, $3::bigint)",
                &[&(MODULUS as i32), &(ours as i32), &key],
            )
            .await
            .expect("satisfies_hash_partition");
        assert!(row.get::<_, bool>(0), "Postgres disagrees for key {key}");
    }
}
