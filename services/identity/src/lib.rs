//! The identity-resolution worker: consumes the touchpoints topic, resolves
//! each event against the identity graph, and publishes the resolved event
//! (keyed by customer id), the graph's changes, and dead letters for events
//! that cannot be attributed.

use std::sync::Arc;

use async_trait::async_trait;
use cdp_domain::{IdentityRules, Resolution, ResolvedTouchpoint, Touchpoint};
use cdp_log::consumer::{BatchHandler, ConsumerOptions, Retry};
use cdp_log::{EventLog, LogRecord, Membership, Record, Topic};
use cdp_proto::record;
use cdp_runtime::generation;
use cdp_store::{IdentityStore, LiveStores};
use tokio_util::sync::CancellationToken;

/// The consumer group of identity workers of the first projection
/// generation (see [`cdp_runtime::generation::identity_group`]).
pub const GROUP: &str = cdp_runtime::generation::IDENTITY_GROUP;

pub struct IdentityWorker {
    log: Arc<dyn EventLog>,
    live: Arc<LiveStores>,
    rules: Arc<IdentityRules>,
    /// The generation being written, and its store.
    generation: u32,
    store: Arc<dyn IdentityStore>,
}

fn dead_letter(key: &[u8], value: Vec<u8>) -> Record {
    Record {
        key: key.to_vec(),
        value,
        headers: Vec::new(),
        idempotency_key: None,
    }
}

impl IdentityWorker {
    pub fn new(log: Arc<dyn EventLog>, live: Arc<LiveStores>, rules: Arc<IdentityRules>) -> Self {
        let current = live.current();
        IdentityWorker {
            log,
            live,
            rules,
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
            let group = generation::identity_group(self.generation);
            let until = generation::until_switch(&self.live, self.generation, &cancel);
            tracing::info!(generation = self.generation, %group, "identity worker joins");
            cdp_log::consumer::join_and_run(
                log.as_ref(),
                &group,
                Topic::Touchpoints,
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
        let mut dead = Vec::new();
        let mut events: Vec<Touchpoint> = Vec::with_capacity(records.len());
        // Each event's trace context, passed on to its resolved record.
        let mut traces: Vec<Option<Vec<u8>>> = Vec::with_capacity(records.len());
        for r in records {
            match record::decode_touchpoint(&r.value) {
                Ok(t) => {
                    events.push(t);
                    traces.push(r.header(cdp_runtime::trace::HEADER).map(<[u8]>::to_vec));
                }
                Err(error) => {
                    tracing::error!(partition = r.partition, offset = r.offset, %error, "undecodable touchpoint record");
                    dead.push(dead_letter(
                        &r.key,
                        record::encode_raw_dead_letter(
                            "identity",
                            &error.to_string(),
                            &r.value,
                            now,
                        ),
                    ));
                }
            }
        }
        let resolutions = self
            .store
            .resolve(&events, &self.rules)
            .await
            .map_err(|e| Retry(format!("identity store: {e}")))?;
        let mut resolved = Vec::with_capacity(events.len());
        let mut graph_changes = Vec::new();
        for ((event, resolution), trace) in events.into_iter().zip(resolutions).zip(traces) {
            match resolution {
                Resolution::Resolved(decision) => {
                    let key = decision.customer_id.to_string().into_bytes();
                    for change in record::identity_records(&decision) {
                        graph_changes.push(Record {
                            key: key.clone(),
                            value: change,
                            ..Record::default()
                        });
                    }
                    if !decision.merges.is_empty() {
                        tracing::info!(customer = %decision.customer_id, merged = decision.merges.len(), event = %decision.event_id, "customers merged");
                    }
                    let r = ResolvedTouchpoint {
                        customer_id: decision.customer_id,
                        merges: decision.merges,
                        touchpoint: event,
                    };
                    let mut headers = vec![
                        (
                            "cdp-event-id".into(),
                            r.touchpoint.event_id().to_string().into_bytes(),
                        ),
                        (
                            generation::HEADER.into(),
                            self.generation.to_string().into_bytes(),
                        ),
                    ];
                    if let Some(t) = trace {
                        headers.push((cdp_runtime::trace::HEADER.into(), t));
                    }
                    resolved.push(Record {
                        key,
                        value: record::encode_resolved(&r),
                        headers,
                        idempotency_key: None,
                    });
                }
                Resolution::Unresolvable { ignored } => {
                    let reasons: Vec<String> = ignored
                        .iter()
                        .map(|(id, why)| format!("{}: {}", id.kind, why.describe()))
                        .collect();
                    let reason = format!(
                        "no identifier of the event may link it to a customer ({})",
                        reasons.join("; ")
                    );
                    tracing::warn!(event = %event.event_id(), %reason, "event sent to dead letters");
                    dead.push(dead_letter(
                        event.event_id().to_string().as_bytes(),
                        record::encode_dead_letter("identity", &reason, &event, now),
                    ));
                }
            }
        }
        // The resolved events first: they are what profiles need. A crash
        // before the commit re-resolves the batch, and the store answers
        // with the same decisions.
        for (topic, batch) in [
            (Topic::Resolved, resolved),
            (Topic::Identity, graph_changes),
            (Topic::DeadLetters, dead),
        ] {
            if !batch.is_empty() {
                self.log
                    .append(topic, batch)
                    .await
                    .map_err(|e| Retry(format!("append to {topic}: {e}")))?;
            }
        }
        Ok(())
    }
}

/// Installs `pipeline.identity_workers` identity workers in a process.
pub async fn install(
    ctx: &cdp_runtime::serve::Context,
    parts: &mut cdp_runtime::serve::Parts,
) -> Result<(), cdp_runtime::serve::StartError> {
    let members = ctx.config.pipeline.identity_workers.max(1);
    for index in 0..members {
        let worker = IdentityWorker::new(
            Arc::clone(&ctx.backends.log),
            Arc::clone(&ctx.backends.live),
            Arc::clone(&ctx.rules),
        );
        let options = ctx.consumer_options(&format!("identity-{index}"));
        let cancel = ctx.cancel.clone();
        let membership = ctx.config.pipeline.membership(index, members);
        parts.tasks.spawn(worker.run(membership, options, cancel));
    }
    Ok(())
}
