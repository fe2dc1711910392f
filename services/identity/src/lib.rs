//! The identity-resolution worker: consumes the touchpoints topic, resolves
//! each event against the identity graph of the active projection
//! generation, and appends what the pipeline's contract says identity
//! emits (`cdp_pipeline::Outputs`): the resolved event keyed by customer
//! id, the graph's changes, and dead letters for events that cannot be
//! attributed.

use std::sync::Arc;

use async_trait::async_trait;
use cdp_domain::{IdentityRules, Resolution, Touchpoint};
use cdp_log::consumer::{BatchHandler, ConsumerOptions, Retry};
use cdp_log::{EventLog, LogRecord, Membership};
use cdp_pipeline::seal::Sealing;
use cdp_pipeline::{Outputs, Stage, emit, group, topic};
use cdp_store::{IdentityStore, Keyring, LiveStores};
use tokio_util::sync::CancellationToken;

pub struct IdentityWorker {
    log: Arc<dyn EventLog>,
    live: Arc<LiveStores>,
    rules: Arc<IdentityRules>,
    keyring: Arc<Keyring>,
    /// The generation being written, and its store.
    generation: u32,
    store: Arc<dyn IdentityStore>,
}

impl IdentityWorker {
    pub fn new(
        log: Arc<dyn EventLog>,
        live: Arc<LiveStores>,
        rules: Arc<IdentityRules>,
        keyring: Arc<Keyring>,
    ) -> Self {
        let current = live.current();
        IdentityWorker {
            log,
            live,
            rules,
            keyring,
            generation: current.generation,
            store: current.identity,
        }
    }

    /// Consumes until `cancel` fires, as member `membership` of the group of
    /// the active generation. When a rebuild activates another generation,
    /// the batch in hand is finished and committed, and the worker goes on
    /// in the new generation's group, where the rebuild stopped.
    pub async fn run(
        mut self,
        membership: Membership,
        options: ConsumerOptions,
        cancel: CancellationToken,
    ) {
        let log = Arc::clone(&self.log);
        while !cancel.is_cancelled() {
            let current = self.live.current();
            self.generation = current.generation;
            self.store = current.identity;
            let group = group::identity(self.generation);
            let until = self.live.until_switch(self.generation, &cancel);
            tracing::info!(generation = self.generation, %group, "identity worker joins");
            cdp_log::consumer::join_and_run(
                log.as_ref(),
                &group,
                topic::TOUCHPOINTS,
                membership,
                &mut self,
                &options,
                until.clone(),
            )
            .await;
            until.cancel();
        }
    }
}

#[async_trait]
impl BatchHandler for IdentityWorker {
    #[tracing::instrument(name = "identity_batch", skip_all, fields(records = records.len()))]
    async fn handle(&mut self, records: &[LogRecord]) -> Result<(), Retry> {
        let now = cdp_runtime::now_ms();
        let mut out = Outputs::default();
        let mut events: Vec<Touchpoint> = Vec::with_capacity(records.len());
        // Each event's record, whose trace context its resolved record carries.
        let mut sources: Vec<&LogRecord> = Vec::with_capacity(records.len());
        let keys = emit::keys_for(&self.keyring, records)
            .await
            .map_err(|e| Retry(format!("keyring: {e}")))?;
        let sealing = Sealing::new(self.keyring.hasher().clone(), keys);
        let mut erased = 0usize;
        for r in records {
            match emit::read_touchpoint(r, &sealing.keys).map(|o| (!o.anonymous).then_some(o.value))
            {
                // Its customer was erased: nothing to attribute it to.
                Ok(None) => erased += 1,
                // Accepted before nesting was bounded: no view may hold it,
                // since clients could not decode what carries it.
                Ok(Some(t)) if !cdp_domain::validate::shape_errors(&t).is_empty() => {
                    let reason =
                        cdp_domain::Rejection(cdp_domain::validate::shape_errors(&t)).to_string();
                    tracing::warn!(partition = r.partition, offset = r.offset, event = %t.event_id(), %reason, "touchpoint beyond the shape limits sent to dead letters");
                    out.dead_letter(Stage::Identity, &reason, &t, now, &sealing)
                        .map_err(|e| Retry(format!("sealing: {e}")))?;
                }
                Ok(Some(t)) => {
                    events.push(t);
                    sources.push(r);
                }
                Err(error) => {
                    tracing::error!(partition = r.partition, offset = r.offset, %error, "undecodable touchpoint record");
                    out.undecodable(Stage::Identity, r, &error.to_string(), now);
                }
            }
        }
        if erased > 0 {
            tracing::debug!(erased, "touchpoints of erased customers skipped");
        }
        let resolutions = self
            .store
            .resolve(&events, &self.rules)
            .await
            .map_err(|e| Retry(format!("identity store: {e}")))?;
        for ((event, resolution), source) in events.into_iter().zip(resolutions).zip(sources) {
            match &resolution {
                Resolution::Resolved(d) if !d.merges.is_empty() => {
                    tracing::info!(customer = %d.customer_id, merged = d.merges.len(), event = %d.event_id, "customers merged");
                }
                Resolution::Unresolvable { ignored } => {
                    tracing::warn!(event = %event.event_id(), reason = %emit::unresolvable_reason(ignored), "event sent to dead letters");
                }
                Resolution::Resolved(_) => {}
            }
            out.resolution(
                event,
                resolution,
                self.generation,
                emit::trace_of(source),
                now,
                &sealing,
            )
            .map_err(|e| Retry(format!("sealing: {e}")))?;
        }
        // In the contract's order, resolved records first: they are what
        // profiles need. A crash before the commit re-resolves the batch,
        // and the store answers with the same decisions.
        for (topic, batch) in out.appends() {
            self.log
                .append(topic, batch)
                .await
                .map_err(|e| Retry(format!("append to {topic}: {e}")))?;
        }
        Ok(())
    }
}

/// Installs `pipeline.identity_workers` identity workers in a process.
pub async fn install(
    ctx: &cdp_runtime::serve::Context,
    parts: &mut cdp_runtime::serve::Parts,
) -> Result<(), cdp_runtime::serve::StartError> {
    let count = ctx.config.pipeline.identity_workers;
    ctx.spawn_workers(parts, "identity", count, |membership, options, cancel| {
        IdentityWorker::new(
            Arc::clone(&ctx.backends.log),
            Arc::clone(&ctx.backends.live),
            Arc::clone(&ctx.rules),
            Arc::clone(&ctx.backends.keyring),
        )
        .run(membership, options, cancel)
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use cdp_domain::{
        Attributes, Channel, CustomerId, Envelope, EventId, EventType, IdKind, Identifier, Personal,
    };
    use cdp_log::EmbeddedLog;
    use cdp_pipeline::codec;
    use cdp_store::EmbeddedGenerations;
    use uuid::Uuid;

    use super::*;

    struct Fixture {
        log: Arc<EmbeddedLog>,
        keyring: Arc<Keyring>,
        worker: IdentityWorker,
        _dir: tempfile::TempDir,
    }

    /// A worker on a fresh embedded log and store.
    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EmbeddedLog::open(&dir.path().join("log"), &topic::ALL, 2).unwrap());
        let generations = EmbeddedGenerations::open(&dir.path().join("store")).unwrap();
        let live = LiveStores::open(Arc::new(generations)).await.unwrap();
        let rules = Arc::new(IdentityRules::default());
        let master = cdp_seal::MasterKeys::parse(&cdp_seal::MasterKeys::generate_file().unwrap());
        let keyring = Arc::new(
            Keyring::embedded(&dir.path().join("keys"), master.unwrap())
                .await
                .unwrap(),
        );
        let worker = IdentityWorker::new(log.clone(), Arc::new(live), rules, keyring.clone());
        Fixture {
            log,
            keyring,
            worker,
            _dir: dir,
        }
    }

    fn event(n: u128, ids: &[(IdKind, &str)]) -> Touchpoint {
        Touchpoint {
            envelope: Envelope {
                event_id: EventId(Uuid::from_u128(n)),
                event_type: EventType::ProductViewed,
                channel: Channel::Web,
                source_id: "web".into(),
                occurred_at: 1_000 + n as i64,
                received_at: 1_000 + n as i64,
                properties: Attributes::new(),
            },
            personal: Personal {
                identifiers: ids
                    .iter()
                    .map(|(k, v)| Identifier::new(k.clone(), *v))
                    .collect(),
                traits: Attributes::new(),
                ..Personal::default()
            },
        }
    }

    /// Appends touchpoints as ingest does and reads them back as the
    /// worker's consumer would get them.
    async fn delivered(f: &Fixture, events: &[Touchpoint]) -> Vec<LogRecord> {
        let log = &f.log;
        let rules = IdentityRules::default();
        let subjects: Vec<_> = events
            .iter()
            .flat_map(|t| &t.personal.identifiers)
            .map(|i| f.keyring.subject(i))
            .collect();
        let sealing = Sealing::new(
            f.keyring.hasher().clone(),
            f.keyring.obtain(&subjects).await.unwrap(),
        );
        let records = events
            .iter()
            .map(|t| {
                emit::touchpoint(
                    t,
                    &rules,
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    &sealing,
                )
                .unwrap()
            })
            .collect();
        log.append(topic::TOUCHPOINTS, records).await.unwrap();
        read_all(log, topic::TOUCHPOINTS).await
    }

    async fn read_resolved(f: &Fixture, r: &LogRecord) -> cdp_domain::ResolvedTouchpoint {
        let keys = emit::keys_for(&f.keyring, [r]).await.unwrap();
        let opened = emit::read_resolved(r, &keys).unwrap();
        assert!(!opened.anonymous);
        opened.value
    }

    /// Once a customer's keys are erased, its events are attributed to no
    /// one: no resolved record, no dead letter, no identity change; the
    /// records themselves never held its identifiers in clear.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_events_of_an_erased_identifier_are_skipped() {
        let mut f = fixture().await;
        let kept = event(1, &[(IdKind::Email, "kept@shop.vn")]);
        let gone = event(2, &[(IdKind::Email, "gone@shop.vn")]);
        let records = delivered(&f, &[kept, gone.clone()]).await;
        for r in &records {
            let bytes = [r.key.as_slice(), r.value.as_slice()].concat();
            assert!(
                !bytes.windows(4).any(|w| w == b"shop"),
                "an email in clear in {r:?}"
            );
        }
        let subject = f.keyring.subject(&gone.personal.identifiers[0]);
        f.keyring.erase(&[subject], 5, "req").await.unwrap();
        f.worker.handle(&records).await.unwrap();
        let resolved = read_all(&f.log, topic::RESOLVED).await;
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            read_resolved(&f, &resolved[0]).await.touchpoint.event_id(),
            EventId(Uuid::from_u128(1))
        );
        assert!(read_all(&f.log, topic::DEAD_LETTERS).await.is_empty());
        assert_eq!(read_all(&f.log, topic::IDENTITY).await.len(), 1);
    }

    async fn read_all(log: &EmbeddedLog, t: cdp_log::Topic) -> Vec<LogRecord> {
        let mut out = Vec::new();
        for p in 0..log.partitions(t) {
            out.extend(log.read(t, p, 0, 10_000).await.unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_emits_resolved_records_graph_changes_and_dead_letters() {
        let mut f = fixture().await;
        let a = event(1, &[(IdKind::Email, "a@shop.vn")]);
        let b = event(
            2,
            &[
                (IdKind::Email, "a@shop.vn"),
                (IdKind::Phone, "+84912345678"),
            ],
        );
        let blocked = event(3, &[(IdKind::DeviceId, "pos-q1-tablet")]);
        let mut records = delivered(&f, &[a.clone(), b.clone(), blocked.clone()]).await;
        // A record no build can read: kept as a dead letter, never dropped.
        records.push(LogRecord {
            value: b"not protobuf".to_vec(),
            offset: 99,
            ..records[0].clone()
        });
        f.worker.handle(&records).await.unwrap();

        let resolved = read_all(&f.log, topic::RESOLVED).await;
        assert_eq!(resolved.len(), 2, "two attributable events");
        let mut customers: Vec<CustomerId> = Vec::new();
        for r in &resolved {
            assert_eq!(emit::generation_of(r), Some(1));
            assert!(emit::trace_of(r).is_some(), "the trace context travels on");
            let rt = read_resolved(&f, r).await;
            assert_eq!(r.key, cdp_pipeline::key::customer(rt.customer_id));
            customers.push(rt.customer_id);
        }
        assert_eq!(customers[0], customers[1], "one email, one customer");
        let changes = read_all(&f.log, topic::IDENTITY).await;
        assert_eq!(changes.len(), 2, "the email, then the phone linked");
        let dead = read_all(&f.log, topic::DEAD_LETTERS).await;
        assert_eq!(dead.len(), 2);
        let reasons: Vec<String> = dead
            .iter()
            .map(|d| codec::decode_dead_letter(&d.value).unwrap().reason)
            .collect();
        assert!(reasons.iter().any(|r| r.contains("pos-*")), "{reasons:?}");
        assert!(
            reasons.iter().any(|r| r.contains("protobuf")),
            "{reasons:?}"
        );
    }

    /// A record accepted before nesting was bounded (a 100-level event)
    /// goes to the dead letters with the reason; the batch goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_nested_too_deep_is_dead_lettered_and_the_batch_goes_on() {
        let mut f = fixture().await;
        let mut deep = event(7, &[(IdKind::Email, "deep@shop.vn")]);
        let nested = (0..100).fold(
            serde_json::json!(1),
            |inner, _| serde_json::json!({ "a": inner }),
        );
        deep.envelope.properties.insert("x".into(), nested);
        let fine = event(8, &[(IdKind::Email, "fine@shop.vn")]);
        let records = delivered(&f, &[deep, fine]).await;
        f.worker.handle(&records).await.unwrap();
        assert_eq!(read_all(&f.log, topic::RESOLVED).await.len(), 1);
        let dead = read_all(&f.log, topic::DEAD_LETTERS).await;
        assert_eq!(dead.len(), 1);
        let reason = codec::decode_dead_letter(&dead[0].value).unwrap().reason;
        assert!(
            reason.contains("properties: nests deeper than 20 levels (at properties.x.a.a"),
            "{reason}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redelivered_batch_gets_the_same_customers() {
        let mut f = fixture().await;
        let events = [
            event(1, &[(IdKind::Email, "x@shop.vn")]),
            event(2, &[(IdKind::Phone, "+84912345670")]),
            event(
                3,
                &[
                    (IdKind::Email, "x@shop.vn"),
                    (IdKind::Phone, "+84912345670"),
                ],
            ),
        ];
        let records = delivered(&f, &events).await;
        f.worker.handle(&records).await.unwrap();
        f.worker.handle(&records).await.unwrap();
        let resolved = read_all(&f.log, topic::RESOLVED).await;
        assert_eq!(resolved.len(), 6);
        let mut by_event: std::collections::BTreeMap<EventId, Vec<(CustomerId, usize)>> =
            Default::default();
        for r in &resolved {
            let rt = read_resolved(&f, r).await;
            by_event
                .entry(rt.touchpoint.event_id())
                .or_default()
                .push((rt.customer_id, rt.merges.len()));
        }
        for (event, outcomes) in by_event {
            assert_eq!(outcomes.len(), 2);
            assert_eq!(
                outcomes[0], outcomes[1],
                "event {event} decided twice differently"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unavailable_log_is_a_retry_not_a_loss() {
        let mut f = fixture().await;
        let records = delivered(&f, &[event(1, &[(IdKind::Email, "r@shop.vn")])]).await;
        // A log without the resolved topic refuses the append.
        let dir = tempfile::tempdir().unwrap();
        let narrow = EmbeddedLog::open(dir.path(), &[topic::TOUCHPOINTS], 1).unwrap();
        f.worker.log = Arc::new(narrow);
        let err = f.worker.handle(&records).await.unwrap_err();
        assert!(err.0.contains("resolved"), "{err}");
    }
}
