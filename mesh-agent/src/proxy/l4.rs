//! Connections allowed whole (a rule without `http`, a pod no longer covered, an audit
//! policy's would-be denial): bytes spliced both ways without parsing.

use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::http::ConnCtx;
use super::io::ConnIo;

/// Connects to the original destination from the client's address and copies bytes both
/// ways until either side closes or nothing moves for the idle timeout. `prefix` holds
/// bytes already read from the client.
pub(crate) async fn splice(ctx: Arc<ConnCtx>, stream: TcpStream, prefix: Vec<u8>) {
    let mut upstream = match ctx
        .shared
        .upstream
        .connect(ctx.peer.ip(), ctx.orig_dst)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            ctx.shared
                .counters
                .upstream_errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Dropping the client's socket closes it: the closest to the refusal the
            // client would have seen from the pod itself.
            warn!(error = %e, "splice: upstream connect failed");
            return;
        }
    };
    let mut client = ConnIo::new(stream, prefix, Arc::clone(&ctx.activity));
    let idle = ctx
        .activity
        .idle(ctx.shared.settings.idle_timeout, || false);
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match r {
            Ok((up, down)) => debug!(bytes_up = up, bytes_down = down, "splice done"),
            Err(e) => debug!(error = %e, "splice ended"),
        },
        () = idle => debug!("splice idle, closed"),
    }
}
