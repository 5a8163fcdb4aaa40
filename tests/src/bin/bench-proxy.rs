//! `bench-proxy` (`make bench-proxy`): HTTP/1.1 keep-alive requests from a client pod on
//! node 0 to a server pod on node 1 (nginx answering 1 KiB), WireGuard between the nodes,
//! measured in one run along four paths:
//!
//! * direct: no policy selects the server, nothing but routing and WireGuard;
//! * veil: 1000 rules in ten `L7Policy` objects select the server; its agent's proxy
//!   judges every request (the client is allowed by rule 507, a ServiceAccount rule);
//! * nginx and HAProxy: each a plain reverse proxy in node 1's own namespace (where the
//!   agent runs), with pooled keep-alive upstream connections to the server pod, as many
//!   workers/threads as the agent's proxy has.
//!
//! Each path gets a throughput run (wrk, fixed concurrency, as fast as it goes) and a
//! latency run (wrk with a fixed pace, about 1000 requests/s); the paths take turns for
//! three rounds and each is summed up by its medians. The added latency is Veil's
//! percentile minus the direct path's. The agent's resident memory is sampled all along
//! (its peak is reported). The last line is the RESULT line.
//! `VEIL_BENCH_PERF=<file>` also records the agent with `perf record -g` during its runs.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use veil_testbed::{bed::Pod, eventually, process::Proc, BedConfig, TestBed, Workload};

#[path = "../../../l7-policy/benches/workload.rs"]
mod workload;

/// Seconds per wrk run.
const SECONDS: u32 = 5;
/// Rounds of all four paths.
const ROUNDS: usize = 3;
/// Open connections of the throughput runs.
const CONNECTIONS: u32 = 16;
/// Connections of the paced runs, each waiting `PACE_MS` after every answer: about
/// 1000 requests/s in all while the answers are fast.
const PACED_CONNECTIONS: u32 = 20;
const PACE_MS: u32 = 20;
/// The server pod's port and the ports of the two reverse proxies on node 1.
const SERVER_PORT: u16 = 8080;
const NGINX_PORT: u16 = 18080;
const HAPROXY_PORT: u16 = 18081;
/// Rules selecting the server, and the rule that allows the client.
const RULES: usize = 1000;
const CLIENT_RULE: usize = 507;
/// Worker threads of every proxy (the agent's default).
const PROXY_THREADS: usize = mesh_agent::proxy::DEFAULT_THREADS;

/// What the wrk script prints when a run ends; parsed by [`WrkRun::parse`].
const WRK_SCRIPT: &str = r#"
-- Set by the bench for the paced runs: milliseconds each connection waits after an answer.
local pace = tonumber(os.getenv("VEIL_BENCH_PACE_MS") or "0")
if pace > 0 then
  delay = function() return pace end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK requests=%d duration_us=%d errors=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

/// One wrk run's summary.
#[derive(Debug, Clone, Copy)]
struct WrkRun {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

impl WrkRun {
    /// Reads the `WRK` line of [`WRK_SCRIPT`]; a run with any error (connect, read,
    /// timeout, non-2xx status) is refused: its numbers would not measure the path.
    fn parse(out: &str) -> Result<WrkRun> {
        let line = out
            .lines()
            .find(|l| l.starts_with("WRK "))
            .with_context(|| format!("wrk printed no summary: {out}"))?;
        let field = |name: &str| -> Result<f64> {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no {name} in {line:?}"))
        };
        if field("errors")? > 0.0 {
            bail!("wrk counted errors (or non-2xx answers): {out}");
        }
        let requests = field("requests")?;
        let seconds = field("duration_us")? / 1e6;
        Ok(WrkRun {
            rps: requests / seconds.max(1e-6),
            p50_us: field("p50_us")?,
            p99_us: field("p99_us")?,
        })
    }
}

/// The measured numbers of one path.
struct PathResult {
    throughput: WrkRun,
    paced: WrkRun,
}

/// Runs wrk in `client` against `url`; `pace_ms` 0 means as fast as it goes.
fn wrk(client: &Pod, script: &Path, url: &str, connections: u32, pace_ms: u32) -> Result<WrkRun> {
    let out = Command::new("ip")
        .args(["netns", "exec", client.netns.name(), "wrk", "-t1"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{SECONDS}s"))
        .arg("--timeout=5s")
        .arg("-s")
        .arg(script)
        .arg(url)
        .env("VEIL_BENCH_PACE_MS", pace_ms.to_string())
        .output()
        .context("run wrk (Debian's wrk package; `make setup` installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk against {url} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    WrkRun::parse(&text)
}

/// A throughput run then a paced run against `url`, after a short warm-up (connection
/// pools, WireGuard session, caches).
fn measure(client: &Pod, script: &Path, url: &str) -> Result<PathResult> {
    eventually(&format!("{url} answers"), Duration::from_secs(20), || {
        Ok((client.curl(&[url])?.status == 200).then_some(()))
    })?;
    let throughput = wrk(client, script, url, CONNECTIONS, 0)?;
    let paced = wrk(client, script, url, PACED_CONNECTIONS, PACE_MS)?;
    Ok(PathResult { throughput, paced })
}

/// Decimal megabytes (the unit of the RESULT line's `agent_rss_mb`) in one MiB.
const MB_PER_MIB: f64 = 1024.0 * 1024.0 / 1_000_000.0;

/// Resident memory of a process in MiB (`VmRSS`), 0 if it cannot be read.
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Samples a process's resident memory every 100 ms until dropped; keeps the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, peak) = (stop.clone(), peak_kib.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max((rss_mib(pid) * 1024.0) as u64, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        RssSampler {
            stop,
            peak_kib,
            thread: Some(thread),
        }
    }

    /// The peak seen so far, in MiB.
    fn peak_mib(&self) -> f64 {
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The 1000 rules of the workload the policy benchmark uses (`l7-policy/benches`), in
/// ten policies of 100 rules selecting `app=api` in `shop`, applied through the API.
fn apply_policies(bed: &TestBed) -> Result<Vec<String>> {
    let specs = workload::specs(RULES, 100);
    let mut names = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        let name = format!("bench-{i:02}");
        let policy = serde_json::json!({
            "apiVersion": "veil.dev/v1alpha1",
            "kind": "L7Policy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec,
        });
        bed.apply_policy(&policy.to_string())?;
        names.push(name);
    }
    Ok(names)
}

/// nginx as the origin in the server pod: 1 KiB for every GET, no logging.
fn nginx_origin(dir: &Path) -> String {
    let body = "x".repeat(1023);
    format!(
        "worker_processes 1;\npid {dir}/origin.pid;\nerror_log {dir}/origin-error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 1000000;\n\
           client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp;\n\
           fastcgi_temp_path {dir}/tmp; uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;\n\
           server {{ listen {SERVER_PORT}; default_type text/plain;\n\
             location / {{ return 200 \"{body}\\n\"; }} }} }}\n",
        dir = dir.display()
    )
}

/// nginx as a plain reverse proxy on node 1 to the server pod, pooled upstream.
fn nginx_proxy(dir: &Path, node_ip: &str, server: &str) -> String {
    format!(
        "worker_processes {PROXY_THREADS};\npid {dir}/proxy.pid;\nerror_log {dir}/proxy-error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; keepalive_requests 1000000;\n\
           client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp;\n\
           fastcgi_temp_path {dir}/tmp; uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;\n\
           upstream origin {{ server {server}:{SERVER_PORT}; keepalive 64; }}\n\
           server {{ listen {node_ip}:{NGINX_PORT};\n\
             location / {{ proxy_pass http://origin; proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\"; proxy_buffering off; }} }} }}\n",
        dir = dir.display()
    )
}

/// HAProxy as a plain HTTP reverse proxy on node 1 to the server pod (keep-alive both
/// sides, connection reuse: HAProxy's defaults in HTTP mode).
fn haproxy_config(node_ip: &str, server: &str) -> String {
    format!(
        "global\n  nbthread {PROXY_THREADS}\n  maxconn 8192\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n\
         frontend bench\n  bind {node_ip}:{HAPROXY_PORT}\n  default_backend origin\n\
         backend origin\n  server s1 {server}:{SERVER_PORT}\n"
    )
}

/// nginx in the foreground with `conf`, its errors on stderr (the process's log).
fn nginx_argv(conf: &Path) -> [&str; 7] {
    let conf = conf.to_str().unwrap_or_default();
    ["nginx", "-e", "stderr", "-g", "daemon off;", "-c", conf]
}

/// Starts `argv` in node `i`'s namespace (where the agent runs), logging to its dir.
fn spawn_on_node(bed: &TestBed, i: usize, name: &str, argv: &[&str]) -> Result<Proc> {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    bed.node(i).spawn_daemon(name, name, cmd)
}

fn main() -> Result<()> {
    veil_testbed::require_root();
    let started = Instant::now();
    let bed = TestBed::start(BedConfig {
        nodes: 2,
        agent_log: "info",
        ..Default::default()
    })?;
    bed.create_namespace("shop", &[("team", "shop")])?;
    // The client is whom rule 507 names: ServiceAccount sa-507 in namespace ns-7.
    let client_ns = format!("ns-{}", CLIENT_RULE % 50);
    bed.create_namespace(&client_ns, &[])?;
    let server = bed.add_workload(
        1,
        "api",
        &Workload::new("shop")
            .label("app", "api")
            .service_account("api")
            .port("http", SERVER_PORT),
    )?;
    let client = bed.add_workload(
        0,
        "client",
        &Workload::new(&client_ns).service_account(&format!("sa-{CLIENT_RULE}")),
    )?;

    let work = tempfile::tempdir()?;
    let dir = work.path();
    std::fs::create_dir_all(dir.join("tmp"))?;
    let script = dir.join("bench.lua");
    std::fs::write(&script, WRK_SCRIPT)?;
    let server_ip = server.ip.to_string();
    let node_ip = bed.node(1).ip.to_string();

    let origin_conf = dir.join("origin.conf");
    std::fs::write(&origin_conf, nginx_origin(dir))?;
    let mut origin = server.spawn("nginx-origin", &nginx_argv(&origin_conf))?;
    server.wait_listening(SERVER_PORT, Some(&mut origin))?;

    let proxy_conf = dir.join("proxy.conf");
    std::fs::write(&proxy_conf, nginx_proxy(dir, &node_ip, &server_ip))?;
    let _nginx = spawn_on_node(&bed, 1, "nginx-proxy", &nginx_argv(&proxy_conf))?;
    let haproxy_cfg = dir.join("haproxy.cfg");
    std::fs::write(&haproxy_cfg, haproxy_config(&node_ip, &server_ip))?;
    let _haproxy = spawn_on_node(
        &bed,
        1,
        "haproxy",
        &["haproxy", "-db", "-f", &haproxy_cfg.to_string_lossy()],
    )?;

    let path = "/api/v1/svc507/items";
    let direct_url = format!("http://{server_ip}:{SERVER_PORT}{path}");
    let urls = [
        ("direct", direct_url.clone()),
        ("nginx", format!("http://{node_ip}:{NGINX_PORT}{path}")),
        ("haproxy", format!("http://{node_ip}:{HAPROXY_PORT}{path}")),
        ("veil", direct_url.clone()),
    ];
    let agent = bed.agent_pid(1).context("node 1 has no agent")?;
    let rss_before = rss_mib(agent);
    let sampler = RssSampler::start(agent);
    // VEIL_BENCH_PERF=<file>: where the agent's time goes, recorded by perf while it
    // serves the Veil runs (`perf report -i <file>` afterwards).
    let mut perf_out = std::env::var_os("VEIL_BENCH_PERF");
    let mut runs: Vec<Vec<PathResult>> = urls.iter().map(|_| Vec::new()).collect();
    // The paths take turns, round after round, and each is summed up by its medians: this
    // machine's speed drifts by tens of percent over minutes.
    for round in 1..=ROUNDS {
        for (i, (name, url)) in urls.iter().enumerate() {
            let policies = if *name == "veil" {
                enforce(&bed, &client, &server_ip)?
            } else {
                Vec::new()
            };
            // Taken by the first Veil run only (a `take` before the name check would spend
            // it on the direct path).
            let perf_for_this = if *name == "veil" {
                perf_out.take()
            } else {
                None
            };
            let perf = match perf_for_this {
                Some(out) => Some(
                    Command::new("perf")
                        .args(["record", "-F", "999", "-g", "-p", &agent.to_string(), "-o"])
                        .arg(out)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn()
                        .context("start perf record (Debian's linux-perf)")?,
                ),
                None => None,
            };
            let result = measure(&client, &script, url);
            if let Some(mut perf) = perf {
                // SIGINT makes perf write its file and exit.
                let _ = Command::new("kill")
                    .args(["-INT", &perf.id().to_string()])
                    .status();
                let _ = perf.wait();
            }
            let result = result?;
            report(&format!("{name} #{round}"), &result);
            runs[i].push(result);
            if !policies.is_empty() {
                delete_policies(&bed, &client, &server_ip, &policies)?;
            }
        }
    }
    let agent_rss = sampler.peak_mib();
    drop(sampler);
    let counters = bed.meshctl(1, &["proxy"])?;
    let judged: serde_json::Value = serde_json::from_str(&counters).unwrap_or_default();
    println!(
        "veil: agent RSS {rss_before:.1} MiB before, peak {agent_rss:.1} MiB under load; proxy counters {judged}"
    );
    let [direct, nginx, haproxy, veil] = [0, 1, 2, 3].map(|i| median(&runs[i]));
    for (name, r) in [
        ("direct", &direct),
        ("nginx", &nginx),
        ("haproxy", &haproxy),
        ("veil", &veil),
    ] {
        report(&format!("{name} (median)"), r);
    }
    let added = |f: fn(&WrkRun) -> f64| f(&veil.paced) - f(&direct.paced);
    // The bed's agents inherit the environment, so VEIL_PROXY_THREADS sets Veil's workers.
    let veil_workers = std::env::var("VEIL_PROXY_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(PROXY_THREADS);
    println!(
        "bench took {:.0} s; {veil_workers} proxy workers for Veil, {PROXY_THREADS} each for nginx and HAProxy; \
         wrk -t1 -c{CONNECTIONS} for {SECONDS} s (paced: -c{PACED_CONNECTIONS}, {PACE_MS} ms between requests); \
         medians of {ROUNDS} rounds",
        started.elapsed().as_secs_f64()
    );
    println!(
        "RESULT proxy rps_veil={:.0} rps_nginx={:.0} rps_haproxy={:.0} rps_direct={:.0} p50_added_us={:.0} p99_added_us={:.0} veil_vs_nginx={:.2} agent_rss_mb={:.1}",
        veil.throughput.rps,
        nginx.throughput.rps,
        haproxy.throughput.rps,
        direct.throughput.rps,
        added(|r| r.p50_us),
        added(|r| r.p99_us),
        veil.throughput.rps / nginx.throughput.rps.max(1.0),
        // The goal is in MB: decimal megabytes, not the MiB printed above.
        agent_rss * MB_PER_MIB
    );
    Ok(())
}

/// Applies the 1000 rules and waits until the proxy on node 1 refuses a path no rule
/// allows; the policies' names.
fn enforce(bed: &TestBed, client: &Pod, server_ip: &str) -> Result<Vec<String>> {
    let policies = apply_policies(bed)?;
    let denied = format!("http://{server_ip}:{SERVER_PORT}/admin");
    let applied = Instant::now();
    eventually("the policies enforced", Duration::from_secs(30), || {
        Ok((client.curl(&[&denied])?.status == 403).then_some(()))
    })?;
    println!(
        "veil: {RULES} rules in {} policies enforced {} ms after they were applied",
        policies.len(),
        applied.elapsed().as_millis()
    );
    Ok(policies)
}

/// Deletes the bench's policies and waits until the server is reached directly again.
fn delete_policies(bed: &TestBed, client: &Pod, server_ip: &str, names: &[String]) -> Result<()> {
    let api = kube::Api::<veil_l7_policy::L7Policy>::namespaced(bed.client.clone(), "shop");
    for name in names {
        bed.block_on(api.delete(name, &Default::default()))?;
    }
    let url = format!("http://{server_ip}:{SERVER_PORT}/admin");
    eventually("the policies gone", Duration::from_secs(30), || {
        Ok((client.curl(&[&url])?.status == 200).then_some(()))
    })
}

/// Per metric, the median over runs.
fn median(runs: &[PathResult]) -> PathResult {
    let pick = |f: &dyn Fn(&PathResult) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let run = |f: &dyn Fn(&PathResult) -> &WrkRun| WrkRun {
        rps: pick(&|r| f(r).rps),
        p50_us: pick(&|r| f(r).p50_us),
        p99_us: pick(&|r| f(r).p99_us),
    };
    PathResult {
        throughput: run(&|r| &r.throughput),
        paced: run(&|r| &r.paced),
    }
}

/// One line per run: throughput, and latency at about 1000 requests/s.
fn report(name: &str, r: &PathResult) {
    println!(
        "{name:<18} {:>8.0} req/s at c={CONNECTIONS} (p50 {:.0} us, p99 {:.0} us); paced {:.0} req/s: p50 {:.0} us, p99 {:.0} us",
        r.throughput.rps,
        r.throughput.p50_us,
        r.throughput.p99_us,
        r.paced.rps,
        r.paced.p50_us,
        r.paced.p99_us
    );
}
