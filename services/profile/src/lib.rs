//! The profile worker: consumes the resolved topic and folds each event
//! (and the merges that came with it) into the profile store.

use std::sync::Arc;

use async_trait::async_trait;
use cdp_domain::FoldOptions;
use cdp_domain::ResolvedTouchpoint;
use cdp_log::consumer::{BatchHandler, ConsumerOptions, Retry};
use cdp_log::{EventLog, LogRecord, Membership, Record, Topic};
use cdp_proto::record;
use cdp_runtime::generation;
use cdp_store::{FIRST_GENERATION, LiveStores, ProfileChanges, ProfileStore};
use tokio_util::sync::CancellationToken;

/// The consumer group of profile workers.
pub const GROUP: &str = generation::PROFILE_GROUP;

pub struct ProfileWorker {
    log: Arc<dyn EventLog>,
    live: Arc<LiveStores>,
    options: FoldOptions,
    changes: ProfileChanges,
    /// Also announce changed customers on the `profile-changes` topic, for
    /// query services in other processes.
    announce_on_log: bool,
    /// The store folded into since the last sync, and its generation.
    unsynced: Option<(u32, Arc<dyn ProfileStore>)>,
}

impl ProfileWorker {
    pub fn new(
        log: Arc<dyn EventLog>,
        live: Arc<LiveStores>,
        options: FoldOptions,
        changes: ProfileChanges,
    ) -> Self {
        ProfileWorker {
            log,
            live,
            options,
            changes,
            announce_on_log: false,
            unsynced: None,
        }
    }

    /// Announces changed customers on the log too (distributed deployments).
    pub fn announce_on_log(mut self, on: bool) -> Self {
        self.announce_on_log = on;
        self
    }

    pub async fn run(
        mut self,
        membership: Membership,
        options: ConsumerOptions,
        cancel: CancellationToken,
    ) {
        let log = std::sync::Arc::clone(&self.log);
        cdp_log::consumer::join_and_run(
            log.as_ref(),
            GROUP,
            Topic::Resolved,
            membership,
            &mut self,
            &options,
            cancel,
        )
        .await;
    }
}

#[async_trait]
impl BatchHandler for ProfileWorker {
    #[tracing::instrument(name = "profile_batch", skip_all, fields(records = records.len()))]
    async fn handle(&mut self, records: &[LogRecord]) -> Result<(), Retry> {
        // Records name the projection generation that resolved them: only
        // the active generation's are folded, into that generation (a
        // record of a newer one means a switch this process has not seen).
        let generations: Vec<Option<u32>> = records
            .iter()
            .map(|r| generation::of_record(r.header(generation::HEADER)))
            .collect();
        let newest = generations
            .iter()
            .flatten()
            .max()
            .copied()
            .unwrap_or(FIRST_GENERATION);
        if newest > self.live.generation() {
            self.live
                .refresh()
                .await
                .map_err(|e| Retry(format!("projection generation: {e}")))?;
        }
        let stores = self.live.current();
        let mut batch: Vec<ResolvedTouchpoint> = Vec::with_capacity(records.len());
        let mut dead = Vec::new();
        let mut other_generation = 0usize;
        for (r, of) in records.iter().zip(&generations) {
            if *of != Some(stores.generation) {
                other_generation += 1;
                continue;
            }
            match record::decode_resolved(&r.value) {
                Ok(resolved) => batch.push(resolved),
                Err(error) => {
                    tracing::error!(partition = r.partition, offset = r.offset, %error, "undecodable resolved record");
                    dead.push(Record {
                        key: r.key.clone(),
                        value: record::encode_raw_dead_letter(
                            "profile",
                            &error.to_string(),
                            &r.value,
                            cdp_runtime::now_ms(),
                        ),
                        ..Record::default()
                    });
                }
            }
        }
        if other_generation > 0 {
            tracing::debug!(
                skipped = other_generation,
                generation = stores.generation,
                "records of another projection generation skipped"
            );
        }
        // A switch to another generation: the old one is made durable
        // before anything is folded into the new one.
        if self
            .unsynced
            .as_ref()
            .is_some_and(|(generation, _)| *generation != stores.generation)
        {
            self.sync().await?;
        }
        let applied = stores
            .profiles
            .apply_unsynced(&batch, &self.options)
            .await
            .map_err(|e| Retry(format!("profile store: {e}")))?;
        self.unsynced = Some((stores.generation, Arc::clone(&stores.profiles)));
        if applied.new_events < batch.len() {
            tracing::debug!(
                redelivered = batch.len() - applied.new_events,
                "events already folded were skipped"
            );
        }
        self.changes.publish(&applied.customers);
        if self.announce_on_log && !applied.customers.is_empty() {
            let records = applied
                .customers
                .iter()
                .map(|c| Record {
                    key: c.to_string().into_bytes(),
                    value: c.0.as_bytes().to_vec(),
                    ..Record::default()
                })
                .collect();
            // Best effort: the fold is stored; a missed announcement only
            // delays a live view until its next change.
            if let Err(error) = self.log.append(Topic::Changes, records).await {
                tracing::warn!(%error, "could not announce changed customers");
            }
        }
        if !dead.is_empty() {
            self.log
                .append(Topic::DeadLetters, dead)
                .await
                .map_err(|e| Retry(format!("append to dead letters: {e}")))?;
        }
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), Retry> {
        if let Some((generation, store)) = &self.unsynced {
            store
                .sync()
                .await
                .map_err(|e| Retry(format!("profile store sync (generation {generation}): {e}")))?;
        }
        self.unsynced = None;
        Ok(())
    }
}

/// Installs `pipeline.profile_workers` profile workers in a process; they
/// announce changed customers on the context's [`ProfileChanges`].
pub async fn install(
    ctx: &cdp_runtime::serve::Context,
    parts: &mut cdp_runtime::serve::Parts,
) -> Result<(), cdp_runtime::serve::StartError> {
    let members = ctx.config.pipeline.profile_workers.max(1);
    for index in 0..members {
        let worker = ProfileWorker::new(
            Arc::clone(&ctx.backends.log),
            Arc::clone(&ctx.backends.live),
            ctx.config.fold_options(),
            ctx.changes.clone(),
        );
        let worker = worker
            .announce_on_log(ctx.config.log.backend == cdp_runtime::config::LogBackend::Kafka);
        let options = ctx.consumer_options(&format!("profile-{index}"));
        let cancel = ctx.cancel.clone();
        let membership = ctx.config.pipeline.membership(index, members);
        parts.tasks.spawn(worker.run(membership, options, cancel));
    }
    Ok(())
}
