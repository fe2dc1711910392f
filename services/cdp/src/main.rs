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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Dev(args) => cdp_runtime::serve::main_with("cdp", &args, cdp::install_all),
        Command::Replay(args) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(error) => {
                    eprintln!("cdp replay: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(cdp::replay::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("cdp replay: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
