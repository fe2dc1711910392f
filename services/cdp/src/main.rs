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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Dev(args) => cdp_runtime::serve::main_with("cdp", &args, cdp::install_all),
    }
}
