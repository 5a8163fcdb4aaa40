//! The three binaries as processes: what a runtime or an operator sees when calling them.
//! (Having this file also makes `cargo test --workspace` build them for the test bed.)

use std::io::Write;
use std::process::{Command, Stdio};

fn run(bin: &str, args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(bin)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn cni_binary_answers_version() {
    let (code, stdout, _) = run(
        env!("CARGO_BIN_EXE_mesh-cni"),
        &[],
        &[("CNI_COMMAND", "VERSION")],
        br#"{"cniVersion":"1.0.0"}"#,
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x == "1.0.0"));
}

#[test]
fn cni_binary_prints_spec_error_when_agent_is_down() {
    let conf = br#"{"cniVersion":"1.0.0","name":"veil","type":"mesh-cni","agentSocket":"/nonexistent/veil/cni.sock"}"#;
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/run/netns/x"),
    ];
    let (code, stdout, _) = run(env!("CARGO_BIN_EXE_mesh-cni"), &[], &env, conf);
    assert_ne!(code, 0);
    let err: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(err["code"], 11);
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/veil/cni.sock"),
        "{stdout}"
    );
}

#[test]
fn agent_binary_exits_64_naming_a_bad_setting() {
    let (code, _, stderr) = run(
        env!("CARGO_BIN_EXE_mesh-agent"),
        &["--node-name", "n1", "--pod-mtu", "100"],
        &[],
        b"",
    );
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("--pod-mtu"), "{stderr}");
    let (code, _, stderr) = run(env!("CARGO_BIN_EXE_mesh-agent"), &[], &[], b"");
    assert_eq!(code, 64, "a missing node name is a usage error: {stderr}");
    let (code, _, stderr) = run(
        env!("CARGO_BIN_EXE_mesh-agent"),
        &["--node-name", "n1", "--issuer-address", "issuer:8443"],
        &[],
        b"",
    );
    assert_eq!(code, 64, "identity without a token: {stderr}");
    assert!(stderr.contains("--issuer-token-file"), "{stderr}");
}

#[test]
fn meshctl_binary_says_where_it_looked() {
    let (code, _, stderr) = run(
        env!("CARGO_BIN_EXE_meshctl"),
        &["--socket", "/nonexistent/agent.sock", "pods"],
        &[],
        b"",
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("/nonexistent/agent.sock"), "{stderr}");
}
