//! Veil's per-node agent as a library: the binaries `mesh-agent`, `mesh-cni` and
//! `meshctl` are thin wrappers around these modules.

pub mod agent;
pub mod cni;
pub mod config;
pub mod fatal;
pub mod identity;
pub mod ipam;
pub mod k8s;
pub mod netns;
pub mod node_install;
pub mod peers;
pub mod podnet;
pub mod redirect;
pub mod routes;
pub mod server;
pub mod state;
pub mod wireguard;

/// The per-pod counters moved into [`redirect`]; this path keeps their callers unchanged.
pub use redirect::pod_counters;
