//! `ReplayService`: analysts read the touchpoints back from the event log,
//! filtered, in log order per partition, with a cursor after every event.
//!
//! - **Bounded**: the replay ends at the log's end offsets taken when the
//!   call starts, so it terminates while events keep arriving.
//! - **Flow control**: a reader task fills a channel of [`BUFFER`] events;
//!   when the client stops reading, HTTP/2 flow control stops the stream,
//!   the channel fills and the reader waits. Memory per call is bounded by
//!   the channel and one read chunk, whatever the client does.
//! - **Resumable**: the cursor is the next offset of every partition; the
//!   cursor of an event resumes right after it, with no gap and no repeat.
//! - **Purposeful**: every replay names its purpose; events of customers who
//!   have not consented to it (`cdp_domain::consent::permits`, decided as
//!   the event is read) come without their personal part, and the number
//!   of customers refused is recorded in the audit log.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use cdp_domain::access::Masker;
use cdp_domain::{Channel, CustomerId, EventType, Identifier, IdentityRules, Touchpoint};
use cdp_log::{EventLog, LogRecord};
use cdp_pipeline::{emit, topic};
use cdp_proto::convert;
use cdp_proto::v1::replay_service_server::ReplayService;
use cdp_proto::v1::{ReplayEvent, ReplayRequest};
use cdp_query::{Lookup, ProfileQuery};
use cdp_runtime::ServiceError;
use cdp_runtime::auth::{Access, Caller};
use cdp_store::IdentityStore;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Events buffered per call between the log reader and the client.
pub const BUFFER: usize = 64;
/// Records read from one partition at a time.
const CHUNK: usize = 256;
const CURSOR_PREFIX: &str = "v1:";

/// The next offset of every partition, as an opaque string.
pub fn encode_cursor(positions: &[u64]) -> String {
    let offsets: Vec<String> = positions.iter().map(u64::to_string).collect();
    format!("{CURSOR_PREFIX}{}", offsets.join(","))
}

/// Reads a cursor of a log with `partitions` partitions.
pub fn decode_cursor(cursor: &str, partitions: u32) -> Result<Vec<u64>, ServiceError> {
    let bad = |why: &str| ServiceError::invalid("cursor", why.to_owned());
    let body = cursor
        .strip_prefix(CURSOR_PREFIX)
        .ok_or_else(|| bad("is not a cursor of this service (take it from a ReplayEvent)"))?;
    let positions: Vec<u64> = body
        .split(',')
        .map(|o| o.parse::<u64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad("is damaged: offsets must be numbers"))?;
    if positions.len() != partitions as usize {
        return Err(bad(&format!(
            "names {} partitions; the log has {partitions}",
            positions.len()
        )));
    }
    Ok(positions)
}

/// What a replay keeps.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub channels: Vec<Channel>,
    pub types: Vec<EventType>,
    /// The identifiers of the customer asked for (merged identities included).
    pub identifiers: Option<BTreeSet<Identifier>>,
    /// What the events are for (a purpose name, normalised).
    pub purpose: String,
}

impl ReplayFilter {
    pub fn matches(&self, t: &Touchpoint) -> bool {
        let e = &t.envelope;
        self.from.is_none_or(|f| e.occurred_at >= f)
            && self.to.is_none_or(|to| e.occurred_at < to)
            && (self.channels.is_empty() || self.channels.contains(&e.channel))
            && (self.types.is_empty() || self.types.contains(&e.event_type))
            && self
                .identifiers
                .as_ref()
                .is_none_or(|ids| t.personal.identifiers.iter().any(|i| ids.contains(i)))
    }
}

#[derive(Clone)]
pub struct ReplayGrpc {
    log: Arc<dyn EventLog>,
    query: ProfileQuery,
    access: Arc<Access>,
}

impl ReplayGrpc {
    pub fn new(log: Arc<dyn EventLog>, query: ProfileQuery, access: Arc<Access>) -> Self {
        ReplayGrpc { log, query, access }
    }

    async fn filter(&self, r: &ReplayRequest) -> Result<ReplayFilter, ServiceError> {
        let mut errors = Vec::new();
        let from = r.from.as_ref().map(convert::timestamp_to_millis);
        let to = r.to.as_ref().map(convert::timestamp_to_millis);
        if let (Some(f), Some(t)) = (from, to)
            && f >= t
        {
            errors.push(cdp_domain::FieldError::new("to", "must be after from"));
        }
        let mut channels = Vec::new();
        for (i, c) in r.channels.iter().enumerate() {
            match c.parse::<Channel>() {
                Ok(c) => channels.push(c),
                Err(e) => errors.push(cdp_domain::FieldError::new(format!("channels[{i}]"), e)),
            }
        }
        let types = r
            .types
            .iter()
            .map(|t| EventType::from(t.as_str()))
            .collect();
        let purpose = if r.purpose.trim().is_empty() {
            errors.push(cdp_domain::FieldError::new(
                "purpose",
                format!(
                    "is required: say what the events are for ({}, or the shop's own purpose); customers who did not consent to it are replayed without their personal data",
                    cdp_domain::consent::PURPOSES.join(", ")
                ),
            ));
            String::new()
        } else {
            match cdp_domain::consent::purpose(&r.purpose) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(cdp_domain::FieldError::new("purpose", e));
                    String::new()
                }
            }
        };
        if !errors.is_empty() {
            return Err(ServiceError::InvalidArgument(errors));
        }
        let identifiers = match r.customer.clone() {
            None => None,
            Some(c) => {
                let stores = self.query.stores();
                let root = self
                    .query
                    .customer_in(&stores, Some(Lookup::from(c)))
                    .await?;
                let node = stores
                    .identity
                    .customer(root)
                    .await?
                    .ok_or_else(|| ServiceError::NotFound(format!("no customer {root}")))?;
                Some(node.identifiers)
            }
        };
        Ok(ReplayFilter {
            from,
            to,
            channels,
            types,
            identifiers,
            purpose,
        })
    }
}

/// Which customer an event belongs to now: the owner of its strongest
/// identifier that has one, merges followed.
async fn customer_of(
    identity: &dyn IdentityStore,
    rules: &IdentityRules,
    t: &Touchpoint,
    cache: &mut HashMap<Identifier, Option<CustomerId>>,
) -> Result<Option<CustomerId>, ServiceError> {
    for id in rules.strongest_first(&t.personal.identifiers) {
        let owner = match cache.get(id) {
            Some(o) => *o,
            None => {
                let o = identity.owner(id).await?;
                if cache.len() > 100_000 {
                    cache.clear();
                }
                cache.insert(id.clone(), o);
                o
            }
        };
        if owner.is_some() {
            return Ok(owner);
        }
    }
    Ok(None)
}

/// Whether a customer's consent (none: no profile yet) allows `purpose`
/// for a use that contacts nobody.
fn allowed_by(consent: Option<&cdp_store::ConsentMap>, purpose: &str) -> bool {
    let records = consent
        .map(cdp_domain::consent::records)
        .unwrap_or_default();
    cdp_domain::consent::permits(&records, purpose, None).allowed
}

/// Looks up the owners of the identifiers of `events` and the consent
/// decisions of their customers that the caches lack, a chunk at a time
/// (the stores' batch reads: one transaction embedded, concurrent queries
/// on ScyllaDB; one round trip per event would bound a replay by latency).
async fn prefetch<'a>(
    identity: &Arc<dyn IdentityStore>,
    profiles: &Arc<dyn cdp_store::ProfileStore>,
    rules: &IdentityRules,
    events: impl Iterator<Item = &'a Touchpoint>,
    owners: &mut HashMap<Identifier, Option<CustomerId>>,
    consents: &mut Consents,
) -> Result<(), ServiceError> {
    let events: Vec<&Touchpoint> = events.collect();
    // Strongest identifier first, the next only when it has no owner: as
    // few lookups as the attribution needs, each round concurrent.
    loop {
        let missing: BTreeSet<Identifier> = events
            .iter()
            .filter_map(|t| {
                for id in rules.strongest_first(&t.personal.identifiers) {
                    match owners.get(id) {
                        Some(Some(_)) => return None,
                        Some(None) => continue,
                        None => return Some(id.clone()),
                    }
                }
                None
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        // One read of every claim, then each claimed customer's root.
        let missing: Vec<Identifier> = missing.into_iter().collect();
        let claims = identity.claims(&missing).await?;
        let claimed: Vec<CustomerId> = claims
            .iter()
            .flatten()
            .map(|c| c.customer)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let roots: HashMap<CustomerId, CustomerId> = claimed
            .iter()
            .copied()
            .zip(identity.roots(&claimed).await?)
            .collect();
        let found: Vec<(Identifier, Option<CustomerId>)> = missing
            .into_iter()
            .zip(claims)
            .map(|(id, claim)| {
                let owner = claim.and_then(|c| roots.get(&c.customer).copied());
                (id, owner)
            })
            .collect();
        if owners.len() + found.len() > 100_000 {
            owners.clear();
        }
        owners.extend(found);
    }
    let customers: BTreeSet<CustomerId> = events
        .iter()
        .filter_map(|t| {
            rules
                .strongest_first(&t.personal.identifiers)
                .into_iter()
                .find_map(|id| owners.get(id).copied().flatten())
        })
        .filter(|c| !consents.allowed.contains_key(c))
        .collect();
    let purpose = consents.purpose.as_str();
    let customers: Vec<CustomerId> = customers.into_iter().collect();
    let found = profiles.consents(&customers).await?;
    let decided: Vec<(CustomerId, bool)> = customers
        .into_iter()
        .zip(found)
        .map(|(c, consent)| (c, allowed_by(consent.as_ref(), purpose)))
        .collect();
    if consents.allowed.len() + decided.len() > 100_000 {
        consents.allowed.clear();
    }
    consents.allowed.extend(decided);
    Ok(())
}

/// What each replayed event shows: its customer (when asked), and personal
/// values as the caller may see them.
struct Shown {
    with_customers: bool,
    masker: Masker,
}

/// The consent decisions of one replay: per customer, decided once, from
/// the generation the replay reads.
struct Consents {
    purpose: String,
    allowed: HashMap<CustomerId, bool>,
    refused: BTreeSet<CustomerId>,
    withheld_events: u64,
}

impl Consents {
    async fn allows(
        &mut self,
        profiles: &dyn cdp_store::ProfileStore,
        customer: Option<CustomerId>,
    ) -> Result<bool, ServiceError> {
        let Some(c) = customer else {
            // Nobody to ask: nothing but the service default covers it.
            return Ok(cdp_domain::consent::permits(&[], &self.purpose, None).allowed);
        };
        if let Some(a) = self.allowed.get(&c) {
            return Ok(*a);
        }
        let allowed = allowed_by(profiles.consent(c).await?.as_ref(), &self.purpose);
        if self.allowed.len() > 100_000 {
            self.allowed.clear();
        }
        self.allowed.insert(c, allowed);
        Ok(allowed)
    }
}

/// Removes the personal part of a touchpoint: identifiers, traits, and the
/// properties `masker` counts as personal.
fn withhold(t: &mut Touchpoint, masker: &Masker) {
    t.personal = cdp_domain::Personal::default();
    t.envelope
        .properties
        .retain(|k, _| !masker.keys.is_personal(k));
}

/// Reads the partitions round-robin up to `ends` and sends what matches.
/// Returns when done or when the client went away.
#[allow(clippy::too_many_arguments)]
async fn pump(
    log: Arc<dyn EventLog>,
    query: ProfileQuery,
    filter: ReplayFilter,
    shown: Shown,
    positions: Vec<u64>,
    ends: Vec<u64>,
    tx: mpsc::Sender<Result<ReplayEvent, Status>>,
    audit: (Arc<Access>, Caller),
) -> Result<(), ServiceError> {
    let mut consents = Consents {
        purpose: filter.purpose.clone(),
        allowed: HashMap::new(),
        refused: BTreeSet::new(),
        withheld_events: 0,
    };
    let result = pump_events(
        log,
        query,
        filter,
        shown,
        positions,
        ends,
        tx,
        &mut consents,
    )
    .await;
    if consents.withheld_events > 0 {
        let (access, caller) = audit;
        let mut entry = caller.entry("refused");
        entry.fields = vec![format!("replay:{}", consents.purpose)];
        entry.reason = format!(
            "{} events replayed without personal data: {} customers without consent to {} (and events no customer holds)",
            consents.withheld_events,
            consents.refused.len(),
            consents.purpose
        );
        if let Err(error) = access.audit(entry).await {
            tracing::error!(%error, "cannot audit the refusals of a replay");
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn pump_events(
    log: Arc<dyn EventLog>,
    query: ProfileQuery,
    filter: ReplayFilter,
    shown: Shown,
    mut positions: Vec<u64>,
    ends: Vec<u64>,
    tx: mpsc::Sender<Result<ReplayEvent, Status>>,
    consents: &mut Consents,
) -> Result<(), ServiceError> {
    let mut owners = HashMap::new();
    // One generation's graph and views for the whole replay.
    let stores = query.stores();
    let identity = stores.identity;
    let profiles = stores.profiles;
    let total: u64 = ends
        .iter()
        .zip(&positions)
        .map(|(e, p)| e.saturating_sub(*p))
        .sum();
    let mut scanned: u64 = 0;
    loop {
        let mut progressed = false;
        for p in 0..positions.len() {
            if positions[p] >= ends[p] {
                continue;
            }
            let partition = u32::try_from(p).unwrap_or(u32::MAX);
            let records: Vec<LogRecord> = log
                .read(topic::TOUCHPOINTS, partition, positions[p], CHUNK)
                .await
                .map_err(ServiceError::from)?;
            if records.is_empty() {
                tracing::warn!(
                    partition,
                    from = positions[p],
                    end = ends[p],
                    "records missing from the log (retention?); skipping to the end"
                );
                positions[p] = ends[p];
                continue;
            }
            progressed = true;
            // Copies a killed ingest left behind (Kafka): the index says
            // where each event's first record is; the others are skipped.
            let end = ends[p];
            let within: Vec<LogRecord> = records.into_iter().filter(|r| r.offset < end).collect();
            let copies = copies_in(log.as_ref(), partition, &within).await?;
            if within.is_empty() {
                positions[p] = end;
            }
            // Decoded and filtered first, so the owners and consents the
            // chunk needs are looked up together.
            let mut kept: HashMap<u64, (Touchpoint, bool)> = HashMap::new();
            let keys = emit::keys_for(query.keyring(), &within)
                .await
                .map_err(ServiceError::from)?;
            for r in &within {
                // A copy a killed ingest left, or a re-driven one: the event
                // was shown at its first position.
                if copies.contains(&r.offset) || emit::is_redrive(r) {
                    continue;
                }
                let (t, erased) = match emit::read_touchpoint(r, &keys) {
                    Ok(o) => (o.value, o.anonymous),
                    Err(error) => {
                        tracing::warn!(partition, offset = r.offset, %error, "undecodable record skipped");
                        continue;
                    }
                };
                if !filter.matches(&t) {
                    continue;
                }
                // Accepted before nesting was bounded: clients could not
                // decode it, so it is left out, loudly (its dead letter was
                // written by identity).
                let shape = cdp_domain::validate::shape_errors(&t);
                if !shape.is_empty() {
                    tracing::warn!(partition, offset = r.offset, event = %t.event_id(), reason = %cdp_domain::Rejection(shape), "touchpoint beyond the shape limits left out of the replay");
                    continue;
                }
                kept.insert(r.offset, (t, erased));
            }
            prefetch(
                &identity,
                &profiles,
                query.rules(),
                kept.values().map(|(t, _)| t),
                &mut owners,
                consents,
            )
            .await?;
            for r in within {
                scanned += r.offset + 1 - positions[p].min(r.offset + 1);
                positions[p] = r.offset + 1;
                let Some((mut t, erased)) = kept.remove(&r.offset) else {
                    continue;
                };
                // An erased customer's event: anonymous, attributed to no one,
                // still counted.
                let customer = if erased {
                    None
                } else {
                    customer_of(identity.as_ref(), query.rules(), &t, &mut owners).await?
                };
                let withheld = !erased && !consents.allows(profiles.as_ref(), customer).await?;
                let customer_id = match customer {
                    Some(c) if shown.with_customers && !withheld => c.to_string(),
                    _ => String::new(),
                };
                if withheld {
                    consents.withheld_events += 1;
                    if let Some(c) = customer {
                        consents.refused.insert(c);
                    }
                    withhold(&mut t, &shown.masker);
                }
                // Analysts see pseudonyms unless their credential grants more.
                shown.masker.touchpoint(&mut t);
                let event = ReplayEvent {
                    touchpoint: Some(convert::api_touchpoint(&t)),
                    customer_id,
                    partition,
                    offset: r.offset,
                    appended_at: Some(convert::millis_to_timestamp(r.timestamp)),
                    cursor: encode_cursor(&positions),
                    records_scanned: scanned,
                    records_total: total,
                    withheld,
                    erased,
                };
                if tx.send(Ok(event)).await.is_err() {
                    tracing::debug!("replay reader went away");
                    return Ok(());
                }
            }
        }
        if !progressed {
            return Ok(());
        }
    }
}

/// The offsets of `records` (one partition of `touchpoints`) that repeat an
/// event whose first record is elsewhere in the log.
async fn copies_in(
    log: &dyn EventLog,
    partition: u32,
    records: &[LogRecord],
) -> Result<std::collections::HashSet<u64>, ServiceError> {
    let mut copies = std::collections::HashSet::new();
    if !log.holds_duplicates() {
        return Ok(copies);
    }
    let keyed: Vec<(u64, Vec<u8>)> = records
        .iter()
        .filter_map(|r| {
            let id = r.header(cdp_pipeline::header::EVENT_ID)?;
            let id = uuid::Uuid::parse_str(std::str::from_utf8(id).ok()?).ok()?;
            Some((r.offset, id.as_bytes().to_vec()))
        })
        .collect();
    let keys: Vec<Vec<u8>> = keyed.iter().map(|(_, k)| k.clone()).collect();
    let firsts = log
        .locate_many(topic::TOUCHPOINTS, &keys)
        .await
        .map_err(ServiceError::from)?;
    for ((offset, _), first) in keyed.iter().zip(firsts) {
        if let Some(first) = first
            && first != (partition, *offset)
        {
            copies.insert(*offset);
        }
    }
    Ok(copies)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ReplayEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ReplayService for ReplayGrpc {
    type ReplayStream = EventStream;

    #[tracing::instrument(skip_all)]
    async fn replay(
        &self,
        request: Request<ReplayRequest>,
    ) -> Result<Response<Self::ReplayStream>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let filter = self.filter(&r).await?;
        let viewer = cdp_query::Viewer::new(&self.access, caller);
        let masker = viewer.masker.clone();
        let mut entry = viewer.caller.entry("allowed");
        entry.fields = vec!["replay".into()];
        entry.reason = format!("purpose: {}", filter.purpose);
        entry.lookup = viewer.describe(r.customer.clone().map(cdp_query::Lookup::from).as_ref());
        self.access.audit(entry).await?;
        let partitions = self.log.partitions(topic::TOUCHPOINTS);
        let positions = if r.cursor.is_empty() {
            vec![0; partitions as usize]
        } else {
            decode_cursor(&r.cursor, partitions)?
        };
        let ends = self
            .log
            .end_offsets(topic::TOUCHPOINTS)
            .await
            .map_err(ServiceError::from)?;
        let (tx, rx) = mpsc::channel(BUFFER);
        let (log, query) = (Arc::clone(&self.log), self.query.clone());
        let with_customers = r.with_customers;
        let audit = (Arc::clone(&self.access), viewer.caller.clone());
        tokio::spawn(async move {
            let failed = tx.clone();
            if let Err(e) = pump(
                log,
                query,
                filter,
                Shown {
                    with_customers,
                    masker,
                },
                positions,
                ends,
                tx,
                audit,
            )
            .await
            {
                tracing::warn!(error = %e, "replay failed");
                let _ = failed.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_name_the_field() {
        let c = encode_cursor(&[3, 0, 17, 42]);
        assert_eq!(decode_cursor(&c, 4).unwrap(), vec![3, 0, 17, 42]);
        for (bad, why) in [
            ("3,0,17,42", "not a cursor"),
            ("v1:3,x,17,42", "damaged"),
            ("v1:3,0", "names 2 partitions"),
        ] {
            let e = decode_cursor(bad, 4).unwrap_err().to_string();
            assert!(e.contains("cursor") && e.contains(why), "{bad}: {e}");
        }
    }
}
