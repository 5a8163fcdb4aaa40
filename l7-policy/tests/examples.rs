//! Every README example: valid ones parse and pass engine validation. Each invalid one
//! starts with `# expect: <substring of the error, naming the field>` and
//! `# rejected-by: apiserver`, `engine`, or `apiserver, engine`; whatever the engine must
//! reject, it rejects with that substring. (The API-server side is checked by the cluster tests.)

use std::path::PathBuf;

use veil_l7_policy::{CompiledPolicy, L7Policy};

fn examples(kind: &str) -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(kind);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read example");
            (p, text)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
}

#[test]
fn policy_valid_examples_are_accepted() {
    for (path, text) in examples("valid") {
        let policy: L7Policy =
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let compiled = CompiledPolicy::from_resource(&policy);
        assert!(
            compiled.errors().is_empty(),
            "{}: {:?}",
            path.display(),
            compiled.errors()
        );
        assert_eq!(
            policy.metadata.name.as_deref().map(str::is_empty),
            Some(false),
            "{}",
            path.display()
        );
    }
}

#[test]
fn policy_invalid_examples_are_rejected() {
    for (path, text) in examples("invalid") {
        let mut lines = text.lines();
        let expect = lines
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| {
                panic!(
                    "{}: first line must be '# expect: <substring>'",
                    path.display()
                )
            });
        let by = lines
            .next()
            .and_then(|l| l.strip_prefix("# rejected-by: "))
            .unwrap_or_else(|| {
                panic!(
                    "{}: second line must be '# rejected-by: ...'",
                    path.display()
                )
            });
        let apiserver_only = !by.split(", ").any(|b| b == "engine");
        let errors = match serde_yaml::from_str::<L7Policy>(&text) {
            Ok(policy) => CompiledPolicy::from_resource(&policy).errors().to_vec(),
            Err(e) => {
                assert!(
                    apiserver_only,
                    "{}: does not parse ({e}) but is not marked rejected-by: apiserver",
                    path.display()
                );
                continue;
            }
        };
        if apiserver_only {
            continue;
        }
        assert!(
            errors.iter().any(|e| e.to_string().contains(expect)),
            "{}: want an error containing {expect:?}, got {errors:?}",
            path.display()
        );
    }
}
