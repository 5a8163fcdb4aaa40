//! The agent's transparent L7 proxy: it enforces `L7Policy` on every connection the eBPF
//! redirect hands to its one listening socket.
//!
//! Per connection: the snapshot current at accept time says whether the destination pod is
//! covered and whether a rule without `http` allows the source (then bytes are spliced,
//! `l4.rs`); otherwise the first bytes must be HTTP, and every request (every h2 stream) is
//! judged against the snapshot current when it arrives (`http.rs`), then forwarded to the
//! pod from the client's own address (`upstream.rs`) or answered 403. Every verdict is a
//! [`FlowRecord`](crate::flows::FlowRecord) in [`Flows`].
//!
//! Threads: one worker per listening socket, each a current-thread runtime on its own OS
//! thread; `sk_lookup` spreads connections over the listeners, so a connection (its
//! requests, its h2 streams, its upstream connection) lives on one thread and never wakes
//! another. `make bench-proxy` measured the multi-threaded runtime this replaced: every
//! spawned task unparked a sibling worker, and switching threads cost more than the policy.
//!
//! Lifecycle: [`Proxy::bind`] → [`Bound`] (read the port and the listener fds for the BPF
//! sockmap), [`Bound::run_workers`] (the proxy's own threads) or [`Bound::run`] (the
//! caller's runtime) with a shutdown future: on shutdown every worker stops accepting, lets
//! in-flight requests finish until [`ProxySettings::drain_timeout`], then cuts what is
//! left.

mod conn;
mod http;
mod io;
mod l4;
mod limits;
mod listener;
mod respond;
#[cfg(test)]
mod tests;
mod upstream;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

pub use limits::*;

use crate::flows::Flows;
use crate::state::DataplaneRx;
use upstream::Upstream;

/// `SO_MARK` on the proxy's upstream sockets. The node's policy routing sends marked
/// packets to the pod itself; without it, a packet from the proxy (with the client pod's
/// source address, to the covered pod) would be steered back into the proxy, a loop. The
/// routing and eBPF side match on this value, so it must not change without them.
pub const UPSTREAM_MARK: u32 = 0x0a00;

/// Setting: the proxy's listening port.
pub const PORT_SETTING: &str = "proxy_port";
/// 15001: Istio's outbound capture port, familiar to operators and unused by pods (the
/// listener only receives what `sk_lookup` assigns it, so it never collides with a pod).
pub const DEFAULT_PORT: u16 = 15001;

/// Setting: worker threads of the proxy (one listening socket each).
pub const THREADS_SETTING: &str = "proxy_threads";
/// 2: the proxy spends most time waiting on sockets; two workers keep one slow handler
/// from stalling every connection while leaving the node's CPUs to its pods.
pub const DEFAULT_THREADS: usize = 2;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A step of setting up the listening socket failed (`IP_TRANSPARENT` needs
    /// CAP_NET_ADMIN).
    #[error("proxy listener {addr}: {op}: {source}")]
    Listener {
        /// The address being bound.
        addr: SocketAddr,
        /// The step (`socket`, `IP_TRANSPARENT`, `bind`, `listen`, ...).
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// A worker's thread or runtime could not be started.
    #[error("proxy runtime: {0}")]
    Runtime(std::io::Error),
    /// A worker thread panicked.
    #[error("proxy worker {0} panicked")]
    WorkerPanicked(usize),
}

/// What the proxy needs.
#[derive(Debug)]
pub struct ProxyConfig {
    /// Where to listen: `0.0.0.0:<port>` in the agent, `127.0.0.1:0` in tests. Worker 0
    /// listens there; the others on the same address with a port of the kernel's choice
    /// (`sk_lookup` reaches them through the sockmap, never by port).
    pub addr: SocketAddr,
    /// Worker threads, one listening socket each (at least 1).
    pub workers: usize,
    /// Limits and timeouts.
    pub settings: ProxySettings,
    /// The data plane snapshots (pods, identities, matchers).
    pub dataplane: DataplaneRx,
    /// Where flow records go.
    pub flows: Flows,
}

impl ProxyConfig {
    /// The agent's configuration: all addresses on [`DEFAULT_PORT`], default settings.
    pub fn new(dataplane: DataplaneRx, flows: Flows) -> ProxyConfig {
        ProxyConfig {
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, DEFAULT_PORT)),
            workers: DEFAULT_THREADS,
            settings: ProxySettings::default(),
            dataplane,
            flows,
        }
    }
}

/// Counters the agent exports (see [`ProxyHandle::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProxyStats {
    /// Connections accepted since start.
    pub connections: u64,
    /// Connections open now.
    pub connections_open: u64,
    /// Connections spliced at L4 (a rule without `http`, or the pod no longer covered).
    pub connections_l4: u64,
    /// Connections closed because their bytes were not HTTP where HTTP rules apply.
    pub connections_not_http: u64,
    /// Connections or requests refused by a limit (connection counts, header size).
    pub limit_refusals: u64,
    /// Connections that did not send a request's headers within the header timeout.
    pub header_timeouts: u64,
    /// Requests allowed.
    pub requests_allowed: u64,
    /// Requests denied (403, or 400 for a refused `Host`).
    pub requests_denied: u64,
    /// Requests an `audit` policy would have denied (forwarded).
    pub requests_audit_denied: u64,
    /// Requests or splices whose pod could not be reached (503/504).
    pub upstream_errors: u64,
}

/// The counters behind [`ProxyStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) connections_l4: AtomicU64,
    pub(crate) not_http: AtomicU64,
    pub(crate) limit_refusals: AtomicU64,
    pub(crate) header_timeouts: AtomicU64,
    pub(crate) requests_allowed: AtomicU64,
    pub(crate) requests_denied: AtomicU64,
    pub(crate) requests_audit_denied: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) settings: ProxySettings,
    pub(crate) dataplane: DataplaneRx,
    pub(crate) flows: Flows,
    pub(crate) counters: Counters,
    pub(crate) limits: Arc<ConnLimits>,
    pub(crate) upstream: Upstream,
    pub(crate) server: auto::Builder<TokioExecutor>,
    /// Set to `true` when the proxy drains: connections finish their requests and close.
    pub(crate) drain: watch::Sender<bool>,
}

/// The proxy, before it is bound.
#[derive(Debug)]
pub struct Proxy;

impl Proxy {
    /// Binds the transparent listeners (needs CAP_NET_ADMIN for `IP_TRANSPARENT`). Needs
    /// no runtime.
    pub fn bind(config: ProxyConfig) -> Result<Bound, ProxyError> {
        let first = listener::bind_transparent(config.addr)?;
        let addr = first.local_addr().map_err(|source| ProxyError::Listener {
            addr: config.addr,
            op: "getsockname",
            source,
        })?;
        let mut listeners = vec![first];
        for _ in 1..config.workers.max(1) {
            listeners.push(listener::bind_transparent(SocketAddr::new(addr.ip(), 0))?);
        }
        info!(addr = %addr, workers = listeners.len(), "proxy listening");
        Ok(Bound {
            addr,
            listeners,
            handle: ProxyHandle::new(config.settings, config.dataplane, config.flows),
            #[cfg(test)]
            original_destination: None,
        })
    }
}

/// The bound proxy: its address and listeners, ready to run.
#[derive(Debug)]
pub struct Bound {
    addr: SocketAddr,
    listeners: Vec<std::net::TcpListener>,
    handle: ProxyHandle,
    /// Tests have no `sk_lookup`: every accepted connection is taken to be for this address.
    #[cfg(test)]
    pub(crate) original_destination: Option<SocketAddr>,
}

impl Bound {
    /// Worker 0's bound address (the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The listening sockets, one per worker, for the BPF sockmap that `sk_lookup` assigns
    /// connections from. They live until the proxy stops.
    pub fn listener_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.listeners.iter().map(AsFd::as_fd).collect()
    }

    /// A handle for stats and flows, valid after the proxy starts.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }

    /// One worker per listener.
    fn into_workers(self) -> Vec<(Worker, std::net::TcpListener)> {
        let Bound {
            addr,
            listeners,
            handle,
            #[cfg(test)]
            original_destination,
        } = self;
        (0..)
            .zip(listeners)
            .map(|(index, listener)| {
                let worker = Worker {
                    index,
                    addr,
                    handle: handle.clone(),
                    #[cfg(test)]
                    original_destination,
                };
                (worker, listener)
            })
            .collect()
    }

    /// Serves on one thread per listener, each with its own current-thread runtime, until
    /// `shutdown` completes, then drains like [`run`](Bound::run). Blocks the calling
    /// thread (which only waits). A worker that ends early (a panic) stops the others and
    /// ends the proxy with an error, so the agent goes down loudly rather than serving on
    /// with fewer workers while `sk_lookup` drops the dead one's share.
    pub fn run_workers(self, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
        let (stop, stopped) = watch::channel(false);
        let ended = Arc::new(tokio::sync::Notify::new());
        let mut threads = Vec::new();
        for (worker, listener) in self.into_workers() {
            let index = worker.index;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(ProxyError::Runtime)?;
            let stopped = stopped.clone();
            let ended = WorkerEnded(Arc::clone(&ended));
            let thread = std::thread::Builder::new()
                .name(format!("veil-proxy-{index}"))
                .spawn(move || {
                    let _ended = ended;
                    runtime.block_on(worker.serve(listener, stopped))
                })
                .map_err(ProxyError::Runtime)?;
            threads.push(thread);
        }
        let waiter = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ProxyError::Runtime)?;
        waiter.block_on(async {
            tokio::select! {
                () = shutdown => {}
                () = ended.notified() => warn!("a proxy worker ended before shutdown; stopping"),
            }
        });
        stop.send_replace(true);
        let mut outcome = Ok(());
        for (index, thread) in threads.into_iter().enumerate() {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => outcome = Err(e),
                Err(_) => outcome = Err(ProxyError::WorkerPanicked(index)),
            }
        }
        info!("proxy stopped");
        outcome
    }

    /// Serves every listener on the caller's runtime until `shutdown` completes, then
    /// drains: stops accepting, asks open connections to finish (HTTP/1.1 after the
    /// current request, HTTP/2 with GOAWAY), waits up to the drain timeout and cuts what
    /// is left.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
        let (stop, stopped) = watch::channel(false);
        let mut workers = JoinSet::new();
        let mut indices = std::collections::HashMap::new();
        for (worker, listener) in self.into_workers() {
            let index = worker.index;
            let task = workers.spawn(worker.serve(listener, stopped.clone()));
            indices.insert(task.id(), index);
        }
        shutdown.await;
        stop.send_replace(true);
        let mut outcome = Ok(());
        while let Some(done) = workers.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => outcome = Err(e),
                Err(e) => {
                    let index = indices.get(&e.id()).copied().unwrap_or_default();
                    outcome = Err(ProxyError::WorkerPanicked(index));
                }
            }
        }
        info!("proxy stopped");
        outcome
    }
}

/// Wakes [`Bound::run_workers`] when a worker's thread ends, by return or by panic.
struct WorkerEnded(Arc<tokio::sync::Notify>);

impl Drop for WorkerEnded {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// One worker: accepts on its own listener and serves what it accepted.
struct Worker {
    index: usize,
    addr: SocketAddr,
    handle: ProxyHandle,
    #[cfg(test)]
    original_destination: Option<SocketAddr>,
}

impl Worker {
    /// Accepts until `stopped` turns true, then drains this worker's connections.
    async fn serve(
        self,
        listener: std::net::TcpListener,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<(), ProxyError> {
        let Worker {
            index,
            addr,
            handle,
            #[cfg(test)]
            original_destination,
        } = self;
        #[cfg(not(test))]
        let original_destination: Option<SocketAddr> = None;
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(|source| ProxyError::Listener {
                addr,
                op: "register with the runtime",
                source,
            })?;
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                // An error means the sender is gone: stop as well. The guard `wait_for`
                // returns is dropped at once (it would make the future !Send).
                () = async { drop(stopped.wait_for(|stop| *stop).await) } => break,
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        // With `sk_lookup` the local address is the original destination.
                        let orig_dst = match original_destination {
                            Some(a) => Ok(a),
                            None => stream.local_addr(),
                        };
                        let Ok(orig_dst) = orig_dst else { continue };
                        let span = tracing::debug_span!("proxy", worker = index, peer = %peer, dst = %orig_dst);
                        let h = handle.clone();
                        tasks.spawn(
                            async move { h.serve_connection(stream, peer, orig_dst).await }
                                .instrument(span),
                        );
                    }
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin on accept.
                        warn!(worker = index, error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                },
            }
            while tasks.try_join_next().is_some() {}
        }
        drop(listener);
        let deadline = handle.shared.settings.drain_timeout;
        info!(
            worker = index,
            open = tasks.len(),
            deadline_ms = deadline.as_millis(),
            "proxy draining"
        );
        handle.shared.drain.send_replace(true);
        let drained = tokio::time::timeout(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                worker = index,
                left = tasks.len(),
                "drain deadline passed, closing connections"
            );
            tasks.shutdown().await;
        }
        Ok(())
    }
}

/// A cheap handle on a proxy: stats, flows, and the per-connection entry point.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle").finish_non_exhaustive()
    }
}

impl ProxyHandle {
    /// A proxy without a listener: connections come in through
    /// [`serve_connection`](ProxyHandle::serve_connection).
    pub fn new(settings: ProxySettings, dataplane: DataplaneRx, flows: Flows) -> ProxyHandle {
        let mut server = auto::Builder::new(TokioExecutor::new());
        server
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            // hyper refuses (panics on) buffers under 8 KiB.
            .max_buf_size(settings.max_header_bytes.max(8 * 1024))
            .max_headers(settings.max_headers);
        server
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(settings.max_concurrent_streams);
        let (drain, _) = watch::channel(false);
        ProxyHandle {
            shared: Arc::new(Shared {
                limits: Arc::new(ConnLimits::new(
                    settings.max_connections,
                    settings.max_connections_per_source,
                )),
                upstream: Upstream::new(settings.clone()),
                settings,
                dataplane,
                flows,
                counters: Counters::default(),
                server,
                drain,
            }),
        }
    }

    /// The counters, now.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            connections: get(&c.connections),
            connections_open: u64::try_from(self.shared.limits.open()).unwrap_or(u64::MAX),
            connections_l4: get(&c.connections_l4),
            connections_not_http: get(&c.not_http),
            limit_refusals: get(&c.limit_refusals),
            header_timeouts: get(&c.header_timeouts),
            requests_allowed: get(&c.requests_allowed),
            requests_denied: get(&c.requests_denied),
            requests_audit_denied: get(&c.requests_audit_denied),
            upstream_errors: get(&c.upstream_errors),
        }
    }

    /// The flow ring the proxy records into.
    pub fn flows(&self) -> &Flows {
        &self.shared.flows
    }

    /// Serves one accepted connection from `peer` whose original destination is
    /// `orig_dst` (the accepted socket's local address under `sk_lookup`). Returns when the
    /// connection is done.
    pub async fn serve_connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        orig_dst: SocketAddr,
    ) {
        conn::serve(Arc::clone(&self.shared), stream, peer, orig_dst).await;
    }
}
