//! `cdp-fuzz`: the long fuzz run of `make fuzz`.
//!
//! ```text
//! cdp-fuzz [--seconds N] [--seed S] [TARGET...]   fuzz (all targets by default)
//! cdp-fuzz --list                                  the targets
//! cdp-fuzz --write-seeds                           (re)write the encoded seeds
//! ```
//!
//! `--seconds` defaults to `FUZZ_SECONDS`, else 60, per target.

use std::process::ExitCode;

use cdp_fuzz::driver::{self, Budget};
use cdp_fuzz::{TARGETS, seeds, target};

fn main() -> ExitCode {
    let mut seconds: f64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let mut seed = None;
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--list" => {
                for t in TARGETS {
                    println!("{:<10} {}", t.name, t.about);
                }
                return ExitCode::SUCCESS;
            }
            "--write-seeds" => return write_seeds(),
            "--seconds" => match args.next().and_then(|s| s.parse().ok()) {
                Some(s) => seconds = s,
                None => return usage("--seconds needs a number"),
            },
            "--seed" => match args.next().and_then(|s| s.parse().ok()) {
                Some(s) => seed = Some(s),
                None => return usage("--seed needs a number"),
            },
            name if target(name).is_some() => names.push(name.to_owned()),
            other => return usage(&format!("unknown target or option {other:?}")),
        }
    }
    let targets: Vec<_> = if names.is_empty() {
        TARGETS.iter().collect()
    } else {
        names.iter().filter_map(|n| target(n)).collect()
    };
    let mut budget = Budget::seconds(seconds);
    if let Some(s) = seed {
        budget.seed = s;
    }
    println!(
        "fuzzing {} targets, {seconds} s of mutation each, seed {}; corpus in {}, artifacts in {}",
        targets.len(),
        budget.seed,
        driver::fuzz_dir().join("corpus").display(),
        driver::fuzz_dir().join("artifacts").display()
    );
    let mut failed = 0;
    let mut execs = 0;
    for t in targets {
        let report = driver::run(t, &budget);
        println!("{report}");
        execs += report.execs;
        if !report.ok() {
            failed += 1;
        }
    }
    println!("{execs} executions; {failed} targets failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!(
        "{problem}\nusage: cdp-fuzz [--seconds N] [--seed S] [TARGET...] | --list | --write-seeds"
    );
    ExitCode::from(2)
}

fn write_seeds() -> ExitCode {
    for (target, name, bytes) in seeds::encoded() {
        let path = driver::corpus_dir(target).join(&name);
        if let Err(e) = std::fs::create_dir_all(driver::corpus_dir(target))
            .and_then(|()| std::fs::write(&path, bytes))
        {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
