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
    /// Show this node's WireGuard key and peers, or rotate the key.
    Wireguard {
        #[command(subcommand)]
        action: Option<WireguardAction>,
    },
    /// List the pods attached on this node, with their addresses and eBPF counters.
    Pods {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum WireguardAction {
    /// Replace this node's key now and publish it; peers switch without dropping connections.
    Rotate,
}

fn call(cli: &Cli, request: AgentRequest) -> Result<AgentResponse, ExitCode> {
    protocol::call(&cli.socket, &request, protocol::DEFAULT_AGENT_TIMEOUT).map_err(|e| {
        eprintln!("meshctl: {e}");
        ExitCode::FAILURE
    })
}

fn wireguard(cli: &Cli, action: &Option<WireguardAction>) -> ExitCode {
    let request = match action {
        Some(WireguardAction::Rotate) => AgentRequest::RotateKey,
        None => AgentRequest::WireguardStatus,
    };
    match call(cli, request) {
        Ok(AgentResponse::Rotated { public_key }) => {
            println!("rotated; new public key {public_key}");
            ExitCode::SUCCESS
        }
        Ok(AgentResponse::Wireguard {
            public_key,
            peers,
            dropped_no_peer,
            queues,
            excluded,
        }) => {
            println!("public key {public_key}; dropped without a peer: {dropped_no_peer}");
            let queues: Vec<String> = queues
                .iter()
                .enumerate()
                .map(|(i, q)| format!("{i}: tx {} rx {}", q.tx_packets, q.rx_packets))
                .collect();
            println!("queues (packets) {}", queues.join(", "));
            for e in &excluded {
                println!("excluded node {}: {}", e.node, e.reason);
            }
            println!(
                "{:<16} {:<40} {:<18} {:>10} {:>12} {:>12} {:>8} {:>9} {:>6}",
                "PEER",
                "ENDPOINT",
                "POD-CIDR",
                "HANDSHAKE",
                "TX-BYTES",
                "RX-BYTES",
                "SPOOFED",
                "MALFORMED",
                "QUEUE"
            );
            for p in peers {
                let handshake = p
                    .last_handshake_secs
                    .map_or("never".to_string(), |s| format!("{s}s ago"));
                println!(
                    "{:<16} {:<40} {:<18} {:>10} {:>12} {:>12} {:>8} {:>9} {:>6}",
                    p.node,
                    p.endpoint,
                    p.pod_cidr,
                    handshake,
                    p.tx_bytes,
                    p.rx_bytes,
                    p.rx_spoofed,
                    p.rx_malformed,
                    p.queue
                );
            }
            ExitCode::SUCCESS
        }
        Ok(AgentResponse::Failed(e)) => {
            eprintln!("meshctl: {e}");
            ExitCode::FAILURE
        }
        Ok(other) => {
            eprintln!("meshctl: unexpected answer from the agent: {other:?}");
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Wireguard { action } = &cli.command {
        return wireguard(&cli, action);
    }
    match cli.command {
        Command::Wireguard { .. } => unreachable!("handled above"),
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
