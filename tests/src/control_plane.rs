//! A real Kubernetes control plane for tests: etcd and kube-apiserver, with certificates
//! made for this run, listening only on addresses of this machine.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::Api;

use crate::process::{eventually, Proc};
use crate::{bins, pki};

/// The Service range of every test cluster; carved from 198.19.0.0/16 above all pod CIDRs.
pub const SERVICE_CIDR: &str = "198.19.240.0/24";

/// A static bearer token and who it authenticates as.
#[derive(Debug, Clone)]
pub struct Token {
    /// The bearer token.
    pub token: String,
    /// User name.
    pub user: String,
    /// Groups.
    pub groups: Vec<String>,
}

/// Running etcd and kube-apiserver.
pub struct ControlPlane {
    /// `https://<ip>:6443`.
    pub url: String,
    /// CA that signed the serving certificate.
    pub ca_pem: String,
    /// A `system:masters` token.
    pub admin: Token,
    /// The CA file clients trust.
    pub ca_file: PathBuf,
    // Field order is drop order: the API server goes before its etcd.
    apiserver: Proc,
    etcd: Proc,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ControlPlane {
    /// Starts etcd (data on `data_dir`) and an API server bound to `ip`, accepting `tokens`
    /// besides the admin token; returns once the API server serves requests.
    pub fn start(
        dir: &Path,
        data_dir: &Path,
        ip: Ipv4Addr,
        tokens: &[Token],
        rt: &tokio::runtime::Runtime,
    ) -> Result<Self> {
        let pki = pki::generate(&[
            IpAddr::V4(ip),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "198.19.240.1".parse()?,
        ])?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
            Ok(path)
        };
        let ca = write("ca.pem", &pki.ca_pem)?;
        let cert = write("apiserver.pem", &pki.serving_cert_pem)?;
        let key = write("apiserver-key.pem", &pki.serving_key_pem)?;
        let sa_key = write("sa-key.pem", &pki.sa_key_pem)?;
        let sa_pub = write("sa.pem", &pki.sa_pub_pem)?;
        let admin = Token {
            token: random_token("admin"),
            user: "admin".into(),
            groups: vec!["system:masters".into()],
        };
        let lines: Vec<String> = std::iter::once(&admin)
            .chain(tokens)
            .map(|t| {
                format!(
                    "{},{},{},\"{}\"",
                    t.token,
                    t.user,
                    t.user,
                    t.groups.join(",")
                )
            })
            .collect();
        let token_file = write("tokens.csv", &(lines.join("\n") + "\n"))?;

        let (client_port, peer_port) = (free_port()?, free_port()?);
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd_cmd = Command::new(bins::etcd()?);
        etcd_cmd
            .arg("--name=testbed")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=testbed={peer_url}"))
            .arg("--log-level=warn");
        let etcd = Proc::spawn("etcd", etcd_cmd, &dir.join("etcd.log"), None)?;

        let mut api_cmd = Command::new(bins::kube("kube-apiserver")?);
        api_cmd
            .arg(format!("--etcd-servers={client_url}"))
            .arg(format!("--bind-address={ip}"))
            .arg(format!("--advertise-address={ip}"))
            .arg("--secure-port=6443")
            .arg(format!("--tls-cert-file={}", cert.display()))
            .arg(format!("--tls-private-key-file={}", key.display()))
            .arg(format!("--client-ca-file={}", ca.display()))
            .arg(format!("--token-auth-file={}", token_file.display()))
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-cluster-ip-range={SERVICE_CIDR}"))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--allow-privileged=true")
            .arg(format!("--cert-dir={}", dir.display()))
            .arg("--v=1");
        let apiserver = Proc::spawn(
            "kube-apiserver",
            api_cmd,
            &dir.join("kube-apiserver.log"),
            None,
        )?;
        let mut cp = ControlPlane {
            url: format!("https://{ip}:6443"),
            ca_pem: pki.ca_pem,
            admin,
            ca_file: ca,
            apiserver,
            etcd,
        };
        let client = cp.client(rt, &cp.admin.token.clone())?;
        eventually("kube-apiserver ready", Duration::from_secs(90), || {
            cp.etcd.check_running()?;
            cp.apiserver.check_running()?;
            rt.block_on(async {
                // `default` comes from the bootstrap controller and `admin` from the RBAC
                // post-start hook: both present means agents can authenticate and be authorised.
                Api::<Namespace>::all(client.clone()).get("default").await?;
                Api::<ClusterRole>::all(client.clone()).get("admin").await?;
                anyhow::Ok(Some(()))
            })
        })?;
        Ok(cp)
    }

    /// A kubeconfig that authenticates with `token`.
    pub fn kubeconfig(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: testbed\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: {}\ncontexts:\n- name: testbed\n  context:\n    cluster: testbed\n    user: user\ncurrent-context: testbed\n",
            self.url,
            self.ca_file.display(),
            token
        )
    }

    /// A client that authenticates with `token`.
    pub fn client(&self, rt: &tokio::runtime::Runtime, token: &str) -> Result<kube::Client> {
        let raw = kube::config::Kubeconfig::from_yaml(&self.kubeconfig(token))?;
        let _guard = rt.enter();
        let config = rt.block_on(kube::Config::from_custom_kubeconfig(
            raw,
            &Default::default(),
        ))?;
        Ok(kube::Client::try_from(config)?)
    }

    /// The API server's log.
    pub fn apiserver_log(&self) -> &Path {
        self.apiserver.log()
    }
}

/// A token nobody can guess from outside the test.
pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 16];
    getrandom_fill(&mut bytes);
    format!(
        "{prefix}-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn getrandom_fill(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}
