//! Who is on the other end of a Workload API connection, bound when it connects.
//!
//! A PID alone names a process only until it exits: the kernel hands the number to the
//! next process, and a connection outlives its opener when it is inherited (fork) or sent
//! on (SCM_RIGHTS). So on accept the server takes a pidfd for the peer — `SO_PEERPIDFD`
//! (Linux ≥ 6.5: the process that called `connect`), else `pidfd_open` of the
//! `SO_PEERCRED` PID with the process start time read before and after — and records the
//! process's start time and network namespace. Every call then re-checks, through the
//! pidfd, that this very process is still alive, unchanged and in the same namespace
//! ([`BoundCaller::check`]); once it has exited the connection gets nothing, whoever
//! holds it now.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};

/// Linux `SO_PEERPIDFD` (6.5): a pidfd of the process that connected. Not in libc yet.
const SO_PEERPIDFD: libc::c_int = 77;
/// Longest `/proc/<pid>/stat` read: the line is a few hundred bytes; a bound keeps a
/// hostile `comm` or a kernel surprise from growing the read.
const MAX_STAT_BYTES: u64 = 4096;
/// First pause after a failed `accept` (EMFILE, ENFILE, ENOMEM): doubles up to
/// [`MAX_ACCEPT_BACKOFF`], so a full descriptor table is not a hot loop.
pub const FIRST_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause between failed `accept` calls.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// Most Workload API connections at once: a node runs at most a few hundred pods, each
/// needing one or two; beyond this, new connections wait in the backlog, so one pod
/// cannot exhaust the agent's descriptors.
pub const MAX_CONNECTIONS: usize = 1024;

/// A network namespace: the (device, inode) of its nsfs file.
pub type NetnsId = (u64, u64);

/// Why a connection's peer is not (or no longer) a process that can be attested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// `getsockopt(SO_PEERCRED)` failed on the accepted socket.
    #[error("getsockopt(SO_PEERCRED): {0}")]
    PeerCred(String),
    /// The socket's credentials carry no PID (the peer is in another PID namespace).
    #[error("the peer's PID is not visible in this PID namespace")]
    NoPid,
    /// Neither `SO_PEERPIDFD` nor `pidfd_open(2)` gave a pidfd for the peer.
    #[error("pidfd for PID {pid}: {reason}")]
    Pidfd {
        /// The peer's PID.
        pid: i32,
        /// errno text.
        reason: String,
    },
    /// `/proc/<pid>/stat` could not be read or parsed.
    #[error("/proc/{pid}/stat: {reason}")]
    Stat {
        /// The PID.
        pid: i32,
        /// What was wrong.
        reason: String,
    },
    /// `/proc/<pid>/ns/net` could not be read.
    #[error("/proc/{pid}/ns/net: {reason}")]
    Netns {
        /// The PID.
        pid: i32,
        /// errno text.
        reason: String,
    },
    /// The process that opened the connection has exited (its PID may be someone else's).
    #[error("the process that opened this connection (PID {pid}) has exited")]
    Exited {
        /// Its PID.
        pid: i32,
    },
    /// The PID now names another process (its start time differs from the bound one).
    #[error("PID {pid} now names another process (start time {now}, bound {bound})")]
    Reused {
        /// The PID.
        pid: i32,
        /// Start time bound at connect, clock ticks after boot.
        bound: u64,
        /// Start time read now.
        now: u64,
    },
    /// The process moved to another network namespace since it connected.
    #[error("process {pid} left the network namespace it connected from")]
    NetnsChanged {
        /// The PID.
        pid: i32,
    },
}

fn errno_text(e: std::io::Error) -> String {
    e.to_string()
}

/// Field 22 (`starttime`, clock ticks after boot) of a `/proc/<pid>/stat` line. The
/// second field (`comm`) is in parentheses and may itself hold spaces and parentheses,
/// so fields are counted after the last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After ")": field 3 (state) is the first; field 22 is the 20th.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// The start time of `pid`, from `/proc/<pid>/stat`.
pub fn start_time(pid: i32) -> Result<u64, PeerError> {
    let stat_err = |reason: String| PeerError::Stat { pid, reason };
    let file =
        std::fs::File::open(format!("/proc/{pid}/stat")).map_err(|e| stat_err(errno_text(e)))?;
    let mut text = String::new();
    file.take(MAX_STAT_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| stat_err(errno_text(e)))?;
    parse_start_time(&text).ok_or_else(|| stat_err("no start time (field 22)".into()))
}

/// The network namespace of `pid`.
pub fn netns_of(pid: i32) -> Result<NetnsId, PeerError> {
    let m = std::fs::metadata(format!("/proc/{pid}/ns/net")).map_err(|e| PeerError::Netns {
        pid,
        reason: errno_text(e),
    })?;
    Ok((m.dev(), m.ino()))
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable from then on,
/// zombie or reaped).
fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    // An error polling (never expected for a valid pidfd) counts as exited: fail closed.
    n != 0
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the kernel returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `getsockopt(SO_PEERPIDFD)`: `Ok(None)` when the kernel does not know the option.
fn peer_pidfd(socket: &impl AsRawFd) -> std::io::Result<Option<OwnedFd>> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are valid for the size given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOPROTOOPT) | Some(libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    if fd < 0 {
        return Err(std::io::Error::other("SO_PEERPIDFD returned no descriptor"));
    }
    // SAFETY: the kernel installed a new descriptor for us.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A process bound to a connection when it connected: its pidfd, start time and network
/// namespace then. Every use goes through [`BoundCaller::check`].
#[derive(Debug)]
pub struct BoundCaller {
    pid: i32,
    uid: u32,
    gid: u32,
    pidfd: OwnedFd,
    start_time: u64,
    netns: NetnsId,
}

impl BoundCaller {
    /// Binds the peer of an accepted unix socket: `SO_PEERCRED` for PID, UID and GID,
    /// `SO_PEERPIDFD` for the process (or the `pidfd_open` fallback of [`Self::from_pid`]).
    pub fn from_socket(socket: &UnixStream) -> Result<Self, PeerError> {
        let cred = socket
            .peer_cred()
            .map_err(|e| PeerError::PeerCred(errno_text(e)))?;
        let pid = cred.pid().filter(|p| *p > 0).ok_or(PeerError::NoPid)?;
        match peer_pidfd(socket) {
            Ok(Some(pidfd)) => Self::from_pidfd(pid, cred.uid(), cred.gid(), pidfd, None),
            Ok(None) => Self::from_pid(pid, cred.uid(), cred.gid()),
            Err(e) => Err(PeerError::Pidfd {
                pid,
                reason: errno_text(e),
            }),
        }
    }

    /// Binds process `pid` without a socket pidfd: start time, `pidfd_open`, start time
    /// again (equal, or the PID changed hands in between), then the namespace.
    pub fn from_pid(pid: i32, uid: u32, gid: u32) -> Result<Self, PeerError> {
        let before = start_time(pid)?;
        let pidfd = pidfd_open(pid).map_err(|e| PeerError::Pidfd {
            pid,
            reason: errno_text(e),
        })?;
        Self::from_pidfd(pid, uid, gid, pidfd, Some(before))
    }

    fn from_pidfd(
        pid: i32,
        uid: u32,
        gid: u32,
        pidfd: OwnedFd,
        start_before: Option<u64>,
    ) -> Result<Self, PeerError> {
        if pidfd_exited(&pidfd) {
            return Err(PeerError::Exited { pid });
        }
        let start_time = start_time(pid)?;
        if let Some(bound) = start_before {
            if bound != start_time {
                return Err(PeerError::Reused {
                    pid,
                    bound,
                    now: start_time,
                });
            }
        }
        let netns = netns_of(pid)?;
        // Still alive after the reads: they were of this process, not a successor.
        if pidfd_exited(&pidfd) {
            return Err(PeerError::Exited { pid });
        }
        Ok(BoundCaller {
            pid,
            uid,
            gid,
            pidfd,
            start_time,
            netns,
        })
    }

    /// The PID it had when it connected.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Its UID.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Its GID.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// Its network namespace when it connected.
    pub fn netns(&self) -> NetnsId {
        self.netns
    }

    /// Re-checks that the process that connected is alive, is the same process (start
    /// time unchanged) and is still in the network namespace it connected from.
    pub fn check(&self) -> Result<NetnsId, PeerError> {
        let pid = self.pid;
        if pidfd_exited(&self.pidfd) {
            return Err(PeerError::Exited { pid });
        }
        let now = start_time(pid);
        let netns = netns_of(pid);
        // Reads of /proc/<pid> name whoever holds the PID: they count only if the bound
        // process was still alive after them.
        if pidfd_exited(&self.pidfd) {
            return Err(PeerError::Exited { pid });
        }
        let now = now?;
        if now != self.start_time {
            return Err(PeerError::Reused {
                pid,
                bound: self.start_time,
                now,
            });
        }
        if netns? != self.netns {
            return Err(PeerError::NetnsChanged { pid });
        }
        Ok(self.netns)
    }

    /// Resolves when the bound process exits (at once if it has).
    pub async fn exited(&self) {
        let watch = self.pidfd.as_fd().try_clone_to_owned().and_then(|fd| {
            // SAFETY: `fd` is an OwnedFd the AsyncFd owns from here on; it stays open and
            // unchanged until the AsyncFd drops.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
            }
            .map_err(|e| e.into_parts().1)
        });
        match watch {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            // Cannot watch: poll now and then instead.
            Err(_) => loop {
                if pidfd_exited(&self.pidfd) {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            },
        }
    }

    #[cfg(test)]
    pub(crate) fn with_start_time(mut self, start_time: u64) -> Self {
        self.start_time = start_time;
        self
    }
}

/// What a Workload API request carries about its connection: the bound caller, or why
/// there is none (the request is then refused).
#[derive(Debug, Clone)]
pub struct PeerInfo(pub Arc<Result<BoundCaller, PeerError>>);

/// An accepted Workload API connection with its peer bound.
pub struct PeerStream {
    io: UnixStream,
    peer: PeerInfo,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl PeerStream {
    /// Binds the peer of `io` now.
    pub fn bind(io: UnixStream) -> Self {
        let peer = PeerInfo(Arc::new(BoundCaller::from_socket(&io)));
        PeerStream {
            io,
            peer,
            _slot: None,
        }
    }

    /// The bound peer.
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts from `listener` forever, binding each peer, at most `max_connections` open
/// at once; a failed `accept` (EMFILE and the like) pauses with backoff instead of
/// spinning.
pub fn incoming(
    listener: UnixListener,
    max_connections: usize,
) -> impl futures::Stream<Item = Result<PeerStream, std::io::Error>> {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    futures::stream::unfold(
        (listener, slots, FIRST_ACCEPT_BACKOFF),
        |(listener, slots, mut backoff)| async move {
            let slot = slots.clone().acquire_owned().await.ok()?;
            loop {
                match listener.accept().await {
                    Ok((io, _)) => {
                        let mut conn = PeerStream::bind(io);
                        conn._slot = Some(slot);
                        return Some((Ok(conn), (listener, slots, FIRST_ACCEPT_BACKOFF)));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "Workload API accept failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardening_start_time_is_field_22_even_with_parentheses_in_comm() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615";
        assert_eq!(parse_start_time(line), Some(987654));
        assert_eq!(parse_start_time("4242 (x) S 1 2"), None);
        assert_eq!(parse_start_time("garbage without paren"), None);
        assert_eq!(
            start_time(std::process::id() as i32).map(|_| ()),
            Ok(()),
            "own start time readable"
        );
    }

    #[test]
    fn hardening_bound_caller_refused_once_its_process_exits_or_is_replaced() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let bound = BoundCaller::from_pid(pid, 0, 0).unwrap();
        assert_eq!(bound.check(), netns_of(pid));

        // Same PID, another start time: a successor is never taken for the original.
        let twin = BoundCaller::from_pid(pid, 0, 0)
            .unwrap()
            .with_start_time(bound.start_time + 1);
        assert!(matches!(twin.check(), Err(PeerError::Reused { .. })));

        // A zombie (exited, not yet reaped) and a reaped process both count as gone.
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !pidfd_exited(&bound.pidfd) {
            assert!(std::time::Instant::now() < deadline, "exit seen by pidfd");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(bound.check(), Err(PeerError::Exited { pid }));
        child.wait().unwrap();
        assert_eq!(bound.check(), Err(PeerError::Exited { pid }));
        assert!(BoundCaller::from_pid(pid, 0, 0).is_err());
    }

    #[tokio::test]
    async fn hardening_socket_peer_is_bound_by_pidfd_and_exit_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let listener = UnixListener::bind(&path).unwrap();
        // The peer is a separate process that connects and then exits.
        let mut child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect({:?}); sys.stdin.read()",
                path.display().to_string()
            ))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (io, _) = listener.accept().await.unwrap();
        let stream = PeerStream::bind(io);
        let bound = stream.peer().0.as_ref().as_ref().unwrap();
        assert_eq!(bound.pid(), child.id() as i32);
        assert!(bound.check().is_ok());
        drop(child.stdin.take());
        tokio::time::timeout(Duration::from_secs(5), bound.exited())
            .await
            .expect("exit noticed");
        child.wait().unwrap();
        assert!(matches!(bound.check(), Err(PeerError::Exited { .. })));
    }

    /// Before, the Workload API accepted without bound: one pod could open connections
    /// until the agent ran out of descriptors.
    #[tokio::test]
    async fn hardening_workload_api_connections_are_capped() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut accepted = Box::pin(incoming(UnixListener::bind(&path).unwrap(), 2));
        let _clients: Vec<_> =
            futures::future::join_all((0..3).map(|_| UnixStream::connect(&path)))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
        let first = accepted.next().await.unwrap().unwrap();
        let _second = accepted.next().await.unwrap().unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), accepted.next())
                .await
                .is_err(),
            "a third connection was taken beyond the cap"
        );
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), accepted.next())
            .await
            .expect("taken once a slot frees")
            .unwrap()
            .unwrap();
    }
}
