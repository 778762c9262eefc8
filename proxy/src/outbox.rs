//! Sends gathered over one pass of a serving thread's event loop and made
//! together, in one `io_uring_enter`.
//!
//! Why: where the proxy shares its cores with Postgres and the clients,
//! each send wakes the process it is for, and that process often preempts
//! the proxy as the send returns — a context switch per send. Sent
//! together, a pass's sends wake all their receivers from one system call,
//! and the proxy is preempted once at most (docs/PERFORMANCE.md, "Sends
//! gathered per pass").
//!
//! How: a connection's bytes are copied into its thread's gather and the
//! writer goes on at once. A flusher task, woken by the first send of a
//! pass, runs after the tasks already queued (the rest of the pass) and
//! sends everything. Each connection's [`Outbox`] holds a duplicate of its
//! socket's descriptor: bytes still gathered when the connection is dropped
//! are sent before the socket closes, and never to a descriptor number
//! reused meanwhile. What the kernel does not take at once (a receiver that
//! does not read) is written by a drain task as the socket drains; the
//! connection's later bytes queue behind it, and its writer waits while
//! that backlog is above `BACKLOG_LIMIT`. A failed send shuts the socket
//! down, so that the connection's next read fails, and its next send
//! returns the error.
//!
//! A socket belongs to the event loop of the thread that opened it, so the
//! gather is the thread's (a thread-local, like tokio's own context), and
//! only current-thread runtimes gather. Without io_uring (an older kernel,
//! a seccomp profile that forbids it, `kernel.io_uring_disabled`)
//! connections get no outbox and write directly, as they do over TLS.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Sends made by one `io_uring_enter` at most; a pass with more makes more.
const RING_ENTRIES: u32 = 128;
/// A writer waits while its connection has this much the kernel has not
/// taken: a client that does not read cannot make the proxy buffer without
/// bound.
const BACKLOG_LIMIT: usize = 256 * 1024;
/// A send buffer bigger than this after a pass is freed, not kept.
const KEEP_BUFFER: usize = 64 * 1024;
/// Send buffers kept for the next pass.
const SPARE_BUFFERS: usize = 64;
/// How long bytes left behind by a dropped connection may wait for a
/// receiver that does not read before the socket is shut down.
const ABANDONED_DRAIN: Duration = Duration::from_secs(10);
/// How often a drain task waiting for room looks whether its connection
/// was dropped meanwhile.
const DRAIN_CHECK: Duration = Duration::from_secs(1);

/// Sends made by gathers, all threads: an operator can see that sends are
/// gathered (`shardline_sends_gathered_total`).
static SENDS_GATHERED: AtomicU64 = AtomicU64::new(0);

/// How many gathered sends all threads made so far.
pub fn sends_gathered() -> u64 {
    SENDS_GATHERED.load(Ordering::Relaxed)
}

/// Whether this process may use io_uring (a ring can be made): where it
/// may not, connections write directly.
pub fn available() -> bool {
    new_ring().is_ok()
}

/// One connection's way out through its thread's gather.
pub struct Outbox {
    socket: Arc<Socket>,
}

struct Socket {
    /// A duplicate of the connection's descriptor (same socket).
    fd: OwnedFd,
    state: Mutex<State>,
    /// Signalled when the backlog shrinks or the socket fails.
    drained: Notify,
}

#[derive(Default)]
struct State {
    /// Bytes the kernel did not take yet, in order; the drain task writes
    /// them, and later sends queue behind them.
    backlog: Vec<u8>,
    /// The OS error of a failed send: the connection is broken.
    failed: Option<i32>,
    /// Whether bytes of this socket wait in the gather of this pass (later
    /// sends of the pass join them, so one send carries them in order).
    gathered: bool,
}

impl Socket {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the socket broken and shuts it down, so that reads on the
    /// connection's own descriptor fail too.
    fn fail(&self, state: &mut State, code: i32) {
        state.failed = Some(code);
        state.backlog = Vec::new();
        // SAFETY: shutdown on a descriptor this struct owns.
        unsafe { libc::shutdown(self.fd.as_raw_fd(), libc::SHUT_RDWR) };
        self.drained.notify_waiters();
    }
}

impl Outbox {
    /// An outbox for `socket` if this thread can gather sends: it runs a
    /// current-thread tokio runtime and the kernel lets it use io_uring.
    pub fn new(socket: BorrowedFd<'_>) -> Option<Outbox> {
        if !GATHER.with(|gather| gather.borrow_mut().ready()) {
            return None;
        }
        let fd = socket.try_clone_to_owned().ok()?;
        Some(Outbox {
            socket: Arc::new(Socket {
                fd,
                state: Mutex::new(State::default()),
                drained: Notify::new(),
            }),
        })
    }

    /// Queues `bytes` to be sent at the end of this pass. Fails if an
    /// earlier send on this connection failed; waits only while the
    /// receiver leaves more than `BACKLOG_LIMIT` unread.
    pub async fn send(&self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        // Registering as a waiter takes the Notify's lock: only a writer
        // that found the backlog full does it.
        if let Some(sent) = self.try_send(bytes) {
            return sent;
        }
        loop {
            let mut drained = pin!(self.socket.drained.notified());
            drained.as_mut().enable();
            if let Some(sent) = self.try_send(bytes) {
                return sent;
            }
            drained.await;
        }
    }

    /// Queues `bytes` unless the backlog is full (`None`: wait for it to
    /// drain); the error of an earlier failed send.
    fn try_send(&self, bytes: &[u8]) -> Option<io::Result<()>> {
        let mut state = self.socket.lock();
        if let Some(code) = state.failed {
            return Some(Err(io::Error::from_raw_os_error(code)));
        }
        if state.backlog.is_empty() {
            let full =
                GATHER.with(|gather| gather.borrow_mut().push(&self.socket, &mut state, bytes));
            drop(state);
            if full {
                // A pass relaying a large result sends as it goes rather
                // than holding it all until the pass ends.
                GATHER.with(|gather| gather.borrow_mut().flush());
            }
            return Some(Ok(()));
        }
        if state.backlog.len() < BACKLOG_LIMIT {
            state.backlog.extend_from_slice(bytes);
            return Some(Ok(()));
        }
        None
    }

    /// Whether everything sent through this outbox has left it, so that
    /// dropping it and writing directly keeps the bytes in order.
    pub fn settled(&self) -> bool {
        let state = self.socket.lock();
        state.backlog.is_empty() && !state.gathered
    }
}

struct Entry {
    socket: Arc<Socket>,
    bytes: Vec<u8>,
}

/// A thread's sends of the current pass, and its ring.
#[derive(Default)]
struct Gather {
    ring: Option<IoUring>,
    /// Whether creating the ring was tried (and said why not, if it failed).
    tried: bool,
    flusher: Option<JoinHandle<()>>,
    wake: Arc<Notify>,
    entries: Vec<Entry>,
    spare: Vec<Vec<u8>>,
    results: Vec<Option<i32>>,
}

thread_local! {
    static GATHER: RefCell<Gather> = RefCell::new(Gather::default());
}

impl Gather {
    /// Whether sends can be gathered here; starts the ring and the flusher
    /// of this thread's runtime on first use.
    fn ready(&mut self) -> bool {
        let Ok(handle) = Handle::try_current() else {
            return false;
        };
        if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
            return false;
        }
        if !self.tried {
            self.tried = true;
            match new_ring() {
                Ok(ring) => self.ring = Some(ring),
                Err(e) => tracing::info!(
                    error = %e,
                    "io_uring is not available: each send is its own system call"
                ),
            }
        }
        if self.ring.is_none() {
            return false;
        }
        // A runtime that ended (tests start one after another on a thread)
        // took its flusher with it.
        let running = matches!(&self.flusher, Some(flusher) if !flusher.is_finished());
        if !running {
            self.entries.clear();
            self.wake = Arc::new(Notify::new());
            self.flusher = Some(handle.spawn(flusher(self.wake.clone())));
        }
        true
    }

    /// Adds `bytes` to the pass's sends; true when this socket's gathered
    /// bytes reached `BACKLOG_LIMIT`, so the pass should send now.
    fn push(&mut self, socket: &Arc<Socket>, state: &mut State, bytes: &[u8]) -> bool {
        if state.gathered {
            if let Some(entry) = self
                .entries
                .iter_mut()
                .rev()
                .find(|entry| Arc::ptr_eq(&entry.socket, socket))
            {
                entry.bytes.extend_from_slice(bytes);
                return entry.bytes.len() >= BACKLOG_LIMIT;
            }
        }
        let mut buffer = self.spare.pop().unwrap_or_default();
        buffer.extend_from_slice(bytes);
        self.entries.push(Entry {
            socket: socket.clone(),
            bytes: buffer,
        });
        state.gathered = true;
        if self.entries.len() == 1 {
            self.wake.notify_one();
        }
        bytes.len() >= BACKLOG_LIMIT
    }

    /// Sends every entry, up to `RING_ENTRIES` per system call.
    fn flush(&mut self) {
        let mut entries = std::mem::take(&mut self.entries);
        SENDS_GATHERED.fetch_add(entries.len() as u64, Ordering::Relaxed);
        for chunk in entries.chunks(RING_ENTRIES as usize) {
            self.results.clear();
            self.results.resize(chunk.len(), None);
            let mut lost = false;
            if let Some(ring) = self.ring.as_mut() {
                if let Err(SendAllError { error, none_taken }) =
                    send_all(ring, chunk, &mut self.results)
                {
                    // The ring goes (with any sends it still holds); the
                    // thread's later sends go one by one, through the drain
                    // task. Sends that may have been made are not made
                    // again: rather a broken connection than bytes twice.
                    if none_taken {
                        tracing::warn!(%error, "io_uring_enter failed: sending one by one from now on");
                    } else {
                        tracing::warn!(%error, "io_uring_enter failed: connections with sends in flight are closed");
                        lost = true;
                    }
                    self.ring = None;
                }
            }
            for (entry, result) in chunk.iter().zip(&self.results) {
                match (result, lost) {
                    (None, true) => {
                        let mut state = entry.socket.lock();
                        state.gathered = false;
                        entry.socket.fail(&mut state, libc::EIO);
                    }
                    _ => settle(entry, *result),
                }
            }
        }
        for entry in entries.drain(..) {
            let mut buffer = entry.bytes;
            if buffer.capacity() <= KEEP_BUFFER && self.spare.len() < SPARE_BUFFERS {
                buffer.clear();
                self.spare.push(buffer);
            }
        }
        // Keeps the larger of the two vectors' allocations for next time.
        if self.entries.capacity() < entries.capacity() {
            self.entries = entries;
        }
    }
}

fn new_ring() -> io::Result<IoUring> {
    let ring = IoUring::new(RING_ENTRIES)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if !probe.is_supported(opcode::Send::CODE) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel's io_uring has no send operation (Linux 5.6 or later has)",
        ));
    }
    Ok(ring)
}

/// Submits one send per entry and waits for all of them. MSG_DONTWAIT makes
/// each complete at once, with what the kernel took or EAGAIN. An entry
/// whose result stays None was not submitted, unless this fails.
struct SendAllError {
    error: io::Error,
    /// No send reached the kernel: the entries may go the slow way.
    none_taken: bool,
}

fn send_all(
    ring: &mut IoUring,
    chunk: &[Entry],
    results: &mut [Option<i32>],
) -> Result<(), SendAllError> {
    let mut queued = 0;
    {
        let mut submission = ring.submission();
        for (index, entry) in chunk.iter().enumerate() {
            let len = u32::try_from(entry.bytes.len()).unwrap_or(u32::MAX);
            let send = opcode::Send::new(
                types::Fd(entry.socket.fd.as_raw_fd()),
                entry.bytes.as_ptr(),
                len,
            )
            .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            .build()
            .user_data(index as u64);
            // SAFETY: the buffer and descriptor outlive the operation: this
            // function waits for every completion before it returns.
            if unsafe { submission.push(&send) }.is_err() {
                break;
            }
            queued += 1;
        }
    }
    let mut completed = 0;
    while completed < queued {
        match ring.submit_and_wait(queued - completed) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(e) => {
                // The kernel fails a call only when it took none of the
                // queued sends; if none was ever taken, nothing is in flight.
                let none_taken = completed == 0 && ring.submission().len() == queued;
                return Err(SendAllError {
                    error: e,
                    none_taken,
                });
            }
        }
        for completion in ring.completion() {
            if let Some(slot) = results.get_mut(completion.user_data() as usize) {
                *slot = Some(completion.result());
            }
            completed += 1;
        }
    }
    Ok(())
}

/// Records what the kernel did with `entry`: all sent, a backlog for the
/// drain task, or a broken socket.
fn settle(entry: &Entry, result: Option<i32>) {
    let socket = &entry.socket;
    let mut state = socket.lock();
    state.gathered = false;
    let sent = match result {
        Some(n) if n >= 0 => n as usize,
        Some(e) if e == -libc::EAGAIN || e == -libc::EINTR => 0,
        // Not submitted: the drain task sends it.
        None => 0,
        Some(e) => {
            socket.fail(&mut state, -e);
            return;
        }
    };
    if sent >= entry.bytes.len() {
        return;
    }
    let start_drain = state.backlog.is_empty();
    let rest = &entry.bytes[sent..];
    // Bytes queued behind a backlog came after it; these came before them.
    state.backlog.splice(0..0, rest.iter().copied());
    if start_drain {
        tokio::spawn(drain(socket.clone()));
    }
}

/// The duplicate descriptor, as tokio's readiness wants it.
struct DrainFd(Arc<Socket>);

impl AsRawFd for DrainFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.fd.as_raw_fd()
    }
}

/// Writes a socket's backlog as the receiver makes room.
async fn drain(socket: Arc<Socket>) {
    // SAFETY: `DrainFd` holds the `Arc` that owns the descriptor, so it
    // stays open, the same one, for the `AsyncFd`'s whole life.
    let registered =
        unsafe { AsyncFd::register_with_interest(DrainFd(socket.clone()), Interest::WRITABLE) };
    let ready = match registered.map_err(io::Error::from) {
        Ok(ready) => ready,
        Err(e) => {
            let mut state = socket.lock();
            socket.fail(&mut state, e.raw_os_error().unwrap_or(libc::EIO));
            return;
        }
    };
    let mut abandoned_at: Option<Instant> = None;
    loop {
        // Once the connection is gone, only this task holds the socket
        // (twice: here and in `ready`): a receiver that does not read does
        // not keep it longer than ABANDONED_DRAIN.
        if Arc::strong_count(&socket) <= 2 {
            let since = *abandoned_at.get_or_insert_with(Instant::now);
            if since.elapsed() >= ABANDONED_DRAIN {
                let mut state = socket.lock();
                socket.fail(&mut state, libc::ETIMEDOUT);
                return;
            }
        }
        let Ok(guard) = tokio::time::timeout(DRAIN_CHECK, ready.writable()).await else {
            continue;
        };
        let mut guard = match guard {
            Ok(guard) => guard,
            Err(e) => {
                let mut state = socket.lock();
                socket.fail(&mut state, e.raw_os_error().unwrap_or(libc::EIO));
                return;
            }
        };
        let mut state = socket.lock();
        if state.failed.is_some() || state.backlog.is_empty() {
            break;
        }
        // SAFETY: a send from a live buffer on a descriptor this task holds.
        let sent = unsafe {
            libc::send(
                socket.fd.as_raw_fd(),
                state.backlog.as_ptr().cast(),
                state.backlog.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if sent < 0 {
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::WouldBlock => {
                    drop(state);
                    guard.clear_ready();
                }
                io::ErrorKind::Interrupted => {}
                _ => {
                    socket.fail(&mut state, error.raw_os_error().unwrap_or(libc::EIO));
                    return;
                }
            }
            continue;
        }
        state.backlog.drain(..sent as usize);
        let empty = state.backlog.is_empty();
        drop(state);
        socket.drained.notify_waiters();
        if empty {
            break;
        }
    }
    socket.drained.notify_waiters();
}

/// Sends the thread's gathered bytes whenever a pass has some.
async fn flusher(wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        GATHER.with(|gather| gather.borrow_mut().flush());
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair: the proxy's end and the peer's.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (ours, theirs) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (ours.expect("connect"), theirs.expect("accept").0)
    }

    /// An outbox for `socket`, or None where the kernel refuses io_uring
    /// (then none is made: the fallback is checked and the test ends).
    fn outbox_or_fallback(socket: &TcpStream) -> Option<Outbox> {
        let outbox = Outbox::new(socket.as_fd());
        assert_eq!(
            outbox.is_some(),
            available(),
            "an outbox exactly where io_uring works"
        );
        outbox
    }

    async fn read_exactly(peer: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut got = vec![0u8; len];
        tokio::time::timeout(Duration::from_secs(10), peer.read_exact(&mut got))
            .await
            .expect("the bytes arrive")
            .expect("read");
        got
    }

    #[tokio::test]
    async fn sends_of_a_pass_reach_each_socket_in_order() {
        let mut pairs = Vec::new();
        for _ in 0..5 {
            pairs.push(pair().await);
        }
        let Some(outboxes) = pairs
            .iter()
            .map(|(ours, _)| outbox_or_fallback(ours))
            .collect::<Option<Vec<Outbox>>>()
        else {
            return;
        };
        // Three sends per socket in one pass (no await above yields): they
        // join into one send per socket, and arrive in order.
        for round in 0..3u8 {
            for (index, outbox) in outboxes.iter().enumerate() {
                outbox.send(&[index as u8, round]).await.expect("send");
            }
        }
        assert_eq!(GATHER.with(|gather| gather.borrow().entries.len()), 5);
        for (index, (_, peer)) in pairs.iter_mut().enumerate() {
            let i = index as u8;
            assert_eq!(read_exactly(peer, 6).await, vec![i, 0, i, 1, i, 2]);
        }
        assert!(outboxes.iter().all(Outbox::settled));
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_makes_a_backlog_that_drains_in_order() {
        let (ours, mut peer) = pair().await;
        let Some(outbox) = outbox_or_fallback(&ours) else {
            return;
        };
        // Far more than the socket buffers hold: the writer must wait for
        // the peer instead of buffering without bound.
        let total = 8 * BACKLOG_LIMIT;
        let writer = async {
            for chunk in 0..total / 1024 {
                outbox
                    .send(&[(chunk % 251) as u8; 1024])
                    .await
                    .expect("send");
            }
        };
        let reader = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            read_exactly(&mut peer, total).await
        };
        let ((), got) = tokio::join!(writer, reader);
        for (chunk, bytes) in got.chunks(1024).enumerate() {
            assert!(
                bytes.iter().all(|b| *b == (chunk % 251) as u8),
                "chunk {chunk} out of order"
            );
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while !outbox.settled() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the backlog drains");
    }

    #[tokio::test]
    async fn bytes_gathered_when_the_connection_is_dropped_arrive_before_the_close() {
        let (ours, mut peer) = pair().await;
        let Some(outbox) = outbox_or_fallback(&ours) else {
            return;
        };
        outbox.send(b"last words").await.expect("send");
        drop(outbox);
        drop(ours);
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut got))
            .await
            .expect("the peer sees the end")
            .expect("read");
        assert_eq!(got, b"last words");
    }

    #[tokio::test]
    async fn a_send_after_the_peer_is_gone_fails_and_so_does_the_next_read() {
        let (mut ours, peer) = pair().await;
        let Some(outbox) = outbox_or_fallback(&ours) else {
            return;
        };
        outbox.send(b"never read").await.expect("send");
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Closing with unread bytes makes the peer answer with a reset.
        drop(peer);
        let failed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if outbox.send(b"into the void").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(failed.is_ok(), "sends to a reset socket never failed");
        let mut rest = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), ours.read(&mut rest))
            .await
            .expect("the read ends");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runtime_of_many_threads_does_not_gather() {
        let (ours, _peer) = pair().await;
        assert!(Outbox::new(ours.as_fd()).is_none());
    }
}
