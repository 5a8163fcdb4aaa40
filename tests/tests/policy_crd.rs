//! The generated `L7Policy` CRD against the test bed's real API server: it installs, the
//! README's examples are accepted, and each invalid example is refused with a message
//! that names the field (by the schema and CEL rules, or by the engine's validation).

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, ObjectMeta, PostParams};
use kube::discovery::ApiResource;
use kube::Api;
use veil_l7_policy::{CompiledPolicy, L7Policy};
use veil_testbed::{eventually, BedConfig, TestBed};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn examples(kind: &str) -> Vec<(PathBuf, String)> {
    let dir = repo().join("l7-policy/examples").join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect();
    files.sort();
    files
}

fn header<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
        .unwrap_or_else(|| panic!("example lacks '# {key}:'"))
}

#[test]
fn policy_crd_installs_and_the_api_server_enforces_its_schema() {
    let bed = TestBed::start(BedConfig {
        nodes: 0,
        ..Default::default()
    })
    .unwrap();
    // The bed installs the chart's CRD (as helm does) and waits until it is Established.
    let crd: CustomResourceDefinition = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("charts/veil/crds/l7policy.yaml")).unwrap(),
    )
    .unwrap();
    let crds = Api::<CustomResourceDefinition>::all(bed.client.clone());
    bed.block_on(crds.get(crd.metadata.name.as_deref().unwrap()))
        .expect("the bed installed the CRD");

    let resource = ApiResource::erase::<L7Policy>(&());
    let namespaces = Api::<Namespace>::all(bed.client.clone());
    // Discovery of a new CRD lags its Established condition by a moment.
    let create = |text: &str| -> Result<DynamicObject, kube::Error> {
        let object: DynamicObject = serde_yaml::from_str(text).unwrap();
        let ns = object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let wanted = Namespace {
            metadata: ObjectMeta {
                name: Some(ns.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let _ = bed.block_on(namespaces.create(&PostParams::default(), &wanted));
        let policies: Api<DynamicObject> = Api::namespaced_with(bed.client.clone(), &ns, &resource);
        bed.block_on(policies.create(&PostParams::default(), &object))
    };

    for (path, text) in examples("valid") {
        let created = eventually(
            &format!("{} accepted", path.display()),
            Duration::from_secs(15),
            || match create(&text) {
                Ok(o) => Ok(Some(o)),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
                Err(e) => Err(anyhow::anyhow!("{e}")),
            },
        );
        created.unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
    }

    for (path, text) in examples("invalid") {
        let expect = header(&text, "expect");
        let by = header(&text, "rejected-by");
        let by_apiserver = by.split(", ").any(|b| b == "apiserver");
        match create(&text) {
            Err(kube::Error::Api(e)) => {
                assert!(
                    by_apiserver,
                    "{}: refused by the API server but not marked so: {}",
                    path.display(),
                    e.message
                );
                assert_eq!(e.code, 422, "{}: {}", path.display(), e.message);
                assert!(
                    e.message.contains(expect),
                    "{}: API server said {:?}, expected it to name {expect:?}",
                    path.display(),
                    e.message
                );
            }
            Err(e) => panic!("{}: {e}", path.display()),
            Ok(_) => {
                assert!(
                    !by_apiserver,
                    "{}: the API server accepted it but the example says it refuses it",
                    path.display()
                );
                // What the schema cannot say, the engine reports on status.
                let policy: L7Policy = serde_yaml::from_str(&text).unwrap();
                let errors = CompiledPolicy::from_resource(&policy).errors().to_vec();
                assert!(
                    errors.iter().any(|e| e.to_string().contains(expect)),
                    "{}: engine errors {errors:?} do not name {expect:?}",
                    path.display()
                );
            }
        }
    }
}
