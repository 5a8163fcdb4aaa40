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
}

/// Opens a namespace file, naming it in the error.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })
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
