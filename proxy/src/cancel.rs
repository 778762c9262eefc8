//! Query cancellation: each client gets a made-up (pid, secret) pair; a
//! CancelRequest carrying it is forwarded to the backend that client is using
//! right now, with that backend's own pid and secret.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// Where a server connection goes, and so where its CancelRequest must go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    /// The socket file (`<dir>/.s.PGSQL.<port>`) of a server on this host.
    Unix(Arc<Path>),
}

/// The backend a client is currently running statements on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    pub addr: ServerAddr,
    pub process_id: i32,
    pub secret_key: i32,
}

pub type TargetSlot = Arc<Mutex<Option<CancelTarget>>>;

#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<i32, (i32, TargetSlot)>>,
}

impl CancelRegistry {
    /// Registers a new client session; returns its (pid, secret) and the slot
    /// the session keeps up to date.
    pub fn register(&self) -> (i32, i32, TargetSlot) {
        let slot: TargetSlot = Arc::new(Mutex::new(None));
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let pid = rand::random::<i32>() & 0x7fff_ffff;
            if pid != 0 && !sessions.contains_key(&pid) {
                let secret = rand::random::<i32>();
                sessions.insert(pid, (secret, slot.clone()));
                return (pid, secret, slot);
            }
        }
    }

    pub fn unregister(&self, pid: i32) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
    }

    /// Forwards a cancel request if (pid, secret) names a live session that
    /// is running something. Unknown or mismatched keys are ignored, as
    /// Postgres does.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let target = {
            let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            match sessions.get(&pid) {
                Some((expected, slot)) if *expected == secret => {
                    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
                }
                _ => None,
            }
        };
        let Some(target) = target else { return };
        let mut request = BytesMut::with_capacity(16);
        request.put_i32(16);
        request.put_i32(80_877_102);
        request.put_i32(target.process_id);
        request.put_i32(target.secret_key);
        match &target.addr {
            ServerAddr::Tcp(addr) => {
                if let Ok(stream) = TcpStream::connect(addr).await {
                    send_and_close(stream, &request).await;
                }
            }
            ServerAddr::Unix(path) => {
                if let Ok(stream) = UnixStream::connect(path).await {
                    send_and_close(stream, &request).await;
                }
            }
        }
    }

    pub fn sessions(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Writes a CancelRequest and closes: the server answers nothing.
async fn send_and_close<S: AsyncWrite + Unpin>(mut stream: S, request: &[u8]) {
    let _ = stream.write_all(request).await;
    let _ = stream.shutdown().await;
}
