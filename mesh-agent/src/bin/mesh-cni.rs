//! `mesh-cni`: the CNI plugin the container runtime executes. It does no network work
//! itself; it hands the request to the node's `mesh-agent` and prints the answer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use mesh_agent::cni::plugin;
use mesh_agent::cni::spec::{CniError, ErrorCode};

fn main() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => plugin::run(&env, &stdin),
        Err(e) => Err(CniError::new(
            ErrorCode::IoFailure,
            "could not read stdin",
            e.to_string(),
        )),
    };
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(Some(out)) => {
            let _ = writeln!(stdout, "{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(err) => {
            // The spec wants the error object on stdout and a non-zero exit.
            let _ = writeln!(
                stdout,
                "{}",
                serde_json::to_string(&err).expect("errors serialise")
            );
            ExitCode::FAILURE
        }
    }
}
