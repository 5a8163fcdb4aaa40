//! Criterion benchmarks: evaluation at 10, 100 and 1,000 rules, and compiling 1,000 policies.
//! `cargo bench -p veil-l7-policy --bench eval`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

#[path = "workload.rs"]
mod workload;

fn eval(c: &mut Criterion) {
    let labels = workload::pod_labels();
    for rules in [10, 100, 1000] {
        let policies = workload::policies(rules, 10);
        let matcher = workload::matcher(&policies, &labels);
        let reqs = workload::requests(rules, 1024, 7);
        let mut i = 0;
        c.bench_function(&format!("policy_eval_{rules}_rules"), |b| {
            b.iter(|| {
                let r = &reqs[i % reqs.len()];
                i += 1;
                let (src, req) = (r.source(), r.request());
                black_box(matcher.evaluate(&src, &req).decision)
            })
        });
    }
}

fn compile(c: &mut Criterion) {
    let labels = workload::pod_labels();
    let specs = workload::specs(1000, 1);
    c.bench_function("policy_compile_1000_policies", |b| {
        b.iter(|| {
            let compiled: Vec<_> = specs
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    std::sync::Arc::new(veil_l7_policy::CompiledPolicy::compile(
                        "shop",
                        &format!("p{i}"),
                        s,
                    ))
                })
                .collect();
            black_box(workload::matcher(&compiled, &labels).alternatives())
        })
    });
}

criterion_group!(benches, eval, compile);
criterion_main!(benches);
