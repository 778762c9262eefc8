//! The proxy's hand-written wire codec against pgwire's `messages` module, on
//! the client requests the proxy sees most.
//!
//! Two requests, as pgbench -M extended / drivers send them:
//! - extended: Parse(unnamed, 1 parameter type) + Bind(2 text parameters) +
//!   Describe(portal) + Execute + Sync;
//! - prepared: Bind(named statement) + Execute + Sync.
//!
//! Four paths over the same bytes, each starting from the request copied into
//! a reused read buffer (as a socket read does) and reading the key parameter
//! (Bind's first) as routing does:
//! - proxy decode: `proxy::wire::next_frame` cuts frames, `Parse::decode`,
//!   `Bind::decode`, `Target::decode`, `decode_execute_portal` decode them
//!   (the proxy's own code, linked from the `proxy` crate);
//! - pgwire decode: `PgWireFrontendMessage::decode` on the read buffer;
//! - proxy forward: proxy decode, then every `frame.raw` appended to an
//!   output buffer (what `Plan::send` does);
//! - pgwire forward: pgwire decode, then every message encoded again into an
//!   output buffer (pgwire keeps no raw bytes to forward).
//!
//! Decoded messages go into a reused `Vec` in every path, so only the codecs'
//! own allocations are counted. Allocations are counted by a global allocator
//! wrapping mimalloc (the proxy binary's allocator), in a separate pass so the
//! timed passes pay only a relaxed load per allocation.
//!
//! Usage: codec-bench [REQUESTS_PER_REPETITION] [REPETITIONS]

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use bytes::{BufMut, BytesMut};
use mimalloc::MiMalloc;
use pgwire::messages::{DecodeContext, PgWireFrontendMessage, ProtocolVersion};
use proxy::wire::frame::{next_frame, Frame, DEFAULT_MAX_MESSAGE};
use proxy::wire::messages::{decode_execute_portal, Bind, Parse, Target};

// ------------------------------------------------------------ allocation count

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

fn count() {
    if COUNTING.load(Relaxed) {
        ALLOCATIONS.fetch_add(1, Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        MiMalloc.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        MiMalloc.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        MiMalloc.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        MiMalloc.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ------------------------------------------------------------------ requests

const QUERY: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = $1";
const KEY: &[u8] = b"12345678";
const OTHER: &[u8] = b"87654321";

/// Appends one tagged message whose body `body` writes.
fn message(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    out.push(tag);
    let start = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

fn bind(out: &mut Vec<u8>, statement: &str) {
    message(out, b'B', |b| {
        b.put_u8(0); // unnamed portal
        b.put_slice(statement.as_bytes());
        b.put_u8(0);
        b.put_i16(0); // parameter formats: all text
        b.put_i16(2);
        for value in [KEY, OTHER] {
            b.put_i32(value.len() as i32);
            b.put_slice(value);
        }
        b.put_i16(1); // result formats: one, text (as libpq sends)
        b.put_i16(0);
    });
}

fn execute_sync(out: &mut Vec<u8>) {
    message(out, b'E', |b| {
        b.put_u8(0);
        b.put_i32(0);
    });
    message(out, b'S', |_| {});
}

/// Parse + Bind + Describe(portal) + Execute + Sync, all unnamed.
fn extended_request() -> Vec<u8> {
    let mut out = Vec::new();
    message(&mut out, b'P', |b| {
        b.put_u8(0);
        b.put_slice(QUERY.as_bytes());
        b.put_u8(0);
        b.put_i16(1);
        b.put_u32(20); // int8
    });
    bind(&mut out, "");
    message(&mut out, b'D', |b| b.put_slice(b"P\0"));
    execute_sync(&mut out);
    out
}

/// Bind of a named statement + Execute + Sync.
fn prepared_request() -> Vec<u8> {
    let mut out = Vec::new();
    bind(&mut out, "P_0");
    execute_sync(&mut out);
    out
}

// -------------------------------------------------------------- proxy path

/// What the session keeps of each message (as `session::extended::Item`).
#[allow(dead_code)]
enum Item {
    Parse(Frame, Parse),
    Bind(Frame, Bind),
    Describe(Frame, Target),
    Execute(Frame, String),
    Sync(Frame),
}

impl Item {
    fn frame(&self) -> &Frame {
        match self {
            Item::Parse(f, _)
            | Item::Bind(f, _)
            | Item::Describe(f, _)
            | Item::Execute(f, _)
            | Item::Sync(f) => f,
        }
    }
}

struct ProxyPath {
    read_buf: BytesMut,
    items: Vec<Item>,
    out: BytesMut,
}

impl ProxyPath {
    fn new() -> ProxyPath {
        ProxyPath {
            read_buf: BytesMut::with_capacity(8192),
            items: Vec::with_capacity(16),
            out: BytesMut::with_capacity(8192),
        }
    }

    /// Frames and decodes `request`; returns the key parameter's length.
    fn decode(&mut self, request: &[u8]) -> usize {
        self.read_buf.extend_from_slice(request);
        while let Some(frame) = next_frame(&mut self.read_buf, DEFAULT_MAX_MESSAGE).expect("frame")
        {
            let body = frame.body();
            let item = match frame.tag {
                b'P' => Item::Parse(frame, Parse::decode(body).expect("Parse")),
                b'B' => Item::Bind(frame, Bind::decode(body).expect("Bind")),
                b'D' => Item::Describe(frame, Target::decode(body, "Describe").expect("Describe")),
                b'E' => Item::Execute(frame, decode_execute_portal(body).expect("Execute")),
                _ => Item::Sync(frame),
            };
            self.items.push(item);
        }
        let mut key_len = 0;
        for item in &self.items {
            if let Item::Bind(_, bind) = item {
                let key = bind.params[0].as_deref().expect("key not NULL");
                key_len = black_box(key).len();
            }
        }
        key_len
    }

    fn forward(&mut self) {
        for item in &self.items {
            self.out.extend_from_slice(&item.frame().raw);
        }
        black_box(&self.out);
    }

    fn finish(&mut self) {
        black_box(&self.items);
        self.items.clear();
        self.out.clear();
    }
}

// ------------------------------------------------------------- pgwire path

struct PgwirePath {
    ctx: DecodeContext,
    read_buf: BytesMut,
    items: Vec<PgWireFrontendMessage>,
    out: BytesMut,
}

fn ready_context() -> DecodeContext {
    let mut ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_0);
    ctx.awaiting_frontend_ssl = false;
    ctx.awaiting_frontend_startup = false;
    ctx
}

impl PgwirePath {
    fn new() -> PgwirePath {
        PgwirePath {
            ctx: ready_context(),
            read_buf: BytesMut::with_capacity(8192),
            items: Vec::with_capacity(16),
            out: BytesMut::with_capacity(8192),
        }
    }

    fn decode(&mut self, request: &[u8]) -> usize {
        self.read_buf.extend_from_slice(request);
        while let Some(message) =
            PgWireFrontendMessage::decode(&mut self.read_buf, &self.ctx).expect("pgwire decode")
        {
            self.items.push(message);
            if self.read_buf.is_empty() {
                break;
            }
        }
        let mut key_len = 0;
        for item in &self.items {
            if let PgWireFrontendMessage::Bind(bind) = item {
                let key = bind.parameters[0].as_deref().expect("key not NULL");
                key_len = black_box(key).len();
            }
        }
        key_len
    }

    fn forward(&mut self) {
        for item in &self.items {
            item.encode(&mut self.out).expect("pgwire encode");
        }
        black_box(&self.out);
    }

    fn finish(&mut self) {
        black_box(&self.items);
        self.items.clear();
        self.out.clear();
    }
}

// ------------------------------------------------------------------ harness

#[derive(Clone, Copy)]
enum Path {
    ProxyDecode,
    PgwireDecode,
    ProxyForward,
    PgwireForward,
}

const PATHS: [(Path, &str); 4] = [
    (Path::ProxyDecode, "proxy: frame + decode"),
    (Path::PgwireDecode, "pgwire: decode"),
    (Path::ProxyForward, "proxy: frame + decode + copy raw"),
    (Path::PgwireForward, "pgwire: decode + re-encode"),
];

struct State {
    proxy: ProxyPath,
    pgwire: PgwirePath,
}

/// Runs `n` requests on `path`; returns the elapsed nanoseconds.
fn run(state: &mut State, path: Path, request: &[u8], n: u64) -> f64 {
    let start = Instant::now();
    let mut check = 0usize;
    match path {
        Path::ProxyDecode => {
            for _ in 0..n {
                check += state.proxy.decode(black_box(request));
                state.proxy.finish();
            }
        }
        Path::ProxyForward => {
            for _ in 0..n {
                check += state.proxy.decode(black_box(request));
                state.proxy.forward();
                state.proxy.finish();
            }
        }
        Path::PgwireDecode => {
            for _ in 0..n {
                check += state.pgwire.decode(black_box(request));
                state.pgwire.finish();
            }
        }
        Path::PgwireForward => {
            for _ in 0..n {
                check += state.pgwire.decode(black_box(request));
                state.pgwire.forward();
                state.pgwire.finish();
            }
        }
    }
    let elapsed = start.elapsed().as_nanos() as f64;
    assert_eq!(black_box(check), KEY.len() * n as usize);
    elapsed
}

fn allocations(state: &mut State, path: Path, request: &[u8], n: u64) -> f64 {
    ALLOCATIONS.store(0, Relaxed);
    COUNTING.store(true, Relaxed);
    run(state, path, request, n);
    COUNTING.store(false, Relaxed);
    ALLOCATIONS.load(Relaxed) as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Checks that every path sees the same key and forwards the request's bytes.
fn check_paths(state: &mut State, request: &[u8]) -> bool {
    state.proxy.decode(request);
    state.proxy.forward();
    assert_eq!(
        &state.proxy.out[..],
        request,
        "proxy forwards the bytes as received"
    );
    let proxy_key = state.proxy.items.iter().find_map(|i| match i {
        Item::Bind(_, b) => b.params[0].clone(),
        _ => None,
    });
    state.proxy.finish();
    state.pgwire.decode(request);
    state.pgwire.forward();
    let identical = &state.pgwire.out[..] == request;
    let pgwire_key = state.pgwire.items.iter().find_map(|i| match i {
        PgWireFrontendMessage::Bind(b) => b.parameters[0].clone(),
        _ => None,
    });
    state.pgwire.finish();
    assert_eq!(proxy_key.as_deref(), Some(KEY));
    assert_eq!(pgwire_key.as_deref(), Some(KEY));
    identical
}

// ------------------------------------------------------- malformed requests

/// What each decoder makes of a malformed request.
fn malformed() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("Bind parameter length 12 > message, then Execute+Sync", {
            let mut r = Vec::new();
            message(&mut r, b'B', |b| {
                b.put_slice(b"\0\0");
                b.put_i16(0);
                b.put_i16(1);
                b.put_i32(12);
                b.put_slice(b"42");
                b.put_i16(0);
            });
            execute_sync(&mut r);
            r
        }),
        ("Bind parameter length 1000 > message, then Execute+Sync", {
            let mut r = Vec::new();
            message(&mut r, b'B', |b| {
                b.put_slice(b"\0\0");
                b.put_i16(0);
                b.put_i16(1);
                b.put_i32(1000);
                b.put_slice(b"42");
                b.put_i16(0);
            });
            execute_sync(&mut r);
            r
        }),
        ("Bind parameter length -2", {
            let mut r = Vec::new();
            message(&mut r, b'B', |b| {
                b.put_slice(b"\0\0");
                b.put_i16(0);
                b.put_i16(1);
                b.put_i32(-2);
                b.put_i16(0);
            });
            r
        }),
        (
            "Bind body cut short (2 bytes), last in buffer",
            b"B\0\0\0\x06\0\0".to_vec(),
        ),
        ("Parse query not UTF-8", {
            let mut r = Vec::new();
            message(&mut r, b'P', |b| {
                b.put_slice(b"\0SELECT '\xff'\0");
                b.put_i16(0);
            });
            r
        }),
        ("Execute with 3 stray bytes in its length, then Sync", {
            let mut r = Vec::new();
            message(&mut r, b'E', |b| {
                b.put_u8(0);
                b.put_i32(0);
                b.put_slice(b"xyz");
            });
            message(&mut r, b'S', |_| {});
            r
        }),
    ];
    println!();
    println!("malformed requests (error = refused; ok = accepted as shown):");
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for (name, bytes) in cases {
        println!("  {name}");
        println!("    proxy : {}", proxy_outcome(&bytes));
        println!("    pgwire: {}", pgwire_outcome(&bytes));
    }
    std::panic::set_hook(hook);
}

fn proxy_outcome(bytes: &[u8]) -> String {
    let mut buf = BytesMut::from(bytes);
    let mut seen = Vec::new();
    loop {
        let frame = match next_frame(&mut buf, DEFAULT_MAX_MESSAGE) {
            Ok(Some(frame)) => frame,
            Ok(None) if buf.is_empty() => return format!("ok: {}", seen.join(" ")),
            Ok(None) => return format!("waits for more bytes after {}", seen.join(" ")),
            Err(e) => return format!("error: {e}"),
        };
        let body = frame.body();
        let result = match frame.tag {
            b'P' => Parse::decode(body).map(|p| format!("Parse({:?})", p.query())),
            b'B' => Bind::decode(body).map(|b| format!("Bind(params={:?})", b.params)),
            b'E' => decode_execute_portal(body).map(|p| format!("Execute({p:?})")),
            b'S' => Ok("Sync".to_string()),
            t => Ok(format!("{:?}", char::from(t))),
        };
        match result {
            Ok(s) => seen.push(s),
            Err(e) => return format!("error: {e}"),
        }
    }
}

fn pgwire_outcome(bytes: &[u8]) -> String {
    let ctx = ready_context();
    let mut buf = BytesMut::from(bytes);
    let mut seen = Vec::new();
    let result = catch_unwind(AssertUnwindSafe(|| loop {
        if buf.is_empty() {
            return Ok(());
        }
        match PgWireFrontendMessage::decode(&mut buf, &ctx) {
            Ok(Some(m)) => seen.push(summary(&m)),
            Ok(None) => return Err(format!("waits for more bytes ({} left)", buf.len())),
            Err(e) => return Err(format!("error: {e}")),
        }
    }));
    let seen = seen.join(" ");
    match result {
        Ok(Ok(())) => format!("ok: {seen}"),
        Ok(Err(e)) if seen.is_empty() => e,
        Ok(Err(e)) => format!("ok: {seen}, then {e}"),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("?");
            if seen.is_empty() {
                format!("PANIC: {msg}")
            } else {
                format!("ok: {seen}, then PANIC: {msg}")
            }
        }
    }
}

fn summary(m: &PgWireFrontendMessage) -> String {
    match m {
        PgWireFrontendMessage::Parse(p) => format!("Parse({:?})", p.query),
        PgWireFrontendMessage::Bind(b) => format!("Bind(params={:?})", b.parameters),
        PgWireFrontendMessage::Execute(e) => format!("Execute({:?})", e.name),
        PgWireFrontendMessage::Sync(_) => "Sync".to_string(),
        other => {
            let s = format!("{other:?}");
            s.chars().take(60).collect()
        }
    }
}

// --------------------------------------------------------------------- main

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .map_or(2_000_000, |a| a.parse().expect("REQUESTS"));
    let reps: usize = args.next().map_or(5, |a| a.parse().expect("REPETITIONS"));
    let requests = [
        (
            "extended: Parse+Bind+Describe+Execute+Sync",
            extended_request(),
        ),
        ("prepared: Bind+Execute+Sync", prepared_request()),
    ];
    let mut state = State {
        proxy: ProxyPath::new(),
        pgwire: PgwirePath::new(),
    };

    let mut identical = Vec::new();
    for (_, request) in &requests {
        identical.push(check_paths(&mut state, request));
    }
    // Warm-up, then allocation counts (steady state).
    let mut allocs = vec![[0.0; 4]; requests.len()];
    for (r, (_, request)) in requests.iter().enumerate() {
        for (p, (path, _)) in PATHS.iter().enumerate() {
            run(&mut state, *path, request, (n / 10).max(1000));
            allocs[r][p] = allocations(&mut state, *path, request, 100_000);
        }
    }
    // Repetitions interleave every path, so machine noise spreads evenly.
    let mut samples = vec![vec![Vec::new(); 4]; requests.len()];
    for _ in 0..reps {
        for (r, (_, request)) in requests.iter().enumerate() {
            for (p, (path, _)) in PATHS.iter().enumerate() {
                samples[r][p].push(run(&mut state, *path, request, n) / n as f64);
            }
        }
    }

    println!(
        "{n} requests x {reps} repetitions per path; median ns/request (min-max); \
         allocations/request counted over 100000 requests (mimalloc underneath)"
    );
    for (r, (name, request)) in requests.iter().enumerate() {
        let ns: Vec<f64> = samples[r].iter().map(|s| median(s.clone())).collect();
        let range = |s: &[f64]| {
            let min = s.iter().copied().fold(f64::INFINITY, f64::min);
            let max = s.iter().copied().fold(0.0, f64::max);
            format!("{min:.0}-{max:.0}")
        };
        println!();
        println!("{name} ({} bytes)", request.len());
        println!(
            "  {:<34} {:>8} {:>10} {:>11} {:>13}",
            "path", "ns/req", "(min-max)", "allocs/req", "pgwire/proxy"
        );
        for (p, (_, label)) in PATHS.iter().enumerate() {
            // pgwire rows compare with the proxy row above them.
            let ratio = if p % 2 == 1 {
                format!("{:.2}x", ns[p] / ns[p - 1])
            } else {
                String::new()
            };
            println!(
                "  {:<34} {:>8.1} {:>10} {:>11.1} {:>13}",
                label,
                ns[p],
                range(&samples[r][p]),
                allocs[r][p],
                ratio
            );
        }
        println!(
            "  pgwire re-encoding reproduces the received bytes: {}",
            if identical[r] { "yes" } else { "no" }
        );
    }
    malformed();
}
