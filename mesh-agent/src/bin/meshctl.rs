//! `meshctl`: inspect a node's agent over its admin socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_agent::admin::protocol::ObserveRequest;
use mesh_agent::admin::{self, AdminRequest, AdminResponse};
use mesh_agent::flows::FlowRecord;

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
    /// Show flow records: every verdict of this node's proxy (and anti-spoofing), newest
    /// last; `--verdict deny` answers "who was refused, by which policy".
    Observe {
        /// Only flows from or to this namespace.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Only flows from or to this pod (with `--namespace`: that namespace's pod).
        #[arg(long)]
        pod: Option<String>,
        /// Only flows with this verdict.
        #[arg(long, value_parser = ["allow", "deny", "audit-deny"])]
        verdict: Option<String>,
        /// Only flows decided by this policy, `<namespace>/<name>`.
        #[arg(long)]
        policy: Option<String>,
        /// Keep streaming new flows until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the proxy's counters.
    Proxy,
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
        "{:<16} {:<24} {:<16} {:>10} {:>12} {:>8}",
        "IP", "POD", "HOST-IF", "TX-PKTS", "TX-BYTES", "SPOOFED"
    );
    for p in pods {
        let pod = p
            .pod
            .unwrap_or_else(|| p.key.container_id.chars().take(12).collect());
        println!(
            "{:<16} {:<24} {:<16} {:>10} {:>12} {:>8}",
            p.ip, pod, p.host_ifname, p.tx_packets, p.tx_bytes, p.spoofed_packets
        );
    }
    ExitCode::SUCCESS
}

/// One line of the `observe` table.
fn flow_row(r: &FlowRecord) -> String {
    let end = |e: &mesh_agent::flows::Endpoint| match (&e.namespace, &e.pod) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
        _ => e.ip.to_string(),
    };
    let destination = match r.destination.port {
        Some(port) => format!("{}:{port}", end(&r.destination)),
        None => end(&r.destination),
    };
    let verdict = serde_json::to_value(r.verdict)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let kind = serde_json::to_value(r.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    format!(
        "{:<13} {:<28} {:<32} {:<8} {:<7} {:<28} {:>6} {:<10} {:<24} {}",
        r.time_unix_ms,
        end(&r.source),
        destination,
        kind,
        r.method.as_deref().unwrap_or("-"),
        r.path.as_deref().unwrap_or("-"),
        r.status.map_or("-".to_string(), |s| s.to_string()),
        verdict,
        r.policy.as_deref().unwrap_or("-"),
        r.reason.as_deref().unwrap_or("")
    )
}

fn observe(cli: &Cli, request: ObserveRequest, json: bool) -> ExitCode {
    let timeout = (!request.follow).then_some(admin::protocol::DEFAULT_TIMEOUT);
    let mut connection = match admin::protocol::Connection::open(
        &cli.socket,
        &AdminRequest::Observe(request),
        timeout,
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("meshctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !json {
        println!(
            "{:<13} {:<28} {:<32} {:<8} {:<7} {:<28} {:>6} {:<10} {:<24} REASON",
            "TIME-MS",
            "SOURCE",
            "DESTINATION",
            "KIND",
            "METHOD",
            "PATH",
            "STATUS",
            "VERDICT",
            "POLICY"
        );
    }
    while let Some(answer) = connection.next_answer() {
        match answer {
            Ok(AdminResponse::Flow(record)) if json => match serde_json::to_string(&record) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("meshctl: {e}"),
            },
            Ok(AdminResponse::Flow(record)) => println!("{}", flow_row(&record)),
            Ok(AdminResponse::Lagged { missed }) => {
                eprintln!("meshctl: fell behind; {missed} flows skipped")
            }
            Ok(AdminResponse::End) => return ExitCode::SUCCESS,
            Ok(AdminResponse::Failed { error }) => {
                eprintln!("meshctl: {error}");
                return ExitCode::FAILURE;
            }
            Ok(other) => return unexpected(&other),
            Err(e) => {
                eprintln!("meshctl: {e}");
                return ExitCode::FAILURE;
            }
        }
        // A closed stdout (`| head`) ends a followed stream quietly.
        if std::io::Write::flush(&mut std::io::stdout()).is_err() {
            return ExitCode::SUCCESS;
        }
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
        Command::Observe {
            namespace,
            pod,
            verdict,
            policy,
            follow,
            json,
        } => {
            let verdict = match verdict
                .as_deref()
                .map(|v| serde_json::from_value(serde_json::Value::String(v.to_string())))
            {
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    eprintln!("meshctl: --verdict: {e}");
                    return ExitCode::FAILURE;
                }
                None => None,
            };
            let request = ObserveRequest {
                namespace: namespace.clone(),
                pod: pod.clone(),
                verdict,
                policy: policy.clone(),
                follow: *follow,
            };
            Ok(observe(&cli, request, *json))
        }
        Command::Proxy => call(&cli, AdminRequest::Proxy).map(|answer| match answer {
            AdminResponse::Proxy(stats) => match serde_json::to_string_pretty(&stats) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("meshctl: {e}");
                    ExitCode::FAILURE
                }
            },
            other => unexpected(&other),
        }),
    };
    outcome.unwrap_or_else(|code| code)
}
