//! The echo server run in-process on 127.0.0.1:0, driven by the built `veil-client`: the
//! pair the end-to-end tier runs in pods, checked here against each other.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use veil_test_workloads::echo;

const CLIENT: &str = env!("CARGO_BIN_EXE_veil-client");
const POD: &str = "test-pod";

/// Starts an echo server on the test's runtime; it stops with the runtime.
async fn start() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(echo::serve(listener, POD.to_owned()));
    addr
}

/// Runs `veil-client` with `args`, waiting without blocking the server's runtime.
async fn client(args: &[&str]) -> Output {
    tokio::process::Command::new(CLIENT)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run veil-client")
}

/// Asserts the client succeeded and returns its stdout.
fn succeeded(output: &Output) -> String {
    assert!(
        output.status.success(),
        "veil-client failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Each stdout line as JSON.
fn answers(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON answer per line"))
        .collect()
}

#[tokio::test]
async fn workload_http1_echoes_the_request() {
    let addr = start().await;
    let url = format!("http://{addr}/some/path?q=1&r=two");
    let out = succeeded(
        &client(&[
            "http",
            &url,
            "--data",
            "hello body",
            "--header",
            "X-Test: one",
            "-H",
            "x-test: two",
            "--expect-status",
            "200",
            "--expect-body-contains",
            "hello body",
        ])
        .await,
    );
    let answers = answers(&out);
    assert_eq!(answers.len(), 1, "{out}");
    let a = &answers[0];
    assert_eq!(a["pod"], POD);
    assert_eq!(a["method"], "GET");
    assert_eq!(a["path"], "/some/path?q=1&r=two");
    assert_eq!(a["version"], "HTTP/1.1");
    assert_eq!(a["host"], addr.to_string());
    assert_eq!(a["body"], "hello body");
    assert_eq!(a["body_len"], 10);
    assert_eq!(a["headers"]["x-test"], serde_json::json!(["one", "two"]));
    let peer = a["peer"].as_str().expect("peer");
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
    assert_ne!(peer, addr.to_string(), "the peer is the client's side");

    let health = succeeded(
        &client(&[
            "http",
            &format!("http://{addr}/healthz"),
            "--expect-body-contains",
            "ok",
        ])
        .await,
    );
    assert_eq!(health.trim(), "ok");
}

#[tokio::test]
async fn workload_http1_count_reuses_one_keep_alive_connection() {
    let addr = start().await;
    let out = succeeded(
        &client(&[
            "http",
            &format!("http://{addr}/"),
            "--method",
            "POST",
            "--data",
            "x",
            "--count",
            "3",
        ])
        .await,
    );
    let answers = answers(&out);
    assert_eq!(answers.len(), 3, "{out}");
    let peers: Vec<&Value> = answers.iter().map(|a| &a["peer"]).collect();
    assert!(
        peers.iter().all(|peer| *peer == peers[0]),
        "one connection, one peer port: {peers:?}"
    );
    assert!(answers.iter().all(|a| a["method"] == "POST"));
}

#[tokio::test]
async fn workload_http2_prior_knowledge() {
    let addr = start().await;
    let out = succeeded(
        &client(&[
            "http",
            &format!("http://{addr}/h2?x=y"),
            "--http2",
            "--data",
            "over h2",
            "--count",
            "2",
        ])
        .await,
    );
    let answers = answers(&out);
    assert_eq!(answers.len(), 2, "{out}");
    for a in &answers {
        assert_eq!(a["version"], "HTTP/2.0");
        assert_eq!(a["path"], "/h2?x=y");
        assert_eq!(a["host"], addr.to_string());
        assert_eq!(a["body"], "over h2");
        assert_eq!(a["peer"], answers[0]["peer"]);
    }
}

#[tokio::test]
async fn workload_grpc_returns_message_and_peer() {
    let addr = start().await;
    let url = format!("http://{addr}");
    let out = succeeded(&client(&["grpc", &url, "--message", "ping"]).await);
    let answers = answers(&out);
    assert_eq!(answers.len(), 1, "{out}");
    let reply = &answers[0];
    assert_eq!(reply["message"], "ping");
    assert_eq!(reply["pod"], POD);
    let peer = reply["peer"].as_str().expect("peer");
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");

    // The call succeeds with 0, so expecting 7 (PERMISSION_DENIED) must fail.
    let wrong = client(&["grpc", &url, "--message", "ping", "--expect-code", "7"]).await;
    assert_eq!(wrong.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("code 0"), "{stderr}");
}

#[tokio::test]
async fn workload_oversized_body_gets_413() {
    let addr = start().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("body");
    std::fs::write(&path, vec![b'a'; echo::MAX_BODY + 1]).expect("write body");
    let path = path.to_str().expect("UTF-8 temporary path");
    let url = format!("http://{addr}/upload");
    for protocol in [None, Some("--http2")] {
        let mut args = vec![
            "http",
            &url,
            "--method",
            "PUT",
            "--data-file",
            path,
            "--expect-status",
            "413",
        ];
        args.extend(protocol);
        let out = succeeded(&client(&args).await);
        assert!(out.contains("request body over"), "{protocol:?}: {out}");
    }
    // At the limit is still fine.
    std::fs::write(path, vec![b'a'; echo::MAX_BODY]).expect("write body");
    let out = succeeded(&client(&["http", &url, "--method", "PUT", "--data-file", path]).await);
    assert_eq!(answers(&out)[0]["body_len"], echo::MAX_BODY);
}

#[tokio::test]
async fn workload_garbage_input_closes_cleanly() {
    let addr = start().await;
    let target = addr.to_string();
    // Not HTTP: the server answers 400 or closes; either way the exchange ends.
    for garbage in [
        "GARBAGE \u{1}\u{2} this is not http\r\n\r\n",
        "x",
        "",
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nnot a settings frame at all",
    ] {
        succeeded(&client(&["tcp", &target, "--send", garbage]).await);
    }
    // Bytes no command line can carry: a TLS ClientHello-like start, NULs, invalid UTF-8.
    let mut raw = TcpStream::connect(addr).await.expect("connect");
    raw.write_all(&[0x16, 0x03, 0x01, 0x00, 0xff, 0x00, 0xfe, 0x80, 0x81])
        .await
        .expect("write");
    raw.shutdown().await.expect("half-close");
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink))
        .await
        .expect("the server closes the connection")
        .ok();
    // And the server still serves the next client.
    succeeded(&client(&["http", &format!("http://{addr}/after")]).await);
}

#[tokio::test]
async fn workload_client_fails_when_expectation_does_not_hold() {
    let addr = start().await;
    let url = format!("http://{addr}/");
    let wrong_status = client(&["http", &url, "--expect-status", "404"]).await;
    assert_eq!(wrong_status.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&wrong_status.stderr);
    assert!(stderr.contains("expected 404"), "{stderr}");
    // The body is still printed, for the test log.
    assert!(String::from_utf8_lossy(&wrong_status.stdout).contains(POD));

    let wrong_body = client(&["http", &url, "--expect-body-contains", "not there"]).await;
    assert_eq!(wrong_body.status.code(), Some(1));

    let wrong_tcp = client(&["tcp", &addr.to_string(), "--expect-contains", "hello"]).await;
    assert_eq!(wrong_tcp.status.code(), Some(1));

    // Nothing listens on a port we just freed.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("local address")
    };
    let refused = client(&["http", &format!("http://{closed}/"), "--timeout", "2s"]).await;
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("connecting to"), "{stderr}");
}
