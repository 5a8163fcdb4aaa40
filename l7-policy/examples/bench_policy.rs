//! Prints evaluation latency percentiles and compile time; the last line is
//! `RESULT policy eval_ns_p99_1000_rules=<n> eval_ns_p99_10_rules=<n> compile_ms_10k_policies=<n>`.
//!
//! `cargo run --release -p veil-l7-policy --example bench-policy`
//!
//! Latency: every evaluation is timed on its own with two `Instant::now()` calls, over
//! 300,000 evaluations of a mixed request stream (allowed and denied) after a warm-up,
//! and the 99th percentile is reported. The figure includes the timer's own cost (about
//! 20-40 ns on this kind of machine), so it slightly overstates the engine. The request
//! structs are built outside the timed region, as the proxy already has them.
//!
//! Compile: 10,000 single-rule policies (1% with regexes) are checked and compiled, then
//! one matcher for a pod that all of them select is built; wall time of the whole.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use veil_l7_policy::{CompiledPolicy, Decision};

#[path = "../benches/workload.rs"]
mod workload;

const SAMPLES: usize = 300_000;

/// Returns (p50, p99, p99.9) nanoseconds and the share of allowed requests.
fn eval_percentiles(rules: usize) -> (u64, u64, u64, f64) {
    let labels = workload::pod_labels();
    let policies = workload::policies(rules, 10);
    let matcher = workload::matcher(&policies, &labels);
    let reqs = workload::requests(rules, 4096, 0x9e37_79b9);
    let mut times = Vec::with_capacity(SAMPLES);
    let mut allowed = 0usize;
    for round in 0..2 {
        times.clear();
        allowed = 0;
        for i in 0..SAMPLES {
            let r = &reqs[i % reqs.len()];
            let (src, req) = (r.source(), r.request());
            let start = Instant::now();
            let v = black_box(matcher.evaluate(black_box(&src), black_box(&req)));
            let ns = start.elapsed().as_nanos() as u64;
            allowed += usize::from(v.decision == Decision::Allow);
            if round == 1 {
                times.push(ns);
            }
        }
    }
    times.sort_unstable();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    (
        pct(0.50),
        pct(0.99),
        pct(0.999),
        allowed as f64 / SAMPLES as f64,
    )
}

fn compile_ms(policies: usize) -> f64 {
    let labels = workload::pod_labels();
    let specs = workload::specs(policies, 1);
    let start = Instant::now();
    let compiled: Vec<Arc<CompiledPolicy>> = specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Arc::new(CompiledPolicy::compile(
                "shop",
                &format!("policy-{i:05}"),
                s,
            ))
        })
        .collect();
    let m = workload::matcher(&compiled, &labels);
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    assert!(compiled.iter().all(|p| p.errors().is_empty()));
    println!(
        "compiled {policies} policies into {} alternatives",
        m.alternatives()
    );
    ms
}

fn main() {
    let mut p99 = Vec::new();
    for rules in [10, 100, 1000, 10_000] {
        let (p50, p, p999, allowed) = eval_percentiles(rules);
        println!(
            "eval rules={rules:>6} p50={p50}ns p99={p}ns p99.9={p999}ns allowed={:.0}%",
            allowed * 100.0
        );
        p99.push((rules, p));
    }
    let compile = compile_ms(10_000);
    println!("compile 10k policies: {compile:.1} ms");
    let at = |n: usize| {
        p99.iter()
            .find(|(r, _)| *r == n)
            .map(|(_, p)| *p)
            .unwrap_or(0)
    };
    println!(
        "RESULT policy eval_ns_p99_1000_rules={} eval_ns_p99_10_rules={} compile_ms_10k_policies={}",
        at(1000),
        at(10),
        compile.round() as u64
    );
}
