//! `veil-svid` without a Workload API: it retries until `--wait` runs out, then fails with
//! the reason. (Fetching a real SVID needs the agent in a pod namespace: the e2e tier.)

use std::time::{Duration, Instant};

const SVID: &str = env!("CARGO_BIN_EXE_veil-svid");

#[test]
fn workload_svid_fails_after_waiting_for_a_missing_workload_api() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let socket = format!("unix://{}/missing.sock", dir.path().display());
    let started = Instant::now();
    let output = std::process::Command::new(SVID)
        .args(["--socket", &socket, "--wait", "1s"])
        .output()
        .expect("run veil-svid");
    let took = started.elapsed();
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "no SPIFFE ID printed");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no SVID from"), "{stderr}");
    assert!(
        took >= Duration::from_secs(1),
        "retried until the deadline: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "and no longer: {took:?}");
}
