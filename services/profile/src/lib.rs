//! The profile worker: consumes the resolved topic and folds each event
//! (and the merges that came with it) into the profile store of the
//! active projection generation; the audience timers ([`timer`]) and the
//! backfill after definitions change ([`backfill`]) run beside them.

pub mod backfill;
pub mod timer;

use std::sync::Arc;

use async_trait::async_trait;
use cdp_domain::FoldOptions;
use cdp_domain::ResolvedTouchpoint;
use cdp_log::consumer::{BatchHandler, ConsumerOptions, Retry};
use cdp_log::{EventLog, LogRecord, Membership};
use cdp_pipeline::{Outputs, Stage, emit, group, topic};
use cdp_store::{FIRST_GENERATION, LiveStores, ProfileChanges, ProfileStore};
use tokio_util::sync::CancellationToken;

pub struct ProfileWorker {
    log: Arc<dyn EventLog>,
    live: Arc<LiveStores>,
    options: FoldOptions,
    changes: ProfileChanges,
    keyring: Arc<cdp_store::Keyring>,
    /// Also announce changed customers on the `profile-changes` topic, for
    /// query services in other processes.
    announce_on_log: bool,
    /// The store folded into since the last sync, and its generation.
    unsynced: Option<(u32, Arc<dyn ProfileStore>)>,
    /// A newer generation seen in records while it was not active yet (a
    /// rebuild running), and when the registry last said so: it is asked
    /// again at most once per `RECHECK`, not for every batch.
    not_active_yet: Option<(u32, std::time::Instant)>,
    /// The audience definitions folded along with the profiles (none: the
    /// audience state is left as it is).
    audiences: Option<Arc<cdp_runtime::audiences::AudienceRegistry>>,
    /// The time audiences are evaluated at.
    clock: cdp_runtime::Clock,
}

/// How often records of a generation that is not active yet make a worker
/// read the registry again.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl ProfileWorker {
    pub fn new(
        log: Arc<dyn EventLog>,
        live: Arc<LiveStores>,
        options: FoldOptions,
        changes: ProfileChanges,
        keyring: Arc<cdp_store::Keyring>,
    ) -> Self {
        ProfileWorker {
            log,
            live,
            options,
            changes,
            keyring,
            announce_on_log: false,
            unsynced: None,
            not_active_yet: None,
            audiences: None,
            clock: cdp_runtime::system_clock(),
        }
    }

    /// Reads the time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: cdp_runtime::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Folds audiences with these definitions and appends the membership
    /// changes to `audience-changes`.
    pub fn with_audiences(
        mut self,
        registry: Arc<cdp_runtime::audiences::AudienceRegistry>,
    ) -> Self {
        self.audiences = Some(registry);
        self
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
        let log = Arc::clone(&self.log);
        cdp_log::consumer::join_and_run(
            log.as_ref(),
            group::PROFILE,
            topic::RESOLVED,
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
        let generations: Vec<Option<u32>> = records.iter().map(emit::generation_of).collect();
        let newest = generations
            .iter()
            .flatten()
            .max()
            .copied()
            .unwrap_or(FIRST_GENERATION);
        let asked_lately = self
            .not_active_yet
            .is_some_and(|(g, at)| g >= newest && at.elapsed() < RECHECK);
        if newest > self.live.generation() && !asked_lately {
            let active = self
                .live
                .refresh()
                .await
                .map_err(|e| Retry(format!("projection generation: {e}")))?;
            self.not_active_yet = (active < newest).then(|| (newest, std::time::Instant::now()));
        }
        let stores = self.live.current();
        let now = (self.clock)();
        let mut batch: Vec<ResolvedTouchpoint> = Vec::with_capacity(records.len());
        let mut out = Outputs::default();
        let mut other_generation = 0usize;
        let keys = emit::keys_for(&self.keyring, records)
            .await
            .map_err(|e| Retry(format!("keyring: {e}")))?;
        for (r, of) in records.iter().zip(&generations) {
            if *of != Some(stores.generation) {
                other_generation += 1;
                continue;
            }
            match emit::read_resolved(r, &keys) {
                // Its customer was erased: no view may hold it again.
                Ok(opened) if opened.anonymous => {}
                Ok(opened) => batch.push(opened.value),
                Err(error) => {
                    tracing::error!(partition = r.partition, offset = r.offset, %error, "undecodable resolved record");
                    out.undecodable(Stage::Profile, r, &error.to_string(), now);
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
        let options =
            cdp_runtime::audiences::fold_options(self.audiences.as_deref(), &self.options, now)
                .await
                .map_err(|e| Retry(format!("audience definitions: {e}")))?;
        // From the commit to the queueing of its changes (see
        // `AudienceRegistry::appends`).
        let _appending = match &self.audiences {
            Some(registry) => Some(registry.appends().read().await),
            None => None,
        };
        let applied = stores
            .profiles
            .apply_unsynced(&batch, &options)
            .await
            .map_err(|e| Retry(format!("profile store: {e}")))?;
        // Appended in the background, before the next sync.
        if let Some(registry) = &self.audiences {
            registry
                .queue(stores.generation, applied.changes, &options)
                .await
                .map_err(|e| Retry(format!("append to {}: {e}", topic::AUDIENCE_CHANGES)))?;
        }
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
                .map(|c| emit::profile_change(*c))
                .collect();
            // Best effort: the fold is stored; a missed announcement only
            // delays a live view until its next change.
            if let Err(error) = self.log.append(topic::PROFILE_CHANGES, records).await {
                tracing::warn!(%error, "could not announce changed customers");
            }
        }
        for (topic, records) in out.appends() {
            self.log
                .append(topic, records)
                .await
                .map_err(|e| Retry(format!("append to {topic}: {e}")))?;
        }
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), Retry> {
        if let Some((generation, store)) = &self.unsynced {
            // Nothing made durable whose changes are not appended.
            let _alone =
                match &self.audiences {
                    Some(registry) => Some(registry.hold_for_sync().await.map_err(|e| {
                        Retry(format!("append to {}: {e}", topic::AUDIENCE_CHANGES))
                    })?),
                    None => None,
                };
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
/// announce changed customers on the context's [`ProfileChanges`], and on
/// the log too when other processes may serve views (Kafka).
pub async fn install(
    ctx: &cdp_runtime::serve::Context,
    parts: &mut cdp_runtime::serve::Parts,
) -> Result<(), cdp_runtime::serve::StartError> {
    let count = ctx.config.pipeline.profile_workers;
    let on_log = ctx.config.log.backend == cdp_runtime::config::LogBackend::Kafka;
    ctx.spawn_workers(parts, "profile", count, |membership, options, cancel| {
        ProfileWorker::new(
            Arc::clone(&ctx.backends.log),
            Arc::clone(&ctx.backends.live),
            ctx.config.fold_options(),
            ctx.changes.clone(),
            Arc::clone(&ctx.backends.keyring),
        )
        .announce_on_log(on_log)
        .with_audiences(Arc::clone(&ctx.audiences))
        .run(membership, options, cancel)
    });
    let every = ctx.config.pipeline.audience_timer_ms;
    if every > 0 {
        let timer = timer::AudienceTimer::new(
            Arc::clone(&ctx.backends.log),
            Arc::clone(&ctx.backends.live),
            ctx.config.fold_options(),
            Arc::clone(&ctx.audiences),
            ctx.changes.clone(),
        )
        .announce_on_log(on_log);
        parts
            .tasks
            .spawn(timer.run(std::time::Duration::from_millis(every), ctx.cancel.clone()));
    }
    // One backfill for all the processes: the first runs it.
    if ctx.config.pipeline.process_index == 0 {
        let backfill = backfill::AudienceBackfill::new(
            Arc::clone(&ctx.backends.log),
            Arc::clone(&ctx.backends.live),
            ctx.config.fold_options(),
            Arc::clone(&ctx.audiences),
            ctx.changes.clone(),
        )
        .announce_on_log(on_log);
        parts
            .tasks
            .spawn(backfill.run(std::time::Duration::from_secs(1), ctx.cancel.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use cdp_domain::identity::{Claim, CustomerNode};
    use cdp_domain::{
        Attributes, Channel, CustomerId, Decision, Envelope, EventId, EventType, IdKind,
        Identifier, IdentityRules, Personal, Resolution, Touchpoint,
    };
    use cdp_log::EmbeddedLog;
    use cdp_store::{
        Applied, EmbeddedGenerations, GenerationInfo, Generations, IdentityStore, ProfileRow,
        ProjectionStores, StoreError, TimelineQuery,
    };
    use uuid::Uuid;

    use super::*;

    fn event(n: u128, ty: EventType) -> Touchpoint {
        Touchpoint {
            envelope: Envelope {
                event_id: EventId(Uuid::from_u128(n)),
                event_type: ty,
                channel: Channel::Store,
                source_id: "pos".into(),
                occurred_at: 1_000 + n as i64,
                received_at: 1_000 + n as i64,
                properties: serde_json::json!({"order_id": format!("O-{n}"), "total": 100_000})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            },
            personal: Personal {
                identifiers: vec![Identifier::new(IdKind::Email, "p@shop.vn")],
                traits: Attributes::new(),
                ..Personal::default()
            },
        }
    }

    /// The `resolved` record identity emits for `event` on `customer` in
    /// `generation`, as a consumer reads it.
    async fn resolved_record(
        keyring: &cdp_store::Keyring,
        customer: CustomerId,
        event: Touchpoint,
        generation: u32,
        offset: u64,
    ) -> LogRecord {
        let subjects: Vec<_> = event
            .personal
            .identifiers
            .iter()
            .map(|i| keyring.subject(i))
            .collect();
        let sealing = cdp_pipeline::seal::Sealing::new(
            keyring.hasher().clone(),
            keyring.obtain(&subjects).await.unwrap(),
        );
        let decision = Decision {
            event_id: event.event_id(),
            at: event.envelope.occurred_at,
            customer_id: customer,
            created: true,
            claims: Vec::new(),
            merges: Vec::new(),
            ignored: Vec::new(),
            recycled: Vec::new(),
            sightings: Vec::new(),
            quarantined: Vec::new(),
            seen: Vec::new(),
        };
        let mut out = Outputs::default();
        out.resolution(
            event,
            Resolution::Resolved(decision),
            generation,
            None,
            0,
            &sealing,
        )
        .unwrap();
        let r = out.resolved.remove(0);
        LogRecord {
            topic: topic::RESOLVED,
            partition: 0,
            offset,
            key: r.key,
            value: r.value,
            headers: r.headers,
            timestamp: 0,
        }
    }

    async fn keyring(dir: &std::path::Path) -> Arc<cdp_store::Keyring> {
        let master = cdp_seal::MasterKeys::parse(&cdp_seal::MasterKeys::generate_file().unwrap());
        Arc::new(
            cdp_store::Keyring::embedded(&dir.join("keys"), master.unwrap())
                .await
                .unwrap(),
        )
    }

    async fn live_on(generations: Arc<dyn Generations>) -> Arc<LiveStores> {
        Arc::new(LiveStores::open(generations).await.unwrap())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memberships_follow_the_definitions_in_the_log_and_are_appended_once() {
        use cdp_domain::audience::{Aggregate, ChangeKind, EventFilter, SegmentDef, TraitDef};
        use cdp_pipeline::audience::{DefinitionChange, read_change};
        use cdp_runtime::audiences::AudienceRegistry;

        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> =
            Arc::new(EmbeddedLog::open(&dir.path().join("log"), &topic::ALL, 1).unwrap());
        let generations = Arc::new(EmbeddedGenerations::open(&dir.path().join("store")).unwrap());
        let live = live_on(generations.clone()).await;
        let keys = keyring(dir.path()).await;
        let registry = Arc::new(AudienceRegistry::new(
            Arc::clone(&log),
            std::time::Duration::ZERO,
        ));
        registry
            .append(&DefinitionChange::TraitSaved {
                definition: TraitDef {
                    name: "orders".into(),
                    version: 1,
                    aggregate: Aggregate::Count,
                    property: None,
                    filter: EventFilter {
                        types: vec!["order_completed".into()],
                        ..EventFilter::default()
                    },
                    window: Default::default(),
                },
                at: 1,
                by: "test".into(),
            })
            .await
            .unwrap();
        registry
            .append(&DefinitionChange::SegmentSaved {
                definition: SegmentDef {
                    name: "repeat_buyers".into(),
                    version: 1,
                    condition: "traits.orders >= 2".into(),
                    description: String::new(),
                },
                at: 2,
                by: "test".into(),
            })
            .await
            .unwrap();
        let mut worker = ProfileWorker::new(
            Arc::clone(&log),
            Arc::clone(&live),
            FoldOptions::default(),
            ProfileChanges::default(),
            keys.clone(),
        )
        .with_audiences(registry);
        let customer = CustomerId(Uuid::from_u128(42));
        let first =
            vec![resolved_record(&keys, customer, event(1, EventType::OrderCompleted), 1, 0).await];
        let second =
            vec![resolved_record(&keys, customer, event(2, EventType::OrderCompleted), 1, 1).await];
        worker.handle(&first).await.unwrap();
        assert!(
            log.read(topic::AUDIENCE_CHANGES, 0, 0, 10)
                .await
                .unwrap()
                .is_empty()
        );
        worker.handle(&second).await.unwrap();
        // Delivered again: nothing changes, nothing is appended again.
        worker.handle(&second).await.unwrap();
        worker.sync().await.unwrap();
        let appended = log.read(topic::AUDIENCE_CHANGES, 0, 0, 10).await.unwrap();
        assert_eq!(appended.len(), 1);
        let change = read_change(&appended[0]).unwrap();
        assert_eq!(change.customer_id, customer);
        assert_eq!(change.generation, 1);
        assert_eq!(change.change.segment, "repeat_buyers");
        assert_eq!(change.change.kind, ChangeKind::Entered);
        let profile = live
            .current()
            .profiles
            .profile(customer)
            .await
            .unwrap()
            .expect("a folded profile");
        assert!(profile.audience.members.contains_key("repeat_buyers"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_window_lets_its_event_go_on_time_and_the_exit_is_appended_once() {
        use std::sync::atomic::{AtomicI64, Ordering};

        use cdp_domain::audience::{
            Aggregate, Cause, ChangeKind, EventFilter, SegmentDef, TraitDef,
        };
        use cdp_pipeline::audience::{DefinitionChange, read_change};
        use cdp_runtime::audiences::AudienceRegistry;

        const WEEK: i64 = 7 * 86_400_000;
        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> =
            Arc::new(EmbeddedLog::open(&dir.path().join("log"), &topic::ALL, 1).unwrap());
        let generations = Arc::new(EmbeddedGenerations::open(&dir.path().join("store")).unwrap());
        let live = live_on(generations.clone()).await;
        let keys = keyring(dir.path()).await;
        let registry = Arc::new(AudienceRegistry::new(
            Arc::clone(&log),
            std::time::Duration::ZERO,
        ));
        registry
            .append(&DefinitionChange::TraitSaved {
                definition: TraitDef {
                    name: "orders_7d".into(),
                    version: 1,
                    aggregate: Aggregate::Count,
                    property: None,
                    filter: EventFilter {
                        types: vec!["order_completed".into()],
                        ..EventFilter::default()
                    },
                    window: "7d".parse().unwrap(),
                },
                at: 1,
                by: "test".into(),
            })
            .await
            .unwrap();
        registry
            .append(&DefinitionChange::SegmentSaved {
                definition: SegmentDef {
                    name: "buyers_7d".into(),
                    version: 1,
                    condition: "traits.orders_7d >= 1".into(),
                    description: String::new(),
                },
                at: 2,
                by: "test".into(),
            })
            .await
            .unwrap();
        // The time, moved by hand.
        let time = Arc::new(AtomicI64::new(2_000));
        let clock: cdp_runtime::Clock = {
            let time = Arc::clone(&time);
            Arc::new(move || time.load(Ordering::SeqCst))
        };
        let mut worker = ProfileWorker::new(
            Arc::clone(&log),
            Arc::clone(&live),
            FoldOptions::default(),
            ProfileChanges::default(),
            keys.clone(),
        )
        .with_audiences(Arc::clone(&registry))
        .with_clock(Arc::clone(&clock));
        let customer = CustomerId(Uuid::from_u128(42));
        // An order at 1001.
        let order =
            vec![resolved_record(&keys, customer, event(1, EventType::OrderCompleted), 1, 0).await];
        worker.handle(&order).await.unwrap();
        worker.sync().await.unwrap();
        let changes = ProfileChanges::default();
        let mut announced = changes.subscribe();
        let timer = |clock: &cdp_runtime::Clock| {
            timer::AudienceTimer::new(
                Arc::clone(&log),
                Arc::clone(&live),
                FoldOptions::default(),
                Arc::clone(&registry),
                changes.clone(),
            )
            .with_clock(Arc::clone(clock))
        };
        let mut first = timer(&clock);

        // Not before the week is over, to the millisecond.
        time.store(1_001 + WEEK - 1, Ordering::SeqCst);
        let round = first.round().await.unwrap();
        assert_eq!(round, timer::Round::default());
        time.store(1_001 + WEEK, Ordering::SeqCst);
        let round = first.round().await.unwrap();
        assert_eq!(
            round,
            timer::Round {
                due: 1,
                appended: 1
            }
        );
        assert_eq!(announced.recv().await.unwrap(), customer);

        // Fired once: neither this timer nor one started afresh (a
        // restart) fires it again.
        time.store(1_001 + 2 * WEEK, Ordering::SeqCst);
        assert_eq!(first.round().await.unwrap(), timer::Round::default());
        assert_eq!(
            timer(&clock).round().await.unwrap(),
            timer::Round::default()
        );

        let appended = log.read(topic::AUDIENCE_CHANGES, 0, 0, 10).await.unwrap();
        let kinds: Vec<_> = appended
            .iter()
            .map(|r| {
                let c = read_change(r).unwrap();
                (c.customer_id, c.change.kind, c.change.cause)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (
                    customer,
                    ChangeKind::Entered,
                    Cause::Event {
                        event_id: EventId(Uuid::from_u128(1))
                    }
                ),
                (
                    customer,
                    ChangeKind::Exited,
                    Cause::Expiry { due: 1_001 + WEEK }
                ),
            ]
        );
        let profile = live
            .current()
            .profiles
            .profile(customer)
            .await
            .unwrap()
            .expect("a folded profile");
        assert!(profile.audience.members.is_empty());
        assert_eq!(
            profile
                .audience
                .computed
                .values(&registry.current().await.unwrap().traits, 1_001 + WEEK)["orders_7d"],
            serde_json::json!(0)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_trait_defined_after_the_events_is_backfilled_once_and_resumes_after_a_restart() {
        use cdp_domain::audience::{
            Aggregate, Cause, ChangeKind, EventFilter, SegmentDef, TraitDef,
        };
        use cdp_pipeline::audience::{BackfillState, DefinitionChange, read_change};
        use cdp_runtime::audiences::AudienceRegistry;

        let dir = tempfile::tempdir().unwrap();
        let log: Arc<dyn EventLog> =
            Arc::new(EmbeddedLog::open(&dir.path().join("log"), &topic::ALL, 1).unwrap());
        let generations = Arc::new(EmbeddedGenerations::open(&dir.path().join("store")).unwrap());
        let live = live_on(generations.clone()).await;
        let keys = keyring(dir.path()).await;
        let registry = Arc::new(AudienceRegistry::new(
            Arc::clone(&log),
            std::time::Duration::ZERO,
        ));
        let mut worker = ProfileWorker::new(
            Arc::clone(&log),
            Arc::clone(&live),
            FoldOptions::default(),
            ProfileChanges::default(),
            keys.clone(),
        )
        .with_audiences(Arc::clone(&registry));
        let customer = CustomerId(Uuid::from_u128(42));
        // Two orders before anything is defined.
        for n in [1, 2] {
            let record = resolved_record(
                &keys,
                customer,
                event(n, EventType::OrderCompleted),
                1,
                n as u64,
            )
            .await;
            worker.handle(&[record]).await.unwrap();
        }
        worker.sync().await.unwrap();
        let backfill = || {
            backfill::AudienceBackfill::new(
                Arc::clone(&log),
                Arc::clone(&live),
                FoldOptions::default(),
                Arc::clone(&registry),
                ProfileChanges::default(),
            )
        };
        let mut running = backfill();
        // Nothing defined: one pass that changes nothing, then nothing.
        let first = running.step().await.unwrap().expect("a first pass");
        assert_eq!((first.state, first.changes), (BackfillState::Done, 0));
        assert!(running.step().await.unwrap().is_none());

        registry
            .append(&DefinitionChange::TraitSaved {
                definition: TraitDef {
                    name: "orders".into(),
                    version: 1,
                    aggregate: Aggregate::Count,
                    property: None,
                    filter: EventFilter {
                        types: vec!["order_completed".into()],
                        ..EventFilter::default()
                    },
                    window: Default::default(),
                },
                at: 1,
                by: "test".into(),
            })
            .await
            .unwrap();
        registry
            .append(&DefinitionChange::SegmentSaved {
                definition: SegmentDef {
                    name: "repeat_buyers".into(),
                    version: 1,
                    condition: "traits.orders >= 2".into(),
                    description: String::new(),
                },
                at: 2,
                by: "test".into(),
            })
            .await
            .unwrap();
        let done = running.step().await.unwrap().expect("a backfill");
        assert_eq!(done.state, BackfillState::Done);
        assert_eq!(
            (done.scanned, done.customers_changed, done.changes),
            (1, 1, 1)
        );
        assert!(done.definitions.contains("segment/repeat_buyers@1"));
        assert!(running.step().await.unwrap().is_none());
        // A restarted process reads the progress: nothing to do again.
        assert!(backfill().step().await.unwrap().is_none());

        let appended = log.read(topic::AUDIENCE_CHANGES, 0, 0, 10).await.unwrap();
        assert_eq!(appended.len(), 1);
        let change = read_change(&appended[0]).unwrap();
        assert_eq!(
            (change.customer_id, change.change.kind, change.change.cause),
            (
                customer,
                ChangeKind::Entered,
                Cause::Definition { events: 2 }
            )
        );
        let profile = live
            .current()
            .profiles
            .profile(customer)
            .await
            .unwrap()
            .expect("a folded profile");
        assert!(profile.audience.members.contains_key("repeat_buyers"));
        let recorded = cdp_runtime::audiences::latest_backfill(log.as_ref(), live.generation())
            .await
            .unwrap();
        assert_eq!(recorded, Some(done));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_active_generations_records_are_folded_and_announced() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(&dir.path().join("log"), &topic::ALL, 1).unwrap());
        let generations = Arc::new(EmbeddedGenerations::open(&dir.path().join("store")).unwrap());
        let live = live_on(generations.clone()).await;
        let changes = ProfileChanges::default();
        let mut announced = changes.subscribe();
        let keys = keyring(dir.path()).await;
        let mut worker = ProfileWorker::new(
            log.clone(),
            Arc::clone(&live),
            FoldOptions::default(),
            changes,
            keys.clone(),
        )
        .announce_on_log(true);
        let customer = CustomerId(Uuid::from_u128(42));
        let records = vec![
            resolved_record(&keys, customer, event(1, EventType::OrderCompleted), 1, 0).await,
            // Resolved by a generation that is not active: not folded here.
            resolved_record(&keys, customer, event(2, EventType::OrderCompleted), 0, 1).await,
            LogRecord {
                value: b"garbage".to_vec(),
                offset: 2,
                ..resolved_record(&keys, customer, event(3, EventType::OrderCompleted), 1, 2).await
            },
        ];
        worker.handle(&records).await.unwrap();
        // Delivered again after a crash: nothing counts twice.
        worker.handle(&records).await.unwrap();
        worker.sync().await.unwrap();
        let profile = live
            .current()
            .profiles
            .profile(customer)
            .await
            .unwrap()
            .expect("a folded profile");
        assert_eq!(profile.view().orders_count, 1);
        assert_eq!(announced.recv().await.unwrap(), customer);
        let on_log = log.read(topic::PROFILE_CHANGES, 0, 0, 10).await.unwrap();
        assert_eq!(emit::read_profile_change(&on_log[0]), Some(customer));
        let dead = log.read(topic::DEAD_LETTERS, 0, 0, 10).await.unwrap();
        assert_eq!(dead.len(), 2, "the undecodable record, once per delivery");
        assert_eq!(
            cdp_pipeline::codec::decode_dead_letter(&dead[0].value)
                .unwrap()
                .stage,
            "profile"
        );
    }

    /// A profile store that records which of its fold calls are used.
    #[derive(Default)]
    struct Spy {
        calls: Mutex<Vec<&'static str>>,
    }

    impl Spy {
        fn saw(&self, call: &'static str) {
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(call);
            }
        }
    }

    #[async_trait]
    impl ProfileStore for Spy {
        async fn apply(
            &self,
            _: &[ResolvedTouchpoint],
            _: &FoldOptions,
        ) -> Result<Applied, StoreError> {
            self.saw("apply");
            Ok(Applied::default())
        }
        async fn apply_unsynced(
            &self,
            _: &[ResolvedTouchpoint],
            _: &FoldOptions,
        ) -> Result<Applied, StoreError> {
            self.saw("apply_unsynced");
            Ok(Applied::default())
        }
        async fn sync(&self) -> Result<(), StoreError> {
            self.saw("sync");
            Ok(())
        }
        async fn due_audiences(
            &self,
            _: i64,
            _: usize,
        ) -> Result<Vec<(i64, CustomerId)>, StoreError> {
            Ok(Vec::new())
        }
        async fn expire_audiences(
            &self,
            _: &[(i64, CustomerId)],
            _: &FoldOptions,
        ) -> Result<Applied, StoreError> {
            self.saw("expire");
            Ok(Applied::default())
        }
        async fn backfill_audiences(
            &self,
            _: Option<&str>,
            _: usize,
            _: &FoldOptions,
        ) -> Result<cdp_store::BackfillPage, StoreError> {
            self.saw("backfill");
            Ok(cdp_store::BackfillPage::default())
        }
        async fn scan_customers(
            &self,
            _: Option<&str>,
            _: usize,
        ) -> Result<(Vec<CustomerId>, Option<String>), StoreError> {
            Ok((Vec::new(), None))
        }
        async fn members(
            &self,
            _: &str,
            _: Option<&str>,
            _: usize,
        ) -> Result<cdp_store::MembersPage, StoreError> {
            Ok(cdp_store::MembersPage::default())
        }
        async fn row(&self, _: CustomerId) -> Result<Option<ProfileRow>, StoreError> {
            Ok(None)
        }
        async fn erase_views(&self, _: &[CustomerId], _: &[String]) -> Result<(), StoreError> {
            self.saw("erase");
            Ok(())
        }
        async fn timeline_range(
            &self,
            _: CustomerId,
            _: &TimelineQuery,
        ) -> Result<Vec<cdp_domain::TimelineEntry>, StoreError> {
            Ok(Vec::new())
        }
        async fn search_range(&self, _: &str, _: usize) -> Result<Vec<CustomerId>, StoreError> {
            Ok(Vec::new())
        }
    }

    #[async_trait]
    impl IdentityStore for Spy {
        async fn resolve(
            &self,
            _: &[Touchpoint],
            _: &IdentityRules,
        ) -> Result<Vec<Resolution>, StoreError> {
            Ok(Vec::new())
        }
        async fn customer(&self, _: CustomerId) -> Result<Option<CustomerNode>, StoreError> {
            Ok(None)
        }
        async fn claims(&self, ids: &[Identifier]) -> Result<Vec<Option<Claim>>, StoreError> {
            Ok(vec![None; ids.len()])
        }
        async fn erase_graph(
            &self,
            _: &[CustomerId],
            _: &[Identifier],
            _: &[cdp_domain::EventId],
        ) -> Result<(), StoreError> {
            Ok(())
        }
        async fn decision(&self, _: &Touchpoint) -> Result<Option<Resolution>, StoreError> {
            Ok(None)
        }
    }

    /// One generation whose stores are spies.
    struct SpyGenerations(Arc<Spy>);

    #[async_trait]
    impl Generations for SpyGenerations {
        async fn active(&self) -> Result<u32, StoreError> {
            Ok(1)
        }
        async fn list(&self) -> Result<Vec<GenerationInfo>, StoreError> {
            Ok(Vec::new())
        }
        async fn open(&self, id: u32) -> Result<ProjectionStores, StoreError> {
            Ok(ProjectionStores {
                generation: id,
                identity: self.0.clone(),
                profiles: self.0.clone(),
            })
        }
        async fn activate(&self, _: u32) -> Result<(), StoreError> {
            Ok(())
        }
        async fn drop_generation(&self, _: u32) -> Result<(), StoreError> {
            Ok(())
        }
        async fn highest(&self) -> Result<u32, StoreError> {
            Ok(1)
        }
    }

    /// The live generation's own fold path is used: unsynced folds, then
    /// one sync (the forwarding `LiveStores` once had took the durable
    /// default for every batch).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn folds_go_unsynced_to_the_live_generation_and_are_synced_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(dir.path(), &topic::ALL, 1).unwrap());
        let spy = Arc::new(Spy::default());
        let live = live_on(Arc::new(SpyGenerations(spy.clone()))).await;
        let keys = keyring(dir.path()).await;
        let mut worker = ProfileWorker::new(
            log,
            live,
            FoldOptions::default(),
            ProfileChanges::default(),
            keys.clone(),
        );
        let customer = CustomerId(Uuid::from_u128(7));
        for n in 0..3 {
            let record = resolved_record(
                &keys,
                customer,
                event(n, EventType::ProductViewed),
                1,
                n as u64,
            )
            .await;
            worker.handle(&[record]).await.unwrap();
        }
        worker.sync().await.unwrap();
        let calls = spy.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec!["apply_unsynced", "apply_unsynced", "apply_unsynced", "sync"]
        );
    }
}
