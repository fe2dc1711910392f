//! Dead letters: list them with their reasons, and re-drive them into the
//! touchpoints topic once the cause is fixed.

use std::sync::Arc;

use cdp_log::{EventLog, LogRecord, Record};
use cdp_pipeline::codec as record;
use cdp_pipeline::topic;
use cdp_proto::convert;
use cdp_proto::v1::dead_letter_service_server::DeadLetterService;
use cdp_proto::v1::{
    DeadLetter, DeadLetterRef, ListDeadLettersRequest, ListDeadLettersResponse, RedriveRequest,
    RedriveResponse,
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
}

impl DeadLetters {
    pub fn new(log: Arc<dyn EventLog>, ingestor: crate::Ingestor, access: Arc<Access>) -> Self {
        DeadLetters {
            log,
            ingestor,
            access,
        }
    }

    fn describe(r: &LogRecord) -> DeadLetter {
        let reference = Some(DeadLetterRef {
            partition: r.partition,
            offset: r.offset,
        });
        match record::decode_dead_letter(&r.value) {
            Ok(d) => {
                let touchpoint = d
                    .touchpoint
                    .as_ref()
                    .and_then(|t| record::touchpoint_from_record(t).ok());
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
            out.extend(records.iter().map(Self::describe));
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

    /// Appends the dead-lettered touchpoints to the touchpoints topic again.
    pub async fn redrive(
        &self,
        refs: &[DeadLetterRef],
        all: bool,
    ) -> Result<RedriveResponse, ServiceError> {
        let mut records = Vec::new();
        if all {
            for p in 0..self.log.partitions(topic::DEAD_LETTERS) {
                let mut from = 0;
                loop {
                    let batch = self
                        .log
                        .read(topic::DEAD_LETTERS, p, from, 1000)
                        .await
                        .map_err(ServiceError::from)?;
                    let Some(last) = batch.last() else { break };
                    from = last.offset + 1;
                    records.extend(batch);
                }
            }
        } else {
            if refs.is_empty() {
                return Err(ServiceError::invalid(
                    "refs",
                    "name the dead letters to re-drive, or set all",
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
                            "no dead letter at {}_{}",
                            r.partition, r.offset
                        )));
                    }
                }
            }
        }
        let mut touchpoints = Vec::new();
        for r in &records {
            if let Ok(d) = record::decode_dead_letter(&r.value)
                && let Some(t) = d
                    .touchpoint
                    .as_ref()
                    .and_then(|t| record::touchpoint_from_record(t).ok())
            {
                touchpoints.push(t);
            }
        }
        // Without the idempotency key: the log has seen these event ids.
        let traceparent = cdp_runtime::trace::current_traceparent();
        let appended: Vec<Record> = touchpoints
            .iter()
            .map(|t| Record {
                idempotency_key: None,
                ..self.ingestor.record(t, &traceparent)
            })
            .collect();
        if !appended.is_empty() {
            self.log
                .append(topic::TOUCHPOINTS, appended)
                .await
                .map_err(ServiceError::from)?;
        }
        tracing::info!(redriven = touchpoints.len(), "dead letters re-driven");
        Ok(RedriveResponse {
            redriven: u32::try_from(touchpoints.len()).unwrap_or(u32::MAX),
            event_ids: touchpoints
                .iter()
                .map(|t| t.event_id().to_string())
                .collect(),
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
        let answer = DeadLetters::redrive(self, &r.refs, r.all).await?;
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
