//! Login hardening with real clients against the real proxy and real
//! Postgres: failed logins delayed and then refused per source address (the
//! attacker connects from 127.0.0.2, everyone else from 127.0.0.1), the
//! counts in `/metrics`, unknown users that get the same SCRAM or md5
//! exchange and error as a wrong password, and `max_clients` per user.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use shardline_tests::{eventually, TestCluster, TestProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const CLUSTER: &str = "logins";

fn user(name: &str, password: &str) -> proxy::config::UserEntry {
    proxy::config::UserEntry {
        name: name.into(),
        password: Some(password.into()),
        ..Default::default()
    }
}

/// A TCP connection to the proxy from `source` (any 127.x address is local).
async fn connect_from(source: &str, proxy: &TestProxy) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    let local: SocketAddr = format!("{source}:0").parse().expect("source address");
    socket.bind(local).expect("bind the source address");
    socket
        .connect(proxy.addr)
        .await
        .expect("connect to the proxy")
}

/// Logs in as `user` from `source` with tokio-postgres; the connection runs
/// in the background. The error is the server's (code, message).
async fn login(
    proxy: &TestProxy,
    source: &str,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, (String, String)> {
    let stream = connect_from(source, proxy).await;
    let mut config = tokio_postgres::Config::new();
    config.user(user).dbname("postgres").password(password);
    match config.connect_raw(stream, tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Ok(client)
        }
        Err(e) => match e.as_db_error() {
            Some(db) => Err((db.code().code().to_string(), db.message().to_string())),
            None => Err(("none".into(), e.to_string())),
        },
    }
}

async fn timed_login(
    proxy: &TestProxy,
    source: &str,
    user: &str,
    password: &str,
) -> (Duration, Result<tokio_postgres::Client, (String, String)>) {
    let start = Instant::now();
    let result = login(proxy, source, user, password).await;
    (start.elapsed(), result)
}

fn metric(proxy: &TestProxy, name: &str) -> f64 {
    let body = proxy::scrape::render(std::slice::from_ref(&proxy.shared));
    shardline_tests::metric_value(&body, name)
}

async fn start_proxy(
    cluster: &TestCluster,
    configure: impl FnOnce(&mut proxy::config::ProxyConfig),
) -> TestProxy {
    TestProxy::start(cluster, CLUSTER, |c| {
        c.auth.method = proxy::auth::AuthMethod::ScramSha256;
        c.auth.users = vec![user("app", "s3cret"), user("other", "0ther")];
        configure(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_from_one_address_are_delayed_then_refused_without_slowing_others() {
    let cluster = TestCluster::start(1);
    cluster.init_map(CLUSTER, 4).await;
    let proxy = start_proxy(&cluster, |c| {
        c.auth.failure_delay_ms = 400;
        c.auth.failure_delay_max_ms = 800;
        c.auth.max_failures = 3;
        c.auth.failure_window_s = 60;
    })
    .await;
    let (baseline, good) = timed_login(&proxy, "127.0.0.1", "other", "0ther").await;
    good.expect("a correct login");

    // First failure: the base delay before the error.
    let (elapsed, result) = timed_login(&proxy, "127.0.0.2", "app", "guess1").await;
    let err = result.expect_err("a wrong password is refused");
    assert_eq!(err.0, "28P01", "{err:?}");
    assert_eq!(err.1, "password authentication failed for user \"app\"");
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");

    // Second failure: doubled. Meanwhile, correct logins from another
    // address are not held up: the delay is the failing client's only.
    let attacker = timed_login(&proxy, "127.0.0.2", "app", "guess2");
    let others = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (elapsed, result) = timed_login(&proxy, "127.0.0.1", "other", "0ther").await;
        result.expect("another user's correct login");
        elapsed
    };
    let ((attacker_elapsed, attacker_result), other_elapsed) = tokio::join!(attacker, others);
    assert_eq!(attacker_result.err().map(|e| e.0).as_deref(), Some("28P01"));
    assert!(
        attacker_elapsed >= Duration::from_millis(800),
        "{attacker_elapsed:?}"
    );
    assert!(
        other_elapsed < baseline + Duration::from_millis(300),
        "a correct login took {other_elapsed:?} during the attack (baseline {baseline:?})"
    );

    // Third failure: capped delay, and the address is now locked out.
    let (elapsed, result) = timed_login(&proxy, "127.0.0.2", "other", "guess3").await;
    assert_eq!(result.err().map(|e| e.0).as_deref(), Some("28P01"));
    assert!(elapsed >= Duration::from_millis(800), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1600), "capped: {elapsed:?}");

    // Locked out: refused at once, before authenticating, even with the
    // right password.
    let (elapsed, result) = timed_login(&proxy, "127.0.0.2", "app", "s3cret").await;
    let err = result.expect_err("a locked-out address is refused");
    assert_eq!(err.0, "28000", "{err:?}");
    assert!(
        err.1.contains("too many failed logins") && err.1.contains("try again in"),
        "{err:?}"
    );
    assert!(
        elapsed < Duration::from_millis(400),
        "refused quickly: {elapsed:?}"
    );

    // Other addresses still log in, as any user.
    let app = login(&proxy, "127.0.0.1", "app", "s3cret")
        .await
        .expect("app from another address");
    let row = app.query_one("SELECT 1 + 1", &[]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 2);

    assert_eq!(metric(&proxy, "shardline_auth_failures_total"), 3.0);
    assert_eq!(metric(&proxy, "shardline_auth_throttled_total"), 1.0);
    assert_eq!(metric(&proxy, "shardline_login_failures_total"), 4.0);
    assert_eq!(metric(&proxy, "shardline_logins_total"), 3.0);
    assert_eq!(metric(&proxy, "shardline_auth_tracked_addresses"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_login_resets_its_address() {
    let cluster = TestCluster::start(1);
    cluster.init_map(CLUSTER, 4).await;
    let proxy = start_proxy(&cluster, |c| {
        c.auth.failure_delay_ms = 0;
        c.auth.max_failures = 3;
    })
    .await;
    for round in 0..3 {
        for _ in 0..2 {
            let result = login(&proxy, "127.0.0.3", "app", "typo").await;
            assert_eq!(result.err().map(|e| e.0).as_deref(), Some("28P01"));
        }
        login(&proxy, "127.0.0.3", "app", "s3cret")
            .await
            .unwrap_or_else(|e| panic!("round {round}: a correct login after two typos: {e:?}"));
    }
    assert_eq!(metric(&proxy, "shardline_auth_failures_total"), 6.0);
    assert_eq!(metric(&proxy, "shardline_auth_throttled_total"), 0.0);
    assert_eq!(metric(&proxy, "shardline_auth_tracked_addresses"), 0.0);
}

/// What a raw SCRAM client saw: the server-first-message, and the error.
#[derive(Debug)]
struct Exchange {
    server_first: Option<String>,
    error: Option<(String, String)>,
}

impl Exchange {
    fn salt_and_iterations(&self) -> Option<(String, String)> {
        let first = self.server_first.as_deref()?;
        let field = |name: &str| {
            first
                .split(',')
                .find_map(|f| f.strip_prefix(name))
                .map(String::from)
        };
        Some((field("s=")?, field("i=")?))
    }
}

async fn read_message(stream: &mut TcpStream) -> (u8, BytesMut) {
    let tag = stream.read_u8().await.expect("message tag");
    let len = stream.read_i32().await.expect("message length");
    let mut body = BytesMut::zeroed(usize::try_from(len - 4).expect("length"));
    stream.read_exact(&mut body).await.expect("message body");
    (tag, body)
}

fn error_fields(mut body: BytesMut) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    while body.has_remaining() {
        let field = body.get_u8();
        if field == 0 {
            break;
        }
        let end = body.iter().position(|&b| b == 0).expect("NUL");
        let value = String::from_utf8_lossy(&body[..end]).into_owned();
        body.advance(end + 1);
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, message)
}

fn startup(user: &str) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_i32(196_608);
    for part in ["user", user, "database", "postgres", ""] {
        body.put_slice(part.as_bytes());
        body.put_u8(0);
    }
    let mut out = BytesMut::new();
    out.put_i32(body.len() as i32 + 4);
    out.put(body);
    out
}

fn password_message(body: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(b'p');
    out.put_i32(body.len() as i32 + 4);
    out.put_slice(body);
    out
}

/// Drives a SCRAM-SHA-256 login message by message.
async fn scram_exchange(proxy: &TestProxy, user: &str, password: &str) -> Exchange {
    let stream = TcpStream::connect(proxy.addr).await.expect("connect");
    scram_exchange_on(stream, user, password).await.0
}

async fn scram_exchange_on(
    mut stream: TcpStream,
    user: &str,
    password: &str,
) -> (Exchange, TcpStream) {
    stream.write_all(&startup(user)).await.expect("startup");
    let (tag, mut body) = read_message(&mut stream).await;
    assert_eq!(
        (tag, body.get_i32()),
        (b'R', 10),
        "AuthenticationSASL first"
    );
    let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    let mut initial = BytesMut::new();
    initial.put_slice(b"SCRAM-SHA-256\0");
    initial.put_i32(client.message().len() as i32);
    initial.put_slice(client.message());
    stream
        .write_all(&password_message(&initial))
        .await
        .expect("SASLInitialResponse");
    let (tag, mut body) = read_message(&mut stream).await;
    if tag == b'E' {
        let exchange = Exchange {
            server_first: None,
            error: Some(error_fields(body)),
        };
        return (exchange, stream);
    }
    assert_eq!(
        (tag, body.get_i32()),
        (b'R', 11),
        "AuthenticationSASLContinue"
    );
    let server_first = String::from_utf8(body.to_vec()).expect("UTF-8");
    client
        .update(server_first.as_bytes())
        .expect("the client accepts the server-first-message");
    stream
        .write_all(&password_message(client.message()))
        .await
        .expect("SASLResponse");
    let (tag, body) = read_message(&mut stream).await;
    let exchange = Exchange {
        server_first: Some(server_first),
        error: (tag == b'E').then(|| error_fields(body)),
    };
    (exchange, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_scram_user_gets_the_whole_exchange_and_the_wrong_password_error() {
    let cluster = TestCluster::start(1);
    cluster.init_map(CLUSTER, 4).await;
    // No delay and no lockout: the timings compared are the exchange's own.
    let proxy = start_proxy(&cluster, |c| {
        c.auth.failure_delay_ms = 0;
        c.auth.max_failures = 0;
    })
    .await;
    let wrong = scram_exchange(&proxy, "app", "nope").await;
    let ghost = scram_exchange(&proxy, "ghost", "nope").await;
    let ghost_again = scram_exchange(&proxy, "ghost", "other").await;
    let phantom = scram_exchange(&proxy, "phantom", "nope").await;
    for (name, exchange) in [("app", &wrong), ("ghost", &ghost), ("phantom", &phantom)] {
        assert!(
            exchange.server_first.is_some(),
            "{name}: the server-first-message came: {exchange:?}"
        );
        assert_eq!(
            exchange.error,
            Some((
                "28P01".to_string(),
                format!("password authentication failed for user \"{name}\"")
            )),
            "{name}"
        );
    }
    let (wrong_salt, wrong_iterations) = wrong.salt_and_iterations().expect("app's salt");
    let (ghost_salt, ghost_iterations) = ghost.salt_and_iterations().expect("ghost's salt");
    assert_eq!(ghost_iterations, wrong_iterations, "same iteration count");
    assert_eq!(
        ghost_salt.len(),
        wrong_salt.len(),
        "a salt as long as a real one"
    );
    assert_eq!(
        ghost_again.salt_and_iterations().map(|s| s.0),
        Some(ghost_salt.clone()),
        "the same unknown name sees the same salt each time"
    );
    assert_ne!(phantom.salt_and_iterations().map(|s| s.0), Some(ghost_salt));

    // psql says the same for both (PGPASSWORD, as an operator would).
    let psql = |user: &str| {
        let output = std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &proxy.addr.port().to_string(),
                "-U",
                user,
                "-d",
                "postgres",
                "-w",
                "-c",
                "SELECT 1",
            ])
            .env("PGPASSWORD", "nope")
            .env_remove("PGSERVICE")
            .output()
            .expect("run psql");
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).replace(user, "USER")
    };
    let (known, unknown) = (psql("app"), psql("ghost"));
    assert!(
        known.contains("password authentication failed for user \"USER\""),
        "{known}"
    );
    assert_eq!(known, unknown);

    // The timing does not tell them apart either: the same work on the
    // proxy (the client's PBKDF2 runs with the same iteration count).
    // Interleaved, so a slower moment of the machine hits both alike.
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for _ in 0..9 {
        for (user, times) in [("app", &mut known), ("ghost", &mut unknown)] {
            let start = Instant::now();
            let exchange = scram_exchange(&proxy, user, "nope").await;
            assert!(exchange.error.is_some());
            times.push(start.elapsed());
        }
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let (known, unknown) = (median(&mut known), median(&mut unknown));
    eprintln!("median failed SCRAM login: known user {known:?}, unknown user {unknown:?}");
    let gap = known.abs_diff(unknown);
    assert!(
        gap < Duration::from_millis(30) + known / 4,
        "median login time: known user {known:?}, unknown {unknown:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_md5_user_gets_a_salt_and_the_wrong_password_error() {
    let cluster = TestCluster::start(1);
    cluster.init_map(CLUSTER, 4).await;
    let proxy = start_proxy(&cluster, |c| {
        c.auth.method = proxy::auth::AuthMethod::Md5;
        c.auth.failure_delay_ms = 0;
    })
    .await;
    for user in ["app", "ghost"] {
        let mut stream = TcpStream::connect(proxy.addr).await.expect("connect");
        stream.write_all(&startup(user)).await.expect("startup");
        let (tag, mut body) = read_message(&mut stream).await;
        assert_eq!((tag, body.get_i32()), (b'R', 5), "{user}: an md5 challenge");
        assert_eq!(body.len(), 4, "{user}: a four-byte salt");
        let salt: [u8; 4] = body[..].try_into().expect("salt");
        let answer = postgres_protocol::authentication::md5_hash(user.as_bytes(), b"nope", salt);
        let mut message = answer.into_bytes();
        message.push(0);
        stream
            .write_all(&password_message(&message))
            .await
            .expect("password");
        let (tag, body) = read_message(&mut stream).await;
        assert_eq!(tag, b'E');
        assert_eq!(
            error_fields(body),
            (
                "28P01".to_string(),
                format!("password authentication failed for user \"{user}\"")
            )
        );
    }
    login(&proxy, "127.0.0.1", "app", "s3cret")
        .await
        .expect("md5 login with the right password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_per_user_is_enforced_and_a_slot_frees_on_disconnect() {
    let cluster = TestCluster::start(1);
    cluster.init_map(CLUSTER, 4).await;
    let proxy = start_proxy(&cluster, |c| {
        c.auth.max_clients_per_user = Some(3);
        c.auth.users[0].max_clients = Some(2);
    })
    .await;
    let first = login(&proxy, "127.0.0.1", "app", "s3cret")
        .await
        .expect("app's first client");
    let second = login(&proxy, "127.0.0.1", "app", "s3cret")
        .await
        .expect("app's second client");
    let err = login(&proxy, "127.0.0.1", "app", "s3cret")
        .await
        .expect_err("app's third client is refused");
    assert_eq!(
        err,
        (
            "53300".to_string(),
            "too many connections for role \"app\"".to_string()
        )
    );
    // A wrong password is told as such, not as the limit: the limit is
    // checked only after authenticating.
    let err = login(&proxy, "127.0.0.1", "app", "wrong")
        .await
        .expect_err("wrong password");
    assert_eq!(err.0, "28P01");
    // The default limit for other users is 3.
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(
            login(&proxy, "127.0.0.1", "other", "0ther")
                .await
                .expect("other's clients"),
        );
    }
    let err = login(&proxy, "127.0.0.1", "other", "0ther")
        .await
        .expect_err("other's fourth client is refused");
    assert_eq!(err.0, "53300");
    for client in &others {
        client.simple_query("SELECT 1").await.expect("still served");
    }

    // A client that leaves gives its slot back.
    drop(first);
    let freed = eventually(Duration::from_secs(5), || {
        let logins = proxy.shared.logins.clone();
        async move { logins.user_clients("app") == 1 }
    })
    .await;
    assert!(freed, "app's slot was not given back");
    let third = login(&proxy, "127.0.0.1", "app", "s3cret")
        .await
        .expect("a slot freed by a disconnect is reused");
    third.simple_query("SELECT 1").await.expect("served");

    // So does one whose connection is reset mid-query, without a Terminate.
    drop(second);
    let stream = connect_from("127.0.0.1", &proxy).await;
    let (exchange, mut raw) = scram_exchange_on(stream, "app", "s3cret").await;
    assert_eq!(exchange.error, None, "raw login");
    loop {
        let (tag, _) = read_message(&mut raw).await;
        if tag == b'Z' {
            break;
        }
    }
    let query = b"SELECT pg_sleep(1)\0";
    let mut message = BytesMut::new();
    message.put_u8(b'Q');
    message.put_i32(query.len() as i32 + 4);
    message.put_slice(query);
    raw.write_all(&message).await.expect("query");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A zero linger resets the connection at once, it does not block.
    #[allow(deprecated)]
    raw.set_linger(Some(Duration::ZERO))
        .expect("linger 0: reset on close");
    drop(raw);
    drop(others);
    let all_freed = eventually(Duration::from_secs(10), || {
        let logins = proxy.shared.logins.clone();
        async move { logins.user_clients("app") == 1 && logins.user_clients("other") == 0 }
    })
    .await;
    assert!(all_freed, "slots were not given back");
}
