//! `veil-issuer`: the cluster's SPIFFE issuer (run by the chart as a Deployment).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use veil_identity::bundle::RotationPolicy;
use veil_identity::issuer::{IssuerService, IssuerSettings, DEFAULT_AUDIENCE};
use veil_identity::k8s::{self, KubePods, TokenReviewAuthenticator};
use veil_identity::rotation::{CaMaintainer, KubeCaStore, LeaseLeadership};
use veil_identity::{ca, id, CaSet, CertificateAuthority};

/// How often the issuer checks whether its CA needs a rotation step (and renews the
/// Lease, and reloads what the leading replica stored).
const MAINTAIN_EVERY: Duration = Duration::from_secs(60);
/// How long the rotation Lease lasts unrenewed: three rounds, so one slow round does not
/// hand the lead over.
const LEASE_DURATION: Duration = Duration::from_secs(180);

/// Signs X.509-SVIDs for agents, for pods on their own node.
#[derive(Debug, Parser)]
#[command(name = "veil-issuer", version)]
struct Args {
    /// Trust domain of every SPIFFE ID.
    #[arg(long, env = "VEIL_TRUST_DOMAIN", default_value = id::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Address to serve gRPC over TLS on.
    #[arg(long, env = "VEIL_ISSUER_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// The issuer's namespace (its Secret and the bundle ConfigMap live there).
    #[arg(long, env = "VEIL_ISSUER_NAMESPACE", default_value = "veil-system")]
    namespace: String,
    /// The issuer's own ServiceAccount (its serving certificate names it).
    #[arg(
        long,
        env = "VEIL_ISSUER_SERVICE_ACCOUNT",
        default_value = "veil-issuer"
    )]
    service_account: String,
    /// Secret holding the self-managed CA (created on first start).
    #[arg(long, env = "VEIL_CA_SECRET", default_value = "veil-issuer-ca")]
    ca_secret: String,
    /// Use the operator's CA from this Secret (`tls.crt`, `tls.key`) instead; not rotated.
    #[arg(long, env = "VEIL_OPERATOR_CA_SECRET")]
    operator_ca_secret: Option<String>,
    /// Use the operator's CA certificate from this file (with --ca-key-file); not rotated.
    #[arg(long, env = "VEIL_CA_CERT_FILE", requires = "ca_key_file")]
    ca_cert_file: Option<PathBuf>,
    /// The operator CA's key file.
    #[arg(long, env = "VEIL_CA_KEY_FILE", requires = "ca_cert_file")]
    ca_key_file: Option<PathBuf>,
    /// ConfigMap the trust bundle is published in.
    #[arg(
        long,
        env = "VEIL_BUNDLE_CONFIGMAP",
        default_value = "veil-trust-bundle"
    )]
    bundle_configmap: String,
    /// SVID lifetime, seconds.
    #[arg(long, env = "VEIL_SVID_TTL_SECONDS", default_value_t = veil_identity::issuer::DEFAULT_SVID_TTL.as_secs())]
    svid_ttl_seconds: u64,
    /// Lifetime of a self-managed CA, seconds.
    #[arg(long, env = "VEIL_CA_TTL_SECONDS", default_value_t = ca::DEFAULT_CA_LIFETIME.as_secs())]
    ca_ttl_seconds: u64,
    /// Agents allowed to ask, as `namespace/serviceaccount`, comma-separated.
    #[arg(
        long,
        env = "VEIL_AGENT_SERVICE_ACCOUNTS",
        default_value = "veil-system/veil-agent",
        value_delimiter = ','
    )]
    agent_service_accounts: Vec<String>,
    /// Audience agent tokens must be issued for.
    #[arg(long, env = "VEIL_TOKEN_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    token_audience: String,
    /// Lease that picks the one replica rotating a self-managed CA.
    #[arg(long, env = "VEIL_ISSUER_LEASE", default_value = veil_identity::rotation::DEFAULT_LEASE)]
    lease: String,
    /// This replica's name in that Lease (the chart passes the pod name); unique per
    /// replica. Default: host name and a random suffix.
    #[arg(long, env = "VEIL_ISSUER_POD_NAME")]
    lease_holder: Option<String>,
    /// Kubeconfig; in-cluster credentials when unset.
    #[arg(long, env = "VEIL_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

fn bad_config(setting: &str, why: impl std::fmt::Display) -> ! {
    eprintln!("veil-issuer: bad setting {setting}: {why}");
    std::process::exit(64);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let td =
        id::trust_domain(&args.trust_domain).unwrap_or_else(|e| bad_config("--trust-domain", e));
    if args.svid_ttl_seconds < 60 {
        bad_config("--svid-ttl-seconds", "must be at least 60");
    }
    if args.ca_ttl_seconds < 4 * args.svid_ttl_seconds {
        bad_config("--ca-ttl-seconds", "must be at least four SVID lifetimes");
    }
    let svid_ttl = Duration::from_secs(args.svid_ttl_seconds);
    let mut agents = BTreeSet::new();
    for a in &args.agent_service_accounts {
        let Some((ns, sa)) = a.split_once('/') else {
            bad_config(
                "--agent-service-accounts",
                format!("{a:?} is not namespace/name"),
            );
        };
        agents.insert(format!("system:serviceaccount:{ns}:{sa}"));
    }
    let issuer_id = id::workload_id(&td, &args.namespace, &args.service_account)
        .unwrap_or_else(|e| bad_config("--namespace/--service-account", e));

    let config = match &args.kubeconfig {
        Some(path) => {
            let raw = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(raw, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("in-cluster kube config")?,
    };
    let client = kube::Client::try_from(config)?;

    let self_managed = args.operator_ca_secret.is_none() && args.ca_cert_file.is_none();
    let set = if let (Some(cert), Some(key)) = (&args.ca_cert_file, &args.ca_key_file) {
        let cert =
            std::fs::read_to_string(cert).unwrap_or_else(|e| bad_config("--ca-cert-file", e));
        let key = std::fs::read_to_string(key).unwrap_or_else(|e| bad_config("--ca-key-file", e));
        CaSet::new(
            CertificateAuthority::from_pem(&td, &cert, &key)
                .unwrap_or_else(|e| bad_config("--ca-cert-file", e)),
        )
    } else if let Some(secret) = &args.operator_ca_secret {
        k8s::load_operator_ca(&client, &args.namespace, secret, &td).await?
    } else {
        k8s::load_or_create_ca(
            &client,
            &args.namespace,
            &args.ca_secret,
            &td,
            Duration::from_secs(args.ca_ttl_seconds),
        )
        .await?
    };
    k8s::publish_bundle(
        &client,
        &args.namespace,
        &args.bundle_configmap,
        &set.bundle(),
    )
    .await?;
    let ca = Arc::new(RwLock::new(set));

    if self_managed {
        let policy = RotationPolicy {
            ca_lifetime: Duration::from_secs(args.ca_ttl_seconds),
            rotate_before: Duration::from_secs(args.ca_ttl_seconds / 3),
            propagation: svid_ttl,
            svid_ttl,
        };
        let store = Arc::new(KubeCaStore {
            client: client.clone(),
            namespace: args.namespace.clone(),
            secret: args.ca_secret.clone(),
            configmap: args.bundle_configmap.clone(),
            trust_domain: td.clone(),
        });
        let leader = Arc::new(LeaseLeadership {
            client: client.clone(),
            namespace: args.namespace.clone(),
            name: args.lease.clone(),
            holder: args
                .lease_holder
                .clone()
                .unwrap_or_else(veil_identity::rotation::holder_identity),
            duration: LEASE_DURATION,
        });
        let maintainer = CaMaintainer::new(store, leader, policy, MAINTAIN_EVERY, ca.clone());
        tokio::spawn(maintainer.run());
    }

    let service = IssuerService::new(
        IssuerSettings {
            trust_domain: td,
            svid_ttl,
            agents,
        },
        ca,
        Arc::new(TokenReviewAuthenticator::new(
            client.clone(),
            vec![args.token_audience.clone()],
        )),
        Arc::new(KubePods::new(client)),
    );
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    let running = veil_identity::issuer::serve(args.listen, issuer_id, service, shutdown).await?;
    running.task.await?;
    Ok(())
}
