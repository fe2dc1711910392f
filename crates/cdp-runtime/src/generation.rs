//! How the pipeline names projection generations on the log (see
//! `cdp_store::generations`).
//!
//! - Each generation has its own identity consumer group on `touchpoints`
//!   ([`identity_group`]): the rebuild fills a new generation under it, and
//!   the identity workers carry on under it from where the rebuild stopped
//!   once the generation is active. A restart resumes under the group of the
//!   active generation, so no event is skipped or resolved twice into one
//!   generation.
//! - Resolved records name their generation ([`HEADER`]); profile workers
//!   fold only the active generation's records into it.

use cdp_store::{FIRST_GENERATION, LiveStores};
use tokio_util::sync::CancellationToken;

/// The record header holding the generation (decimal) of a resolved record.
/// Records without it belong to the first generation.
pub const HEADER: &str = "cdp-generation";

/// The consumer group of the profile workers (on `resolved`, whatever the
/// generation: records name theirs).
pub const PROFILE_GROUP: &str = "cdp-profile";

/// The identity consumer group of the first generation.
pub const IDENTITY_GROUP: &str = "cdp-identity";

/// The identity consumer group of `generation`.
pub fn identity_group(generation: u32) -> String {
    if generation == FIRST_GENERATION {
        IDENTITY_GROUP.to_owned()
    } else {
        format!("{IDENTITY_GROUP}-g{generation}")
    }
}

/// The generation a record names (the first one when it names none).
pub fn of_record(header: Option<&[u8]>) -> Option<u32> {
    match header {
        None => Some(FIRST_GENERATION),
        Some(h) => std::str::from_utf8(h).ok()?.parse().ok(),
    }
}

/// A token that fires when `parent` does or when `live` switches away from
/// `generation`.
pub fn until_switch(
    live: &LiveStores,
    generation: u32,
    parent: &CancellationToken,
) -> CancellationToken {
    let token = parent.child_token();
    let fire = token.clone();
    let mut switches = live.switches();
    tokio::spawn(async move {
        tokio::select! {
            _ = fire.cancelled() => {}
            switched = switches.wait_for(|served| *served != generation) => {
                // An error means the stores are gone: the process is ending.
                if switched.is_ok() {
                    fire.cancel();
                }
            }
        }
    });
    token
}
