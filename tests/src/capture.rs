//! Packet capture on a test bed interface with tcpdump, for assertions on what really
//! crossed the wire.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A running tcpdump writing a pcap file.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
}

/// What a capture saw.
pub struct Captured {
    /// The pcap file's bytes (headers and all packet data).
    pub raw: Vec<u8>,
    /// One line per packet, as `tcpdump -nn -r` prints it.
    pub lines: Vec<String>,
}

impl Captured {
    /// Whether `needle` occurs anywhere in the captured bytes.
    pub fn contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.raw.windows(needle.len()).any(|w| w == needle)
    }
}

impl Capture {
    /// Starts capturing on `interface` (in the test's namespace) with a BPF `filter`, and
    /// returns once tcpdump says it is listening.
    pub fn start(interface: &str, filter: &str, dir: &Path) -> Result<Capture> {
        let file = dir.join(format!("capture-{interface}-{}.pcap", std::process::id()));
        let mut child = Command::new(crate::bins::on_path("tcpdump")?)
            .args(["-i", interface, "-U", "--immediate-mode", "-s", "0", "-w"])
            .arg(&file)
            .arg(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("start tcpdump")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while rx.recv_timeout(Duration::from_millis(100)).is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("tcpdump on {interface} exited with {status}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("tcpdump on {interface} did not start listening");
            }
        }
        Ok(Capture {
            child: Some(child),
            file,
        })
    }

    /// Stops the capture and reads what it saw.
    pub fn stop(mut self) -> Result<Captured> {
        if let Some(mut child) = self.child.take() {
            // SIGINT makes tcpdump flush and close the file.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            child.wait()?;
        }
        let raw =
            std::fs::read(&self.file).with_context(|| format!("read {}", self.file.display()))?;
        let out = Command::new(crate::bins::on_path("tcpdump")?)
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()?;
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        let _ = std::fs::remove_file(&self.file);
        Ok(Captured { raw, lines })
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}
