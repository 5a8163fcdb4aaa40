//! `bench-wireguard` (`make bench-wireguard`): one iperf3 TCP flow from a pod on node 0 to
//! a pod on node 1, through (a) plain routing, (b) Veil's WireGuard, (c) wireguard-go on
//! the same topology, measured in one run, with the CPU time of the process doing the
//! encryption. The last line is the RESULT line.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use veil_testbed::{bed::Pod, bins, eventually, process::Proc, BedConfig, TestBed};

/// Seconds per iperf3 run: long enough for TCP to settle, short enough for CI.
const SECONDS: u32 = 8;

/// The unit of /proc's CPU times.
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    ticks as f64 / clock_ticks_per_second()
}

/// CPU seconds the whole machine has spent busy (everything but idle and I/O wait): all
/// nodes, pods and iperf3 share these cores, so this is the budget each path competes for.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .enumerate()
        // user nice system idle iowait irq softirq steal: skip idle (3) and iowait (4).
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks_per_second()
}

/// One measured flow.
struct Flow {
    gbps: f64,
    /// CPU seconds the whole machine was busy during the flow.
    machine_cpu: f64,
}

impl Flow {
    /// Gigabits moved per CPU-second the machine spent: the path's cost, whoever paid it.
    fn gbit_per_cpu_s(&self) -> f64 {
        self.gbps * SECONDS as f64 / self.machine_cpu.max(0.001)
    }
}

/// Runs one iperf3 flow from `client` to `server`, with the machine's CPU use.
fn iperf(client: &Pod, server: &Pod) -> Result<Flow> {
    let busy_before = machine_busy_seconds();
    let gbps = iperf_gbps(client, server)?;
    Ok(Flow {
        gbps,
        machine_cpu: machine_busy_seconds() - busy_before,
    })
}

/// Runs one iperf3 flow from `client` to `server`; returns Gbit/s.
fn iperf_gbps(client: &Pod, server: &Pod) -> Result<f64> {
    let mut srv: Child = Command::new("ip")
        .args([
            "netns",
            "exec",
            server.netns.name(),
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5201",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start iperf3 server")?;
    let out = eventually(
        "iperf3 run",
        Duration::from_secs(SECONDS as u64 + 30),
        || {
            let out = client.netns.exec(&[
                "iperf3",
                "-c",
                &server.ip.to_string(),
                "-p",
                "5201",
                "-t",
                &SECONDS.to_string(),
                "-J",
            ])?;
            // Until the server listens, iperf3 reports "connection refused" in its JSON.
            let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            Ok((out.status.success() && json.get("error").is_none()).then_some(json))
        },
    );
    let _ = srv.kill();
    let _ = srv.wait();
    let json = out?;
    let Some(bps) = json["end"]["sum_received"]["bits_per_second"].as_f64() else {
        bail!(
            "iperf3 gave no result: {}",
            json.get("error").unwrap_or(&json["end"])
        );
    };
    Ok(bps / 1e9)
}

fn pods(bed: &TestBed) -> Result<(Pod, Pod)> {
    let a = bed.add_pod(0, "bench-a")?;
    let c = bed.add_pod(1, "bench-c")?;
    eventually("cross-node ping", Duration::from_secs(20), || {
        Ok(a.ping(c.ip).ok())
    })?;
    Ok((a, c))
}

fn plain() -> Result<Flow> {
    let bed = TestBed::start(BedConfig {
        encryption: "none",
        ..Default::default()
    })?;
    let (a, c) = pods(&bed)?;
    iperf(&a, &c)
}

fn veil() -> Result<(Flow, f64)> {
    let bed = TestBed::start(BedConfig::default())?;
    let (a, c) = pods(&bed)?;
    let pids = [bed.agent_pid(0).unwrap_or(0), bed.agent_pid(1).unwrap_or(0)];
    let before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let flow = iperf(&a, &c)?;
    let after: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    Ok((flow, after - before))
}

/// Plain-routed bed, then a wireguard-go device on each node and /32 routes for the two
/// pods through them (more specific than the agents' routes, which the agents leave alone).
fn wireguard_go() -> Result<(Flow, f64)> {
    let bed = TestBed::start(BedConfig {
        encryption: "none",
        ..Default::default()
    })?;
    let (a, c) = pods(&bed)?;
    let mut procs = Vec::new();
    let mut keys = Vec::new();
    for i in 0..2 {
        let node = bed.node(i);
        let dev = format!("wgb{}n{i}", bed.index);
        let mut cmd = Command::new(bins::tool("wireguard-go")?);
        cmd.args(["-f", &dev])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
        procs.push(Proc::spawn(
            "wireguard-go",
            cmd,
            &node.dir.join("wireguard-go.log"),
            Some(&node.netns.path()),
        )?);
        let key = Command::new("wg").arg("genkey").output()?.stdout;
        let path = node.dir.join("wg.key");
        std::fs::write(&path, &key)?;
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(&mut child.stdin.take().expect("piped"), &key)?;
        let public = String::from_utf8(child.wait_with_output()?.stdout)?
            .trim()
            .to_string();
        keys.push((dev, path, public));
    }
    for (i, (pod_here, pod_there)) in [(&a, &c), (&c, &a)].into_iter().enumerate() {
        let node = bed.node(i);
        let peer = bed.node(1 - i);
        let (dev, key, _) = &keys[i];
        let peer_public = &keys[1 - i].2;
        eventually("wireguard-go up", Duration::from_secs(10), || {
            Ok(node
                .netns
                .exec(&["wg", "show", dev])?
                .status
                .success()
                .then_some(()))
        })?;
        let out = node.netns.exec(&[
            "wg",
            "set",
            dev,
            "listen-port",
            "51820",
            "private-key",
            key.to_str().unwrap_or_default(),
            "peer",
            peer_public,
            "endpoint",
            &format!("{}:51820", peer.ip),
            "allowed-ips",
            &peer.pod_cidr.to_string(),
        ])?;
        if !out.status.success() {
            bail!("wg set: {}", String::from_utf8_lossy(&out.stderr));
        }
        // Same inner MTU as Veil's device: underlay 1500 minus 60 for IPv4.
        node.netns.ip(&["link", "set", dev, "mtu", "1440", "up"])?;
        node.netns
            .ip(&["route", "add", &format!("{}/32", pod_there.ip), "dev", dev])?;
        let _: Ipv4Addr = pod_here.ip;
    }
    eventually("ping through wireguard-go", Duration::from_secs(20), || {
        Ok(a.ping(c.ip).ok())
    })?;
    let before: f64 = procs.iter().map(|p| cpu_seconds(p.pid())).sum();
    let flow = iperf(&a, &c)?;
    let after: f64 = procs.iter().map(|p| cpu_seconds(p.pid())).sum();
    Ok((flow, after - before))
}

fn main() -> Result<()> {
    let plain = plain()?;
    let machine = |f: &Flow| {
        format!(
            "machine busy {:.1} CPU-s, {:.2} Gbit per CPU-s",
            f.machine_cpu,
            f.gbit_per_cpu_s()
        )
    };
    println!(
        "plain routing:   {:.2} Gbit/s (kernel only); {}",
        plain.gbps,
        machine(&plain)
    );
    let (veil, veil_cpu) = veil()?;
    println!(
        "veil wireguard:  {:.2} Gbit/s, agents used {veil_cpu:.1} CPU-s in {SECONDS} s; {}",
        veil.gbps,
        machine(&veil)
    );
    let (wggo, wggo_cpu) = wireguard_go()?;
    println!(
        "wireguard-go:    {:.2} Gbit/s, wireguard-go used {wggo_cpu:.1} CPU-s in {SECONDS} s; {}",
        wggo.gbps,
        machine(&wggo)
    );
    // Every node, pod and iperf3 here shares the machine's cores, so a path can go no
    // faster than (cores x Gbit per CPU-s): the ceiling its cost per bit sets here.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let ceiling = cores * veil.gbit_per_cpu_s();
    println!(
        "cost ceiling:    Veil at {:.2} Gbit per CPU-s on {cores} cores: {ceiling:.2} Gbit/s = {:.2} of plain",
        veil.gbit_per_cpu_s(),
        ceiling / plain.gbps
    );
    println!(
        "RESULT wireguard veil_gbps={:.2} wggo_gbps={:.2} plain_gbps={:.2} veil_vs_wggo={:.2} veil_vs_plain={:.2}",
        veil.gbps,
        wggo.gbps,
        plain.gbps,
        veil.gbps / wggo.gbps,
        veil.gbps / plain.gbps
    );
    Ok(())
}
