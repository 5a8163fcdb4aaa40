//! The proxy's limits: every one a named setting with a default and the reason for it, and
//! the per-source connection accounting that keeps one client from holding the node's proxy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use veil_l7_policy::limits::{MAX_HEADER_BYTES, MAX_HEADER_COUNT, MAX_TARGET_BYTES};

/// Setting: most bytes of request line and headers the proxy buffers per request.
pub const MAX_HEADER_BYTES_SETTING: &str = "proxy_max_header_bytes";
/// The engine judges up to 60 KiB of headers plus an 8 KiB request-target; the buffer must
/// hold both and the framing, so anything the engine could allow fits, and nothing much
/// bigger is ever buffered (hyper's h1 `max_buf_size`, h2 `max_header_list_size`).
pub const DEFAULT_MAX_HEADER_BYTES: usize = MAX_HEADER_BYTES + MAX_TARGET_BYTES + 4 * 1024;

/// Setting: most header fields per request.
pub const MAX_HEADERS_SETTING: &str = "proxy_max_headers";
/// The engine's own limit (Envoy's default): a request the engine would refuse for its
/// header count is refused while parsing, before it is buffered whole.
pub const DEFAULT_MAX_HEADERS: usize = MAX_HEADER_COUNT;

/// Setting: time allowed to receive a request's headers (and, on a new connection, the
/// bytes that tell HTTP from not-HTTP).
pub const HEADER_READ_TIMEOUT_SETTING: &str = "proxy_header_read_timeout";
/// 10 s: a client on the cluster network sends its headers in milliseconds; a slowloris
/// client trickling a byte a second is cut after 10 s. Also ends idle HTTP/1.1 keep-alive
/// connections (hyper restarts it while waiting for the next request).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Setting: a connection with no bytes either way and no request in progress is closed.
pub const IDLE_TIMEOUT_SETTING: &str = "proxy_idle_timeout";
/// 5 min: longer than the keep-alive of common clients' pools (Go 90 s, Java 60 s), so the
/// proxy is not the one that breaks them, short enough that dead peers free their slot.
/// Applies to HTTP/2 and spliced connections; an idle HTTP/1.1 connection is closed by the
/// header read timeout first (hyper runs it while waiting for the next request).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Setting: time from forwarding a request to the pod's response headers.
pub const REQUEST_TIMEOUT_SETTING: &str = "proxy_request_timeout";
/// 60 s: above the 30 s of most client defaults, so the client gives up first and sees its
/// own error; bodies that stream after the headers (gRPC streams) are not cut by it.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Setting: time to connect to the pod.
pub const CONNECT_TIMEOUT_SETTING: &str = "proxy_connect_timeout";
/// 5 s: the pod is on this node, so a connect takes microseconds; a pod that does not
/// answer its SYNs for 5 s (overloaded, gone) gets the client a prompt 503 (Envoy's 5 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Setting: most open connections from one source address.
pub const MAX_CONNECTIONS_PER_SOURCE_SETTING: &str = "proxy_max_connections_per_source";
/// 512: a busy client pod's pool holds tens of connections per destination; a half-open
/// flood from one address stops at an eighth of the node's total.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 512;

/// Setting: most open connections in total.
pub const MAX_CONNECTIONS_SETTING: &str = "proxy_max_connections";
/// 4096: with header buffers of ~72 KiB each at worst that is under 300 MiB, and far below
/// the agent's file limit; more than a node's pods open at once in practice.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Setting: most concurrent HTTP/2 streams per downstream connection.
pub const MAX_CONCURRENT_STREAMS_SETTING: &str = "proxy_max_concurrent_streams";
/// 100: the minimum RFC 9113 recommends and nginx's default; gRPC clients open more
/// connections when they need more streams.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 100;

/// Setting: on shutdown, how long in-flight requests may take before they are cut.
pub const DRAIN_TIMEOUT_SETTING: &str = "proxy_drain_timeout";
/// 20 s: within Kubernetes' default 30 s termination grace period, leaving the agent
/// time for its other cleanup.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Setting: how long an idle upstream connection stays pooled.
pub const UPSTREAM_IDLE_TIMEOUT_SETTING: &str = "proxy_upstream_idle_timeout";
/// 4 s: below the shortest common server keep-alive (Node.js closes after 5 s), so the
/// proxy rarely sends a request on a connection the pod is closing.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Setting: most idle HTTP/1.1 upstream connections pooled per (client, destination).
pub const MAX_IDLE_PER_UPSTREAM_SETTING: &str = "proxy_max_idle_per_upstream";
/// 4: absorbs a small burst of one client's parallel requests without reconnecting; with
/// [`DEFAULT_MAX_UPSTREAM_KEYS`] at most 4096 idle sockets, well inside the agent's fd limit.
pub const DEFAULT_MAX_IDLE_PER_UPSTREAM: usize = 4;

/// Setting: most (client, destination) pairs with pooled upstream connections.
pub const MAX_UPSTREAM_KEYS_SETTING: &str = "proxy_max_upstream_keys";
/// 1024: one per client-pod/server-pod pair talking within the idle timeout (100 clients
/// of 10 local pods); past it requests still work, their connections are just not pooled.
pub const DEFAULT_MAX_UPSTREAM_KEYS: usize = 1024;

/// The proxy's limits and timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// See [`DEFAULT_MAX_HEADER_BYTES`] (hyper needs at least 8 KiB; less is raised).
    pub max_header_bytes: usize,
    /// See [`DEFAULT_MAX_HEADERS`].
    pub max_headers: usize,
    /// See [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// See [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`DEFAULT_MAX_CONNECTIONS_PER_SOURCE`].
    pub max_connections_per_source: usize,
    /// See [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`DEFAULT_MAX_CONCURRENT_STREAMS`].
    pub max_concurrent_streams: u32,
    /// See [`DEFAULT_DRAIN_TIMEOUT`].
    pub drain_timeout: Duration,
    /// See [`DEFAULT_UPSTREAM_IDLE_TIMEOUT`].
    pub upstream_idle_timeout: Duration,
    /// See [`DEFAULT_MAX_IDLE_PER_UPSTREAM`].
    pub max_idle_per_upstream: usize,
    /// See [`DEFAULT_MAX_UPSTREAM_KEYS`].
    pub max_upstream_keys: usize,
}

impl Default for ProxySettings {
    fn default() -> ProxySettings {
        ProxySettings {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            upstream_idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            max_idle_per_upstream: DEFAULT_MAX_IDLE_PER_UPSTREAM,
            max_upstream_keys: DEFAULT_MAX_UPSTREAM_KEYS,
        }
    }
}

/// Which connection limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ConnLimit {
    /// The source address has too many open connections.
    #[error("too many connections from this source")]
    PerSource,
    /// The proxy has too many open connections.
    #[error("too many connections in total")]
    Total,
}

/// Open connections, in total and per source address. The map holds only addresses with a
/// live connection, so it is bounded by the total limit.
#[derive(Debug)]
pub(crate) struct ConnLimits {
    max_total: usize,
    max_per_source: usize,
    total: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection's slot; dropping it frees the slot.
#[derive(Debug)]
pub(crate) struct ConnPermit {
    limits: Arc<ConnLimits>,
    source: IpAddr,
}

impl ConnLimits {
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> ConnLimits {
        ConnLimits {
            max_total,
            max_per_source,
            total: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a slot for a connection from `source`, or says which limit is reached.
    pub(crate) fn try_acquire(self: &Arc<Self>, source: IpAddr) -> Result<ConnPermit, ConnLimit> {
        let mut map = self
            .per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.total.load(Ordering::Relaxed) >= self.max_total {
            return Err(ConnLimit::Total);
        }
        let count = map.entry(source).or_insert(0);
        if *count >= self.max_per_source {
            if *count == 0 {
                map.remove(&source);
            }
            return Err(ConnLimit::PerSource);
        }
        *count += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(ConnPermit {
            limits: Arc::clone(self),
            source,
        })
    }

    /// Open connections now.
    pub(crate) fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut map = self
            .limits
            .per_source
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = map.get_mut(&self.source) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.source);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_conn_limits_per_source_and_total() {
        let limits = Arc::new(ConnLimits::new(3, 2));
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let a1 = limits.try_acquire(a).expect("first");
        let _a2 = limits.try_acquire(a).expect("second");
        assert_eq!(limits.try_acquire(a).err(), Some(ConnLimit::PerSource));
        let _b1 = limits.try_acquire(b).expect("b");
        assert_eq!(limits.try_acquire(b).err(), Some(ConnLimit::Total));
        drop(a1);
        assert_eq!(limits.open(), 2);
        let _b2 = limits.try_acquire(b).expect("a slot came free");
        // Zero limits refuse without leaving an entry behind.
        let none = Arc::new(ConnLimits::new(10, 0));
        assert!(none.try_acquire(a).is_err());
        assert!(none.per_source.lock().expect("lock").is_empty());
    }
}
