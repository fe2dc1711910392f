//! `AudienceService`: computed traits and segments saved, deleted, listed
//! and checked. A change is checked against the definitions the log holds
//! (`AudienceRegistry::latest`), appended to `audience-definitions`, and
//! audited; the profile workers pick it up within a second. The
//! membership changes the workers append are listed from the
//! `audience-changes` topic.

use std::sync::Arc;

use cdp_domain::audience::{
    Aggregate, Condition, DefinitionError, EventFilter, Op, SegmentDef, TraitDef, Window,
};
use cdp_domain::{Channel, CustomerId};
use cdp_pipeline::audience::{DefinitionChange, DefinitionKind, DefinitionSet};
use cdp_proto::v1;
use cdp_proto::v1::audience_service_server::AudienceService;
use cdp_runtime::ServiceError;
use cdp_runtime::audiences::AudienceRegistry;
use cdp_runtime::auth::{Access, Caller};
use tonic::{Request, Response, Status};

pub struct AudienceGrpc {
    registry: Arc<AudienceRegistry>,
    access: Arc<Access>,
    log: Arc<dyn cdp_log::EventLog>,
    live: Arc<cdp_store::LiveStores>,
    /// Customer views (members, explanations), read as the caller may.
    query: crate::ProfileQuery,
}

/// Records of `audience-changes` one `ListChanges` page reads at most.
const CHANGES_SCAN: usize = 10_000;
/// Records read from one partition at once.
const CHANGES_READ: usize = 512;
/// Records of `audience-changes` one `GetMemberships` reads at most.
const MEMBERSHIPS_SCAN: u64 = 1_000_000;
/// Profiles one page of a scoped caller reads at most to tell who is in
/// its scope (`ListMembers`, `ListChanges`); the page then ends there, and
/// its cursor says where.
const SCOPE_READS: usize = 2_000;
/// Reads of the members index one `ListMembers` page of a scoped caller
/// makes at most.
const MEMBERS_PAGES: usize = 200;
/// The most profile rows a scoped caller's preview reads: its sample counts
/// the customers in its scope (so `complete` says nothing of how many
/// profiles there are in all), within this many rows of every scope.
const PREVIEW_READS: usize = 100_000;

/// Which customers the caller of one request may see: with scopes, those
/// whose live profile (merges followed) was seen at a source of its
/// scopes, as on every read of the query side (an erased or unknown
/// customer is not); without, everyone, and nothing is read.
struct InScope {
    /// Holds the rule, as for every other read.
    viewer: crate::viewer::Viewer,
    stores: cdp_store::ProjectionStores,
    known: std::collections::HashMap<CustomerId, bool>,
    /// Profiles read so far.
    reads: usize,
}

impl InScope {
    fn new(grpc: &AudienceGrpc, caller: &Caller) -> Self {
        InScope {
            viewer: crate::viewer::Viewer::new(&grpc.access, caller.clone()),
            stores: grpc.query.stores(),
            known: std::collections::HashMap::new(),
            reads: 0,
        }
    }

    /// Whether telling if `customer` is in scope needs a read past the
    /// budget ([`SCOPE_READS`]).
    fn out_of_reads(&self, customer: CustomerId) -> bool {
        !self.everyone() && self.reads >= SCOPE_READS && !self.known.contains_key(&customer)
    }

    fn everyone(&self) -> bool {
        !self.viewer.scoped()
    }

    /// Whether the live profile of a row read anyway is in scope.
    fn profile(&self, profile: &cdp_domain::Profile) -> bool {
        self.viewer.admit(profile).is_ok()
    }

    async fn admits(&mut self, customer: CustomerId) -> Result<bool, ServiceError> {
        if self.everyone() {
            return Ok(true);
        }
        if let Some(known) = self.known.get(&customer) {
            return Ok(*known);
        }
        self.reads += 1;
        let profile = self
            .stores
            .profiles
            .profile(customer)
            .await
            .map_err(|e| ServiceError::Unavailable(format!("profiles: {e}")))?;
        let admitted = profile.is_some_and(|p| self.profile(&p));
        self.known.insert(customer, admitted);
        Ok(admitted)
    }
}

impl AudienceGrpc {
    pub fn new(
        registry: Arc<AudienceRegistry>,
        access: Arc<Access>,
        log: Arc<dyn cdp_log::EventLog>,
        query: crate::ProfileQuery,
    ) -> Self {
        AudienceGrpc {
            registry,
            access,
            log,
            live: Arc::clone(query.live()),
            query,
        }
    }

    /// The definitions folds use now.
    async fn current(&self) -> Result<Arc<cdp_domain::audience::Definitions>, ServiceError> {
        self.registry
            .current()
            .await
            .map_err(|e| ServiceError::Unavailable(format!("audience definitions: {e}")))
    }

    async fn latest(&self) -> Result<DefinitionSet, ServiceError> {
        self.registry
            .latest()
            .await
            .map_err(|e| ServiceError::Unavailable(format!("audience definitions: {e}")))
    }

    /// Checks `change` against the definitions held now, appends it and
    /// audits it.
    async fn save(
        &self,
        caller: &Caller,
        set: &DefinitionSet,
        change: DefinitionChange,
    ) -> Result<(), ServiceError> {
        // The definition itself first, so its own problem names its field.
        if let DefinitionChange::SegmentSaved { definition, .. } = &change {
            let traits: Vec<TraitDef> = set.traits().cloned().collect();
            cdp_domain::audience::Segment::compile(definition.clone(), &traits).map_err(invalid)?;
        }
        // Then the whole set it would leave.
        let mut after = set.clone();
        after.apply(change.clone());
        if let Err(e) = after.check() {
            return Err(ServiceError::FailedPrecondition(match change {
                DefinitionChange::Deleted { .. } => format!(
                    "{} {} is still needed: {e}",
                    change.kind().as_str(),
                    change.name()
                ),
                _ => format!("the definitions would not hold together: {e}"),
            }));
        }
        self.registry
            .append(&change)
            .await
            .map_err(|e| ServiceError::Unavailable(format!("audience definitions: {e}")))?;
        let mut entry = caller.entry("allowed");
        entry.fields = vec![format!("{}/{}", change.kind().as_str(), change.name())];
        entry.reason = match &change {
            DefinitionChange::TraitSaved { definition, .. } => {
                format!("computed trait saved, version {}", definition.version)
            }
            DefinitionChange::SegmentSaved { definition, .. } => {
                format!("segment saved, version {}", definition.version)
            }
            DefinitionChange::Deleted { version, .. } => format!("deleted at version {version}"),
        };
        self.access.audit_durable(entry).await?;
        tracing::info!(
            kind = change.kind().as_str(),
            name = change.name(),
            actor = %caller.principal.name,
            "audience definition changed"
        );
        Ok(())
    }
}

/// Where a `ListChanges` page starts: the next offset of each partition,
/// `.`-separated (empty: every partition from its start).
fn parse_cursor(cursor: &str, partitions: usize) -> Result<Vec<u64>, ServiceError> {
    if cursor.trim().is_empty() {
        return Ok(vec![0; partitions]);
    }
    let bad = || {
        ServiceError::invalid(
            "cursor",
            format!("{cursor:?} is not a cursor from a ListChanges response of this topic"),
        )
    };
    let offsets: Vec<u64> = cursor
        .split('.')
        .map(|o| o.parse::<u64>().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if offsets.len() != partitions {
        return Err(bad());
    }
    Ok(offsets)
}

fn change_proto(m: cdp_pipeline::audience::MembershipChange) -> v1::MembershipChange {
    use cdp_domain::audience::{Cause, ChangeKind};
    use cdp_proto::convert::millis_to_timestamp;
    let c = m.change;
    let (cause, event, customer) = match c.cause {
        Cause::Event { event_id } => ("event", event_id.to_string(), String::new()),
        Cause::Merge { absorbed } => ("merge", String::new(), absorbed.to_string()),
        Cause::MergedInto { survivor } => ("merged_into", String::new(), survivor.to_string()),
        Cause::Expiry { .. } => ("expiry", String::new(), String::new()),
        Cause::Definition { .. } => ("definition", String::new(), String::new()),
    };
    v1::MembershipChange {
        customer_id: m.customer_id.to_string(),
        segment: c.segment,
        version: c.version,
        kind: match c.kind {
            ChangeKind::Entered => "entered",
            ChangeKind::Exited => "exited",
        }
        .into(),
        cause: cause.into(),
        cause_event_id: event,
        cause_customer_id: customer,
        at: Some(millis_to_timestamp(c.at)),
        since: c.since.map(millis_to_timestamp),
        generation: m.generation,
    }
}

/// A domain check's error on the request's definition, as the API's: the
/// field under `definition.`, named as in the API (`value_json`).
fn invalid(e: DefinitionError) -> ServiceError {
    let field = match e.field.strip_suffix(".value") {
        Some(condition) => format!("{condition}.value_json"),
        None => e.field,
    };
    ServiceError::invalid(format!("definition.{field}"), e.reason)
}

fn required<T>(d: Option<T>) -> Result<T, ServiceError> {
    d.ok_or_else(|| ServiceError::invalid("definition", "is required"))
}

/// A computed trait from the API.
pub fn trait_def(d: &v1::ComputedTrait) -> Result<TraitDef, ServiceError> {
    let aggregate: Aggregate = d
        .aggregate
        .parse()
        .map_err(|e: String| ServiceError::invalid("definition.aggregate", e))?;
    let window: Window = d
        .window
        .parse()
        .map_err(|e: String| ServiceError::invalid("definition.window", e))?;
    let f = d.filter.clone().unwrap_or_default();
    let channels = f
        .channels
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.parse::<Channel>()
                .map_err(|e| ServiceError::invalid(format!("definition.filter.channels[{i}]"), e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let conditions = f
        .conditions
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let field = |name: &str| format!("definition.filter.conditions[{i}].{name}");
            let op: Op = serde_json::from_value(serde_json::Value::String(c.op.trim().to_owned()))
                .map_err(|_| {
                    ServiceError::invalid(
                        field("op"),
                        format!(
                            "{:?} is not one of eq, ne, gt, gte, lt, lte, exists, in, contains",
                            c.op
                        ),
                    )
                })?;
            let value = if c.value_json.trim().is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(&c.value_json).map_err(|e| {
                    ServiceError::invalid(field("value_json"), format!("not JSON: {e}"))
                })?
            };
            Ok(Condition {
                property: c.property.clone(),
                op,
                value,
            })
        })
        .collect::<Result<Vec<_>, ServiceError>>()?;
    let def = TraitDef {
        name: d.name.trim().to_owned(),
        version: 0,
        aggregate,
        property: Some(d.property.trim().to_owned()).filter(|p| !p.is_empty()),
        filter: EventFilter {
            types: f.types.clone(),
            channels,
            conditions,
        },
        window,
    };
    def.check().map_err(invalid)?;
    Ok(def)
}

fn trait_proto(d: &TraitDef) -> v1::ComputedTrait {
    v1::ComputedTrait {
        name: d.name.clone(),
        version: d.version,
        aggregate: d.aggregate.as_str().to_owned(),
        property: d.property.clone().unwrap_or_default(),
        filter: Some(v1::EventFilter {
            types: d.filter.types.clone(),
            channels: d
                .filter
                .channels
                .iter()
                .map(|c| c.as_str().to_owned())
                .collect(),
            conditions: d
                .filter
                .conditions
                .iter()
                .map(|c| v1::PropertyCondition {
                    property: c.property.clone(),
                    op: serde_json::to_value(c.op)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    value_json: if c.value.is_null() {
                        String::new()
                    } else {
                        c.value.to_string()
                    },
                })
                .collect(),
        }),
        window: d.window.to_string(),
    }
}

fn segment_def(d: &v1::Segment) -> SegmentDef {
    SegmentDef {
        name: d.name.trim().to_owned(),
        version: 0,
        condition: d.condition.clone(),
        description: d.description.clone(),
    }
}

fn segment_proto(d: &SegmentDef) -> v1::Segment {
    v1::Segment {
        name: d.name.clone(),
        version: d.version,
        condition: d.condition.clone(),
        description: d.description.clone(),
    }
}

fn saved(kind: DefinitionKind, name: &str, version: u64, deleted: bool) -> v1::SavedDefinition {
    v1::SavedDefinition {
        kind: kind.as_str().to_owned(),
        name: name.to_owned(),
        version,
        deleted,
    }
}

#[tonic::async_trait]
impl AudienceService for AudienceGrpc {
    async fn save_computed_trait(
        &self,
        request: Request<v1::SaveComputedTraitRequest>,
    ) -> Result<Response<v1::SavedDefinition>, Status> {
        let caller = Caller::of(&request)?;
        let mut def = trait_def(&required(request.into_inner().definition)?)?;
        let set = self.latest().await?;
        def.version = set.next_version(DefinitionKind::Trait, &def.name);
        let (name, version) = (def.name.clone(), def.version);
        let change = DefinitionChange::TraitSaved {
            definition: def,
            at: cdp_runtime::now_ms(),
            by: caller.principal.name.clone(),
        };
        self.save(&caller, &set, change).await?;
        Ok(Response::new(saved(
            DefinitionKind::Trait,
            &name,
            version,
            false,
        )))
    }

    async fn save_segment(
        &self,
        request: Request<v1::SaveSegmentRequest>,
    ) -> Result<Response<v1::SavedDefinition>, Status> {
        let caller = Caller::of(&request)?;
        let mut def = segment_def(&required(request.into_inner().definition)?);
        let set = self.latest().await?;
        def.version = set.next_version(DefinitionKind::Segment, &def.name);
        let (name, version) = (def.name.clone(), def.version);
        let change = DefinitionChange::SegmentSaved {
            definition: def,
            at: cdp_runtime::now_ms(),
            by: caller.principal.name.clone(),
        };
        self.save(&caller, &set, change).await?;
        Ok(Response::new(saved(
            DefinitionKind::Segment,
            &name,
            version,
            false,
        )))
    }

    async fn delete_definition(
        &self,
        request: Request<v1::DeleteDefinitionRequest>,
    ) -> Result<Response<v1::SavedDefinition>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let kind = match r.kind.trim() {
            "trait" => DefinitionKind::Trait,
            "segment" => DefinitionKind::Segment,
            other => {
                return Err(ServiceError::invalid(
                    "kind",
                    format!("{other:?} is not \"trait\" or \"segment\""),
                )
                .into());
            }
        };
        let name = r.name.trim();
        let set = self.latest().await?;
        let version = match kind {
            DefinitionKind::Trait => set.trait_def(name).map(|d| d.version),
            DefinitionKind::Segment => set.segment_def(name).map(|d| d.version),
        }
        .ok_or_else(|| ServiceError::NotFound(format!("no {} named {name:?}", kind.as_str())))?;
        let change = DefinitionChange::Deleted {
            kind,
            name: name.to_owned(),
            version,
            at: cdp_runtime::now_ms(),
            by: caller.principal.name.clone(),
        };
        self.save(&caller, &set, change).await?;
        Ok(Response::new(saved(kind, name, version, true)))
    }

    async fn list_definitions(
        &self,
        _request: Request<v1::ListDefinitionsRequest>,
    ) -> Result<Response<v1::ListDefinitionsResponse>, Status> {
        let set = self.latest().await?;
        Ok(Response::new(v1::ListDefinitionsResponse {
            traits: set.traits().map(trait_proto).collect(),
            segments: set.segments().map(segment_proto).collect(),
        }))
    }

    async fn list_changes(
        &self,
        request: Request<v1::ListChangesRequest>,
    ) -> Result<Response<v1::ListChangesResponse>, Status> {
        use cdp_pipeline::topic::AUDIENCE_CHANGES;
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let limit = match r.limit {
            0 => 100,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(
                    ServiceError::invalid("limit", format!("{n} is more than 1000")).into(),
                );
            }
        };
        let customer = match r.customer_id.trim() {
            "" => None,
            c => Some(c.parse::<uuid::Uuid>().map_err(|e| {
                ServiceError::invalid("customer_id", format!("is not a customer id: {e}"))
            })?),
        };
        let segment = r.segment.trim();
        let unavailable =
            |e: cdp_log::LogError| ServiceError::Unavailable(format!("{AUDIENCE_CHANGES}: {e}"));
        let ends = self
            .log
            .end_offsets(AUDIENCE_CHANGES)
            .await
            .map_err(unavailable)?;
        let mut next = parse_cursor(&r.cursor, ends.len())?;
        // A customer's records are all in its key's partition: only that
        // one is read (the cursor keeps the others where they were).
        let partitions = u32::try_from(ends.len()).unwrap_or(u32::MAX);
        let only = customer
            .map(|c| cdp_pipeline::key::customer_partition(CustomerId(c), partitions) as usize);
        let generation =
            match r.generation {
                // The pointer itself: a switch this process has not picked up
                // yet is listed already.
                0 => self.live.refresh().await.map_err(|e| {
                    ServiceError::Unavailable(format!("projection generation: {e}"))
                })?,
                g => g,
            };
        let mut scope = InScope::new(self, &caller);
        let mut changes = Vec::new();
        let mut budget = CHANGES_SCAN;
        'partitions: for (partition, end) in ends.iter().enumerate() {
            if only.is_some_and(|o| o != partition) {
                continue;
            }
            let p = u32::try_from(partition).unwrap_or(u32::MAX);
            while next[partition] < *end {
                if changes.len() >= limit || budget == 0 {
                    break 'partitions;
                }
                let records = self
                    .log
                    .read(
                        AUDIENCE_CHANGES,
                        p,
                        next[partition],
                        budget.min(CHANGES_READ),
                    )
                    .await
                    .map_err(unavailable)?;
                if records.is_empty() {
                    // Nothing readable up to the end (offsets with no
                    // record, as Kafka's transaction markers): past it.
                    next[partition] = *end;
                    break;
                }
                for record in records {
                    budget = budget.saturating_sub(1);
                    next[partition] = record.offset + 1;
                    let m = match cdp_pipeline::audience::read_change(&record) {
                        Ok(m) => m,
                        Err(error) => {
                            tracing::warn!(partition, offset = record.offset, %error, "an unreadable membership change");
                            continue;
                        }
                    };
                    if m.generation != generation
                        || (!segment.is_empty() && m.change.segment != segment)
                        || customer.is_some_and(|c| m.customer_id.0 != c)
                    {
                        continue;
                    }
                    if scope.out_of_reads(m.customer_id) {
                        // The next page starts with this record.
                        next[partition] = record.offset;
                        break 'partitions;
                    }
                    if !scope.admits(m.customer_id).await? {
                        continue;
                    }
                    changes.push(change_proto(m));
                    if changes.len() >= limit || budget == 0 {
                        break 'partitions;
                    }
                }
            }
        }
        let at_end = next
            .iter()
            .zip(&ends)
            .enumerate()
            .filter(|(p, _)| only.is_none_or(|o| o == *p))
            .all(|(_, (n, e))| n >= e);
        let mut entry = caller.entry("allowed");
        entry.fields = vec![
            format!("segment/{segment}"),
            format!("customer/{}", r.customer_id),
        ];
        entry.reason = format!("{} membership changes listed", changes.len());
        self.access.audit(entry).await?;
        let next_cursor = next
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(".");
        Ok(Response::new(v1::ListChangesResponse {
            changes,
            next_cursor,
            at_end,
        }))
    }

    async fn get_backfill(
        &self,
        request: Request<v1::GetBackfillRequest>,
    ) -> Result<Response<v1::Backfill>, Status> {
        use cdp_pipeline::audience::{BackfillState, fingerprint};
        use cdp_proto::convert::millis_to_timestamp;
        // The counts are of every customer: a scoped key gets none of them.
        let counted = Caller::of(&request)?.principal.scopes.is_empty();
        let count = |n: u64| if counted { n } else { 0 };
        let generation =
            match request.into_inner().generation {
                0 => self.live.refresh().await.map_err(|e| {
                    ServiceError::Unavailable(format!("projection generation: {e}"))
                })?,
                g => g,
            };
        let current = self
            .registry
            .current()
            .await
            .map_err(|e| ServiceError::Unavailable(format!("audience definitions: {e}")))?;
        let definitions = fingerprint(&current);
        let latest = cdp_runtime::audiences::latest_backfill(self.log.as_ref(), generation)
            .await
            .map_err(|e| ServiceError::Unavailable(format!("audience-backfills: {e}")))?;
        Ok(Response::new(match latest {
            Some(p) if p.definitions == definitions => v1::Backfill {
                generation,
                state: match p.state {
                    BackfillState::Running => "running",
                    BackfillState::Done => "done",
                }
                .into(),
                definitions,
                scanned: count(p.scanned),
                customers_changed: count(p.customers_changed),
                changes: count(p.changes),
                failed: count(p.failed),
                started_at: Some(millis_to_timestamp(p.started_at)),
                updated_at: Some(millis_to_timestamp(p.updated_at)),
                finished_at: p.finished_at.map(millis_to_timestamp),
            },
            _ => v1::Backfill {
                generation,
                state: "pending".into(),
                definitions,
                ..Default::default()
            },
        }))
    }

    async fn list_members(
        &self,
        request: Request<v1::ListMembersRequest>,
    ) -> Result<Response<v1::ListMembersResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let limit = match r.limit {
            0 => 100,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(
                    ServiceError::invalid("limit", format!("{n} is more than 1000")).into(),
                );
            }
        };
        let segment = r.segment.trim();
        if segment.is_empty() {
            return Err(ServiceError::invalid("segment", "is required").into());
        }
        let set = self.latest().await?;
        if !set.segments().any(|s| s.name == segment) {
            return Err(ServiceError::NotFound(format!("no segment is named {segment:?}")).into());
        }
        let mut scope = InScope::new(self, &caller);
        // A scoped caller's cursor may name a member out of its scope (where
        // a page stopped): it gets it sealed, bound to its key and segment.
        let context = format!("ListMembers/{}/{segment}", caller.principal.credential_id);
        let mut cursor = match r.cursor.as_str() {
            "" => None,
            c if scope.everyone() => Some(c.to_owned()),
            c => Some(
                self.access
                    .open_cursor(&context, c)
                    .map_err(|reason| ServiceError::invalid("cursor", reason))?,
            ),
        };
        let profiles = Arc::clone(&scope.stores.profiles);
        let mut members = Vec::new();
        let mut pages = 0usize;
        // A scoped caller's page reads on past members out of its scope,
        // up to a budget; the cursor then says where it stopped.
        let next = loop {
            let page = profiles
                .members(segment, cursor.as_deref(), limit - members.len())
                .await
                .map_err(|e| match e {
                    // The store's reason quotes the cursor: a scoped
                    // caller's opened one may name a customer out of its
                    // scope (one sealed before the store's cursors
                    // changed shape, say).
                    cdp_store::StoreError::Invalid(_) if !scope.everyone() => {
                        ServiceError::invalid(
                            "cursor",
                            "is not one of this store's cursors any more: list again without one",
                        )
                    }
                    cdp_store::StoreError::Invalid(reason) => {
                        ServiceError::invalid("cursor", reason)
                    }
                    e => ServiceError::Unavailable(format!("segment members: {e}")),
                })?;
            pages += 1;
            for (customer, since) in page.members {
                if scope.admits(customer).await? {
                    members.push((customer, since));
                }
            }
            match page.next {
                Some(next)
                    if !scope.everyone()
                        && members.len() < limit
                        && pages < MEMBERS_PAGES
                        && scope.reads < SCOPE_READS =>
                {
                    cursor = Some(next);
                }
                next => break next,
            }
        };
        let mut entry = caller.entry("allowed");
        entry.fields = vec![format!("segment/{segment}")];
        entry.reason = format!("{} members listed", members.len());
        self.access.audit(entry).await?;
        Ok(Response::new(v1::ListMembersResponse {
            members: members
                .into_iter()
                .map(|(c, since)| v1::SegmentMember {
                    customer_id: c.to_string(),
                    since: Some(cdp_proto::convert::millis_to_timestamp(since)),
                })
                .collect(),
            next_cursor: match next {
                None => String::new(),
                Some(next) if scope.everyone() => next,
                Some(next) => self.access.seal_cursor(&context, &next)?,
            },
        }))
    }

    async fn explain_membership(
        &self,
        request: Request<v1::ExplainMembershipRequest>,
    ) -> Result<Response<v1::ExplainMembershipResponse>, Status> {
        use cdp_proto::convert::{millis_to_timestamp, timeline_entry};
        let viewer = crate::viewer::Viewer::new(&self.access, Caller::of(&request)?);
        let r = request.into_inner();
        let name = r.segment.trim().to_owned();
        if name.is_empty() {
            return Err(ServiceError::invalid("segment", "is required").into());
        }
        let defs = self.current().await?;
        let Some(segment) = defs.segments.iter().find(|s| s.def.name == name) else {
            return Err(ServiceError::NotFound(format!("no segment is named {name:?}")).into());
        };
        let lookup = r.lookup.map(|l| match l {
            v1::explain_membership_request::Lookup::CustomerId(c) => crate::Lookup::CustomerId(c),
            v1::explain_membership_request::Lookup::Identifier(i) => crate::Lookup::Identifier(i),
        });
        let loaded = self
            .query
            .load_for(&viewer, lookup, usize::MAX, &["audience", "explain"])
            .await
            .map_err(|e| viewer.hide(e))?;
        let now = cdp_runtime::now_ms();
        let audience = &loaded.profile.audience;
        let view = loaded.profile.view();
        let evaluation = match audience.evaluate(&defs, &view, now).remove(&name) {
            Some(Ok(b)) => b.to_string(),
            Some(Err(reason)) => reason,
            None => "not evaluated".to_owned(),
        };
        let mut values = audience.trait_values(&defs, now);
        for (v, def) in values.iter_mut().zip(&defs.traits) {
            v.mask(def, &viewer.masker);
        }
        let traits = defs
            .traits
            .iter()
            .zip(values)
            .filter(|(d, _)| segment.reads(&d.name))
            .map(|(d, v)| {
                let since = d
                    .window
                    .millis()
                    .map_or(i64::MIN, |w| now.saturating_sub(w));
                v1::TraitEvidence {
                    name: d.name.clone(),
                    value_json: v.value.to_string(),
                    complete: v.complete,
                    aggregate: d.aggregate.as_str().to_owned(),
                    window: d.window.to_string(),
                    events: loaded
                        .timeline
                        .iter()
                        .filter(|e| e.occurred_at > since && d.matches(&e.touchpoint()))
                        .take(20)
                        .map(timeline_entry)
                        .collect(),
                }
            })
            .collect();
        let member = audience.members.get(&name);
        Ok(Response::new(v1::ExplainMembershipResponse {
            customer_id: loaded.profile.customer_id.to_string(),
            segment: name.clone(),
            version: segment.def.version,
            condition: segment.def.condition.clone(),
            member: member.is_some(),
            since: member.map(|m| millis_to_timestamp(m.since)),
            evaluation,
            waiting_for_backfill: !audience.determined(&defs, segment),
            traits,
        }))
    }

    async fn get_memberships(
        &self,
        request: Request<v1::GetMembershipsRequest>,
    ) -> Result<Response<v1::GetMembershipsResponse>, Status> {
        use cdp_domain::audience::ChangeKind;
        use cdp_pipeline::topic::AUDIENCE_CHANGES;
        use cdp_proto::convert::{millis_to_timestamp, timestamp_to_millis};
        let viewer = crate::viewer::Viewer::new(&self.access, Caller::of(&request)?);
        let r = request.into_inner();
        let as_of = r
            .as_of
            .as_ref()
            .map_or_else(cdp_runtime::now_ms, timestamp_to_millis);
        let lookup = r.lookup.map(|l| match l {
            v1::get_memberships_request::Lookup::CustomerId(c) => crate::Lookup::CustomerId(c),
            v1::get_memberships_request::Lookup::Identifier(i) => crate::Lookup::Identifier(i),
        });
        let loaded = self
            .query
            .load_for(&viewer, lookup, 1, &["audience", "memberships"])
            .await
            .map_err(|e| viewer.hide(e))?;
        let profile = &loaded.profile;
        let family: std::collections::BTreeSet<CustomerId> = std::iter::once(profile.customer_id)
            .chain(profile.merged_from.iter().copied())
            .collect();
        let generation = self
            .live
            .refresh()
            .await
            .map_err(|e| ServiceError::Unavailable(format!("projection generation: {e}")))?;
        let unavailable =
            |e: cdp_log::LogError| ServiceError::Unavailable(format!("{AUDIENCE_CHANGES}: {e}"));
        let ends = self
            .log
            .end_offsets(AUDIENCE_CHANGES)
            .await
            .map_err(unavailable)?;
        let partitions = u32::try_from(ends.len()).unwrap_or(u32::MAX);
        let wanted: std::collections::BTreeSet<u32> = family
            .iter()
            .map(|c| cdp_pipeline::key::customer_partition(*c, partitions))
            .collect();
        // (customer, segment) -> (version, since), folded in log order.
        let mut members: std::collections::BTreeMap<(CustomerId, String), (u64, i64)> =
            std::collections::BTreeMap::new();
        let mut read = 0u64;
        let mut complete = true;
        'partitions: for p in wanted {
            let end = ends.get(p as usize).copied().unwrap_or(0);
            let mut next = 0;
            while next < end {
                if read >= MEMBERSHIPS_SCAN {
                    complete = false;
                    break 'partitions;
                }
                let records = self
                    .log
                    .read(AUDIENCE_CHANGES, p, next, CHANGES_READ)
                    .await
                    .map_err(unavailable)?;
                if records.is_empty() {
                    break;
                }
                for record in records {
                    next = record.offset + 1;
                    read += 1;
                    let Ok(m) = cdp_pipeline::audience::read_change(&record) else {
                        continue;
                    };
                    if m.generation != generation
                        || !family.contains(&m.customer_id)
                        || m.change.at > as_of
                    {
                        continue;
                    }
                    let key = (m.customer_id, m.change.segment);
                    match m.change.kind {
                        ChangeKind::Entered => {
                            members.insert(key, (m.change.version, m.change.at));
                        }
                        ChangeKind::Exited => {
                            members.remove(&key);
                        }
                    }
                }
            }
        }
        Ok(Response::new(v1::GetMembershipsResponse {
            customer_id: profile.customer_id.to_string(),
            memberships: members
                .into_iter()
                .map(|((customer, segment), (version, since))| v1::Membership {
                    customer_id: customer.to_string(),
                    segment,
                    version,
                    since: Some(millis_to_timestamp(since)),
                })
                .collect(),
            records_read: read,
            complete,
        }))
    }

    async fn preview_segment(
        &self,
        request: Request<v1::PreviewSegmentRequest>,
    ) -> Result<Response<v1::PreviewSegmentResponse>, Status> {
        use futures::StreamExt;
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let sample = match r.sample {
            0 => 10_000,
            n @ 1..=100_000 => n as usize,
            n => {
                return Err(
                    ServiceError::invalid("sample", format!("{n} is more than 100000")).into(),
                );
            }
        };
        let draft = segment_def(&required(r.definition)?);
        let defs = self.current().await?;
        let segment =
            cdp_domain::audience::Segment::compile(draft, &defs.traits).map_err(invalid)?;
        // One generation's stores, for the rows and the scope alike.
        let scope = InScope::new(self, &caller);
        let stores = &scope.stores;
        let unavailable =
            |e: cdp_store::StoreError| ServiceError::Unavailable(format!("profiles: {e}"));
        let now = cdp_runtime::now_ms();
        let mut response = v1::PreviewSegmentResponse::default();
        let (mut from, mut read) = (None::<String>, 0usize);
        // A scoped caller's sample counts the customers in its scope; an
        // unscoped one's, the profiles read.
        let scoped = !scope.everyone();
        let budget = if scoped { PREVIEW_READS } else { sample };
        loop {
            let want = (budget - read).min(256);
            let (customers, next) = stores
                .profiles
                .scan_customers(from.as_deref(), want)
                .await
                .map_err(unavailable)?;
            read += customers.len();
            let rows: Vec<Result<Option<cdp_store::ProfileRow>, cdp_store::StoreError>> =
                futures::stream::iter(customers)
                    .map(|c| stores.profiles.row(c))
                    .buffered(32)
                    .collect()
                    .await;
            // Rows left when a scoped caller's sample was full.
            let mut left = false;
            for row in rows {
                if scoped && response.evaluated as usize >= sample {
                    left = true;
                    break;
                }
                let row = match row {
                    Ok(Some(row)) => row,
                    Ok(None) => continue,
                    Err(error) => {
                        // Left out of the sample, not the whole preview.
                        tracing::warn!(%error, "a profile not read for a preview");
                        continue;
                    }
                };
                let cdp_domain::profile::ProfileSlot::Live(profile) = row.slot else {
                    continue;
                };
                // A scoped caller previews over the customers it may see.
                if !scope.profile(&profile) {
                    continue;
                }
                response.evaluated += 1;
                if !profile.audience.determined(&defs, &segment) {
                    response.undetermined += 1;
                    continue;
                }
                let values = profile.audience.computed.values(&defs.traits, now);
                let view = profile.view();
                let input = cdp_domain::audience::Input::new(&view, &values);
                if matches!(segment.matches(&input), Ok(true)) {
                    response.matched += 1;
                    if response.examples.len() < 10 {
                        response.examples.push(profile.customer_id.to_string());
                    }
                }
            }
            match next {
                None if !left => {
                    response.complete = true;
                    break;
                }
                None => break,
                Some(_) if left || read >= budget => break,
                Some(_) if scoped && response.evaluated as usize >= sample => break,
                Some(n) => from = Some(n),
            }
        }
        let determined = response.evaluated.saturating_sub(response.undetermined);
        if determined > 0 {
            response.share = response.matched as f64 / determined as f64;
        }
        let mut entry = caller.entry("allowed");
        entry.fields = vec![format!("segment/{}", segment.def.name)];
        entry.reason = format!(
            "draft previewed over {} profiles, {} matched",
            response.evaluated, response.matched
        );
        self.access.audit(entry).await?;
        Ok(Response::new(response))
    }

    async fn validate_segment(
        &self,
        request: Request<v1::ValidateSegmentRequest>,
    ) -> Result<Response<v1::ValidateSegmentResponse>, Status> {
        let def = segment_def(&required(request.into_inner().definition)?);
        let set = self.latest().await?;
        let traits: Vec<TraitDef> = set.traits().cloned().collect();
        Ok(Response::new(
            match cdp_domain::audience::Segment::compile(def, &traits) {
                Ok(_) => v1::ValidateSegmentResponse {
                    valid: true,
                    ..Default::default()
                },
                Err(e) => v1::ValidateSegmentResponse {
                    valid: false,
                    field: format!("definition.{}", e.field),
                    reason: e.reason,
                },
            },
        ))
    }
}
