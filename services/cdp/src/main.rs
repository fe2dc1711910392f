//! `cdp`: the all-in-one binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use cdp_runtime::PlatformConfig;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "cdp",
    version,
    about = "An event-sourced omnichannel customer data platform"
)]
struct Cli {
    /// Configuration file (TOML). Environment variables CDP__SECTION__KEY override it.
    #[arg(long, global = true, env = "CDP_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the whole platform in one process on the embedded log and store.
    Dev {
        /// Where gRPC listens (overrides server.grpc_addr).
        #[arg(long)]
        grpc_addr: Option<SocketAddr>,
        /// Where the HTTP API listens (overrides http.addr).
        #[arg(long)]
        http_addr: Option<SocketAddr>,
        /// Where data is kept (overrides data_dir).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config =
        PlatformConfig::load(cli.config.as_deref()).context("loading configuration")?;
    cdp_runtime::telemetry::init(&config.telemetry);
    match cli.command {
        Command::Dev {
            grpc_addr,
            http_addr,
            data_dir,
        } => {
            if let Some(a) = grpc_addr {
                config.server.grpc_addr = a;
            }
            if let Some(a) = http_addr {
                config.http.addr = a;
            }
            if let Some(d) = data_dir {
                config.data_dir = d;
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("cdp")
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(dev(config))
        }
    }
}

async fn dev(config: PlatformConfig) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    cdp_runtime::shutdown::on_signal(cancel.clone());
    let running = cdp::start_embedded(&config, cancel.clone()).await?;
    // A machine-readable line for scripts and tests that start on port 0.
    println!(
        "CDP_READY grpc={} http={}",
        running.grpc_addr, running.http_addr
    );
    running.wait().await;
    tracing::info!("cdp dev stopped");
    Ok(())
}
