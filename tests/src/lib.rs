//! Veil's test bed: a real Kubernetes API server with etcd, an underlay bridge, nodes as
//! network namespaces each running a real `mesh-agent`, and pods as network namespaces
//! wired by running `mesh-cni` exactly as a container runtime does. Every test that needs
//! a cluster builds one [`TestBed`]; everything is torn down when it drops, also when the
//! test panics. On request ([`BedConfig::kube_proxy`]) every node also runs a real
//! `kube-proxy`, and tests run real workloads behind Services: Pod objects with a
//! kubelet's status ([`TestBed::add_workload`]), Services with the EndpointSlices no
//! controller manager writes here ([`TestBed::create_service`]), servers and `curl` in
//! pods ([`Pod::spawn`], [`Pod::curl`]).
//!
//! Addresses come from the benchmarking range only: underlay `198.18.<bed>.0/24`, pod
//! CIDRs from `198.19.0.0/16`, Services `198.19.240.0/24`.

pub mod bed;
pub mod bins;
pub mod capture;
pub mod control_plane;
pub mod issuer;
pub mod kind;
pub mod net;
pub mod objects;
pub mod pki;
pub mod process;

pub use bed::{BedConfig, CniCall, CniOutput, HttpReply, Pod, TestBed};
pub use mesh_agent::admin::{AdminRequest, AdminResponse};
pub use mesh_agent::cni::protocol::{AgentRequest, AgentResponse};
pub use objects::{ServicePortSpec, Workload};
pub use process::eventually;

/// Fails unless the test runs as root, with a message saying why it must.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test builds network namespaces, veths and eBPF programs: run it as root (`make test` does)"
    );
}
