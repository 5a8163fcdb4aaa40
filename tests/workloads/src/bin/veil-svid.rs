//! `veil-svid`: asks the SPIFFE Workload API for this workload's X.509-SVID and prints its
//! SPIFFE ID, so end-to-end tests can check which identity a pod was given.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tokio::time::{timeout, Instant};
use veil_test_workloads::duration;

/// Limit for one connect-and-fetch attempt, so an endpoint that accepts but never answers
/// still lets us retry (or give up) near the --wait deadline.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between attempts while waiting for the agent to have an SVID for this pod.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Fetches this workload's X.509-SVID from the SPIFFE Workload API and prints its SPIFFE ID.
#[derive(Debug, Parser)]
#[command(name = "veil-svid", version)]
struct Cli {
    /// The Workload API endpoint (unix:///path or tcp://host:port).
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET",
        default_value = "unix:///run/veil/workload-api/socket"
    )]
    socket: String,
    /// The SPIFFE ID the SVID must carry, e.g. spiffe://cluster.local/ns/demo/sa/client.
    #[arg(long)]
    expect_id: Option<String>,
    /// Keep retrying this long while the Workload API refuses or is unreachable (the agent
    /// may not have the pod's SVID yet); 0s tries once.
    #[arg(long, default_value = "0s", value_parser = duration::parse)]
    wait: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("veil-svid: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let deadline = Instant::now() + cli.wait;
    let mut last_error = String::new();
    let id = loop {
        match fetch_id(&cli.socket).await {
            Ok(id) => break id,
            Err(error) => {
                let error = format!("{error:#}");
                if Instant::now() >= deadline {
                    bail!("no SVID from {} within {:?}: {error}", cli.socket, cli.wait);
                }
                // Once per distinct error: a minute of retries should not print 120 lines.
                if error != last_error {
                    eprintln!("veil-svid: not yet: {error}");
                    last_error = error;
                }
                tokio::time::sleep(RETRY_INTERVAL).await;
            }
        }
    };
    println!("{id}");
    if let Some(expected) = &cli.expect_id {
        if id != *expected {
            // A different identity is an answer, not a transient failure: no retry.
            bail!("the SVID's SPIFFE ID is {id}, expected {expected}");
        }
    }
    Ok(())
}

/// One attempt: connect, fetch the default X.509-SVID, return its SPIFFE ID.
async fn fetch_id(endpoint: &str) -> anyhow::Result<String> {
    timeout(ATTEMPT_TIMEOUT, async {
        let client = spiffe::WorkloadApiClient::connect_to(endpoint)
            .await
            .with_context(|| format!("connecting to the Workload API at {endpoint}"))?;
        let svid = client
            .fetch_x509_svid()
            .await
            .context("fetching the X.509-SVID")?;
        anyhow::Ok(svid.spiffe_id().to_string())
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer within {ATTEMPT_TIMEOUT:?}"))?
}
