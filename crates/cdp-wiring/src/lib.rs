//! What only the binaries link: which implementation fills each port (the
//! embedded log and store, or Kafka and ScyllaDB), and the allocator.
//! Service libraries see the ports only (`cdp_runtime::serve::Backends`),
//! so `cargo test -p cdp-identity` builds neither librdkafka nor the
//! ScyllaDB driver.

use std::process::ExitCode;
use std::sync::Arc;

use cdp_config::{LogBackend, PlatformConfig, StoreBackend};
use cdp_kafka::KafkaLog;
use cdp_log::{DedupeIndex, EmbeddedLog, EventLog};
use cdp_runtime::serve::{BackendError, Backends, Context, Parts, ProcessArgs, StartError};
use cdp_scylla::ScyllaGenerations;
use cdp_scylla::ScyllaKeyRows;
use cdp_seal::MasterKeys;
use cdp_store::{
    EmbeddedGenerations, EmbeddedKeyRows, Generations, KeyRows, Keyring, LiveStores, ViewSeal,
};
use clap::Parser;

/// Every CDP binary allocates with mimalloc: with many worker threads
/// folding JSON, glibc's per-thread arenas fragment and hold on to freed
/// memory (peak RSS measured by `make bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Opens the store and the log named by the configuration. With Kafka and
/// ScyllaDB, the ScyllaDB store is also the log's idempotency-key index.
pub async fn open_backends(config: &PlatformConfig) -> Result<Backends, BackendError> {
    let topics = cdp_pipeline::topic::ALL;
    // The embedded log first: its file also holds the embedded keyring.
    let embedded_log = match config.log.backend {
        LogBackend::Embedded => {
            let dir = config.data_dir.join("log");
            let log = EmbeddedLog::open_with_cache(
                &dir,
                &topics,
                config.log.partitions,
                usize::try_from(config.log.embedded_cache_mib << 20).unwrap_or(usize::MAX),
            )
            .map_err(|source| BackendError::Log {
                what: dir.display().to_string(),
                source,
            })?;
            Some(log)
        }
        LogBackend::Kafka => None,
    };
    /// The generations before the keyring their views are sealed with.
    enum Unsealed {
        Embedded(EmbeddedGenerations),
        Scylla(ScyllaGenerations),
    }
    type Opened = (Unsealed, Option<Arc<dyn DedupeIndex>>, Arc<dyn KeyRows>);
    let (generations, dedupe, key_rows): Opened = match config.store.backend {
        StoreBackend::Embedded => {
            let dir = config.data_dir.join("store");
            let cache =
                usize::try_from(config.store.embedded_cache_mib << 20).unwrap_or(usize::MAX);
            let generations = EmbeddedGenerations::open(&dir)
                .map_err(|source| BackendError::Store {
                    what: dir.display().to_string(),
                    source,
                })?
                .with_cache(cache);
            // A keyring of its own in `keys/` before the log held it.
            let keys = config.data_dir.join("keys");
            let failed = |source| BackendError::Store {
                what: keys.display().to_string(),
                source,
            };
            let rows = match &embedded_log {
                Some(log) => {
                    let rows = EmbeddedKeyRows::open_on(log.database(), &keys).map_err(failed)?;
                    // New keys are written and synced with the log's appends.
                    log.set_append_hook(rows.append_hook()).map_err(|source| {
                        BackendError::Log {
                            what: config.data_dir.join("log").display().to_string(),
                            source,
                        }
                    })?;
                    rows
                }
                None => EmbeddedKeyRows::open(&keys).map_err(failed)?,
            };
            (Unsealed::Embedded(generations), None, Arc::new(rows))
        }
        StoreBackend::Scylla => {
            let c = &config.store.scylla;
            let generations =
                ScyllaGenerations::connect(c)
                    .await
                    .map_err(|source| BackendError::Store {
                        what: format!("scylla {} keyspace {}", c.nodes.join(","), c.keyspace),
                        source,
                    })?;
            let dedupe: Arc<dyn DedupeIndex> = Arc::new(generations.base().clone());
            let rows = ScyllaKeyRows::new(generations.base())
                .await
                .map_err(|source| BackendError::Store {
                    what: "the keyring on ScyllaDB".into(),
                    source,
                })?;
            (Unsealed::Scylla(generations), Some(dedupe), Arc::new(rows))
        }
    };
    // The embedded keyring's rows are this process's alone (it holds their
    // file), read through this one keyring: its cached keys never go stale.
    let exclusive = matches!(generations, Unsealed::Embedded(_));
    let keyring = open_keyring(config, key_rows, exclusive).await?;
    // Profiles and timelines are sealed under customer keys.
    let seal = ViewSeal::new(Arc::clone(&keyring));
    let generations: Arc<dyn Generations> = match generations {
        Unsealed::Embedded(g) => Arc::new(g.with_seal(seal)),
        Unsealed::Scylla(g) => Arc::new(g.with_seal(seal)),
    };
    let live =
        Arc::new(
            LiveStores::open(generations)
                .await
                .map_err(|source| BackendError::Store {
                    what: "the active projection generation".into(),
                    source,
                })?,
        );
    let log: Arc<dyn EventLog> = match embedded_log {
        Some(log) => Arc::new(log),
        None => {
            let k = &config.log.kafka;
            if dedupe.is_none() {
                tracing::warn!(
                    "Kafka without the ScyllaDB store: retried events are not reported as duplicates (consumers still ignore them)"
                );
            }
            Arc::new(
                KafkaLog::connect(k.clone(), &topics, config.log.partitions, dedupe)
                    .await
                    .map_err(|source| BackendError::Log {
                        what: format!("kafka {} prefix {:?}", k.brokers, k.topic_prefix),
                        source,
                    })?,
            )
        }
    };
    // Embedded data, and the local access secret in every mode.
    if let Err(error) = std::fs::create_dir_all(&config.data_dir) {
        tracing::warn!(path = %config.data_dir.display(), %error, "cannot create the data directory");
    }
    restrict(&config.data_dir);
    tracing::info!(log = ?config.log.backend, store = ?config.store.backend, "back ends open");
    Ok(Backends { log, live, keyring })
}

/// The master keys from `privacy.master_key_file` (created with a fresh key
/// when absent), and the keyring's rows next to the store.
async fn open_keyring(
    config: &PlatformConfig,
    rows: Arc<dyn KeyRows>,
    exclusive: bool,
) -> Result<Arc<Keyring>, BackendError> {
    let path = config.privacy.master_key_path(&config.data_dir);
    let failed = |reason: String| BackendError::Store {
        what: format!("master keys {}", path.display()),
        source: cdp_store::StoreError::Invalid(reason),
    };
    if !path.exists() {
        let text = MasterKeys::generate_file().map_err(|e| failed(e.to_string()))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
        }
        write_private(&path, text.as_bytes()).map_err(|e| failed(e.to_string()))?;
        tracing::warn!(
            path = %path.display(),
            "created a master key: every process of this platform must use this same file (privacy.master_key_file); losing it loses every customer's personal data"
        );
    }
    let text = std::fs::read_to_string(&path).map_err(|e| failed(e.to_string()))?;
    let master = MasterKeys::parse(&text).map_err(|e| failed(e.to_string()))?;
    let p = &config.privacy;
    let keyring = Keyring::open(
        rows,
        master,
        std::time::Duration::from_secs(p.key_cache_secs),
        p.key_cache_entries,
    )
    .await
    .map_err(|source| BackendError::Store {
        what: "the keyring".into(),
        source,
    })?
    .with_master_file(path);
    let keyring = if exclusive {
        keyring.exclusive()
    } else {
        keyring
    };
    tracing::info!(
        master_key_version = keyring.master_version(),
        "keyring open"
    );
    Ok(Arc::new(keyring))
}

/// Writes a new file readable by its owner only.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes the data directory private to the service's user: directories
/// 0700, files 0600 (they hold personal data; the files the embedded
/// stores create are 0644 by default). Whatever is created inside later
/// sits behind the directory's 0700.
pub fn restrict(data_dir: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mut pending = vec![data_dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            let set = |path: &std::path::Path, mode: u32| {
                if let Err(error) =
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                {
                    tracing::warn!(path = %path.display(), %error, "cannot restrict the permissions of data");
                }
            };
            set(&dir, 0o700);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                match entry.file_type() {
                    Ok(t) if t.is_dir() => pending.push(entry.path()),
                    Ok(t) if t.is_file() => set(&entry.path(), 0o600),
                    _ => {}
                }
            }
        }
    }
}

/// `main` of a service binary: parses [`ProcessArgs`] and runs [`main_with`].
pub fn main<F>(name: &str, install: F) -> ExitCode
where
    F: AsyncFnOnce(&Context, &mut Parts) -> Result<(), StartError>,
{
    main_with(name, &ProcessArgs::parse(), install)
}

/// Runs one process on the back ends its configuration names, with the
/// services `install` adds (see `cdp_runtime::serve::main_with`).
pub fn main_with<F>(name: &str, args: &ProcessArgs, install: F) -> ExitCode
where
    F: AsyncFnOnce(&Context, &mut Parts) -> Result<(), StartError>,
{
    cdp_runtime::serve::main_with(name, args, open_backends, install)
}
