//! `cdp rebuild` and `cdp generations`: operators' commands for projection
//! generations, against `ProjectionService` of a running projection service (or `cdp dev`).

use std::time::Duration;

use anyhow::bail;
use cdp_proto::client::Authed;
use cdp_proto::v1::projection_service_client::ProjectionServiceClient;
use cdp_proto::v1::rebuild_status::State;
use cdp_proto::v1::{
    ActivateGenerationRequest, DropGenerationRequest, GetRebuildRequest, ListGenerationsRequest,
    ListGenerationsResponse, StartRebuildRequest,
};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, clap::Args)]
pub struct RebuildArgs {
    /// The projection service's gRPC endpoint (`cdp dev` serves it too).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// An operator's or admin's key.
    #[arg(long, env = "CDP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Switch to the new generation once it has caught up with the log.
    #[arg(long)]
    pub activate: bool,
    /// Resume the rebuild of this generation (interrupted or cancelled).
    #[arg(long)]
    pub generation: Option<u32>,
}

#[derive(Debug, clap::Subcommand)]
pub enum GenerationsCommand {
    /// Lists the generations and which one is active.
    List,
    /// Switches to a rebuilt generation that has caught up with the log.
    Activate {
        generation: u32,
        /// Switch even if it has not caught up (lookups see a partial view).
        #[arg(long)]
        force: bool,
    },
    /// Deletes a generation that is not active, with its data.
    Drop {
        generation: u32,
        /// Drop the generation the last switch retired within its grace period.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct GenerationsArgs {
    /// The projection service's gRPC endpoint (`cdp dev` serves it too).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// An operator's or admin's key.
    #[arg(long, env = "CDP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: GenerationsCommand,
}

async fn connect(
    endpoint: &str,
    token: Option<&str>,
) -> anyhow::Result<ProjectionServiceClient<Authed>> {
    let channel = cdp_proto::client::connect(endpoint, token)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(ProjectionServiceClient::new(channel))
}

fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

/// Starts (or resumes) a rebuild and follows it with a progress bar.
pub async fn rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.endpoint, args.token.as_deref()).await?;
    let started = client
        .start_rebuild(StartRebuildRequest {
            activate: args.activate,
            generation: args.generation.unwrap_or(0),
        })
        .await
        .map_err(refused)?
        .into_inner();
    let generation = started.generation;
    eprintln!("rebuilding generation {generation}");
    let bar = ProgressBar::new(started.records_total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} touchpoints ({per_sec}, ETA {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let status = client
            .get_rebuild(GetRebuildRequest { generation })
            .await
            .map_err(refused)?
            .into_inner();
        bar.set_length(status.records_total);
        bar.set_position(status.records_done);
        // A batch failing and retried says why.
        bar.set_message(status.error.clone());
        match status.state() {
            State::Running | State::Unspecified => {}
            State::CaughtUp => {
                bar.finish_with_message("caught up");
                eprintln!(
                    "generation {generation} has caught up; switch to it with `cdp generations activate {generation}`"
                );
                return Ok(());
            }
            State::Activated => {
                bar.finish_with_message("activated");
                eprintln!("generation {generation} is active");
                return Ok(());
            }
            State::Cancelled => {
                bar.abandon_with_message("cancelled");
                bail!("the rebuild was cancelled; resume it with --generation {generation}");
            }
            State::Failed => {
                bar.abandon_with_message("failed");
                bail!(
                    "the rebuild failed: {}; resume it with --generation {generation}",
                    status.error
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn print(list: &ListGenerationsResponse) {
    for g in &list.generations {
        let created = g
            .created_at
            .as_ref()
            .map(cdp_proto::convert::timestamp_to_millis)
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default();
        let mark = if g.active { "active" } else { "" };
        println!("{:>4}  {created}  {mark}", g.id);
    }
}

pub async fn generations(args: GenerationsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.endpoint, args.token.as_deref()).await?;
    let list = match args.command {
        GenerationsCommand::List => client.list_generations(ListGenerationsRequest {}).await,
        GenerationsCommand::Activate { generation, force } => {
            client
                .activate_generation(ActivateGenerationRequest { generation, force })
                .await
        }
        GenerationsCommand::Drop { generation, force } => {
            client
                .drop_generation(DropGenerationRequest { generation, force })
                .await
        }
    }
    .map_err(refused)?
    .into_inner();
    print(&list);
    Ok(())
}
