//! The right to erasure (`PrivacyService/Erase`): crypto-shredding in the
//! log, removal from the views.
//!
//! 1. The customer found by the request, everyone merged into it, their
//!    identifiers and events (the active generation says who they are).
//! 2. The request is appended to `erasures` (the log's own record of it).
//! 3. The data keys of every identifier are erased: every record of the log
//!    that named one of them is anonymous from now on, on every copy, and
//!    the identifiers' hashes stay as the suppression list.
//! 4. Their views, timeline, search entries and identity graph are removed
//!    from every projection generation; past views kept in memory for time
//!    travel are dropped.
//! 5. After `privacy.key_cache_secs` (other processes may still hold the
//!    keys and fold a record opened with them), the views are removed once
//!    more; then the completion is appended to `erasures`.
//!
//! The work runs in a task of its own: a caller that goes away does not
//! leave it half done.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cdp_domain::{CustomerId, EventId, Identifier};
use cdp_log::{EventLog, Record};
use cdp_pipeline::topic;
use cdp_proto::convert;
use cdp_proto::v1::{EraseRequest, Erasure, ErasureState};
use cdp_runtime::ServiceError;
use cdp_runtime::auth::{Access, Caller};
use cdp_store::ProjectionStores;
use prost::Message;
use uuid::Uuid;

use crate::{Lookup, ProfileQuery, Viewer};

/// The longest request id kept.
const MAX_REQUEST_ID: usize = 200;

/// Who an erasure removes from one generation's views.
#[derive(Debug, Default)]
struct Found {
    customers: BTreeSet<CustomerId>,
    identifiers: BTreeSet<Identifier>,
    events: BTreeSet<EventId>,
    terms: BTreeSet<String>,
}

/// Erasure requests: carried out, recorded, reported.
#[derive(Clone)]
pub struct Erasures {
    query: ProfileQuery,
    log: Arc<dyn EventLog>,
    access: Arc<Access>,
    deadline_days: u32,
    /// One erasure at a time in a process.
    running: Arc<tokio::sync::Mutex<()>>,
}

fn request_id(raw: &str) -> Result<String, ServiceError> {
    let id = raw.trim();
    if id.is_empty() {
        return Ok(Uuid::now_v7().to_string());
    }
    if id.chars().count() > MAX_REQUEST_ID || id.chars().any(char::is_control) {
        return Err(ServiceError::invalid(
            "request_id",
            format!("must be at most {MAX_REQUEST_ID} printable characters"),
        ));
    }
    Ok(id.to_owned())
}

/// The request id and the reason outlive the customer (they stay on
/// `erasures` and in the audit log, in clear): refused when they hold
/// personal data, `known` being the customer's identifier values. A UUID
/// as the id is a reference.
fn no_personal_data(request_id: &str, reason: &str, known: &[String]) -> Result<(), ServiceError> {
    let id = Uuid::parse_str(request_id)
        .is_err()
        .then_some(("request_id", request_id));
    for (field, text) in id.into_iter().chain([("reason", reason)]) {
        if let Some(what) = cdp_domain::access::personal_data_in(text, known) {
            return Err(ServiceError::invalid(
                field,
                format!(
                    "holds {what}; it is kept after the customer is erased, so give a ticket or case reference instead"
                ),
            ));
        }
    }
    Ok(())
}

impl Erasures {
    pub fn new(
        query: ProfileQuery,
        log: Arc<dyn EventLog>,
        access: Arc<Access>,
        deadline_days: u32,
    ) -> Self {
        Erasures {
            query,
            log,
            access,
            deadline_days,
            running: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The latest record of `request_id` on `erasures`.
    pub async fn status(&self, request_id: &str) -> Result<Option<Erasure>, ServiceError> {
        let mut found = None;
        cdp_log::scan(self.log.as_ref(), topic::ERASURES, 500, |r| {
            if r.key == request_id.as_bytes()
                && let Ok(e) = Erasure::decode(r.value.as_slice())
            {
                found = Some(e);
            }
            Ok::<_, ServiceError>(())
        })
        .await?;
        Ok(found)
    }

    async fn record(&self, e: &Erasure) -> Result<(), ServiceError> {
        self.log
            .append(
                topic::ERASURES,
                vec![Record {
                    key: e.request_id.clone().into_bytes(),
                    value: e.encode_to_vec(),
                    ..Record::default()
                }],
            )
            .await
            .map_err(ServiceError::from)?;
        Ok(())
    }

    /// Carries out an erasure request and answers when it is complete.
    pub async fn erase(&self, caller: &Caller, r: EraseRequest) -> Result<Erasure, ServiceError> {
        let request_id = request_id(&r.request_id)?;
        if r.reason.chars().count() > 1000 {
            return Err(ServiceError::invalid(
                "reason",
                "is longer than 1000 characters",
            ));
        }
        no_personal_data(&request_id, &r.reason, &[])?;
        let lookup = r
            .lookup
            .clone()
            .map(Lookup::from)
            .ok_or_else(|| ServiceError::invalid("lookup", "name the customer to erase"))?;
        let this = self.clone();
        let caller = caller.clone();
        let reason = r.reason.trim().to_owned();
        // In a task of its own: a caller that hangs up does not stop it half way.
        tokio::spawn(async move {
            let _one = this.running.lock().await;
            if let Some(done) = this.status(&request_id).await?
                && done.state == ErasureState::Complete as i32
            {
                return Ok(done);
            }
            this.carry_out(&caller, lookup, request_id, reason).await
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("the erasure task failed: {e}")))?
    }

    async fn carry_out(
        &self,
        caller: &Caller,
        lookup: Lookup,
        request_id: String,
        reason: String,
    ) -> Result<Erasure, ServiceError> {
        let viewer = Viewer::new(&self.access, caller.clone());
        let active = self.query.stores();
        if let Lookup::Identifier(raw) = &lookup {
            // Who holds an identifier now is not always whom the request is
            // about: a value shared by many people, or a phone number that
            // passed to someone new, names the customer only by id.
            let id = self.query.identifier(raw)?;
            if let Some(claim) = active
                .identity
                .claims(std::slice::from_ref(&id))
                .await?
                .pop()
                .flatten()
            {
                if claim.quarantined.is_some() {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "{} is quarantined as shared by many people: name the customer to erase by customer_id",
                        id.kind
                    )));
                }
                if claim.linked_to() != claim.customer
                    && active.identity.root(claim.linked_to()).await?
                        != active.identity.root(claim.customer).await?
                {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "this {} passed from one customer to another: name the customer to erase by customer_id",
                        id.kind
                    )));
                }
            }
        }
        let resumed = self.status(&request_id).await?;
        let root = match (&resumed, self.query.customer(Some(lookup)).await) {
            (_, Ok(root)) => root,
            // A request that stopped half way (its customer is partly
            // removed already): resumed from what its first record names.
            (Some(first), Err(ServiceError::NotFound(_))) if !first.customer_ids.is_empty() => {
                first
                    .customer_ids
                    .first()
                    .and_then(|c| Uuid::parse_str(c).ok())
                    .map(CustomerId)
                    .ok_or_else(|| {
                        ServiceError::Internal("an erasure record without customers".into())
                    })?
            }
            (_, Err(e)) => return Err(viewer.hide(e)),
        };
        if let Some(profile) = active.profiles.profile(root).await? {
            viewer.admit(&profile)?;
        }
        // Every identifier of the customer and of those merged into it
        // (and, for a resumed request, of every customer it named).
        let mut family: BTreeSet<CustomerId> = BTreeSet::from([root]);
        if let Some(profile) = active.profiles.profile(root).await? {
            family.extend(cdp_store::read::family(&profile));
        }
        if let Some(first) = &resumed {
            family.extend(
                first
                    .customer_ids
                    .iter()
                    .filter_map(|c| Uuid::parse_str(c).ok())
                    .map(CustomerId),
            );
        }
        let mut identifiers: BTreeSet<Identifier> = BTreeSet::new();
        for c in &family {
            if let Some(node) = active.identity.customer(*c).await? {
                identifiers.extend(node.identifiers);
            }
        }
        // An identifier quarantined as shared (a shop's phone typed for
        // many people) is not this person's: erasing its key would erase
        // everyone's records that carry it, and its claim keeps the
        // quarantine. The person's own identifiers shred their records.
        let listed: Vec<Identifier> = identifiers.iter().cloned().collect();
        let mut shared: BTreeSet<Identifier> = BTreeSet::new();
        for (id, claim) in listed.iter().zip(active.identity.claims(&listed).await?) {
            if claim.is_some_and(|c| c.quarantined.is_some()) {
                shared.insert(id.clone());
            }
        }
        identifiers.retain(|i| !shared.contains(i));
        let values: Vec<String> = identifiers
            .iter()
            .chain(&shared)
            .map(|i| i.value.clone())
            .collect();
        // A request resumed was checked when it started.
        if resumed.is_none() {
            no_personal_data(&request_id, &reason, &values)?;
        }
        let keyring = self.query.keyring();
        let mut subjects: Vec<cdp_seal::Subject> =
            identifiers.iter().map(|i| keyring.subject(i)).collect();
        if let Some(first) = &resumed {
            subjects.extend(
                first
                    .subjects
                    .iter()
                    .filter_map(|s| cdp_seal::Subject::from_slice(s).ok()),
            );
        }
        subjects.sort();
        subjects.dedup();
        let now = cdp_runtime::now_ms();
        let deadline = now.saturating_add(i64::from(self.deadline_days) * 86_400_000);
        let found = self.find_all(&identifiers, &shared, &family).await?;
        // The keys their views (profiles, timelines) are sealed under, in
        // every generation.
        let customers: BTreeSet<CustomerId> = family
            .iter()
            .chain(found.iter().flat_map(|(_, f)| &f.customers))
            .copied()
            .collect();
        let identifier_keys = subjects.len();
        subjects.extend(
            customers
                .iter()
                .map(|c| cdp_store::sealed::customer_subject(keyring.hasher(), *c)),
        );
        subjects.sort();
        subjects.dedup();
        let events: usize = found.iter().map(|(_, f)| f.events.len()).max().unwrap_or(0);
        let mut erasure = Erasure {
            request_id: request_id.clone(),
            state: ErasureState::Erasing.into(),
            requested_at: Some(convert::millis_to_timestamp(now)),
            deadline: Some(convert::millis_to_timestamp(deadline)),
            completed_at: None,
            customer_ids: family.iter().map(ToString::to_string).collect(),
            identifiers: u32::try_from(identifiers.len()).unwrap_or(u32::MAX),
            events: u32::try_from(events).unwrap_or(u32::MAX),
            generations: found.iter().map(|(g, _)| *g).collect(),
            requested_by: caller.principal.name.clone(),
            reason,
            steps: Vec::new(),
            subjects: subjects.iter().map(|s| s.0.to_vec()).collect(),
        };
        self.record(&erasure).await?;
        tracing::info!(request = %request_id, customers = family.len(), identifiers = identifiers.len(), "erasure started");

        keyring.erase(&subjects, now, &request_id).await?;
        erasure.steps.push(format!(
            "erased the data keys of {identifier_keys} identifiers and of {} customers' views: every record of the log that named them is anonymous, their stored views unreadable wherever a copy remains, and the identifiers are suppressed",
            customers.len()
        ));
        if !shared.is_empty() {
            erasure.steps.push(format!(
                "kept {} identifiers quarantined as shared by many people (their keys also open other customers' records)",
                shared.len()
            ));
        }
        // The events' identity decisions wait for the last pass: they are
        // sealed under the keys just erased, and the embedded store finds
        // them by a scan of every decision.
        self.remove(&found, false).await?;
        self.query.forget_history();
        let removed: usize = found.iter().map(|(_, f)| f.customers.len()).sum();
        erasure.steps.push(format!(
            "removed the profiles, timelines, search entries and identity graph of {removed} customer rows from generations {:?}",
            erasure.generations
        ));
        // Another process may have opened a record with a key it still had
        // in memory and folded it meanwhile.
        let wait = keyring.cache_ttl() + Duration::from_millis(500);
        tokio::time::sleep(wait).await;
        let found_again = self.find_all(&identifiers, &shared, &family).await?;
        let late: Vec<cdp_seal::Subject> = found_again
            .iter()
            .flat_map(|(_, f)| &f.customers)
            .filter(|c| !customers.contains(c))
            .map(|c| cdp_store::sealed::customer_subject(keyring.hasher(), *c))
            .collect();
        if !late.is_empty() {
            keyring.erase(&late, now, &request_id).await?;
        }
        self.remove(&both(found, found_again), true).await?;
        self.query.forget_history();
        erasure.steps.push(format!(
            "after {} ms (every process has dropped the keys), removed what was folded meanwhile and the events' identity decisions",
            wait.as_millis()
        ));
        erasure.state = ErasureState::Complete.into();
        erasure.completed_at = Some(convert::millis_to_timestamp(cdp_runtime::now_ms()));
        self.record(&erasure).await?;
        let mut entry = caller.entry("allowed");
        entry.customer_id = root.to_string();
        entry.fields = vec!["erasure".into()];
        entry.reason = format!("erased (request {request_id})");
        self.access.audit_durable(entry).await?;
        tracing::info!(request = %request_id, "erasure complete");
        Ok(erasure)
    }

    /// What to remove in every projection generation: the customers the
    /// identifiers (or the family's ids) lead to there, their events and
    /// search terms.
    async fn find_all(
        &self,
        identifiers: &BTreeSet<Identifier>,
        shared: &BTreeSet<Identifier>,
        family: &BTreeSet<CustomerId>,
    ) -> Result<Vec<(u32, Found)>, ServiceError> {
        let generations = self.query.live().generations();
        let mut out = Vec::new();
        for info in generations.list().await? {
            let stores = generations.open(info.id).await?;
            out.push((info.id, find(&stores, identifiers, shared, family).await?));
        }
        Ok(out)
    }

    /// Removes what `found` names in its generations; the events' identity
    /// decisions only with `decisions`.
    async fn remove(&self, found: &[(u32, Found)], decisions: bool) -> Result<(), ServiceError> {
        // An erasure's commit is durable, and so makes durable every fold
        // this process committed before it: their membership changes are
        // appended first, as a profile worker's sync does (see
        // `AudienceRegistry::appends`), or a crash right after the erasure
        // would lose them.
        let _alone = match self.query.audiences() {
            Some(registry) => Some(registry.hold_for_sync().await?),
            None => None,
        };
        let generations = self.query.live().generations();
        for (id, f) in found {
            let stores = generations.open(*id).await?;
            let customers: Vec<CustomerId> = f.customers.iter().copied().collect();
            let terms: Vec<String> = f.terms.iter().cloned().collect();
            let events: Vec<EventId> = if decisions {
                f.events.iter().copied().collect()
            } else {
                Vec::new()
            };
            stores.profiles.erase_views(&customers, &terms).await?;
            let identifiers: Vec<Identifier> = f.identifiers.iter().cloned().collect();
            stores
                .identity
                .erase_graph(&customers, &identifiers, &events)
                .await?;
        }
        Ok(())
    }
}

/// What two passes found, by generation.
fn both(first: Vec<(u32, Found)>, second: Vec<(u32, Found)>) -> Vec<(u32, Found)> {
    let mut all: BTreeMap<u32, Found> = BTreeMap::new();
    for (generation, f) in first.into_iter().chain(second) {
        let into = all.entry(generation).or_default();
        into.customers.extend(f.customers);
        into.identifiers.extend(f.identifiers);
        into.events.extend(f.events);
        into.terms.extend(f.terms);
    }
    all.into_iter().collect()
}

/// The customers of one generation an erasure removes: those owning the
/// identifiers, those named, and everyone merged into them.
async fn find(
    stores: &ProjectionStores,
    identifiers: &BTreeSet<Identifier>,
    shared: &BTreeSet<Identifier>,
    named: &BTreeSet<CustomerId>,
) -> Result<Found, ServiceError> {
    let mut roots: BTreeSet<CustomerId> = BTreeSet::new();
    let ids: Vec<Identifier> = identifiers.iter().cloned().collect();
    for claim in stores.identity.claims(&ids).await?.into_iter().flatten() {
        roots.insert(stores.identity.root(claim.customer).await?);
    }
    for c in named {
        if stores.identity.customer(*c).await?.is_some() {
            roots.insert(stores.identity.root(*c).await?);
        }
    }
    let mut found = Found::default();
    let mut all_ids: BTreeSet<Identifier> = identifiers.clone();
    for root in roots {
        // In a generation that merged differently, a root may hold someone
        // else's identifiers too: that customer is not removed (its claims
        // of the erased identifiers are).
        if !named.contains(&root)
            && let Some(node) = stores.identity.customer(root).await?
            && node
                .identifiers
                .iter()
                .any(|i| !identifiers.contains(i) && !shared.contains(i))
        {
            continue;
        }
        found.customers.insert(root);
        if let Some(profile) = stores.profiles.profile(root).await? {
            found.customers.extend(cdp_store::read::family(&profile));
            found.events.extend(profile.applied.iter().copied());
            found.terms.extend(profile.search_terms.iter().cloned());
            found
                .terms
                .extend(cdp_domain::search::terms_of(identifiers.iter(), |k| {
                    profile.traits.get(k).and_then(|s| s.value.as_str())
                }));
        }
    }
    for c in found.customers.clone() {
        if let Some(node) = stores.identity.customer(c).await? {
            all_ids.extend(node.identifiers);
        }
    }
    // Every identifier they hold here: their claims and search entries.
    found
        .terms
        .extend(cdp_domain::search::terms_of(all_ids.iter(), |_| None));
    found.customers.extend(named.iter().copied());
    // Claims of the erased identifiers only: a shared one keeps its
    // quarantine, and nobody else's is touched.
    found.identifiers = identifiers.clone();
    Ok(found)
}
