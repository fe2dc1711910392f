//! Property tests of the reference model: the fold converges whatever the
//! order of events, re-delivery changes nothing, and joining the profiles of
//! merged customers equals folding all their events into one.

use std::collections::BTreeMap;

use cdp_domain::journey::{self, JourneyConfig};
use cdp_domain::profile::FoldOptions;
use cdp_domain::reference::ReferenceModel;
use cdp_domain::{
    Context, CustomerId, IdentityRules, Profile, Touchpoint, ValidationLimits, validate,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use uuid::Uuid;

const NOW: i64 = 1_800_000_000_000;

fn touchpoints(seed: u64, customers: usize) -> Vec<(usize, Touchpoint)> {
    let config = JourneyConfig {
        customers,
        start: NOW - 40 * 86_400_000,
        ..JourneyConfig::default()
    };
    let (_, events) = journey::generate(seed, &config);
    let rules = IdentityRules::default();
    events
        .into_iter()
        .map(|g| {
            let t = validate(
                &g.event,
                &rules,
                &ValidationLimits::default(),
                Context {
                    now: NOW,
                    fresh_event_id: Uuid::nil(),
                },
            )
            .unwrap_or_else(|e| panic!("generated event rejected: {e}"));
            (g.person, t)
        })
        .collect()
}

fn fold(events: &[&Touchpoint]) -> Profile {
    let mut p = Profile::new(CustomerId(Uuid::nil()));
    for t in events {
        p.apply(t, &FoldOptions::default());
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_fold_does_not_depend_on_event_order(seed in any::<u64>(), shuffle in any::<u64>()) {
        let events = touchpoints(seed, 1);
        let ordered: Vec<&Touchpoint> = events.iter().map(|(_, t)| t).collect();
        let mut shuffled = ordered.clone();
        shuffled.shuffle(&mut StdRng::seed_from_u64(shuffle));
        prop_assert_eq!(fold(&ordered).view(), fold(&shuffled).view());
    }

    #[test]
    fn redelivery_changes_nothing(seed in any::<u64>()) {
        let events = touchpoints(seed, 1);
        let once: Vec<&Touchpoint> = events.iter().map(|(_, t)| t).collect();
        let twice: Vec<&Touchpoint> = once.iter().chain(once.iter()).copied().collect();
        prop_assert_eq!(fold(&once).view(), fold(&twice).view());
    }

    #[test]
    fn absorbing_a_merged_profile_equals_folding_everything(seed in any::<u64>(), cut in 0usize..20) {
        let events = touchpoints(seed, 1);
        let all: Vec<&Touchpoint> = events.iter().map(|(_, t)| t).collect();
        let cut = cut.min(all.len());
        let mut left = fold(&all[..cut]);
        left.absorb(fold(&all[cut..]));
        prop_assert_eq!(left.view(), fold(&all).view());
    }

    /// Every generated person ends as exactly one customer whose view is the
    /// fold of that person's events, whatever order the stream had.
    #[test]
    fn the_reference_model_finds_every_person_once(seed in any::<u64>(), shuffle in any::<u64>()) {
        let mut events = touchpoints(seed, 8);
        events.shuffle(&mut StdRng::seed_from_u64(shuffle));
        let mut model = ReferenceModel::new(IdentityRules::default(), FoldOptions::default());
        for (_, t) in &events {
            model.apply(t).expect("the model's redirects are sound");
        }
        let customers = model.customers();
        prop_assert_eq!(customers.len(), 8);
        let mut by_person: BTreeMap<usize, Vec<&Touchpoint>> = BTreeMap::new();
        for (person, t) in &events {
            by_person.entry(*person).or_default().push(t);
        }
        for person_events in by_person.values() {
            let expected = fold(person_events).view();
            let any_id = &person_events[0].personal.identifiers[0];
            let got = model.profile_of(any_id).map(|p| p.view().without_id());
            prop_assert_eq!(got, Some(expected.without_id()));
        }
    }
}
