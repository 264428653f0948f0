//! Cancel keys: every client gets a random (pid, secret) of the proxy's own,
//! mapped to the upstream backend serving it only while it is attached. A
//! CancelRequest is forwarded only to that backend; unknown keys are dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::RwLock;
use tracing::debug;

use crate::wire;

/// How long forwarding one cancel may take.
const CANCEL_FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// The upstream backend a client is attached to.
#[derive(Debug, Clone, Copy)]
pub struct BackendKey {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

struct Entry {
    secret: i32,
    /// Held for reading while a cancel is forwarded, and for writing when
    /// the backend is detached: a detach waits for cancels in flight, so a
    /// cancel can never reach the backend's next client.
    backend: RwLock<Option<BackendKey>>,
}

/// The proxy's map of client cancel keys.
#[derive(Default)]
pub struct CancelMap {
    entries: Mutex<HashMap<i32, Arc<Entry>>>,
}

/// A client's registration; detach it before its backend is reused.
pub struct Registration {
    pub pid: i32,
    pub secret: i32,
    entry: Arc<Entry>,
    map: Arc<CancelMap>,
}

impl CancelMap {
    /// Issues a fresh random key for a client attached to `backend`.
    pub fn register(self: &Arc<Self>, backend: BackendKey) -> Registration {
        let secret = rand::random::<i32>();
        let entry = Arc::new(Entry {
            secret,
            backend: RwLock::new(Some(backend)),
        });
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let pid = loop {
            let pid = rand::random::<i32>() & i32::MAX;
            if pid != 0 && !entries.contains_key(&pid) {
                break pid;
            }
        };
        entries.insert(pid, entry.clone());
        Registration {
            pid,
            secret,
            entry,
            map: Arc::clone(self),
        }
    }

    /// Forwards a cancel for (pid, secret) if it matches a live session.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pid)
            .cloned();
        let Some(entry) = entry else {
            debug!(pid, "cancel for unknown key dropped");
            return;
        };
        // Constant time, so the secret cannot be guessed byte by byte.
        if !bool::from(entry.secret.to_be_bytes().ct_eq(&secret.to_be_bytes())) {
            debug!(pid, "cancel with wrong secret dropped");
            return;
        }
        let guard = entry.backend.read().await;
        let Some(backend) = *guard else { return };
        let sent = tokio::time::timeout(CANCEL_FORWARD_TIMEOUT, forward(backend)).await;
        debug!(pid, ok = matches!(sent, Ok(Ok(()))), "cancel forwarded");
    }

    fn remove(&self, pid: i32) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
    }
}

impl Registration {
    /// Points the key at another backend: the session moved to a new
    /// upstream connection before its first query.
    pub async fn retarget(&self, backend: BackendKey) {
        *self.entry.backend.write().await = Some(backend);
    }

    /// Detaches the backend, waiting for any cancel being forwarded to it.
    pub async fn detach(self) {
        *self.entry.backend.write().await = None;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.map.remove(self.pid);
    }
}

/// Asks the server to stop whatever `backend` is running, without waiting:
/// for a session whose client left mid-query, whose connection is about to
/// be closed. Postgres would otherwise run the query to its end, holding
/// its locks, since it notices a closed socket only when it next reads.
pub fn cancel_abandoned(backend: BackendKey) {
    tokio::spawn(async move {
        let sent = tokio::time::timeout(CANCEL_FORWARD_TIMEOUT, forward(backend)).await;
        debug!(
            pid = backend.pid,
            ok = matches!(sent, Ok(Ok(()))),
            "abandoned query cancelled"
        );
    });
}

async fn forward(backend: BackendKey) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(backend.addr).await?;
    let mut out = BytesMut::with_capacity(16);
    out.put_i32(16);
    out.put_i32(wire::CANCEL_REQUEST_CODE);
    out.put_i32(backend.pid);
    out.put_i32(backend.secret);
    stream.write_all(&out).await?;
    // The postmaster closes once it has signalled the backend; waiting for
    // that keeps the detach lock held until the signal is out.
    let mut sink = [0u8; 16];
    while stream.read(&mut sink).await? > 0 {}
    Ok(())
}
