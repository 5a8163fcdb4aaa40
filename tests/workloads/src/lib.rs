//! Workloads for Veil's end-to-end tier: the echo server (`veil-echo`) lives here so tests
//! can run it in-process; the test client and the SVID fetcher are in `src/bin/`.

pub mod duration;
pub mod echo;

/// The generated `veil.test.Echo` gRPC client and server.
pub mod proto {
    tonic::include_proto!("veil.test");
}
