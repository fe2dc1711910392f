//! `cdp credentials`, `cdp audit` and `cdp keys`: API keys issued, listed
//! and revoked at run time, the audit chain exported and verified, and the
//! master key rotated.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use cdp_proto::client::Authed;
use cdp_proto::v1::access_service_client::AccessServiceClient;
use cdp_proto::v1::{
    Credential, ExportAuditRequest, IssueCredentialRequest, ListAuditRequest,
    ListCredentialsRequest, RevokeCredentialRequest,
};

#[derive(Debug, clap::Args)]
pub struct Endpoint {
    /// The query service's gRPC endpoint (`cdp dev` serves it too).
    #[arg(long, global = true, default_value = "http://127.0.0.1:50051")]
    pub endpoint: String,
    /// The caller's key (an admin's for credentials and export).
    #[arg(long, global = true, env = "CDP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Endpoint {
    async fn channel(&self) -> anyhow::Result<Authed> {
        cdp_proto::client::connect(&self.endpoint, self.token.as_deref())
            .await
            .map_err(anyhow::Error::msg)
    }

    async fn client(&self) -> anyhow::Result<AccessServiceClient<Authed>> {
        Ok(AccessServiceClient::new(self.channel().await?))
    }
}

fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

#[derive(Debug, clap::Args)]
pub struct CredentialsArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    #[command(subcommand)]
    pub command: CredentialsCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CredentialsCommand {
    /// Issues a key; prints it once.
    Issue {
        /// Who or what uses it (an agent's login, a system's name).
        #[arg(long)]
        name: String,
        /// ingest, agent, supervisor, analyst, operator or admin.
        #[arg(long)]
        role: String,
        /// A source an ingest key sends for (repeatable).
        #[arg(long = "source")]
        sources: Vec<String>,
        /// A label the key is restricted to (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// clear, masked or pseudonymised (default: the role's).
        #[arg(long, default_value = "")]
        disclosure: String,
        #[arg(long, default_value = "")]
        team: String,
        /// Lifetime in days (default: access.credential_ttl_days).
        #[arg(long)]
        days: Option<u64>,
    },
    /// Lists every key (never their secrets).
    List,
    /// Revokes an issued key at once, in every process.
    Revoke { id: String },
}

fn describe(c: &Credential) -> String {
    let state = if c.revoked_at.is_some() {
        "revoked"
    } else {
        "active"
    };
    format!(
        "{}\t{}\t{}\t{}\t{}\tsources={}\tscopes={}\tteam={}",
        c.id,
        c.name,
        c.role,
        c.origin,
        state,
        c.sources.join(","),
        c.scopes.join(","),
        c.team
    )
}

pub async fn credentials(args: CredentialsArgs) -> anyhow::Result<()> {
    let mut client = args.endpoint.client().await?;
    match args.command {
        CredentialsCommand::Issue {
            name,
            role,
            sources,
            scopes,
            disclosure,
            team,
            days,
        } => {
            let issued = client
                .issue_credential(IssueCredentialRequest {
                    name,
                    role,
                    sources,
                    scopes,
                    disclosure,
                    team,
                    expires_in_seconds: days.map_or(0, |d| d.saturating_mul(86_400)),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if let Some(c) = &issued.credential {
                eprintln!("{}", describe(c));
            }
            eprintln!("the key (shown once, keep it safe):");
            println!("{}", issued.secret);
        }
        CredentialsCommand::List => {
            let list = client
                .list_credentials(ListCredentialsRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            for c in &list.credentials {
                println!("{}", describe(c));
            }
        }
        CredentialsCommand::Revoke { id } => {
            let c = client
                .revoke_credential(RevokeCredentialRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            println!("{}", describe(&c));
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Rewraps every data key under the newest master key version, while
    /// the platform serves. First add the new version (`<version> <base64
    /// of 32 random bytes>`, e.g. from `openssl rand -base64 32`) to the
    /// master key file of every process; call it again until it rewraps
    /// nothing, then the old version may leave the files.
    Rotate,
}

pub async fn keys(args: KeysArgs) -> anyhow::Result<()> {
    let mut client = cdp_proto::v1::privacy_service_client::PrivacyServiceClient::new(
        args.endpoint.channel().await?,
    );
    match args.command {
        KeysCommand::Rotate => {
            let done = client
                .rotate_master_key(cdp_proto::v1::RotateMasterKeyRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            println!(
                "master key version {} wraps (newly read: {:?}); {} rows scanned, {} rewrapped, {} under a version missing from the file",
                done.master_version,
                done.versions_added,
                done.scanned,
                done.rewrapped,
                done.unknown
            );
            if done.unknown > 0 {
                bail!(
                    "{} keys are wrapped by a master key version this process lacks: add it to privacy.master_key_file and run again",
                    done.unknown
                );
            }
        }
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Writes every audit record, as stored, to a JSON Lines file.
    Export {
        #[command(flatten)]
        endpoint: Endpoint,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Verifies the hash chains of an export (`--file`), or of the running
    /// platform's audit topic. Fails when a record was removed or altered.
    Verify {
        #[command(flatten)]
        endpoint: Endpoint,
        /// An export to verify instead of the running platform.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Who read or changed what (a supervisor's team, or everyone for an admin).
    List {
        #[command(flatten)]
        endpoint: Endpoint,
        /// Records about this customer ("who viewed my data").
        #[arg(long, default_value = "")]
        customer_id: String,
        /// Records of this actor.
        #[arg(long, default_value = "")]
        actor: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

async fn export_lines(endpoint: &Endpoint) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut client = endpoint.client().await?;
    let mut stream = client
        .export_audit(ExportAuditRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    let mut lines = Vec::new();
    while let Some(record) = stream.message().await.map_err(refused)? {
        lines.push(record.json);
    }
    Ok(lines)
}

pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    match args.command {
        AuditCommand::Export { endpoint, out } => {
            let lines = export_lines(&endpoint).await?;
            let file = std::fs::File::create(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let mut w = std::io::BufWriter::new(file);
            for l in &lines {
                w.write_all(l)?;
                w.write_all(b"\n")?;
            }
            w.flush()?;
            eprintln!("{} audit records written to {}", lines.len(), out.display());
        }
        AuditCommand::Verify { endpoint, file } => {
            let lines = match file {
                Some(path) => {
                    let f = std::fs::File::open(&path)
                        .with_context(|| format!("opening {}", path.display()))?;
                    std::io::BufReader::new(f)
                        .lines()
                        .map(|l| l.map(String::into_bytes))
                        .filter(|l| l.as_ref().map_or(true, |l| !l.is_empty()))
                        .collect::<Result<Vec<_>, _>>()?
                }
                None => export_lines(&endpoint).await?,
            };
            let v = cdp_pipeline::audit::verify(lines.iter().map(Vec::as_slice));
            println!(
                "{} records in {} chains verified ({} written before chaining)",
                v.records, v.chains, v.legacy
            );
            if !v.ok() {
                for p in &v.problems {
                    eprintln!("BROKEN: {p}");
                }
                bail!("the audit chain is broken ({} problems)", v.problems.len());
            }
            println!("the audit chain is intact");
        }
        AuditCommand::List {
            endpoint,
            customer_id,
            actor,
            limit,
        } => {
            let mut client = endpoint.client().await?;
            let list = client
                .list_audit(ListAuditRequest {
                    customer_id,
                    actor,
                    limit,
                })
                .await
                .map_err(refused)?
                .into_inner();
            for e in &list.entries {
                let at =
                    e.at.as_ref()
                        .map(cdp_proto::convert::timestamp_to_millis)
                        .and_then(chrono::DateTime::from_timestamp_millis)
                        .map(|t| t.to_rfc3339())
                        .unwrap_or_default();
                println!(
                    "{at}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    e.actor,
                    e.role,
                    e.action,
                    e.outcome,
                    e.customer_id,
                    e.fields.join(","),
                    e.reason,
                    e.client
                );
            }
        }
    }
    Ok(())
}
