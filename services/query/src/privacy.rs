//! `PrivacyService`: consent recorded as touchpoints and decided by
//! [`cdp_domain::consent::permits`], the [`ConsentGate`] every outbound use
//! calls at the moment data leaves, and the right of access (`Export`).

use std::collections::BTreeSet;
use std::sync::Arc;

use cdp_domain::consent::{self, Basis, Permit};
use cdp_domain::{
    CustomerId, IdentityRules, Profile, RawIdentifier, RawTouchpoint, ValidationLimits,
};
use cdp_log::{Appended, EventLog};
use cdp_pipeline::{emit, topic};
use cdp_proto::convert;
use cdp_proto::v1::privacy_service_server::PrivacyService;
use cdp_proto::v1::{
    self, CheckConsentRequest, CheckConsentResponse, ExportRequest, ExportResponse,
    GetConsentRequest, GetConsentResponse, RecordConsentRequest, RecordConsentResponse,
};
use cdp_runtime::ServiceError;
use cdp_runtime::auth::{Access, Caller};
use serde_json::{Value, json};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{Lookup, ProfileQuery, Viewer};

/// Most grants in one `RecordConsent`.
pub const MAX_GRANTS: usize = 50;
/// Longest evidence text.
pub const MAX_EVIDENCE: usize = 500;

/// What the gate decided for one customer.
#[derive(Debug, Clone)]
pub struct Checked {
    pub customer_id: CustomerId,
    pub permit: Permit,
    pub reason: String,
}

/// The one check every use of a customer's data that leaves the platform
/// (a message sent, an export, a replay) makes at the moment it happens,
/// never at scheduling time, so a withdrawal in between stops it. A refusal
/// is recorded in the audit log with the action and the reason.
#[derive(Clone)]
pub struct ConsentGate {
    query: ProfileQuery,
    access: Arc<Access>,
}

impl ConsentGate {
    pub fn new(query: ProfileQuery, access: Arc<Access>) -> Self {
        ConsentGate { query, access }
    }

    /// Whether `customer` (merges followed) allows `purpose` on `channel`
    /// (`None`: a use that contacts nobody). `action` says what the use
    /// is, for the audit record of a refusal.
    pub async fn check(
        &self,
        caller: &Caller,
        customer: CustomerId,
        purpose: &str,
        channel: Option<&str>,
        action: &str,
    ) -> Result<Checked, ServiceError> {
        let purpose = consent::purpose(purpose).map_err(|e| ServiceError::invalid("purpose", e))?;
        let channel = channel
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(consent::channel)
            .transpose()
            .map_err(|e| ServiceError::invalid("channel", e))?;
        let stores = self.query.stores();
        let profile = stores.profiles.profile(customer).await?.ok_or_else(|| {
            ServiceError::NotFound(format!("customer {customer} has no profile yet"))
        })?;
        let checked = decide(&profile, &purpose, channel.as_deref());
        if !checked.permit.allowed {
            let mut entry = caller.entry("refused");
            entry.customer_id = checked.customer_id.to_string();
            entry.fields = vec![format!(
                "consent:{}",
                consent::key(&purpose, channel.as_deref())
            )];
            entry.reason = format!("{action}: {}", checked.reason);
            self.access.audit(entry).await?;
            tracing::info!(customer = %checked.customer_id, %purpose, channel = channel.as_deref().unwrap_or(""), action, "use refused: no consent");
        }
        Ok(checked)
    }
}

/// The decision for a loaded profile.
pub fn decide(profile: &Profile, purpose: &str, channel: Option<&str>) -> Checked {
    let records = consent::records(&profile.consent);
    let permit = consent::permits(&records, purpose, channel);
    let reason = permit.reason(purpose, channel);
    Checked {
        customer_id: profile.customer_id,
        permit,
        reason,
    }
}

/// The gRPC face of consent and access requests.
pub struct PrivacyGrpc {
    query: ProfileQuery,
    access: Arc<Access>,
    gate: ConsentGate,
    log: Arc<dyn EventLog>,
    rules: Arc<IdentityRules>,
    limits: Arc<ValidationLimits>,
    erasures: crate::erase::Erasures,
}

impl PrivacyGrpc {
    pub fn new(
        query: ProfileQuery,
        access: Arc<Access>,
        log: Arc<dyn EventLog>,
        rules: Arc<IdentityRules>,
        limits: Arc<ValidationLimits>,
        erasure_deadline_days: u32,
    ) -> Self {
        PrivacyGrpc {
            erasures: crate::erase::Erasures::new(
                query.clone(),
                Arc::clone(&log),
                Arc::clone(&access),
                erasure_deadline_days,
            ),
            gate: ConsentGate::new(query.clone(), Arc::clone(&access)),
            query,
            access,
            log,
            rules,
            limits,
        }
    }

    /// The customer a request names, within the caller's scope.
    async fn customer(
        &self,
        viewer: &Viewer,
        lookup: Option<Lookup>,
    ) -> Result<Profile, ServiceError> {
        let customer = self
            .query
            .customer(lookup)
            .await
            .map_err(|e| viewer.hide(e))?;
        let profile = self
            .query
            .stores()
            .profiles
            .profile(customer)
            .await?
            .ok_or_else(|| {
                viewer.hide(ServiceError::NotFound(format!(
                    "customer {customer} has no profile yet"
                )))
            })?;
        viewer.admit(&profile)?;
        Ok(profile)
    }

    /// The identifier a recorded consent is attributed with: the one the
    /// request named, else the customer's strongest.
    async fn carrier(
        &self,
        lookup: Option<&Lookup>,
        customer: CustomerId,
    ) -> Result<RawIdentifier, ServiceError> {
        if let Some(Lookup::Identifier(id)) = lookup {
            return Ok(RawIdentifier::new(id.kind.clone(), id.value.clone()));
        }
        let node = self
            .query
            .stores()
            .identity
            .customer(customer)
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("no customer {customer}")))?;
        let all: Vec<_> = node.identifiers.into_iter().collect();
        let strongest = self
            .rules
            .strongest_first(&all)
            .into_iter()
            .next()
            .ok_or_else(|| {
                ServiceError::FailedPrecondition(format!(
                    "customer {customer} has no identifier to record consent under"
                ))
            })?;
        Ok(RawIdentifier::new(
            strongest.kind.to_string(),
            strongest.value.clone(),
        ))
    }

    async fn record(
        &self,
        caller: &Caller,
        r: RecordConsentRequest,
    ) -> Result<RecordConsentResponse, ServiceError> {
        let viewer = Viewer::new(&self.access, caller.clone());
        let mut errors = Vec::new();
        if r.grants.is_empty() {
            errors.push(cdp_domain::FieldError::new(
                "grants",
                "is empty: give at least one purpose with granted true or false",
            ));
        }
        if r.grants.len() > MAX_GRANTS {
            errors.push(cdp_domain::FieldError::new(
                "grants",
                format!("holds {} grants; at most {MAX_GRANTS}", r.grants.len()),
            ));
        }
        if r.evidence.chars().count() > MAX_EVIDENCE {
            errors.push(cdp_domain::FieldError::new(
                "evidence",
                format!("is longer than {MAX_EVIDENCE} characters"),
            ));
        }
        if !r.event_id.trim().is_empty() && Uuid::parse_str(r.event_id.trim()).is_err() {
            errors.push(cdp_domain::FieldError::new(
                "event_id",
                format!("{:?} is not a UUID", r.event_id),
            ));
        }
        if !errors.is_empty() {
            return Err(ServiceError::InvalidArgument(errors));
        }
        let lookup = r.lookup.clone().map(Lookup::from);
        let profile = self.customer(&viewer, lookup.clone()).await?;
        let carrier = self.carrier(lookup.as_ref(), profile.customer_id).await?;
        let grants: Vec<Value> = r
            .grants
            .iter()
            .map(|g| {
                let mut o = serde_json::Map::new();
                o.insert("purpose".into(), Value::String(g.purpose.clone()));
                o.insert("granted".into(), Value::Bool(g.granted));
                if !g.channel.trim().is_empty() {
                    o.insert("channel".into(), Value::String(g.channel.clone()));
                }
                Value::Object(o)
            })
            .collect();
        let mut consent = serde_json::Map::new();
        consent.insert("grants".into(), Value::Array(grants));
        if !r.notice_version.trim().is_empty() {
            consent.insert(
                "notice_version".into(),
                Value::String(r.notice_version.trim().to_owned()),
            );
        }
        let mut properties = cdp_domain::Attributes::new();
        properties.insert("consent".into(), Value::Object(consent));
        properties.insert(
            "recorded_by".into(),
            Value::String(caller.principal.name.clone()),
        );
        if !r.evidence.trim().is_empty() {
            properties.insert(
                "evidence".into(),
                Value::String(r.evidence.trim().to_owned()),
            );
        }
        let raw = RawTouchpoint {
            event_id: Some(r.event_id.trim().to_owned()).filter(|e| !e.is_empty()),
            event_type: Some(cdp_domain::EventType::ConsentUpdated.to_string()),
            channel: Some(if r.channel.trim().is_empty() {
                "other".to_owned()
            } else {
                r.channel.trim().to_owned()
            }),
            source_id: Some(PRIVACY_SOURCE.to_owned()),
            occurred_at: r.occurred_at.as_ref().map(convert::timestamp_to_millis),
            identifiers: vec![carrier],
            traits: cdp_domain::Attributes::new(),
            properties,
        };
        let now = cdp_runtime::now_ms();
        let ctx = cdp_domain::Context {
            now,
            fresh_event_id: Uuid::now_v7(),
        };
        let t =
            cdp_domain::validate(&raw, &self.rules, &self.limits, ctx).map_err(|rejection| {
                ServiceError::InvalidArgument(
                    rejection
                        .0
                        .into_iter()
                        .map(|mut e| {
                            e.field = request_field(&e.field);
                            e
                        })
                        .collect(),
                )
            })?;
        let keyring = self.query.keyring();
        let subjects: Vec<_> = t
            .personal
            .identifiers
            .iter()
            .map(|i| keyring.subject(i))
            .collect();
        let sealing = cdp_pipeline::seal::Sealing::new(
            keyring.hasher().clone(),
            keyring.obtain(&subjects).await?,
        );
        let record = emit::touchpoint(
            &t,
            &self.rules,
            &cdp_runtime::trace::current_traceparent(),
            &sealing,
        )
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let appended = self
            .log
            .append(topic::TOUCHPOINTS, vec![record])
            .await
            .map_err(ServiceError::from)?;
        let appended = matches!(appended.first(), Some(Appended::New { .. }));
        let mut entry = caller.entry("allowed");
        entry.customer_id = profile.customer_id.to_string();
        entry.fields = vec!["consent".into()];
        entry.lookup = viewer.describe(lookup.as_ref());
        entry.reason = format!("recorded consent, event {}", t.event_id());
        self.access.audit_durable(entry).await?;
        tracing::info!(customer = %profile.customer_id, event = %t.event_id(), appended, "consent recorded");
        Ok(RecordConsentResponse {
            event_id: t.event_id().to_string(),
            customer_id: profile.customer_id.to_string(),
            appended,
        })
    }

    async fn export(
        &self,
        caller: &Caller,
        lookup: Option<Lookup>,
    ) -> Result<(CustomerId, String), ServiceError> {
        let viewer = Viewer::new(&self.access, caller.clone());
        let described = viewer.describe(lookup.as_ref());
        let profile = self.customer(&viewer, lookup).await?;
        let customer = profile.customer_id;
        let stores = self.query.stores();
        let identifiers = crate::view::identifiers_of(&stores, customer).await?;
        let claims = stores.identity.claims(&identifiers).await?;
        let mut timeline = Vec::new();
        let mut query = cdp_store::TimelineQuery {
            limit: 500,
            ..cdp_store::TimelineQuery::default()
        };
        loop {
            let page = stores.profiles.timeline_of(&profile, &query).await?;
            timeline.extend(page.entries);
            match page.next {
                Some(next) => query.after = Some(next),
                None => break,
            }
        }
        let merges = self.query.merges(customer).await?;
        let family: BTreeSet<String> = std::iter::once(customer)
            .chain(profile.merged_from.iter().copied())
            .map(|c| c.to_string())
            .collect();
        let access_log: Vec<Value> = crate::access::audit_entries(self.log.as_ref())
            .await?
            .into_iter()
            .filter(|e| family.contains(&e.customer_id))
            .map(|e| {
                json!({
                    "at": iso(e.at),
                    "actor": e.actor,
                    "role": e.role,
                    "team": e.team,
                    "action": e.action,
                    "outcome": e.outcome,
                    "fields": e.fields,
                    "reason": e.reason,
                })
            })
            .collect();
        let view = profile.view();
        let document = json!({
            "format": "cdp.v1.export",
            "generated_at": iso(cdp_runtime::now_ms()),
            "customer_id": customer.to_string(),
            "merged_customer_ids": profile.merged_from.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "identifiers": identifiers.iter().zip(&claims).map(|(id, claim)| json!({
                "kind": id.kind.to_string(),
                "value": id.value,
                "linked_at": claim.as_ref().map(|c| iso(c.at)),
                "linked_by_event_id": claim.as_ref().map(|c| c.event_id.to_string()),
            })).collect::<Vec<_>>(),
            "traits": view.traits,
            "trait_sources": profile.traits.iter().map(|(k, t)| json!({
                "key": k, "source_id": t.source_id, "channel": t.channel.to_string(),
                "at": iso(t.at), "event_id": t.event_id.to_string(),
            })).collect::<Vec<_>>(),
            "profile": view,
            "consents": view.consents.iter().map(|r| json!({
                "purpose": r.purpose,
                "channel": r.channel,
                "granted": r.granted,
                "notice_version": r.notice_version,
                "at": iso(r.at),
                "event_id": r.event_id.to_string(),
                "source_id": r.source_id,
                "via": r.via.to_string(),
            })).collect::<Vec<_>>(),
            "merges": merges.iter().map(|m| json!({
                "loser": m.loser.to_string(),
                "survivor": m.survivor.to_string(),
                "at": iso(m.at),
                "event_id": m.cause.event_id.to_string(),
                "identifier": m.cause.identifier.to_string(),
                "rule": m.cause.rule,
            })).collect::<Vec<_>>(),
            "timeline": timeline.iter().map(|e| json!({
                "event_id": e.event_id.to_string(),
                "occurred_at": iso(e.occurred_at),
                "type": e.event_type.to_string(),
                "channel": e.channel.to_string(),
                "source_id": e.source_id,
                "summary": e.summary,
                "properties": e.properties,
            })).collect::<Vec<_>>(),
            "access_log": access_log,
        });
        // The export itself is a disclosure: recorded before it is returned.
        let mut entry = caller.entry("allowed");
        entry.customer_id = customer.to_string();
        entry.fields = vec!["export".into()];
        entry.lookup = described;
        entry.reason = "right of access".into();
        self.access.audit_durable(entry).await?;
        let json = serde_json::to_string_pretty(&document)
            .map_err(|e| ServiceError::Internal(format!("cannot write the export: {e}")))?;
        Ok((customer, json))
    }
}

/// The source id consent recorded through the API is kept under.
pub const PRIVACY_SOURCE: &str = "cdp.privacy";

/// A validation field of the touchpoint, as the request names it.
fn request_field(field: &str) -> String {
    field
        .strip_prefix("properties.consent.")
        .map(ToOwned::to_owned)
        .or_else(|| field.strip_prefix("properties.").map(ToOwned::to_owned))
        .unwrap_or_else(|| field.to_owned())
}

fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

fn basis(b: &Basis) -> String {
    b.to_string()
}

#[tonic::async_trait]
impl PrivacyService for PrivacyGrpc {
    async fn record_consent(
        &self,
        request: Request<RecordConsentRequest>,
    ) -> Result<Response<RecordConsentResponse>, Status> {
        let caller = Caller::of(&request)?;
        Ok(Response::new(
            self.record(&caller, request.into_inner()).await?,
        ))
    }

    async fn get_consent(
        &self,
        request: Request<GetConsentRequest>,
    ) -> Result<Response<GetConsentResponse>, Status> {
        let caller = Caller::of(&request)?;
        let viewer = Viewer::new(&self.access, caller);
        let lookup = request.into_inner().lookup.map(Lookup::from);
        let described = viewer.describe(lookup.as_ref());
        let profile = self.customer(&viewer, lookup).await?;
        viewer
            .read(&profile.customer_id.to_string(), &["consent"], &described)
            .await?;
        let records = consent::records(&profile.consent);
        let mut decisions = Vec::new();
        let mut purposes: BTreeSet<String> =
            consent::PURPOSES.iter().map(|p| (*p).to_owned()).collect();
        purposes.extend(records.iter().map(|r| r.purpose.clone()));
        for purpose in &purposes {
            for channel in std::iter::once(None).chain(consent::CHANNELS.iter().map(|c| Some(*c))) {
                let permit = consent::permits(&records, purpose, channel);
                decisions.push(v1::ConsentDecision {
                    purpose: purpose.clone(),
                    channel: channel.unwrap_or_default().to_owned(),
                    allowed: permit.allowed,
                    basis: basis(&permit.basis),
                    reason: permit.reason(purpose, channel),
                });
            }
        }
        Ok(Response::new(GetConsentResponse {
            customer_id: profile.customer_id.to_string(),
            records: records.iter().map(convert::consent_record).collect(),
            decisions,
        }))
    }

    async fn check_consent(
        &self,
        request: Request<CheckConsentRequest>,
    ) -> Result<Response<CheckConsentResponse>, Status> {
        let caller = Caller::of(&request)?;
        let viewer = Viewer::new(&self.access, caller.clone());
        let r = request.into_inner();
        let profile = self.customer(&viewer, r.lookup.map(Lookup::from)).await?;
        let action = if r.action.trim().is_empty() {
            "CheckConsent"
        } else {
            r.action.trim()
        };
        let checked = self
            .gate
            .check(
                &caller,
                profile.customer_id,
                &r.purpose,
                Some(r.channel.as_str()),
                action,
            )
            .await?;
        let record = match &checked.permit.basis {
            Basis::Recorded(rec) => Some(convert::consent_record(rec)),
            _ => None,
        };
        Ok(Response::new(CheckConsentResponse {
            customer_id: checked.customer_id.to_string(),
            allowed: checked.permit.allowed,
            basis: basis(&checked.permit.basis),
            reason: checked.reason,
            record,
        }))
    }

    async fn export(
        &self,
        request: Request<ExportRequest>,
    ) -> Result<Response<ExportResponse>, Status> {
        let caller = Caller::of(&request)?;
        let lookup = request.into_inner().lookup.map(Lookup::from);
        let (customer, json) = PrivacyGrpc::export(self, &caller, lookup).await?;
        Ok(Response::new(ExportResponse {
            customer_id: customer.to_string(),
            json,
            generated_at: Some(convert::millis_to_timestamp(cdp_runtime::now_ms())),
        }))
    }

    async fn erase(
        &self,
        request: Request<cdp_proto::v1::EraseRequest>,
    ) -> Result<Response<cdp_proto::v1::Erasure>, Status> {
        let caller = Caller::of(&request)?;
        Ok(Response::new(
            self.erasures.erase(&caller, request.into_inner()).await?,
        ))
    }

    async fn get_erasure(
        &self,
        request: Request<cdp_proto::v1::GetErasureRequest>,
    ) -> Result<Response<cdp_proto::v1::Erasure>, Status> {
        let id = request.into_inner().request_id;
        let id = id.trim();
        if id.is_empty() {
            return Err(ServiceError::invalid("request_id", "is required").into());
        }
        match self.erasures.status(id).await? {
            Some(e) => Ok(Response::new(e)),
            None => Err(ServiceError::NotFound(format!("no erasure request {id:?}")).into()),
        }
    }

    async fn rotate_master_key(
        &self,
        request: Request<v1::RotateMasterKeyRequest>,
    ) -> Result<Response<v1::RotateMasterKeyResponse>, Status> {
        let caller = Caller::of(&request)?;
        let keyring = self.query.keyring();
        // The master key file unreadable or in conflict with the keys in
        // memory: a precondition the operator fixes.
        let done = keyring.rotate(ROTATION_PAGE).await.map_err(|e| match e {
            cdp_store::StoreError::Invalid(reason) => ServiceError::FailedPrecondition(reason),
            e => ServiceError::from(e),
        })?;
        let mut entry = caller.entry("allowed");
        entry.fields = vec!["master_key".into()];
        entry.reason = format!(
            "master key version {}: {} of {} rows rewrapped, {} under an unknown version",
            keyring.master_version(),
            done.rewrapped,
            done.scanned,
            done.unknown
        );
        self.access.audit_durable(entry).await?;
        tracing::info!(
            master_version = keyring.master_version(),
            scanned = done.scanned,
            rewrapped = done.rewrapped,
            unknown = done.unknown,
            "master key rotation pass complete"
        );
        Ok(Response::new(v1::RotateMasterKeyResponse {
            master_version: keyring.master_version(),
            versions_added: done.added,
            scanned: done.scanned,
            rewrapped: done.rewrapped,
            unknown: done.unknown,
        }))
    }
}

/// Keyring rows read per page of a rotation.
const ROTATION_PAGE: usize = 500;
