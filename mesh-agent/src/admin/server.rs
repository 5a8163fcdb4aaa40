//! The admin socket's server side.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use futures::StreamExt;

use super::protocol::{AdminRequest, AdminResponse, ObserveRequest};
use crate::flows::{FlowEvent, Flows};
use crate::local_socket::{write_line, ConnectionError};
use crate::proxy::ProxyHandle;
use crate::server::PodService;

/// What admin requests are answered from.
pub struct AdminService {
    /// The node's pods, counters, WireGuard and key rotation.
    pub pods: Arc<PodService>,
    /// The flow records.
    pub flows: Flows,
    /// The proxy, for its counters.
    pub proxy: Option<ProxyHandle>,
}

impl AdminService {
    async fn answer(&self, request: AdminRequest) -> AdminResponse {
        let outcome = match request {
            AdminRequest::Pods => Ok(AdminResponse::Pods {
                pods: self.pods.list(),
            }),
            AdminRequest::Wireguard => self.pods.wireguard_status(),
            AdminRequest::RotateKey => self.pods.rotate_key().await,
            AdminRequest::Proxy => self
                .proxy
                .as_ref()
                .map(|p| AdminResponse::Proxy(p.stats()))
                .ok_or_else(|| "the proxy is not running".to_string()),
            // Streams are answered by `observe`.
            AdminRequest::Observe(_) => Err("observe is a stream".to_string()),
        };
        outcome.unwrap_or_else(|error| AdminResponse::Failed { error })
    }
}

/// Serves `meshctl` on the admin socket until the listener fails (see
/// [`crate::local_socket::serve`]).
pub async fn serve(listener: UnixListener, service: Arc<AdminService>) {
    crate::local_socket::serve(listener, "admin", move |line, mut write| {
        let service = service.clone();
        async move {
            let response = match serde_json::from_slice::<AdminRequest>(&line) {
                Ok(AdminRequest::Observe(request)) => {
                    return observe(&service.flows, &request, &mut write).await;
                }
                Ok(request) => service.answer(request).await,
                Err(e) => AdminResponse::Failed {
                    error: format!("not an admin request: {e}"),
                },
            };
            crate::local_socket::write_line(&mut write, &response).await?;
            write.shutdown().await?;
            Ok(())
        }
    })
    .await
}

/// Writes the ring's records that pass the filter, then either [`AdminResponse::End`] or,
/// with `follow`, every new record until the client hangs up (or stops reading for
/// [`crate::local_socket::REQUEST_TIMEOUT`]).
async fn observe(
    flows: &Flows,
    request: &ObserveRequest,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> Result<(), ConnectionError> {
    let filter = request.filter();
    if !request.follow {
        for record in flows.snapshot(&filter) {
            write_line(write, &AdminResponse::Flow(Box::new((*record).clone()))).await?;
        }
        write_line(write, &AdminResponse::End).await?;
        write.shutdown().await?;
        return Ok(());
    }
    let events = flows.subscribe(filter);
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        let line = match event {
            FlowEvent::Record(record) => AdminResponse::Flow(Box::new((*record).clone())),
            FlowEvent::Lagged(missed) => AdminResponse::Lagged { missed },
        };
        match write_line(write, &line).await {
            Ok(()) => {}
            // The observer left: the normal end of a followed stream.
            Err(ConnectionError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return Ok(())
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
