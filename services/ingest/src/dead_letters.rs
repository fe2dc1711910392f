//! Dead letters: list them with their reasons, and re-drive them into the
//! touchpoints topic once the cause is fixed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cdp_log::{Appended, EventLog, LogRecord, Record};
use cdp_pipeline::codec as record;
use cdp_pipeline::{emit, topic};
use cdp_proto::convert;
use cdp_proto::v1::dead_letter_service_server::DeadLetterService;
use cdp_proto::v1::{
    DeadLetter, DeadLetterRef, ListDeadLettersRequest, ListDeadLettersResponse, RedriveRequest,
    RedriveResponse, SkippedDeadLetter,
};
use cdp_runtime::ServiceError;
use cdp_runtime::auth::{Access, Caller};
use tonic::{Request, Response, Status};

const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub struct DeadLetters {
    log: Arc<dyn EventLog>,
    ingestor: crate::Ingestor,
    access: Arc<Access>,
    /// One re-drive at a time in this process, so each reads the marks of
    /// the one before (across processes the copies' idempotency keys
    /// decide).
    redriving: tokio::sync::Mutex<()>,
}

impl DeadLetters {
    pub fn new(log: Arc<dyn EventLog>, ingestor: crate::Ingestor, access: Arc<Access>) -> Self {
        DeadLetters {
            log,
            ingestor,
            access,
            redriving: tokio::sync::Mutex::new(()),
        }
    }

    fn describe(r: &LogRecord, keys: &cdp_seal::KeySet) -> DeadLetter {
        let reference = Some(DeadLetterRef {
            partition: r.partition,
            offset: r.offset,
        });
        match record::decode_dead_letter(&r.value) {
            Ok(d) => {
                let touchpoint = d
                    .touchpoint
                    .as_ref()
                    .and_then(|t| record::touchpoint_from_record(t, keys).ok())
                    .map(|o| o.value);
                DeadLetter {
                    r#ref: reference,
                    stage: d.stage,
                    reason: d.reason,
                    failed_at: Some(convert::millis_to_timestamp(d.failed_at_ms)),
                    event_id: touchpoint
                        .as_ref()
                        .map(|t| t.event_id().to_string())
                        .unwrap_or_default(),
                    r#type: touchpoint
                        .as_ref()
                        .map(|t| t.envelope.event_type.to_string())
                        .unwrap_or_default(),
                    channel: touchpoint
                        .as_ref()
                        .map(|t| t.envelope.channel.to_string())
                        .unwrap_or_default(),
                    source_id: touchpoint
                        .as_ref()
                        .map(|t| t.envelope.source_id.clone())
                        .unwrap_or_default(),
                    identifiers: touchpoint
                        .map(|t| {
                            t.personal
                                .identifiers
                                .iter()
                                .map(convert::identifier)
                                .collect()
                        })
                        .unwrap_or_default(),
                    redriven_at: None,
                }
            }
            Err(e) => DeadLetter {
                r#ref: reference,
                stage: "unknown".into(),
                reason: format!("the dead letter itself cannot be decoded: {e}"),
                ..DeadLetter::default()
            },
        }
    }

    /// One page of dead letters in (partition, offset) order.
    pub async fn list(
        &self,
        page_size: usize,
        token: &str,
    ) -> Result<ListDeadLettersResponse, ServiceError> {
        let (mut partition, mut offset) = match token {
            "" => (0, 0),
            t => t
                .split_once('_')
                .and_then(|(p, o)| Some((p.parse::<u32>().ok()?, o.parse::<u64>().ok()?)))
                .ok_or_else(|| {
                    ServiceError::invalid("page_token", "is not a token from a previous response")
                })?,
        };
        let size = if page_size == 0 {
            DEFAULT_PAGE
        } else {
            page_size.min(MAX_PAGE)
        };
        let partitions = self.log.partitions(topic::DEAD_LETTERS);
        let mut out = Vec::new();
        while partition < partitions && out.len() < size {
            let records = self
                .log
                .read(topic::DEAD_LETTERS, partition, offset, size - out.len())
                .await
                .map_err(ServiceError::from)?;
            match records.last() {
                Some(last) => offset = last.offset + 1,
                None => {
                    partition += 1;
                    offset = 0;
                }
            }
            let keys = emit::keys_for(&self.ingestor.keyring, &records)
                .await
                .map_err(ServiceError::from)?;
            out.extend(records.iter().map(|r| Self::describe(r, &keys)));
        }
        if !out.is_empty() {
            let done = self.redriven().await?;
            for d in &mut out {
                if let Some(r) = &d.r#ref
                    && let Some(at) = done.get(&(r.partition, r.offset))
                {
                    d.redriven_at = Some(convert::millis_to_timestamp(*at));
                }
            }
        }
        let next = if partition < partitions {
            format!("{partition}_{offset}")
        } else {
            String::new()
        };
        Ok(ListDeadLettersResponse {
            dead_letters: out,
            next_page_token: next,
        })
    }

    /// Every dead letter re-driven so far: its position and when.
    async fn redriven(&self) -> Result<HashMap<(u32, u64), i64>, ServiceError> {
        let mut done = HashMap::new();
        for r in self.read_topic(topic::REDRIVES).await? {
            match record::decode_redrive(&r.value) {
                Ok(m) => {
                    done.insert((m.dead_letter_partition, m.dead_letter_offset), m.at_ms);
                }
                Err(error) => tracing::warn!(
                    partition = r.partition,
                    offset = r.offset,
                    %error,
                    "undecodable redrives record skipped"
                ),
            }
        }
        Ok(done)
    }

    /// Every record of `topic`, partition by partition.
    async fn read_topic(&self, topic: cdp_log::Topic) -> Result<Vec<LogRecord>, ServiceError> {
        let mut records = Vec::new();
        for p in 0..self.log.partitions(topic) {
            let mut from = 0;
            loop {
                let batch = self
                    .log
                    .read(topic, p, from, 1000)
                    .await
                    .map_err(ServiceError::from)?;
                let Some(last) = batch.last() else { break };
                from = last.offset + 1;
                records.extend(batch);
            }
        }
        Ok(records)
    }

    /// Appends the dead-lettered touchpoints to the touchpoints topic again,
    /// each dead letter at most once and each event at most once per call,
    /// and records what it re-drove on the `redrives` topic.
    pub async fn redrive(
        &self,
        refs: &[DeadLetterRef],
        all: bool,
        actor: &str,
    ) -> Result<RedriveResponse, ServiceError> {
        let _one_at_a_time = self.redriving.lock().await;
        let mut records = Vec::new();
        if all {
            records = self.read_topic(topic::DEAD_LETTERS).await?;
        } else {
            if refs.is_empty() {
                return Err(ServiceError::invalid(
                    "refs",
                    "name the dead letters to re-drive, or set all",
                ));
            }
            if refs.len() > MAX_PAGE {
                return Err(ServiceError::invalid(
                    "refs",
                    format!("at most {MAX_PAGE} dead letters per call"),
                ));
            }
            for (i, r) in refs.iter().enumerate() {
                let found = self
                    .log
                    .read(topic::DEAD_LETTERS, r.partition, r.offset, 1)
                    .await
                    .map_err(|e| match e {
                        cdp_log::LogError::Invalid(m) => {
                            ServiceError::invalid(format!("refs[{i}].partition"), m)
                        }
                        other => other.into(),
                    })?;
                match found.into_iter().next() {
                    Some(rec) if rec.offset == r.offset => records.push(rec),
                    _ => {
                        return Err(ServiceError::NotFound(format!(
                            "refs[{i}]: no dead letter at {}_{}",
                            r.partition, r.offset
                        )));
                    }
                }
            }
        }
        let done = self.redriven().await?;
        let now = cdp_runtime::now_ms();
        let traceparent = cdp_runtime::trace::current_traceparent();
        let keys = emit::keys_for(&self.ingestor.keyring, &records)
            .await
            .map_err(ServiceError::from)?;
        // Each dead letter's event, unless it cannot be decoded or its
        // customer was erased (its personal part is gone).
        let decoded: Vec<Option<cdp_domain::Touchpoint>> = records
            .iter()
            .map(|r| {
                record::decode_dead_letter(&r.value).ok().and_then(|d| {
                    d.touchpoint
                        .as_ref()
                        .and_then(|t| record::touchpoint_from_record(t, &keys).ok())
                        .filter(|o| !o.anonymous)
                        .map(|o| o.value)
                })
            })
            .collect();
        let present: Vec<cdp_domain::Touchpoint> = decoded.iter().flatten().cloned().collect();
        let sealing = self.ingestor.sealing(&present).await?;
        let mut skipped = Vec::new();
        let mut events = HashSet::new();
        // (dead letter, its record to append, or None when its event is
        // already being re-driven from another dead letter of this call)
        let mut plan: Vec<(&LogRecord, String, Option<Record>)> = Vec::new();
        for (r, touchpoint) in records.iter().zip(decoded) {
            let position = (r.partition, r.offset);
            let reference = Some(DeadLetterRef {
                partition: r.partition,
                offset: r.offset,
            });
            let Some(t) = touchpoint else {
                skipped.push(SkippedDeadLetter {
                    r#ref: reference,
                    event_id: String::new(),
                    reason:
                        "holds no decodable touchpoint (the record it failed on is kept as bytes), or its customer was erased"
                            .into(),
                });
                continue;
            };
            let event_id = t.event_id().to_string();
            if let Some(at) = done.get(&position) {
                skipped.push(SkippedDeadLetter {
                    r#ref: reference,
                    event_id,
                    reason: format!(
                        "already re-driven at {}; if it failed again, it is a newer dead letter",
                        convert::millis_to_timestamp(*at)
                    ),
                });
                continue;
            }
            if events.insert(t.event_id()) {
                let copy = emit::redriven_touchpoint(
                    &t,
                    &self.ingestor.rules,
                    &traceparent,
                    position,
                    &sealing,
                )
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
                plan.push((r, event_id, Some(copy)));
            } else {
                plan.push((r, event_id, None));
            }
        }
        let copies: Vec<Record> = plan.iter().filter_map(|(_, _, c)| c.clone()).collect();
        let mut landed = if copies.is_empty() {
            Vec::new()
        } else {
            self.log
                .append(topic::TOUCHPOINTS, copies)
                .await
                .map_err(ServiceError::from)?
        }
        .into_iter();
        let mut markers = Vec::new();
        let mut event_ids = Vec::new();
        for (r, event_id, copy) in plan {
            let mut marker = cdp_proto::v1::RedriveRecord {
                dead_letter_partition: r.partition,
                dead_letter_offset: r.offset,
                event_id: event_id.clone(),
                at_ms: now,
                actor: actor.to_owned(),
                ..Default::default()
            };
            let reference = Some(DeadLetterRef {
                partition: r.partition,
                offset: r.offset,
            });
            match copy.and_then(|_| landed.next()) {
                Some(Appended::New { partition, offset }) => {
                    marker.appended = true;
                    marker.touchpoint_partition = partition;
                    marker.touchpoint_offset = offset;
                    event_ids.push(event_id);
                }
                // A concurrent or retried call appended it first.
                Some(Appended::Duplicate { .. }) => skipped.push(SkippedDeadLetter {
                    r#ref: reference,
                    event_id,
                    reason: "already re-driven by a concurrent or retried call".into(),
                }),
                None => skipped.push(SkippedDeadLetter {
                    r#ref: reference,
                    event_id,
                    reason: "its event is re-driven from another dead letter in this call".into(),
                }),
            }
            markers.push(emit::redrive(&marker));
        }
        if !markers.is_empty() {
            self.log
                .append(topic::REDRIVES, markers)
                .await
                .map_err(ServiceError::from)?;
        }
        tracing::info!(
            redriven = event_ids.len(),
            skipped = skipped.len(),
            "dead letters re-driven"
        );
        Ok(RedriveResponse {
            redriven: u32::try_from(event_ids.len()).unwrap_or(u32::MAX),
            event_ids,
            skipped,
        })
    }
}

#[tonic::async_trait]
impl DeadLetterService for DeadLetters {
    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Result<Response<ListDeadLettersResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let mut page = self.list(r.page_size as usize, &r.page_token).await?;
        let mut entry = caller.entry("allowed");
        entry.fields = vec![format!("dead_letters:{}", page.dead_letters.len())];
        self.access.audit(entry).await?;
        // Operators see what failed and why, not whom it was about.
        let masker = self.access.masker(&caller.principal);
        for d in &mut page.dead_letters {
            d.reason = masker.text(&d.reason);
            for id in &mut d.identifiers {
                id.value = masker.identifier_value(&id.kind, &id.value);
            }
        }
        Ok(Response::new(page))
    }

    async fn redrive(
        &self,
        request: Request<RedriveRequest>,
    ) -> Result<Response<RedriveResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let answer = DeadLetters::redrive(self, &r.refs, r.all, &caller.principal.name).await?;
        let mut entry = caller.entry("allowed");
        entry.fields = vec![format!("redriven:{}", answer.redriven)];
        entry.reason = if r.all {
            "all dead letters".into()
        } else {
            format!("{} dead letters", r.refs.len())
        };
        self.access.audit_durable(entry).await?;
        Ok(Response::new(answer))
    }
}
