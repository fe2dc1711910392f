//! The query side: the single customer view for customer-service agents.
//!
//! - [`view`]: `ProfileQuery`, the view read from one projection generation;
//! - [`history`]: time travel, the view folded from the log up to an instant;
//! - [`explain`]: why identifiers are one customer;
//! - [`grpc`]: `ProfileService` and `IdentityService`;
//! - [`viewer`]: scope, masking and audit of every read;
//! - [`access`]: `AccessService` (reveal, audit, credentials);
//! - [`privacy`]: `PrivacyService` (consent, the consent gate, exports);
//! - [`console`]: the agent console and its JSON API;
//! - [`follow`]: live views across processes (`profile-changes`);
//! - [`install`]: what a process adds to serve all of it.

pub mod access;
pub mod audiences;
pub mod console;
pub mod erase;
pub mod explain;
pub mod follow;
pub mod grpc;
pub mod history;
pub mod install;
pub mod privacy;
pub mod view;
pub mod viewer;

pub use install::install;
pub use privacy::ConsentGate;
pub use view::{Loaded, Lookup, ProfileQuery};
pub use viewer::Viewer;
