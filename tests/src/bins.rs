//! Where the test bed finds the programs it runs: Veil's own from the cargo target
//! directory, the Kubernetes components from the set-up cache, the rest from PATH.

use std::path::PathBuf;

use anyhow::{bail, Result};

/// Where `make setup` caches the Kubernetes binaries unless `VEIL_CACHE` says otherwise.
pub const DEFAULT_CACHE: &str = "/var/cache/veil";

/// A Kubernetes component built by `make setup`.
pub fn kube(name: &str) -> Result<PathBuf> {
    let cache = std::env::var("VEIL_CACHE").unwrap_or_else(|_| DEFAULT_CACHE.to_string());
    let path = PathBuf::from(cache).join("kubernetes").join(name);
    if !path.exists() {
        bail!(
            "{} not found: run `make setup` to build the pinned Kubernetes components",
            path.display()
        );
    }
    Ok(path)
}

/// A tool `make setup` builds from the Go module proxy (`cnitool`, `helm`).
pub fn tool(name: &str) -> Result<PathBuf> {
    let cache = std::env::var("VEIL_CACHE").unwrap_or_else(|_| DEFAULT_CACHE.to_string());
    let path = PathBuf::from(cache).join("tools/bin").join(name);
    if !path.exists() {
        bail!("{} not found: run `make setup`", path.display());
    }
    Ok(path)
}

/// etcd from Debian's etcd-server package.
pub fn etcd() -> Result<PathBuf> {
    on_path("etcd")
}

/// A program on PATH, or an error that says how to get it.
pub fn on_path(name: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("{name} is not on PATH: run `make setup`"))
}

/// One of Veil's binaries (`mesh-agent`, `mesh-cni`, `meshctl`), from the target directory
/// this test was built into; `make test` builds them first.
pub fn veil(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // Test executables live in target/<profile>/deps, other binaries (the benchmark) in
    // target/<profile>, which is where Veil's binaries are.
    let mut profile_dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if profile_dir.ends_with("deps") {
        profile_dir.pop();
    }
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!("{} not found: build Veil's binaries first (`cargo build --workspace --bins`, which `make test` does)", path.display());
    }
    Ok(path)
}
