//! The proxy's listening sockets: TCP, `IP_TRANSPARENT`, so that the eBPF `sk_lookup`
//! program can hand them connections to any pod address and the accepted sockets keep the
//! original destination as their local address. One per worker thread, each in its own slot
//! of the sockmap `sk_lookup` picks from; no `SO_REUSEPORT` (see `bpf/sk_lookup.c`).

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use super::ProxyError;

/// Pending connections the kernel queues before `accept`: the kernel's default `somaxconn`
/// (4096 since Linux 5.4), so bursts of new connections are not dropped at SYN time.
pub(crate) const LISTEN_BACKLOG: i32 = 4096;

/// Binds one transparent listener on `addr`.
pub(crate) fn bind_transparent(addr: SocketAddr) -> Result<std::net::TcpListener, ProxyError> {
    let err = |op: &'static str| move |source| ProxyError::Listener { addr, op, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(err("socket"))?;
    socket
        .set_reuse_address(true)
        .map_err(err("SO_REUSEADDR"))?;
    if addr.is_ipv4() {
        socket.set_ip_transparent_v4(true)
    } else {
        socket.set_ip_transparent_v6(true)
    }
    .map_err(err("IP_TRANSPARENT"))?;
    socket.bind(&addr.into()).map_err(err("bind"))?;
    socket.listen(LISTEN_BACKLOG).map_err(err("listen"))?;
    socket.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
    Ok(socket.into())
}
