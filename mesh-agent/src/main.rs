//! `mesh-agent`: the per-node agent.

use std::process::ExitCode;

use clap::Parser;
use mesh_agent::agent::Agent;
use mesh_agent::config::Config;

/// Exit code for bad configuration (EX_USAGE), so supervisors can tell it from a crash.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match Config::try_parse() {
        Ok(config) => config,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if let Err(e) = config.validate() {
        eprintln!("mesh-agent: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // Once, so a node's log always says what the agent ran with.
    tracing::info!(config = ?config, "effective configuration");
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(async {
        let agent = Agent::build(config).await?;
        agent.run().await
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "mesh-agent stopped");
            ExitCode::FAILURE
        }
    }
}
