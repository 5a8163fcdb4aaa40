//! Compiles every eBPF program under `bpf/` with clang into `OUT_DIR`.

use std::path::PathBuf;
use std::process::Command;

/// One object per attach point; the agent embeds each.
const PROGRAMS: &[&str] = &["from_pod"];

fn main() {
    let dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    for header in std::fs::read_dir(dir.join("lib")).expect("bpf/lib exists") {
        println!(
            "cargo:rerun-if-changed={}",
            header.expect("readable bpf/lib").path().display()
        );
    }
    // Debian keeps asm/ under the multiarch directory, which -target bpf does not search.
    let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    for program in PROGRAMS {
        let source = dir.join(format!("{program}.c"));
        println!("cargo:rerun-if-changed={}", source.display());
        let object = out.join(format!("{program}.o"));
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-c"])
            .arg("-I")
            .arg(dir.join("lib"))
            .arg("-I")
            .arg(dir.as_os_str())
            .arg("-idirafter")
            .arg(&multiarch)
            .arg(&source)
            .arg("-o")
            .arg(&object)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {clang} to compile {}: {e}; run `make setup` (it installs clang and libbpf-dev)", source.display()));
        if !output.status.success() {
            panic!(
                "{clang} failed on {}:\n{}",
                source.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
