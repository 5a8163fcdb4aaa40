//! `local-cluster`: the test bed as a cluster to try Veil by hand. Starts etcd, the API
//! server, N nodes with their agents, prints how to reach them, and tears everything
//! down on Ctrl-C or SIGTERM.

use anyhow::{bail, Context, Result};
use veil_testbed::{BedConfig, TestBed};

fn main() -> Result<()> {
    let mut nodes = 2usize;
    let mut pods_per_node = 1usize;
    let mut kube_proxy = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--nodes" => {
                nodes = args
                    .next()
                    .context("--nodes needs a number")?
                    .parse()
                    .context("--nodes")?
            }
            "--pods-per-node" => {
                pods_per_node = args
                    .next()
                    .context("--pods-per-node needs a number")?
                    .parse()
                    .context("--pods-per-node")?
            }
            "--kube-proxy" => kube_proxy = true,
            "-h" | "--help" => {
                println!(
                    "usage: local-cluster [--nodes N (2)] [--pods-per-node N (1)] [--kube-proxy (a real kube-proxy per node, for Services)]"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?}; try --help"),
        }
    }
    let bed = TestBed::start(BedConfig {
        nodes,
        kube_proxy,
        ..Default::default()
    })?;
    let mut pods = Vec::new();
    for n in 0..bed.node_count() {
        for p in 0..pods_per_node {
            pods.push(bed.add_pod(n, &format!("n{n}-pod{p}"))?);
        }
    }
    println!("Veil local cluster {} is up.", bed.index);
    println!(
        "  kubectl --kubeconfig {} get nodes -o wide",
        bed.admin_kubeconfig().display()
    );
    for n in 0..bed.node_count() {
        let node = bed.node(n);
        println!(
            "  {}: netns {}, underlay {}, pod CIDR {}, CNI socket {} (meshctl --socket {} pods)",
            node.name,
            node.netns.name(),
            node.ip,
            node.pod_cidr,
            node.socket().display(),
            node.admin_socket().display()
        );
    }
    for pod in &pods {
        println!(
            "  pod {}: {} (ip netns exec {} ping ...)",
            pod.name,
            pod.ip,
            pod.netns.name()
        );
    }
    println!("Logs: {}. Ctrl-C tears it all down.", bed.dir().display());
    bed.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    drop(pods);
    drop(bed);
    println!("torn down");
    Ok(())
}
