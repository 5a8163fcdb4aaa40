//! The admin socket's server side.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixListener;

use super::protocol::{AdminRequest, AdminResponse};
use crate::server::PodService;

/// What admin requests are answered from.
pub struct AdminService {
    /// The node's pods, counters, WireGuard and key rotation.
    pub pods: Arc<PodService>,
}

impl AdminService {
    async fn answer(&self, request: AdminRequest) -> AdminResponse {
        let outcome = match request {
            AdminRequest::Pods => Ok(AdminResponse::Pods {
                pods: self.pods.list(),
            }),
            AdminRequest::Wireguard => self.pods.wireguard_status(),
            AdminRequest::RotateKey => self.pods.rotate_key().await,
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
