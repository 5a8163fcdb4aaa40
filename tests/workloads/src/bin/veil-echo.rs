//! `veil-echo`: the test server of Veil's end-to-end tier (see `echo.rs`).

use std::io::IsTerminal;
use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;
use veil_test_workloads::echo;

/// Echo server for Veil's end-to-end tests: HTTP/1.1, h2c (prior knowledge) and gRPC
/// (veil.test.Echo/Echo) on one port. Every HTTP request gets 200 with a JSON body naming
/// the pod, the TCP peer, method, path, version, host, headers and body; GET /healthz gets
/// `ok`. The pod name is POD_NAME, else the host name. Logs go to stderr (RUST_LOG).
#[derive(Debug, Parser)]
#[command(name = "veil-echo", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "VEIL_ECHO_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: in a pod the log is read by kubectl and tests.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let listener = TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("listening on {}", cli.listen))?;
    let pod = echo::pod_name();
    tracing::info!(addr = %listener.local_addr()?, %pod, "serving HTTP/1.1, h2c and gRPC");
    // As a container's PID 1 the process gets no default SIGTERM action: without a handler
    // every pod deletion would wait out the whole grace period.
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        () = echo::serve(listener, pod) => {}
        _ = terminate.recv() => tracing::info!("SIGTERM, exiting"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT, exiting"),
    }
    Ok(())
}
