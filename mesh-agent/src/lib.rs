//! Veil's per-node agent as a library: the binaries `mesh-agent`, `mesh-cni` and
//! `meshctl` are thin wrappers around these modules.

pub mod admin;
pub mod agent;
pub mod cni;
pub mod config;
pub mod fatal;
pub mod flows;
pub mod identity;
pub mod ipam;
pub mod k8s;
pub mod local_socket;
pub mod netns;
pub mod node_install;
pub mod peers;
pub mod podnet;
pub mod policy_status;
pub mod proxy;
pub mod redirect;
pub mod routes;
pub mod server;
pub mod state;
pub mod wireguard;
