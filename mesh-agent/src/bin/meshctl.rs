//! `meshctl`: inspect a node's agent over its admin socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_agent::admin::{self, AdminRequest, AdminResponse};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect Veil's node agent")]
struct Cli {
    /// The agent's admin socket.
    #[arg(long, env = "VEIL_ADMIN_SOCKET", default_value = admin::DEFAULT_ADMIN_SOCKET, global = true)]
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

/// Sends one request; the agent's own failure and an unreachable agent both end here.
fn call(cli: &Cli, request: AdminRequest) -> Result<AdminResponse, ExitCode> {
    match admin::call(&cli.socket, &request, admin::protocol::DEFAULT_TIMEOUT) {
        Ok(AdminResponse::Failed { error }) => {
            eprintln!("meshctl: {error}");
            Err(ExitCode::FAILURE)
        }
        Ok(answer) => Ok(answer),
        Err(e) => {
            eprintln!("meshctl: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

fn unexpected(answer: &AdminResponse) -> ExitCode {
    eprintln!("meshctl: unexpected answer from the agent: {answer:?}");
    ExitCode::FAILURE
}

fn print_wireguard(answer: AdminResponse) -> ExitCode {
    let AdminResponse::Wireguard {
        public_key,
        peers,
        dropped_no_peer,
        queues,
        excluded,
    } = answer
    else {
        return unexpected(&answer);
    };
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

fn print_pods(answer: AdminResponse, json: bool) -> ExitCode {
    let AdminResponse::Pods { pods } = answer else {
        return unexpected(&answer);
    };
    if json {
        match serde_json::to_string_pretty(&pods) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("meshctl: {e}");
                return ExitCode::FAILURE;
            }
        }
        return ExitCode::SUCCESS;
    }
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Wireguard {
            action: Some(WireguardAction::Rotate),
        } => call(&cli, AdminRequest::RotateKey).map(|answer| match answer {
            AdminResponse::Rotated { public_key } => {
                println!("rotated; new public key {public_key}");
                ExitCode::SUCCESS
            }
            other => unexpected(&other),
        }),
        Command::Wireguard { action: None } => {
            call(&cli, AdminRequest::Wireguard).map(print_wireguard)
        }
        Command::Pods { json } => call(&cli, AdminRequest::Pods).map(|a| print_pods(a, *json)),
    };
    outcome.unwrap_or_else(|code| code)
}
