//! The CDP's domain: the event model, validation, identifier normalisation,
//! identity rules and the profile fold. Pure logic: no async runtime, no
//! network, no storage. Everything else in the workspace calls into it.
//!
//! The `testsuite` feature adds what tests and benchmarks need and
//! production does not: generated journeys (`journey`), the sequential
//! reference model (`reference`) and the identity accuracy benchmark
//! (`accuracy`), with the `rand` they use.

pub mod access;
#[cfg(any(test, feature = "testsuite"))]
pub mod accuracy;
pub mod audience;
pub mod consent;
pub mod event;
pub mod identity;
#[cfg(any(test, feature = "testsuite"))]
pub mod journey;
pub mod normalize;
pub mod profile;
pub mod props;
pub mod redirect;
#[cfg(any(test, feature = "testsuite"))]
pub mod reference;
pub mod rules;
pub mod search;
pub mod timeline;
pub mod validate;

pub use event::{
    Attributes, Channel, CustomerId, DroppedIdentifier, Envelope, EventId, EventType, IdKind,
    Identifier, Personal, RawIdentifier, RawTouchpoint, Touchpoint, UnixMillis,
};
pub use identity::{Decision, Merge, Resolution, ResolvedTouchpoint};
pub use profile::{FoldOptions, Profile, ProfileView};
pub use rules::{IdentityRules, IdentityRulesConfig, ValidationLimits};
pub use timeline::TimelineEntry;
pub use validate::{Context, FieldError, Rejection, validate};
