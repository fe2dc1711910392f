//! The smoke run of every fuzz target, part of `cargo test`: all seeds,
//! then a fixed number of mutated inputs from a fixed seed
//! (`FUZZ_SMOKE_EXECS`), so it passes or fails alike on every machine. The
//! long run, which looks for new defects, is `make fuzz`.

use cdp_fuzz::check::KNOWN;
use cdp_fuzz::driver::{self, Budget};
use cdp_fuzz::{TARGETS, target};

fn smoke(name: &str) {
    let t = target(name).expect("a target of that name");
    let report = driver::run(t, &Budget::smoke());
    println!("{report}");
    assert!(report.ok(), "{report}");
    assert!(report.seeds > 0, "{name} has no seeds");
    assert!(
        report.accepted > 0 && report.rejected > 0,
        "{name}: the run must see both accepted and refused inputs: {report}"
    );
}

macro_rules! smoke_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                smoke(stringify!($name));
            }
        )*

        #[test]
        fn every_target_has_a_smoke_test() {
            let tested = [$(stringify!($name)),*];
            for t in TARGETS {
                assert!(tested.contains(&t.name), "target {} has no smoke test", t.name);
            }
        }
    };
}

smoke_tests!(
    segment, zalo, messenger, codec, identifier, validate, rules, config
);

#[test]
fn every_known_defect_has_a_regression_seed() {
    for (id, _) in KNOWN {
        let found = TARGETS.iter().any(|t| {
            driver::seeds(t.name)
                .expect("corpus")
                .iter()
                .any(|(name, _)| name.starts_with(&format!("bug-{id}")))
        });
        assert!(found, "known defect {id} has no bug-{id}* seed");
    }
}
