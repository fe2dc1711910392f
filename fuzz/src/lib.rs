//! Fuzz targets for every decoder of untrusted bytes, and a driver that
//! runs them on stable Rust.
//!
//! A target ([`Target`]) takes bytes, hands them to the real decoder, and
//! checks its invariants: no panic, at most [`check::memory_bound`] bytes
//! held at once by one decoder call, every reject a precise error (a field
//! or a position named), and, where the decoder produces a value, the
//! round trip or idempotence that value promises. The driver ([`driver`])
//! first runs every seed of `fuzz/corpus/<target>/`, then mutates seeds
//! ([`mutate`]) and generates structured inputs for a time budget, keeping
//! the inputs that produce a new kind of outcome. Whatever breaks an
//! invariant is written to `fuzz/artifacts/<target>/` and fails the run.
//!
//! There is no coverage instrumentation (that needs nightly or an external
//! AFL build): the feedback is the outcome, an error of a new shape or an
//! accepted value of a new shape.

pub mod check;
pub mod driver;
pub mod inputs;
pub mod mutate;
pub mod seeds;
pub mod targets;

pub use check::{Outcome, Violation};
pub use driver::{Budget, Report};
pub use targets::{TARGETS, Target, target};
