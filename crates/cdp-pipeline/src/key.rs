//! How records are keyed. The key decides the partition: records with one
//! key stay in order.

use cdp_domain::{CustomerId, EventId, IdentityRules, Touchpoint};

/// A touchpoint's key: its routing identifier (the strongest one, so the
/// events of one person mostly share a partition) named by its subject
/// (an HMAC, never the value), else its event id.
pub fn touchpoint(t: &Touchpoint, rules: &IdentityRules, hasher: &cdp_seal::Hasher) -> Vec<u8> {
    t.routing_identifier(rules)
        .map_or_else(
            || t.event_id().to_string(),
            |id| cdp_store::keys::subject_of(hasher, id).hex(),
        )
        .into_bytes()
}

/// The key of an `alerts` record about an identifier: its subject.
pub fn identifier(id: &cdp_domain::Identifier, hasher: &cdp_seal::Hasher) -> Vec<u8> {
    cdp_store::keys::subject_of(hasher, id).hex().into_bytes()
}

/// The key of every record about one customer: `resolved`, `identity`,
/// `profile-changes` and `audit`.
pub fn customer(c: CustomerId) -> Vec<u8> {
    c.to_string().into_bytes()
}

/// The key of a dead letter of a decoded event.
pub fn event(e: EventId) -> Vec<u8> {
    e.to_string().into_bytes()
}

/// The key of a `redrives` record, and the idempotency key of the copy a
/// re-drive appends: the dead letter's position.
pub fn dead_letter(partition: u32, offset: u64) -> Vec<u8> {
    format!("{partition}/{offset}").into_bytes()
}

/// The partition of `topic` (with `partitions` partitions) holding the
/// records about `c`.
pub fn customer_partition(c: CustomerId, partitions: u32) -> u32 {
    cdp_log::partition_for(&customer(c), partitions)
}
