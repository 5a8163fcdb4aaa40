//! The agent's root-only unix sockets (CNI and admin): binding with safe permissions, and
//! one accept loop that checks the caller, bounds connections and reads one request line.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};

/// A request line larger than this is no request of ours; the cap keeps a broken client
/// from growing the agent's memory.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// Connections served at once per socket: mesh-cni calls are short and a node runs at most
/// a few hundred pods, so 64 leaves room for bursts while a flood of idle connections
/// cannot exhaust the agent's file descriptors or tasks.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send its request line (and to take each answer line):
/// our clients write at once, so 10 s only ever ends slow or stalled ones.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket, replacing a stale one from an earlier run. The socket is root-only
/// whatever the umask: it is created under a umask of 0o177 (so it is never reachable by
/// others, not even for a moment), then set to 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // umask is process-wide; bind is only called at start, before any other file is made.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Why a connection was turned away or ended early.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The peer's credentials could not be read.
    #[error("read the caller's credentials (SO_PEERCRED): {0}")]
    Credentials(std::io::Error),
    /// The peer is not root.
    #[error("caller uid {uid} (pid {pid:?}) is not root")]
    NotRoot {
        /// The caller's uid.
        uid: u32,
        /// The caller's pid, when known.
        pid: Option<i32>,
    },
    /// The request (or the client's reading of an answer) did not happen in time.
    #[error("no progress within {0:?}")]
    Timeout(Duration),
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves connections until the listener fails: root callers only, at most
/// [`MAX_CONNECTIONS`] at once (others wait in the backlog), each with
/// [`REQUEST_TIMEOUT`] to send its request line, which `handle` then answers on the
/// write half (once, or as a stream). `socket` names the socket in logs.
pub async fn serve<H, F>(listener: UnixListener, socket: &'static str, handle: H)
where
    H: Fn(Vec<u8>, OwnedWriteHalf) -> F + Send + Sync + 'static,
    F: Future<Output = Result<(), ConnectionError>> + Send + 'static,
{
    let handle = Arc::new(handle);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut delay = Duration::from_millis(10);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                delay = Duration::from_millis(10);
                let handle = handle.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    let outcome = match read_request(stream).await {
                        Ok((line, write)) => handle(line, write).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = outcome {
                        tracing::warn!(socket, error = %e, "connection refused or failed");
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                tracing::error!(socket, error = %e, retry_in_ms = delay.as_millis() as u64, "accept");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Checks the caller is root and reads its request line.
async fn read_request(stream: UnixStream) -> Result<(Vec<u8>, OwnedWriteHalf), ConnectionError> {
    let cred = stream.peer_cred().map_err(ConnectionError::Credentials)?;
    if cred.uid() != 0 {
        return Err(ConnectionError::NotRoot {
            uid: cred.uid(),
            pid: cred.pid(),
        });
    }
    let (read, write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| ConnectionError::Timeout(REQUEST_TIMEOUT))??;
    Ok((line, write))
}

/// Writes one JSON line, within [`REQUEST_TIMEOUT`]: a client that stops reading is
/// dropped rather than holding a task.
pub async fn write_line<T: serde::Serialize>(
    write: &mut OwnedWriteHalf,
    value: &T,
) -> Result<(), ConnectionError> {
    use tokio::io::AsyncWriteExt;
    // Plain data always serialises; an empty line would tell the client something broke.
    let mut out = serde_json::to_vec(value).unwrap_or_default();
    out.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, write.write_all(&out))
        .await
        .map_err(|_| ConnectionError::Timeout(REQUEST_TIMEOUT))??;
    Ok(())
}
