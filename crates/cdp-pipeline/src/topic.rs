//! The topics of the pipeline. Every process opens the log with [`ALL`].

pub use cdp_log::Topic;

/// Accepted touchpoints, keyed by routing identifier ([`crate::key::touchpoint`]):
/// the source of truth.
pub const TOUCHPOINTS: Topic = Topic::new("touchpoints");

/// The identity graph's changes (links, merges, ignored identifiers), keyed
/// by customer id.
pub const IDENTITY: Topic = Topic::new("identity");

/// Touchpoints with their customer id (and the merges their resolution
/// caused), keyed by customer id; each names its projection generation.
pub const RESOLVED: Topic = Topic::new("resolved");

/// Events accepted but not processed, with the stage and the reason.
pub const DEAD_LETTERS: Topic = Topic::new("dead-letters");

/// Who looked at which customer, when.
pub const AUDIT: Topic = Topic::new("audit");

/// Customers whose view changed, announced by the profile workers after
/// their store commit, so query services in other processes can refresh
/// live views.
pub const PROFILE_CHANGES: Topic = Topic::new("profile-changes");

/// What an operator should look at (identifiers quarantined as shared),
/// keyed by identifier.
pub const ALERTS: Topic = Topic::new("alerts");

/// API keys issued and revoked at run time (hashes only), keyed by id.
pub const CREDENTIALS: Topic = Topic::new("credentials");

/// Which dead letter was re-driven, when and by whom (`cdp.v1.RedriveRecord`),
/// keyed by the dead letter's position ([`crate::key::dead_letter`]).
pub const REDRIVES: Topic = Topic::new("redrives");

/// Erasure requests and their completion (`cdp.v1.Erasure`), keyed by
/// request id: the log's own record that a customer was erased.
pub const ERASURES: Topic = Topic::new("erasures");

/// Computed traits and segments saved and deleted
/// ([`crate::audience::DefinitionChange`]), keyed `trait/<name>` or
/// `segment/<name>`: every profile worker folds it.
pub const AUDIENCE_DEFINITIONS: Topic = Topic::new("audience-definitions");

/// Segment memberships entered and exited
/// ([`crate::audience::MembershipChange`]), keyed by customer id.
pub const AUDIENCE_CHANGES: Topic = Topic::new("audience-changes");

/// The progress of audience backfills ([`crate::audience::BackfillProgress`]),
/// keyed by projection generation: the latest record of a generation says
/// which definitions its profiles were last brought up to, and how far.
pub const AUDIENCE_BACKFILLS: Topic = Topic::new("audience-backfills");

/// Every topic of the pipeline.
pub const ALL: [Topic; 13] = [
    TOUCHPOINTS,
    IDENTITY,
    RESOLVED,
    DEAD_LETTERS,
    AUDIT,
    PROFILE_CHANGES,
    ALERTS,
    CREDENTIALS,
    REDRIVES,
    ERASURES,
    AUDIENCE_DEFINITIONS,
    AUDIENCE_CHANGES,
    AUDIENCE_BACKFILLS,
];
