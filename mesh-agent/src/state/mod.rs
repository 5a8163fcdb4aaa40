//! The state layer: Kubernetes watches write it, the data plane (eBPF maps, the proxy,
//! WireGuard peers) reads immutable snapshots of it and never waits on the API server.

pub mod dataplane;

pub use dataplane::{CoveredPod, Dataplane, DataplaneRx, Workload};
