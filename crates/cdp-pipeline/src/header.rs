//! The headers of log records.

/// The event id of a touchpoint or resolved record (text UUID), so a tool
/// can tell which event a record carries without decoding it.
pub const EVENT_ID: &str = "cdp-event-id";

/// The message and schema version of a record's value,
/// `cdp.v1.TouchpointRecord/1`.
pub const SCHEMA: &str = "cdp-schema";

/// The projection generation (decimal) that resolved a `resolved` record.
/// Records without it belong to the first generation.
pub const GENERATION: &str = "cdp-generation";

/// The W3C trace context of the request that brought the event in: ingest
/// writes it on the touchpoint record and identity copies it onto the
/// resolved one, so one trace id follows the event through the log.
pub const TRACEPARENT: &str = "traceparent";

/// Set on the records a rebuild appends for its generation, long after the
/// events arrived: their append time says nothing of when the events
/// reached the views, their arrival does (see
/// [`crate::emit::reached_views_at`]).
pub const REBUILT: &str = "cdp-rebuilt";

/// Set on a `touchpoints` record appended again from a dead letter, naming
/// it (`dead-letters/<partition>/<offset>`): the event is already in the
/// log at its first position, so replay leaves the copy out, and the views
/// fold it once (folds are idempotent per event).
pub const REDRIVE_OF: &str = "cdp-redrive-of";

/// The subjects (HMACs of identifiers, 32 bytes each) whose keys open a
/// record's sealed parts, so a reader fetches a batch's keys before
/// decoding it (see [`crate::seal`]).
pub const SUBJECTS: &str = "cdp-subjects";
