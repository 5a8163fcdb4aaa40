//! `meshctl`: inspect a node's agent.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_agent::cni::protocol::{self, AgentRequest, AgentResponse};
use mesh_agent::config::DEFAULT_CNI_SOCKET;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect Veil's node agent")]
struct Cli {
    /// The agent's socket.
    #[arg(long, env = "VEIL_CNI_SOCKET", default_value = DEFAULT_CNI_SOCKET, global = true)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the pods attached on this node, with their addresses and eBPF counters.
    Pods {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Pods { json } => {
            match protocol::call(
                &cli.socket,
                &AgentRequest::ListPods,
                protocol::DEFAULT_AGENT_TIMEOUT,
            ) {
                Ok(AgentResponse::Pods { pods }) if json => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&pods).expect("pods serialise")
                    );
                    ExitCode::SUCCESS
                }
                Ok(AgentResponse::Pods { pods }) => {
                    println!(
                        "{:<16} {:<24} {:<16} {:>10} {:>12}",
                        "IP", "POD", "HOST-IF", "TX-PKTS", "TX-BYTES"
                    );
                    for p in pods {
                        let pod = p
                            .pod
                            .unwrap_or_else(|| p.key.container_id.chars().take(12).collect());
                        println!(
                            "{:<16} {:<24} {:<16} {:>10} {:>12}",
                            p.ip, pod, p.host_ifname, p.tx_packets, p.tx_bytes
                        );
                    }
                    ExitCode::SUCCESS
                }
                Ok(other) => {
                    eprintln!("meshctl: unexpected answer from the agent: {other:?}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("meshctl: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
