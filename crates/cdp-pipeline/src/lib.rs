//! The pipeline's contract: everything two stages must agree on to talk
//! through the event log, in one place.
//!
//! - [`topic`]: the topics and what each holds;
//! - [`key`]: how each topic's records are keyed (the key decides the
//!   partition, and so what stays in order);
//! - [`header`]: the record headers (event id, schema, generation, trace);
//! - [`group`]: the consumer groups of the workers;
//! - [`codec`]: the protobuf encoding of records (`proto/cdp/v1/log.proto`);
//! - [`emit`]: the records each stage appends, as pure functions, and the
//!   readers of what other stages appended;
//! - [`audience`]: the audience definitions and membership changes.
//!
//! A new worker (an audience, a journey, an outbound channel) plugs in
//! here: it reads a topic of [`topic`] under a group of its own, decodes
//! with [`emit`], and appends what [`emit`] builds. No I/O happens in this
//! crate; the log itself is the `cdp_log::EventLog` port.

pub mod audience;
pub mod audit;
pub mod codec;
pub mod credentials;
pub mod emit;
pub mod group;
pub mod header;
pub mod key;
pub mod seal;
pub mod topic;

pub use audit::{AuditEntry, Sealed};
pub use codec::{CodecError, SCHEMA_VERSION};
pub use emit::{Outputs, Stage};
pub use topic::Topic;
