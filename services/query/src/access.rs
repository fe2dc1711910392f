//! `AccessService`: the caller's identity, revealing one field with a
//! reason, the audit (by customer, by actor, the whole chain) and API keys
//! issued, listed and revoked at run time.

use std::collections::BTreeSet;
use std::sync::Arc;

use cdp_domain::access::Role;
use cdp_pipeline::audit;
use cdp_pipeline::credentials::{CredentialChange, IssuedKey};
use cdp_pipeline::{AuditEntry, topic};
use cdp_proto::convert;
use cdp_proto::v1::access_service_server::AccessService;
use cdp_proto::v1::{self};
use cdp_runtime::ServiceError;
use cdp_runtime::auth::{Access, Caller, KeyEntry};
use tonic::{Request, Response, Status};

use crate::{Lookup, ProfileQuery, Viewer};

/// Shortest reason a reveal accepts.
const MIN_REASON: usize = 5;
const DEFAULT_AUDIT_PAGE: usize = 100;
const MAX_AUDIT_PAGE: usize = 1000;

pub struct AccessGrpc {
    query: ProfileQuery,
    access: Arc<Access>,
}

impl AccessGrpc {
    pub fn new(query: ProfileQuery, access: Arc<Access>) -> Self {
        AccessGrpc { query, access }
    }

    /// One field of one customer in clear, for a reason; audited.
    pub async fn reveal(
        &self,
        viewer: &Viewer,
        lookup: Option<Lookup>,
        field: &str,
        reason: &str,
    ) -> Result<v1::RevealFieldResponse, ServiceError> {
        let field = field.trim().to_owned();
        let reason = reason.trim().to_owned();
        let mut errors = Vec::new();
        if field.is_empty() {
            errors.push(cdp_domain::FieldError::new(
                "field",
                "name the field: an identifier kind (phone, email...) or a trait key",
            ));
        }
        if reason.chars().count() < MIN_REASON {
            errors.push(cdp_domain::FieldError::new(
                "reason",
                format!("say why (at least {MIN_REASON} characters): it is audited"),
            ));
        }
        if !errors.is_empty() {
            return Err(ServiceError::InvalidArgument(errors));
        }
        let described = viewer.describe(lookup.as_ref());
        let (customer_id, values) = self.field_values(viewer, lookup, &field).await?;
        let mut entry = viewer.caller.entry("allowed");
        entry.customer_id = customer_id.clone();
        entry.fields = vec![field.clone()];
        entry.lookup = described;
        entry.reason = reason;
        self.access.audit_durable(entry).await?;
        let hide_at = cdp_runtime::now_ms()
            + i64::try_from(self.access.config.reveal_seconds).unwrap_or(60) * 1000;
        Ok(v1::RevealFieldResponse {
            customer_id,
            field,
            values,
            hide_at: Some(convert::millis_to_timestamp(hide_at)),
        })
    }

    /// Audit entries newest first: a supervisor's team's, or everyone's for
    /// an admin; by customer (merges followed) and by actor. The read is
    /// itself audited.
    pub async fn audit_list(
        &self,
        caller: &Caller,
        customer_id: &str,
        actor: &str,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, ServiceError> {
        let limit = match limit {
            0 => DEFAULT_AUDIT_PAGE,
            n => (n as usize).min(MAX_AUDIT_PAGE),
        };
        let customer_id = customer_id.trim();
        // A customer's records include those of every customer merged into it.
        let mut customers: BTreeSet<String> = BTreeSet::new();
        if !customer_id.is_empty() {
            customers.insert(customer_id.to_owned());
            if let Ok(loaded) = self
                .query
                .load(Some(Lookup::CustomerId(customer_id.to_owned())), 1)
                .await
            {
                customers.insert(loaded.profile.customer_id.to_string());
                customers.extend(loaded.profile.merged_from.iter().map(ToString::to_string));
            }
        }
        // Recorded first and durably: the listing then holds every record
        // written before it, this read included.
        let mut read = caller.entry("allowed");
        read.fields = vec!["audit".into()];
        read.customer_id = customer_id.to_owned();
        read.lookup = if actor.is_empty() {
            String::new()
        } else {
            format!("actor:{actor}")
        };
        self.access.audit_durable(read).await?;
        let principal = &caller.principal;
        let everyone = principal.role == Role::Admin;
        let mut entries: Vec<AuditEntry> = self
            .entries()
            .await?
            .into_iter()
            .filter(|e| everyone || (!principal.team.is_empty() && e.team == principal.team))
            .filter(|e| customers.is_empty() || customers.contains(&e.customer_id))
            .filter(|e| actor.is_empty() || e.actor == actor)
            .collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.at));
        entries.truncate(limit);
        Ok(entries)
    }

    /// Every audit entry, oldest first per partition.
    async fn entries(&self) -> Result<Vec<AuditEntry>, ServiceError> {
        audit_entries(self.query.event_log()?.as_ref()).await
    }

    /// The values of `field` (an identifier kind or a trait key) of a
    /// customer, in clear.
    async fn field_values(
        &self,
        viewer: &Viewer,
        lookup: Option<Lookup>,
        field: &str,
    ) -> Result<(String, Vec<String>), ServiceError> {
        let loaded = self
            .query
            .load(lookup, 1)
            .await
            .map_err(|e| viewer.hide(e))?;
        viewer.admit(&loaded.profile)?;
        let mut values: Vec<String> = loaded
            .identifiers
            .iter()
            .filter(|i| i.kind.as_str() == field)
            .map(|i| i.value.clone())
            .collect();
        if values.is_empty()
            && let Some(t) = loaded.profile.traits.get(field)
        {
            values.push(match &t.value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        }
        if values.is_empty() {
            return Err(ServiceError::NotFound(format!(
                "the customer has no {field}"
            )));
        }
        Ok((loaded.profile.customer_id.to_string(), values))
    }
}

fn credential(e: &KeyEntry) -> v1::Credential {
    v1::Credential {
        id: e.id.clone(),
        name: e.name.clone(),
        role: e.role.to_string(),
        sources: e.sources.clone(),
        scopes: e.scopes.clone(),
        disclosure: e
            .disclosure
            .map(|d| d.as_str().to_owned())
            .unwrap_or_default(),
        team: e.team.clone(),
        created_at: e.created_at.map(convert::millis_to_timestamp),
        expires_at: e.expires_at.map(convert::millis_to_timestamp),
        revoked_at: e.revoked_at.map(convert::millis_to_timestamp),
        origin: e.origin.to_owned(),
    }
}

fn entry_proto(e: &AuditEntry) -> v1::AuditEntry {
    v1::AuditEntry {
        at: Some(convert::millis_to_timestamp(e.at)),
        actor: e.actor.clone(),
        role: e.role.clone(),
        team: e.team.clone(),
        action: e.action.clone(),
        outcome: e.outcome.clone(),
        customer_id: e.customer_id.clone(),
        fields: e.fields.clone(),
        lookup: e.lookup.clone(),
        reason: e.reason.clone(),
        client: e.client.clone(),
        request_id: e.request_id.clone(),
    }
}

/// Every audit entry of `log`, oldest first per partition.
pub(crate) async fn audit_entries(
    log: &dyn cdp_log::EventLog,
) -> Result<Vec<AuditEntry>, ServiceError> {
    let mut out = Vec::new();
    cdp_log::scan::<ServiceError>(log, topic::AUDIT, 1000, |r| {
        if let Ok(stored) = audit::read(r) {
            out.push(stored.entry().clone());
        }
        Ok(())
    })
    .await?;
    Ok(out)
}

#[tonic::async_trait]
impl AccessService for AccessGrpc {
    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::Principal>, Status> {
        let p = Caller::of(&request)?.principal;
        Ok(Response::new(v1::Principal {
            name: p.name.clone(),
            role: p.role.to_string(),
            sources: p.sources.clone(),
            scopes: p.scopes.iter().cloned().collect(),
            disclosure: p.disclosure.as_str().to_owned(),
            team: p.team.clone(),
            credential_id: p.credential_id.clone(),
        }))
    }

    async fn reveal_field(
        &self,
        request: Request<v1::RevealFieldRequest>,
    ) -> Result<Response<v1::RevealFieldResponse>, Status> {
        let viewer = Viewer::new(&self.access, Caller::of(&request)?);
        let r = request.into_inner();
        let lookup = r.lookup.map(Lookup::from);
        Ok(Response::new(
            self.reveal(&viewer, lookup, &r.field, &r.reason).await?,
        ))
    }

    async fn list_audit(
        &self,
        request: Request<v1::ListAuditRequest>,
    ) -> Result<Response<v1::ListAuditResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let entries = self
            .audit_list(&caller, &r.customer_id, &r.actor, r.limit)
            .await?;
        Ok(Response::new(v1::ListAuditResponse {
            entries: entries.iter().map(entry_proto).collect(),
        }))
    }

    type ExportAuditStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<v1::SealedAuditRecord, Status>> + Send>,
    >;

    async fn export_audit(
        &self,
        request: Request<v1::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportAuditStream>, Status> {
        let caller = Caller::of(&request)?;
        let log = Arc::clone(self.query.event_log()?);
        let mut entry = caller.entry("allowed");
        entry.fields = vec!["audit:export".into()];
        self.access.audit_durable(entry).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let ends = match log.end_offsets(topic::AUDIT).await {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(ServiceError::from(e).into())).await;
                    return;
                }
            };
            for (partition, end) in (0u32..).zip(ends) {
                let mut from = 0;
                while from < end {
                    let records = match log.read(topic::AUDIT, partition, from, 1000).await {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(ServiceError::from(e).into())).await;
                            return;
                        }
                    };
                    let Some(last) = records.last() else { break };
                    from = last.offset + 1;
                    for r in records {
                        let item = v1::SealedAuditRecord { json: r.value };
                        if tx.send(Ok(item)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn issue_credential(
        &self,
        request: Request<v1::IssueCredentialRequest>,
    ) -> Result<Response<v1::IssuedCredential>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let mut errors = Vec::new();
        let name = r.name.trim().to_owned();
        if name.is_empty() {
            errors.push(cdp_domain::FieldError::new("name", "is required"));
        }
        let role = match r.role.parse::<Role>() {
            Ok(role) => Some(role),
            Err(reason) => {
                errors.push(cdp_domain::FieldError::new("role", reason));
                None
            }
        };
        let sources: Vec<String> = r
            .sources
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        match role {
            Some(Role::Ingest) if sources.is_empty() => errors.push(cdp_domain::FieldError::new(
                "sources",
                "an ingest credential names the sources it sends for",
            )),
            Some(role) if role != Role::Ingest && !sources.is_empty() => errors.push(
                cdp_domain::FieldError::new("sources", "only ingest credentials send for sources"),
            ),
            _ => {}
        }
        let disclosure = match r.disclosure.trim() {
            "" => None,
            d => match d.parse::<cdp_domain::access::Disclosure>() {
                Ok(_) => Some(d.to_owned()),
                Err(reason) => {
                    errors.push(cdp_domain::FieldError::new("disclosure", reason));
                    None
                }
            },
        };
        self.access.registry.refresh().await?;
        let now = cdp_runtime::now_ms();
        if self.access.registry.list().iter().any(|k| {
            k.name == name && k.revoked_at.is_none() && k.expires_at.is_none_or(|e| e > now)
        }) {
            errors.push(cdp_domain::FieldError::new(
                "name",
                format!("{name:?} already names a key: the audit must tell callers apart"),
            ));
        }
        if !errors.is_empty() {
            return Err(ServiceError::InvalidArgument(errors).into());
        }
        let ttl_ms = match r.expires_in_seconds {
            0 => i64::try_from(self.access.config.credential_ttl_days)
                .unwrap_or(90)
                .saturating_mul(86_400_000),
            s => i64::try_from(s)
                .unwrap_or(i64::MAX / 2)
                .saturating_mul(1000),
        };
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let spec = IssuedKey {
            id,
            name: name.clone(),
            role: r.role.trim().to_owned(),
            key_sha256: String::new(),
            sources,
            scopes: r.scopes.clone(),
            disclosure,
            team: r.team.trim().to_owned(),
            created_at: now,
            expires_at: Some(now.saturating_add(ttl_ms)),
            issued_by: caller.principal.name.clone(),
        };
        let (change, secret) = self.access.registry.issue(spec);
        let mut entry = caller.entry("allowed");
        entry.fields = vec!["credential:issue".into()];
        entry.reason = format!("{} ({}) id {}", name, r.role.trim(), change.id());
        self.access.audit_durable(entry).await?;
        self.access.registry.append(&change).await?;
        let CredentialChange::Issued(key) = &change else {
            return Err(ServiceError::Internal("issue made no key".into()).into());
        };
        let listed = self
            .access
            .registry
            .list()
            .into_iter()
            .find(|e| e.id == key.id)
            .ok_or_else(|| ServiceError::Internal("the issued key is not listed".into()))?;
        Ok(Response::new(v1::IssuedCredential {
            credential: Some(credential(&listed)),
            secret,
        }))
    }

    async fn list_credentials(
        &self,
        request: Request<v1::ListCredentialsRequest>,
    ) -> Result<Response<v1::ListCredentialsResponse>, Status> {
        let _ = Caller::of(&request)?;
        self.access.registry.refresh().await?;
        Ok(Response::new(v1::ListCredentialsResponse {
            credentials: self.access.registry.list().iter().map(credential).collect(),
        }))
    }

    async fn revoke_credential(
        &self,
        request: Request<v1::RevokeCredentialRequest>,
    ) -> Result<Response<v1::Credential>, Status> {
        let caller = Caller::of(&request)?;
        let id = request.into_inner().id.trim().to_owned();
        self.access.registry.refresh().await?;
        let found = self
            .access
            .registry
            .list()
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(|| ServiceError::NotFound(format!("no credential {id:?}")))?;
        if found.origin == "config" {
            return Err(ServiceError::FailedPrecondition(format!(
                "{id} comes from the configuration: remove it there"
            ))
            .into());
        }
        let mut entry = caller.entry("allowed");
        entry.fields = vec!["credential:revoke".into()];
        entry.reason = format!("{} id {id}", found.name);
        self.access.audit_durable(entry).await?;
        if found.revoked_at.is_none() {
            let change = CredentialChange::Revoked {
                id: id.clone(),
                at: cdp_runtime::now_ms(),
                by: caller.principal.name.clone(),
            };
            self.access.registry.append(&change).await?;
        }
        let now = self
            .access
            .registry
            .list()
            .into_iter()
            .find(|e| e.id == id)
            .ok_or_else(|| ServiceError::Internal("the revoked key is gone".into()))?;
        Ok(Response::new(credential(&now)))
    }
}
