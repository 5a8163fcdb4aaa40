//! Connections to the pods: opened from the client's address (`IP_TRANSPARENT`, marked
//! [`super::UPSTREAM_MARK`]) so the pod sees its real peer. An HTTP/1.1 client connection
//! keeps its own upstream connection while it lives (its [`H1Slot`]), as the client would
//! have had to the pod; when it ends, that connection goes to a pool per (client address,
//! destination) for the client's next one. HTTP/2 connections are shared per key.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn, Instrument};

use super::limits::ProxySettings;
use super::UPSTREAM_MARK;

/// Why a request could not reach the pod.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The TCP connect failed.
    #[error("connect to {dst}: {source}")]
    Connect {
        /// The pod's address.
        dst: SocketAddr,
        /// The error.
        source: io::Error,
    },
    /// The TCP connect took longer than the connect timeout.
    #[error("connect to {dst} timed out")]
    ConnectTimeout {
        /// The pod's address.
        dst: SocketAddr,
    },
    /// The HTTP handshake or the exchange failed.
    #[error("HTTP to {dst}: {source}")]
    Http {
        /// The pod's address.
        dst: SocketAddr,
        /// The error.
        source: hyper::Error,
    },
}

type Key = (IpAddr, SocketAddr);

/// The HTTP/1.1 upstream connection one client connection holds between its requests,
/// and when it was last used.
pub(crate) type H1Slot = Mutex<Option<(http1::SendRequest<Incoming>, Instant)>>;

/// Pooled connections, bounded per key and in keys.
#[derive(Default)]
struct Pool {
    h1: HashMap<Key, Vec<(http1::SendRequest<Incoming>, Instant)>>,
    /// The shared HTTP/2 connection per key, and when it was last handed out.
    h2: HashMap<Key, (http2::SendRequest<Incoming>, Instant)>,
    /// When expired and closed connections were last dropped from every key.
    last_sweep: Option<Instant>,
}

impl Pool {
    /// Drops expired or closed connections of every key, at most once per `idle`: a key
    /// that is never asked for again must not keep its sockets open.
    fn sweep(&mut self, idle: std::time::Duration) {
        if self.last_sweep.is_some_and(|t| t.elapsed() < idle) {
            return;
        }
        self.last_sweep = Some(Instant::now());
        self.h1.retain(|_, list| {
            list.retain(|(s, at)| !s.is_closed() && at.elapsed() < idle);
            !list.is_empty()
        });
        self.h2
            .retain(|_, (s, at)| !s.is_closed() && at.elapsed() < idle);
    }
}

/// Opens and pools connections to pods.
pub(crate) struct Upstream {
    settings: ProxySettings,
    pool: Mutex<Pool>,
    /// Cleared when the kernel refuses `IP_TRANSPARENT` or `SO_MARK` (no CAP_NET_ADMIN):
    /// every later connect is plain.
    transparent: AtomicBool,
    /// Whether the fall-back to a plain connect was logged already.
    fallback_logged: AtomicBool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("transparent", &self.transparent.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Upstream {
    pub(crate) fn new(settings: ProxySettings) -> Upstream {
        Upstream {
            settings,
            pool: Mutex::new(Pool::default()),
            transparent: AtomicBool::new(true),
            fallback_logged: AtomicBool::new(false),
        }
    }

    /// Sends `req` to `dst` on behalf of `client`, over HTTP/2 if `h2`, else HTTP/1.1 on
    /// the client connection's own upstream connection (`slot`) when it has a live one.
    pub(crate) async fn send(
        &self,
        client: IpAddr,
        dst: SocketAddr,
        h2: bool,
        slot: &H1Slot,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = (client, dst);
        let http = |source| UpstreamError::Http { dst, source };
        if h2 {
            let mut sender = match self.take_h2(key) {
                Some(s) => s,
                None => {
                    let io = TokioIo::new(self.connect(client, dst).await?);
                    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .handshake(io)
                        .await
                        .map_err(http)?;
                    tokio::spawn(drive(conn, dst));
                    self.put_h2(key, sender.clone());
                    sender
                }
            };
            sender.ready().await.map_err(http)?;
            sender.send_request(req).await.map_err(http)
        } else {
            let own = take_live(slot, self.settings.upstream_idle_timeout);
            let mut sender = match own.or_else(|| self.take_h1(key)) {
                Some(s) => s,
                None => {
                    let io = TokioIo::new(self.connect(client, dst).await?);
                    let (sender, conn) = http1::handshake(io).await.map_err(http)?;
                    // With upgrades: a `101 Switching Protocols` hands the socket over.
                    tokio::spawn(drive(conn.with_upgrades(), dst));
                    sender
                }
            };
            sender.ready().await.map_err(http)?;
            let resp = sender.send_request(req).await.map_err(http)?;
            // Kept for the client connection's next request, which hyper reads only once
            // this response's body has been sent (and so read from the pod). Per client
            // connection, not shared: a shared pool hands a connection whose response is
            // still streaming to nobody, so parallel clients would reconnect per request.
            // An upgraded connection belongs to its tunnel.
            if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
                *lock(slot) = Some((sender, Instant::now()));
            }
            Ok(resp)
        }
    }

    fn take_h1(&self, key: Key) -> Option<http1::SendRequest<Incoming>> {
        let mut pool = lock(&self.pool);
        let idle = self.settings.upstream_idle_timeout;
        let list = pool.h1.get_mut(&key)?;
        list.retain(|(s, at)| !s.is_closed() && at.elapsed() < idle);
        let found = list
            .iter()
            .position(|(s, _)| s.is_ready())
            .map(|i| list.swap_remove(i).0);
        if list.is_empty() {
            pool.h1.remove(&key);
        }
        found
    }

    /// Pools the upstream connection of a client connection that ended, for the same
    /// client's next connection to the same destination.
    pub(crate) fn release_h1(&self, client: IpAddr, dst: SocketAddr, slot: &H1Slot) {
        if let Some(sender) = take_live(slot, self.settings.upstream_idle_timeout) {
            self.put_h1((client, dst), sender);
        }
    }

    fn put_h1(&self, key: Key, sender: http1::SendRequest<Incoming>) {
        let mut pool = lock(&self.pool);
        pool.sweep(self.settings.upstream_idle_timeout);
        if !pool.h1.contains_key(&key) && !make_room(&mut pool, self.settings.max_upstream_keys) {
            return;
        }
        let list = pool.h1.entry(key).or_default();
        if list.len() < self.settings.max_idle_per_upstream {
            list.push((sender, Instant::now()));
        }
    }

    fn take_h2(&self, key: Key) -> Option<http2::SendRequest<Incoming>> {
        let mut pool = lock(&self.pool);
        match pool.h2.get_mut(&key) {
            Some((s, at)) if !s.is_closed() => {
                *at = Instant::now();
                Some(s.clone())
            }
            Some(_) => {
                pool.h2.remove(&key);
                None
            }
            None => None,
        }
    }

    fn put_h2(&self, key: Key, sender: http2::SendRequest<Incoming>) {
        let mut pool = lock(&self.pool);
        pool.sweep(self.settings.upstream_idle_timeout);
        if pool.h2.contains_key(&key) || make_room(&mut pool, self.settings.max_upstream_keys) {
            pool.h2.insert(key, (sender, Instant::now()));
        }
    }

    /// A TCP connection to `dst`, from `client`'s address when the kernel lets us.
    pub(crate) async fn connect(
        &self,
        client: IpAddr,
        dst: SocketAddr,
    ) -> Result<TcpStream, UpstreamError> {
        let connect = async {
            let socket = if self.transparent.load(Ordering::Relaxed)
                && client.is_ipv4() == dst.is_ipv4()
            {
                match transparent_socket(client, dst) {
                    Ok(s) => s,
                    Err(e) => {
                        if e.kind() == io::ErrorKind::PermissionDenied {
                            self.transparent.store(false, Ordering::Relaxed);
                        }
                        if !self.fallback_logged.swap(true, Ordering::Relaxed) {
                            warn!(client = %client, dst = %dst, error = %e,
                                "transparent upstream bind refused; connecting from the node's address (pods see the node as the peer)");
                        }
                        plain_socket(dst)?
                    }
                }
            } else {
                plain_socket(dst)?
            };
            let stream = socket.connect(dst).await?;
            stream.set_nodelay(true)?;
            Ok::<_, io::Error>(stream)
        };
        match tokio::time::timeout(self.settings.connect_timeout, connect).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(UpstreamError::Connect { dst, source }),
            Err(_) => Err(UpstreamError::ConnectTimeout { dst }),
        }
    }
}

/// Empties `slot`; its connection if still open and used within `idle`.
fn take_live(slot: &H1Slot, idle: std::time::Duration) -> Option<http1::SendRequest<Incoming>> {
    lock(slot)
        .take()
        .filter(|(s, at)| !s.is_closed() && at.elapsed() < idle)
        .map(|(s, _)| s)
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Frees a key slot if the pool is full by dropping keys whose connections are all closed;
/// whether there is room now.
fn make_room(pool: &mut Pool, max_keys: usize) -> bool {
    let count = |p: &Pool| p.h1.len() + p.h2.len();
    if count(pool) < max_keys {
        return true;
    }
    pool.h1
        .retain(|_, list| list.iter().any(|(s, _)| !s.is_closed()));
    pool.h2.retain(|_, (s, _)| !s.is_closed());
    count(pool) < max_keys
}

/// Runs one upstream connection until it closes.
fn drive<F>(conn: F, dst: SocketAddr) -> impl std::future::Future<Output = ()>
where
    F: std::future::Future<Output = Result<(), hyper::Error>>,
{
    async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "upstream connection ended");
        }
    }
    .instrument(tracing::debug_span!("upstream", dst = %dst))
}

/// A socket bound to `client`'s address with `IP_TRANSPARENT` and [`UPSTREAM_MARK`].
fn transparent_socket(client: IpAddr, dst: SocketAddr) -> io::Result<TcpSocket> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    if dst.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    socket.set_mark(UPSTREAM_MARK)?;
    socket.bind(&SocketAddr::new(client, 0).into())?;
    socket.set_nonblocking(true)?;
    Ok(TcpSocket::from_std_stream(socket.into()))
}

/// A plain socket of `dst`'s family: the fall-back when the kernel refuses the transparent
/// one (the pod then sees the node's address).
fn plain_socket(dst: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    Ok(socket)
}
