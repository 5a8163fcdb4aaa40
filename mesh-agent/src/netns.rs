//! Network namespaces: netlink sockets opened inside another namespace, and work done on
//! a dedicated OS thread that entered one (a namespace belongs to a thread, so entering it
//! on a shared async worker would move every task on that worker).

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

/// Errors of entering a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("open network namespace {path}: {source}")]
    Open {
        /// The namespace path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// setns(2) refused the file.
    #[error("enter network namespace {path}: {source}")]
    Enter {
        /// The namespace path.
        path: PathBuf,
        /// The underlying error.
        source: nix::Error,
    },
    /// The netlink socket could not be created.
    #[error("open netlink socket in {path}: {source}")]
    Socket {
        /// The namespace path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The helper thread died.
    #[error("namespace thread for {0} panicked")]
    Thread(PathBuf),
    /// The path is something other than a network namespace (a FIFO, a regular file, a
    /// directory, another kind of namespace).
    #[error("{path} is not a network namespace ({what})")]
    NotNetns {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// The path is the node's own network namespace, which is never a pod's.
    #[error("{0} is the node's own network namespace, not a pod's")]
    HostNamespace(PathBuf),
}

/// A network namespace's identity: the nsfs device and inode, which stay the same
/// whatever path names it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct NsId {
    /// `st_dev` of the namespace file.
    pub dev: u64,
    /// `st_ino` of the namespace file.
    pub ino: u64,
}

/// `NSFS_MAGIC` from linux/magic.h: the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `NS_GET_NSTYPE` from linux/nsfs.h: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Opens a network namespace file, refusing at once anything else: the open never
/// blocks (`O_NONBLOCK`, so a FIFO cannot stall a worker), and the opened file must be
/// on nsfs and be a network namespace.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let not = |what| NetnsError::NotNetns {
        path: path.to_path_buf(),
        what,
    };
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| NetnsError::Open {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    if fs.filesystem_type().0 as i64 != NSFS_MAGIC {
        let kind = file.metadata().map(|m| m.file_type()).ok();
        return Err(not(match kind {
            Some(t) if t.is_dir() => "a directory",
            Some(t) if std::os::unix::fs::FileTypeExt::is_fifo(&t) => "a FIFO",
            Some(t) if std::os::unix::fs::FileTypeExt::is_socket(&t) => "a socket",
            Some(t) if std::os::unix::fs::FileTypeExt::is_char_device(&t) => "a device",
            Some(t) if t.is_file() => "a regular file",
            _ => "not on nsfs",
        }));
    }
    // SAFETY: an ioctl without arguments on a descriptor we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(not("another kind of namespace"));
    }
    Ok(file)
}

/// The identity of an opened namespace file.
pub fn id_of(file: &File) -> std::io::Result<NsId> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    Ok(NsId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Opens the pod network namespace at `path` and returns its identity, refusing the
/// agent's own namespace (the node's: the agent runs in the host network).
pub fn pod_netns_id(path: &Path) -> Result<NsId, NetnsError> {
    let file = open(path)?;
    let io = |source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    };
    let id = id_of(&file).map_err(io)?;
    let own = File::open("/proc/self/ns/net")
        .and_then(|f| id_of(&f))
        .map_err(io)?;
    if id == own {
        return Err(NetnsError::HostNamespace(path.to_path_buf()));
    }
    Ok(id)
}

/// Runs `work` on a fresh OS thread inside the network namespace at `path`.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let ns = open(path)?;
    let owned = path.to_path_buf();
    std::thread::spawn(move || {
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: owned.clone(),
            source,
        })?;
        Ok(work())
    })
    .join()
    .map_err(|_| NetnsError::Thread(path.to_path_buf()))?
}

/// A netlink handle whose socket lives in the namespace at `path`. A socket stays in the
/// namespace it was created in, so only its creation needs the other namespace; the
/// connection then runs on the caller's tokio runtime.
pub async fn netlink_in(path: &Path) -> Result<rtnetlink::Handle, NetnsError> {
    let runtime = tokio::runtime::Handle::current();
    let owned = path.to_path_buf();
    let (connection, handle) = run_in(path, move || {
        // The socket registers with the reactor when it is made, so enter the runtime.
        let _guard = runtime.enter();
        rtnetlink::new_connection().map(|(connection, handle, _)| (connection, handle))
    })?
    .map_err(|source| NetnsError::Socket {
        path: owned,
        source,
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A netlink handle in the calling process's own namespace.
pub fn netlink_here() -> Result<rtnetlink::Handle, NetnsError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetnsError::Socket {
            path: PathBuf::from("/proc/self/ns/net"),
            source,
        })?;
    tokio::spawn(connection);
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `pod_netns_id` on a thread so that a blocking open fails the test instead
    /// of hanging it.
    fn check(path: &Path) -> Result<NsId, NetnsError> {
        let path = path.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(pod_netns_id(&path)));
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("the check returned at once (a FIFO must not block it)")
    }

    #[test]
    fn hardening_netns_paths_that_are_no_pod_namespace_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"not a namespace").unwrap();
        let cases = [
            (fifo.as_path(), "a FIFO"),
            (file.as_path(), "a regular file"),
            (dir.path(), "a directory"),
            (Path::new("/proc/self/ns/mnt"), "another kind of namespace"),
        ];
        for (path, what) in cases {
            match check(path) {
                Err(NetnsError::NotNetns { what: said, .. }) => assert_eq!(said, what, "{path:?}"),
                other => panic!("{path:?}: {other:?}"),
            }
        }
        assert!(matches!(
            check(Path::new("/proc/self/ns/net")),
            Err(NetnsError::HostNamespace(_))
        ));
        assert!(matches!(
            check(&dir.path().join("missing")),
            Err(NetnsError::Open { .. })
        ));
    }
}
