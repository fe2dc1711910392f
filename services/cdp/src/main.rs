//! `cdp`: the all-in-one binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cdp",
    version,
    about = "An event-sourced omnichannel customer data platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the whole platform in one process (on the embedded log and
    /// store unless the configuration names Kafka and ScyllaDB).
    Dev(cdp_runtime::serve::ProcessArgs),
    /// Replays touchpoints from the event log into a JSON Lines file
    /// (filters, progress bar, resumable).
    Replay(cdp::replay::ReplayArgs),
    /// Rebuilds the views (identity graph, profiles, timeline) from the log
    /// into a new generation while the active one keeps serving.
    Rebuild(cdp::rebuild::RebuildArgs),
    /// Lists, activates or drops projection generations.
    Generations(cdp::rebuild::GenerationsArgs),
    /// Issues, lists and revokes API keys.
    Credentials(cdp::access::CredentialsArgs),
    /// Exports, verifies and lists the tamper-evident audit.
    Audit(cdp::access::AuditArgs),
    /// Rotates the master key that wraps every customer's data key.
    Keys(cdp::access::KeysArgs),
}

/// Runs one client command on a fresh runtime.
fn client<F: std::future::Future<Output = anyhow::Result<()>>>(name: &str, f: F) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(error) => {
            eprintln!("cdp {name}: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cdp {name}: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Dev(args) => cdp_wiring::main_with("cdp", &args, cdp::install_all),
        Command::Replay(args) => client("replay", cdp::replay::run(args)),
        Command::Rebuild(args) => client("rebuild", cdp::rebuild::rebuild(args)),
        Command::Generations(args) => client("generations", cdp::rebuild::generations(args)),
        Command::Credentials(args) => client("credentials", cdp::access::credentials(args)),
        Command::Audit(args) => client("audit", cdp::access::audit(args)),
        Command::Keys(args) => client("keys", cdp::access::keys(args)),
    }
}
