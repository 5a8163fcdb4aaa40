//! The admin socket `meshctl` talks to, apart from the CNI socket: the CNI plugin never
//! sees admin answers, and admin requests may stream (`observe`). Root only, like the
//! CNI socket; one JSON request line per connection, then one answer line or a stream of
//! them.

pub mod protocol;
mod server;

pub use protocol::{call, AdminError, AdminRequest, AdminResponse, PodInfo};
pub use server::{serve, AdminService};

/// Where `meshctl` reaches the agent unless told otherwise; under `/run` like the CNI
/// socket, so a reboot clears it.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/veil/admin.sock";
