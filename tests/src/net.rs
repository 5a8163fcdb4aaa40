//! Kernel networking for the test bed: named network namespaces, the underlay bridge,
//! and threads that run inside a namespace. Everything made here is removed on drop.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};

/// Runs `ip` with `args`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace (`/run/netns/<name>`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace, replacing a stale one of the same name, with `lo` up.
    pub fn create(name: &str) -> Result<Netns> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path runtimes pass as `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `ip` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs a command inside the namespace and returns its output.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .with_context(|| format!("run {argv:?} in {}", self.name))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let out = self.exec(&["sysctl", "-qw", &format!("{key}={value}")])?;
        if !out.status.success() {
            bail!(
                "sysctl {key}={value} in {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs `work` on a new thread inside the namespace (the rest of the test stays put).
    pub fn spawn<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        let path = self.path();
        std::thread::spawn(move || {
            let ns = File::open(&path).with_context(|| format!("open {}", path.display()))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("enter {}", path.display()))?;
            work()
        })
    }
}

impl Netns {
    /// Runs the current test binary's ignored test `test` as a separate process inside the
    /// namespace, with `env` added; returns its stdout and fails the calling test if the
    /// child failed. A process, not a thread, because some checks (SO_PEERCRED and
    /// `/proc/<pid>/ns/net`) see a process's main thread only.
    pub fn run_test_child(&self, test: &str, env: &[(&str, &std::ffi::OsStr)]) -> String {
        let exe = std::env::current_exe().expect("current test binary");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(exe)
            .args([
                "--exact",
                test,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .output()
            .expect("run the test binary under ip netns exec");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "child {test} in {} failed:\n{stdout}\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

/// The value a child printed as a `KEY=value` line.
pub fn child_field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        // The test harness prints "test ... " before the first line of output.
        .find_map(|l| l.split_once(&format!("{key}=")).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("child printed no {key}:\n{out}"))
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("test bed: could not delete netns {}: {e:#}", self.name);
        }
    }
}

/// A Linux bridge in the test process's namespace, deleted on drop.
pub struct Bridge {
    name: String,
}

/// The comment on the bed's own firewall rules, so they are found again (and by
/// `make clean-testbeds`).
pub const FORWARD_RULE_COMMENT: &str = "veil-testbed";

/// The host firewall rule that lets frames bridged on `bridge` through. Bridge netfilter
/// (built into this kernel, on by default) sends bridged frames through the host's
/// FORWARD chain, and Docker sets that chain's policy to DROP: without this rule a bed's
/// nodes cannot reach each other on a machine where Docker runs. The per-bridge
/// `nf_call_iptables 0` does not help: the kernel ORs it with the global sysctl.
fn forward_rule(bridge: &str) -> [&str; 10] {
    [
        "FORWARD",
        "-i",
        bridge,
        "-o",
        bridge,
        "-m",
        "comment",
        "--comment",
        FORWARD_RULE_COMMENT,
        "-j",
    ]
}

/// Adds (`-I`) or deletes (`-D`) the bed's accept rule for `bridge` in iptables and
/// ip6tables. A machine without the iptables tools has no FORWARD chain to fear.
fn set_forward_rule(op: &str, bridge: &str) -> Result<()> {
    for tool in ["iptables", "ip6tables"] {
        let Ok(path) = crate::bins::on_path(tool) else {
            continue;
        };
        let out = Command::new(path)
            .arg(op)
            .args(forward_rule(bridge))
            .arg("ACCEPT")
            .output()
            .with_context(|| format!("run {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {op} FORWARD accept rule for {bridge}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

impl Bridge {
    /// Creates the bridge; fails if the name is taken (callers use that as a lock). Frames
    /// bridged on it pass the host's FORWARD chain whatever its policy.
    pub fn create(name: &str) -> Result<Bridge> {
        ip(&["link", "add", name, "type", "bridge"])?;
        let bridge = Bridge {
            name: name.to_string(),
        };
        set_forward_rule("-I", name)?;
        ip(&["link", "set", name, "up"])?;
        Ok(bridge)
    }

    /// The bridge's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Err(e) = set_forward_rule("-D", &self.name) {
            eprintln!("test bed: {e:#}");
        }
        if let Err(e) = ip(&["link", "del", &self.name]) {
            eprintln!("test bed: could not delete bridge {}: {e:#}", self.name);
        }
    }
}
