//! The consumer groups of the pipeline's workers.
//!
//! Each projection generation has its own identity group on `touchpoints`
//! ([`identity`]): a rebuild fills a new generation under it, and the
//! identity workers carry on under it from where the rebuild stopped once
//! the generation is active, so no event is skipped or resolved twice into
//! one generation. Profile workers have one group on `resolved` whatever
//! the generation: records name theirs ([`crate::header::GENERATION`]).

use cdp_store::FIRST_GENERATION;

/// The identity group of the first generation.
pub const IDENTITY: &str = "cdp-identity";

/// The group of the profile workers on `resolved`.
pub const PROFILE: &str = "cdp-profile";

/// The identity consumer group of `generation`.
pub fn identity(generation: u32) -> String {
    if generation == FIRST_GENERATION {
        IDENTITY.to_owned()
    } else {
        format!("{IDENTITY}-g{generation}")
    }
}

/// A group of its own for one query process following `profile-changes`
/// (every query replica must see every announcement).
pub fn changes_follower(instance: uuid::Uuid) -> String {
    format!("cdp-query-{}", instance.simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_generation_keeps_the_historical_group_name() {
        assert_eq!(identity(1), "cdp-identity");
        assert_eq!(identity(3), "cdp-identity-g3");
    }
}
