//! Extended-protocol sequences as real drivers send them, written byte by
//! byte so each case pins one shape, through the real proxy to 3 real
//! Postgres servers, with keys on every server:
//! - asyncpg prepares with Parse/Describe/Flush, then binds in a second
//!   request: the preparing request needs no particular server;
//! - pgjdbc sends BEGIN as an unnamed statement ahead of the first statement
//!   of a transaction, in the same request: each Bind binds the statement
//!   parsed last before it;
//! - psycopg pipelines several unnamed statements before one Sync;
//! - an INSERT without a column list is routed by the columns the map records;
//! - a Parse of an existing named statement fails with 42P05, and after an
//!   error in a request ended by Flush every message up to Sync is ignored.

use std::time::Duration;

use shardline_tests::fixtures::{create_table, init_schema, rows_on_every_server};
use shardline_tests::{TestCluster, TestProxy};
use shardmap::{ClusterMap, Group, KeyType, KeyValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLUSTER: &str = "extended";

/// One backend message as the tests look at it: its type, and for an
/// ErrorResponse its SQLSTATE, for CommandComplete its tag, for
/// ReadyForQuery the transaction status.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply(char, String);

fn reply(tag: char, detail: &str) -> Reply {
    Reply(tag, detail.to_string())
}

/// A client speaking the protocol directly.
struct Raw {
    stream: TcpStream,
    out: Vec<u8>,
}

fn message(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(body: &mut Vec<u8>, s: &str) {
    body.extend_from_slice(s.as_bytes());
    body.push(0);
}

impl Raw {
    async fn login(proxy: &TestProxy) -> Raw {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for s in ["user", "postgres", "database", "postgres", ""] {
            cstr(&mut body, s);
        }
        let mut startup = (body.len() as i32 + 4).to_be_bytes().to_vec();
        startup.extend_from_slice(&body);
        stream.write_all(&startup).await.expect("startup");
        let mut raw = Raw {
            stream,
            out: Vec::new(),
        };
        let replies = raw.until_ready().await;
        assert_eq!(replies.last(), Some(&reply('Z', "I")), "{replies:?}");
        raw
    }

    fn parse(&mut self, name: &str, query: &str) -> &mut Raw {
        let mut body = Vec::new();
        cstr(&mut body, name);
        cstr(&mut body, query);
        body.extend_from_slice(&0i16.to_be_bytes());
        message(&mut self.out, b'P', &body);
        self
    }

    /// Binds `statement` to the unnamed portal with text parameters.
    fn bind(&mut self, statement: &str, params: &[&str]) -> &mut Raw {
        let mut body = Vec::new();
        cstr(&mut body, "");
        cstr(&mut body, statement);
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            body.extend_from_slice(&(p.len() as i32).to_be_bytes());
            body.extend_from_slice(p.as_bytes());
        }
        body.extend_from_slice(&0i16.to_be_bytes());
        message(&mut self.out, b'B', &body);
        self
    }

    fn describe(&mut self, kind: u8, name: &str) -> &mut Raw {
        let mut body = vec![kind];
        cstr(&mut body, name);
        message(&mut self.out, b'D', &body);
        self
    }

    fn execute(&mut self) -> &mut Raw {
        let mut body = Vec::new();
        cstr(&mut body, "");
        body.extend_from_slice(&0i32.to_be_bytes());
        message(&mut self.out, b'E', &body);
        self
    }

    fn sync(&mut self) -> &mut Raw {
        message(&mut self.out, b'S', &[]);
        self
    }

    fn flush(&mut self) -> &mut Raw {
        message(&mut self.out, b'H', &[]);
        self
    }

    async fn send(&mut self) {
        let out = std::mem::take(&mut self.out);
        self.stream.write_all(&out).await.expect("send");
    }

    async fn next(&mut self) -> Reply {
        let read = async {
            let tag = self.stream.read_u8().await.expect("message type");
            let len = self.stream.read_i32().await.expect("message length");
            let mut body = vec![0u8; (len - 4).max(0) as usize];
            self.stream
                .read_exact(&mut body)
                .await
                .expect("message body");
            (tag, body)
        };
        let (tag, body) = tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("a reply within 20 s");
        let detail = match tag {
            b'E' => body
                .split(|&b| b == 0)
                .find_map(|f| f.strip_prefix(b"C"))
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .unwrap_or_default(),
            b'C' => String::from_utf8_lossy(body.split(|&b| b == 0).next().unwrap_or_default())
                .into_owned(),
            b'Z' => String::from_utf8_lossy(&body).into_owned(),
            _ => String::new(),
        };
        Reply(tag as char, detail)
    }

    /// Sends what is queued and reads replies up to ReadyForQuery.
    async fn until_ready(&mut self) -> Vec<Reply> {
        self.send().await;
        let mut replies = Vec::new();
        loop {
            let next = self.next().await;
            let done = next.0 == 'Z';
            // Notices and parameter changes are not what these tests check.
            if !matches!(next.0, 'N' | 'S' | 'K') {
                replies.push(next);
            }
            if done {
                return replies;
            }
        }
    }

    /// Sends what is queued and reads `count` replies (after a Flush).
    async fn replies(&mut self, count: usize) -> Vec<Reply> {
        self.send().await;
        let mut replies = Vec::new();
        while replies.len() < count {
            let next = self.next().await;
            if !matches!(next.0, 'N' | 'S') {
                replies.push(next);
            }
        }
        replies
    }
}

/// One user id owned by each server, in server order.
fn user_per_server(map: &ClusterMap) -> Vec<(i64, String)> {
    let mut found: Vec<(i64, String)> = Vec::new();
    for id in 1..10_000i64 {
        let partition = map
            .partition_of("notes", &KeyValue::Int(id))
            .expect("partition of a user");
        let owner = &map.assignments[partition as usize].owner;
        if !found.iter().any(|(_, server)| server == owner) {
            found.push((id, owner.clone()));
        }
        if found.len() == map.servers.len() {
            break;
        }
    }
    found.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(found.len(), map.servers.len(), "a user on every server");
    found
}

/// `(server, n)` of every notes row of `user`, read on the servers directly.
async fn notes_of(cluster: &TestCluster, user: i64) -> Vec<(String, i64)> {
    let sql = format!("SELECT n FROM notes WHERE user_id = {user} ORDER BY n");
    rows_on_every_server(cluster, &sql)
        .await
        .into_iter()
        .map(|(row, server)| (server, row.get(0)))
        .collect()
}

/// The replies to Parse, Bind, Execute and Sync of a statement that ran
/// outside a transaction with CommandComplete `tag`.
fn ran(tag: &str) -> Vec<Reply> {
    vec![
        reply('1', ""),
        reply('2', ""),
        reply('C', tag),
        reply('Z', "I"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_sequences_route_each_bind_by_its_own_statement() {
    let cluster = TestCluster::start(3);
    let columns = "user_id bigint, n bigint, PRIMARY KEY (user_id, n)";
    let (_store, map) = init_schema(&cluster, CLUSTER, 16, |map| {
        map.declare(Group::hash("users", KeyType::Bigint).table("notes", "user_id"));
        // As `shardctl table create` records them.
        map.columns.insert("notes".into(), columns.into());
    })
    .await;
    create_table(&cluster, &map, "notes", columns).await;
    let proxy = TestProxy::start(&cluster, CLUSTER, |_| {}).await;
    let users = user_per_server(&map);
    let insert = "INSERT INTO notes (user_id, n) VALUES ($1, $2)";

    for (user, owner) in &users {
        let uid = user.to_string();
        let mut c = Raw::login(&proxy).await;

        // asyncpg: prepare and describe, Flush; then bind in another request.
        c.parse("s_insert", insert)
            .describe(b'S', "s_insert")
            .flush();
        let described = c.replies(3).await;
        assert_eq!(
            described,
            vec![reply('1', ""), reply('t', ""), reply('n', "")],
            "Parse/Describe/Flush for user {user}"
        );
        c.bind("s_insert", &[&uid, "1"]).execute().sync();
        assert_eq!(
            c.until_ready().await,
            vec![reply('2', ""), reply('C', "INSERT 0 1"), reply('Z', "I")],
            "Bind/Execute/Sync of the described statement for user {user} on {owner}"
        );

        // pgjdbc: BEGIN as an unnamed statement ahead of the statement.
        c.parse("", "BEGIN").bind("", &[]).execute();
        c.parse("", insert)
            .bind("", &[&uid, "2"])
            .describe(b'P', "")
            .execute()
            .sync();
        assert_eq!(
            c.until_ready().await,
            vec![
                reply('1', ""),
                reply('2', ""),
                reply('C', "BEGIN"),
                reply('1', ""),
                reply('2', ""),
                reply('n', ""),
                reply('C', "INSERT 0 1"),
                reply('Z', "T"),
            ],
            "JDBC-style BEGIN + INSERT for user {user} on {owner}"
        );
        c.parse("", "COMMIT").bind("", &[]).execute().sync();
        assert_eq!(c.until_ready().await, ran("COMMIT"));

        // psycopg pipeline: several unnamed statements, one Sync.
        for n in 3..6 {
            c.parse("", insert)
                .bind("", &[&uid, &n.to_string()])
                .execute();
        }
        c.parse("", "SELECT count(*) FROM notes WHERE user_id = $1")
            .bind("", &[&uid])
            .execute()
            .sync();
        let piped = c.until_ready().await;
        assert_eq!(
            piped.iter().filter(|r| r.1 == "INSERT 0 1").count(),
            3,
            "{piped:?}"
        );
        assert_eq!(piped.last(), Some(&reply('Z', "I")), "{piped:?}");

        // No column list: the key's position comes from the recorded columns.
        c.parse("", "INSERT INTO notes VALUES ($1, $2)")
            .bind("", &[&uid, "6"])
            .execute()
            .sync();
        assert_eq!(c.until_ready().await, ran("INSERT 0 1"));

        assert_eq!(
            notes_of(&cluster, *user).await,
            (1..7).map(|n| (owner.clone(), n)).collect::<Vec<_>>(),
            "user {user}'s rows are all on {owner}, once"
        );
    }

    let mut c = Raw::login(&proxy).await;
    // Statements of two servers in one implicit transaction (a pipeline):
    // each runs on its server, committed together (two-phase commit).
    let ((a, owner_a), (b, owner_b)) = (&users[0], &users[1]);
    assert_ne!(
        owner_a, owner_b,
        "the first two users live on different servers"
    );
    c.parse("", insert)
        .bind("", &[&a.to_string(), "9"])
        .execute();
    c.parse("", insert)
        .bind("", &[&b.to_string(), "9"])
        .execute()
        .sync();
    let piped = c.until_ready().await;
    assert_eq!(
        piped,
        vec![
            reply('1', ""),
            reply('2', ""),
            reply('C', "INSERT 0 1"),
            reply('1', ""),
            reply('2', ""),
            reply('C', "INSERT 0 1"),
            reply('Z', "I")
        ]
    );
    assert!(notes_of(&cluster, *a).await.contains(&(owner_a.clone(), 9)));
    assert!(notes_of(&cluster, *b).await.contains(&(owner_b.clone(), 9)));

    // A named statement cannot be parsed twice (42P05), as in Postgres.
    c.parse("twice", "SELECT 1").sync();
    assert_eq!(c.until_ready().await, vec![reply('1', ""), reply('Z', "I")]);
    c.parse("twice", "SELECT 2").sync();
    assert_eq!(
        c.until_ready().await,
        vec![reply('E', "42P05"), reply('Z', "I")]
    );

    // After an error in a request ended by Flush, everything up to Sync is
    // ignored: the Bind/Execute of the failed statement gets no reply.
    c.parse("broken", "SELEC 1")
        .describe(b'S', "broken")
        .flush();
    assert_eq!(c.replies(1).await, vec![reply('E', "42601")]);
    c.bind("broken", &[]).execute().sync();
    assert_eq!(c.until_ready().await, vec![reply('Z', "I")]);
    // And the session goes on.
    c.parse("", "SELECT count(*) FROM notes WHERE user_id = $1")
        .bind("", &[&a.to_string()])
        .execute()
        .sync();
    let counted = c.until_ready().await;
    assert_eq!(
        counted,
        vec![
            reply('1', ""),
            reply('2', ""),
            reply('D', ""),
            reply('C', "SELECT 1"),
            reply('Z', "I")
        ]
    );
}
