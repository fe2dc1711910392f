//! Runs a target: every seed of its corpus, then mutated and generated
//! inputs for a time budget. Whatever breaks an invariant (a panic, a call
//! over its memory bound, a vague error, a broken round trip) is shrunk,
//! written to `artifacts/<target>/`, and fails the run.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs;
use std::os::unix::fs::FileExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use arbitrary::Unstructured;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::check::{KNOWN, Outcome, Violation, shape};
use crate::mutate::mutate;
use crate::targets::Target;

/// How long and how hard to fuzz one target.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Time spent mutating once the seeds ran.
    pub mutate_for: Duration,
    /// Seed of the random choices (a run is reproducible up to timing).
    pub seed: u64,
    /// Longest input tried.
    pub max_len: usize,
    /// Largest pool of inputs kept for mutation.
    pub max_pool: usize,
    /// At most this many mutated inputs (with the seed, a run of a fixed
    /// count is the same run on any machine).
    pub max_execs: Option<u64>,
}

impl Budget {
    pub fn seconds(seconds: f64) -> Self {
        Budget {
            mutate_for: Duration::from_secs_f64(seconds.max(0.0)),
            seed: 0x00C0_FFEE,
            max_len: 64 * 1024,
            max_pool: 4096,
            max_execs: None,
        }
    }

    /// The smoke run of `cargo test`: a fixed number of mutated inputs per
    /// target (`FUZZ_SMOKE_EXECS`, 300) from a fixed seed, so it is the same
    /// run on every machine and fails only when the code changed; finding
    /// new defects is `make fuzz`'s job.
    pub fn smoke() -> Self {
        let execs = std::env::var("FUZZ_SMOKE_EXECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        Budget {
            max_execs: Some(execs),
            ..Budget::seconds(3600.0)
        }
    }
}

/// What went wrong on one input.
#[derive(Debug, Clone)]
pub struct Failure {
    pub message: String,
    /// The (shrunk) input, written under `artifacts/<target>/`.
    pub artifact: Option<PathBuf>,
    pub input: Vec<u8>,
}

/// What one run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub target: &'static str,
    pub seeds: usize,
    pub execs: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Kinds of errors seen (quoted parts and numbers blanked).
    pub distinct_errors: usize,
    /// Kinds of accepted values seen.
    pub distinct_accepted: usize,
    /// Inputs kept for mutation at the end (seeds and new-outcome inputs).
    pub pool: usize,
    pub seconds: f64,
    pub slowest: Duration,
    /// Known defects hit ([`KNOWN`]), and how often.
    pub known: BTreeMap<&'static str, u64>,
    pub failures: Vec<Failure>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<10} {:>9} execs ({} seeds) {:>5} distinct errors {:>4} accepted shapes  pool {:>4}  {:>6.1} s  slowest {:>4} ms",
            self.target,
            self.execs,
            self.seeds,
            self.distinct_errors,
            self.distinct_accepted,
            self.pool,
            self.seconds,
            self.slowest.as_millis()
        )?;
        for (id, n) in &self.known {
            write!(f, "\n           known defect {id}: hit {n} times")?;
        }
        for failure in &self.failures {
            write!(f, "\n           FAILED: {}", failure.message)?;
            match &failure.artifact {
                Some(p) => write!(f, "\n           input: {}", p.display())?,
                None => write!(
                    f,
                    "\n           input: {:?}",
                    String::from_utf8_lossy(&failure.input)
                )?,
            }
        }
        Ok(())
    }
}

/// `fuzz/`, where the corpus and the artifacts live.
pub fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn corpus_dir(target: &str) -> PathBuf {
    fuzz_dir().join("corpus").join(target)
}

pub fn artifacts_dir(target: &str) -> PathBuf {
    fuzz_dir().join("artifacts").join(target)
}

/// The seeds of a target, by file name.
pub fn seeds(target: &str) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(corpus_dir(target))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let name = entry.file_name().to_string_lossy().into_owned();
            out.push((name, fs::read(entry.path())?));
        }
    }
    out.sort();
    Ok(out)
}

/// What one execution gave.
#[derive(Debug, Clone)]
enum Exec {
    Done(Outcome),
    Broke(Violation),
    Panicked(String),
}

impl Exec {
    /// An invariant broken that is not a known defect.
    fn failure(&self) -> Option<String> {
        match self {
            Exec::Done(_) => None,
            Exec::Broke(v) if v.known.is_some() => None,
            Exec::Broke(v) => Some(v.message.clone()),
            Exec::Panicked(m) => Some(format!("panicked: {m}")),
        }
    }
}

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Panics of targets are caught and reported; while an input is being
/// shrunk its repeated panics are not printed.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                default(info);
            }
        }));
    });
}

fn execute(target: &Target, bytes: &[u8]) -> (Exec, Duration) {
    let started = Instant::now();
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(bytes)));
    let exec = match result {
        Ok(Ok(outcome)) => Exec::Done(outcome),
        Ok(Err(violation)) => Exec::Broke(violation),
        Err(payload) => Exec::Panicked(
            payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic without a message".into()),
        ),
    };
    (exec, started.elapsed())
}

/// The file holding the input being run, so that an input that kills the
/// process (stack overflow, abort) is not lost: a run that ends normally
/// removes it; the next run finds it and tries it first.
struct LastInput {
    file: Option<fs::File>,
    path: PathBuf,
}

impl LastInput {
    fn open(dir: &Path) -> (Self, Option<Vec<u8>>) {
        let path = dir.join(format!("last-input-{}", std::process::id()));
        let leftover = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                // Left by a process that is gone (not one running now).
                p.file_name()
                    .and_then(|n| {
                        n.to_string_lossy()
                            .strip_prefix("last-input-")?
                            .parse::<u32>()
                            .ok()
                    })
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            })
            .find_map(|p| {
                let bytes = fs::read(&p).ok()?;
                let kept = dir.join(format!("crash-{:016x}", fnv(&bytes)));
                fs::rename(&p, &kept).ok()?;
                eprintln!(
                    "a previous run stopped while running {} (kept as {}): trying it first",
                    p.display(),
                    kept.display()
                );
                Some(bytes)
            });
        let file = fs::create_dir_all(dir)
            .and_then(|()| {
                fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .open(&path)
            })
            .ok();
        (LastInput { file, path }, leftover)
    }

    fn set(&self, bytes: &[u8]) {
        if let Some(f) = &self.file {
            let _ = f.set_len(0).and_then(|()| f.write_all_at(bytes, 0));
        }
    }
}

impl Drop for LastInput {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Shrinks a failing input by deleting chunks while it still fails
/// (at most a few thousand tries).
fn shrink(target: &Target, input: &[u8]) -> Vec<u8> {
    QUIET.with(|q| q.set(true));
    let mut best = input.to_vec();
    let mut tries = 0;
    let mut chunk = (best.len() / 2).max(1);
    while chunk >= 1 && tries < 4000 {
        let mut i = 0;
        let mut shrunk = false;
        while i < best.len() && tries < 4000 {
            let end = (i + chunk).min(best.len());
            let mut candidate = best[..i].to_vec();
            candidate.extend_from_slice(&best[end..]);
            tries += 1;
            if execute(target, &candidate).0.failure().is_some() {
                best = candidate;
                shrunk = true;
            } else {
                i += chunk;
            }
        }
        if chunk == 1 && !shrunk {
            break;
        }
        if !shrunk {
            chunk /= 2;
        }
    }
    QUIET.with(|q| q.set(false));
    best
}

fn save(target: &str, kind: &str, input: &[u8], message: &str) -> Option<PathBuf> {
    let dir = artifacts_dir(target);
    fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("{kind}-{:016x}", fnv(input)));
    fs::write(&path, input).ok()?;
    let mut note = path.clone().into_os_string();
    note.push(".txt");
    fs::write(note, message).ok()?;
    Some(path)
}

struct Run<'a> {
    target: &'a Target,
    report: Report,
    errors: HashSet<String>,
    accepted: HashSet<String>,
    pool: Vec<Vec<u8>>,
    last: LastInput,
    /// `FUZZ_SHOW_ERRORS=1`: print each error of a new shape (to review
    /// how precise the errors are).
    show_errors: bool,
}

impl Run<'_> {
    /// Runs one input; true when its outcome is of a new shape.
    fn one(&mut self, bytes: &[u8]) -> (Exec, bool) {
        self.last.set(bytes);
        let (exec, took) = execute(self.target, bytes);
        self.report.execs += 1;
        self.report.slowest = self.report.slowest.max(took);
        let new = match &exec {
            Exec::Done(Outcome::Accepted(s)) => {
                self.report.accepted += 1;
                self.accepted.len() < 100_000 && self.accepted.insert(shape(s))
            }
            Exec::Done(Outcome::Rejected(e)) => {
                self.report.rejected += 1;
                let new = self.errors.len() < 100_000 && self.errors.insert(shape(e));
                if new && self.show_errors {
                    eprintln!("{}: {e}", self.target.name);
                }
                new
            }
            Exec::Broke(v) => {
                if let Some(id) = v.known {
                    *self.report.known.entry(id).or_default() += 1;
                }
                false
            }
            Exec::Panicked(_) => false,
        };
        (exec, new)
    }

    fn fail(&mut self, bytes: &[u8], message: String) {
        let small = shrink(self.target, bytes);
        let message = match execute(self.target, &small).0.failure() {
            Some(m) if small.len() < bytes.len() => {
                format!("{message}\n           shrunk to {} bytes: {m}", small.len())
            }
            _ => message,
        };
        let kind = if message.contains("panicked: ") {
            "panic"
        } else if message.contains(" held ") {
            "memory"
        } else {
            "violation"
        };
        let artifact = save(self.target.name, kind, &small, &message);
        self.report.failures.push(Failure {
            message,
            artifact,
            input: small,
        });
    }
}

/// What a seed's name promises: `ok-*` is accepted, `err-*` refused
/// precisely, `bug-<known id>*` still shows that known defect; any other
/// name only must not break an invariant.
fn expectation(name: &str, exec: &Exec) -> Option<String> {
    if let Some(rest) = name.strip_prefix("bug-") {
        let Some((id, _)) = KNOWN.iter().find(|(id, _)| rest.starts_with(id)) else {
            return Some(format!(
                "seed {name}: names no known defect of check::KNOWN"
            ));
        };
        return match exec {
            Exec::Broke(v) if v.known == Some(id) => None,
            other => Some(format!(
                "seed {name} no longer shows known defect {id} ({other:?}): if it is fixed, remove it \
                 from check::KNOWN and rename the seed"
            )),
        };
    }
    if let Some(message) = exec.failure() {
        return Some(format!("seed {name}: {message}"));
    }
    match exec {
        Exec::Done(Outcome::Accepted(_)) if name.starts_with("err-") => {
            Some(format!("seed {name} should be refused, but was accepted"))
        }
        Exec::Done(Outcome::Rejected(e)) if name.starts_with("ok-") => Some(format!(
            "seed {name} should be accepted, but was refused: {e}"
        )),
        Exec::Broke(v) if name.starts_with("ok-") || name.starts_with("err-") => {
            Some(format!("seed {name}: {v}"))
        }
        _ => None,
    }
}

/// Fuzzes `target` within `budget`; stops at the first failure.
pub fn run(target: &Target, budget: &Budget) -> Report {
    install_panic_hook();
    let started = Instant::now();
    let (last, leftover) = LastInput::open(&artifacts_dir(target.name));
    let mut run = Run {
        target,
        report: Report {
            target: target.name,
            ..Report::default()
        },
        errors: HashSet::new(),
        accepted: HashSet::new(),
        pool: Vec::new(),
        last,
        show_errors: std::env::var_os("FUZZ_SHOW_ERRORS").is_some_and(|v| v == "1"),
    };

    let mut seeds = match seeds(target.name) {
        Ok(s) => s,
        Err(e) => {
            run.report.failures.push(Failure {
                message: format!("no corpus at {}: {e}", corpus_dir(target.name).display()),
                artifact: None,
                input: Vec::new(),
            });
            return run.report;
        }
    };
    if let Some(bytes) = leftover {
        seeds.insert(0, ("last input of a run that stopped".into(), bytes));
    }
    run.report.seeds = seeds.len();
    for (name, bytes) in &seeds {
        let (exec, _) = run.one(bytes);
        if let Some(message) = expectation(name, &exec) {
            run.fail(bytes, message);
            run.report.seconds = started.elapsed().as_secs_f64();
            return run.report;
        }
        run.pool.push(bytes.clone());
    }
    if run.pool.is_empty() {
        run.pool.push(Vec::new());
    }
    let fixed = run.pool.len();

    let mut rng = StdRng::seed_from_u64(budget.seed ^ fnv(target.name.as_bytes()));
    let deadline = Instant::now() + budget.mutate_for;
    let mut raw = vec![0u8; 4096];
    let mut execs = 0u64;
    while Instant::now() < deadline && budget.max_execs.is_none_or(|max| execs < max) {
        execs += 1;
        let pick = rng.random_range(0..100u32);
        let input = if pick < 10 {
            let n = rng.random_range(16..raw.len());
            rng.fill_bytes(&mut raw[..n]);
            let mut u = Unstructured::new(&raw[..n]);
            match (target.generate)(&mut u) {
                Ok(bytes) => bytes,
                Err(_) => continue,
            }
        } else if pick < 14 {
            let n = rng.random_range(0..256);
            (0..n).map(|_| rng.random()).collect()
        } else {
            let a = rng.random_range(0..run.pool.len());
            let b = rng.random_range(0..run.pool.len());
            mutate(
                &mut rng,
                &run.pool[a],
                &run.pool[b],
                target.dictionary,
                budget.max_len,
            )
        };
        let (exec, new) = run.one(&input);
        if let Some(message) = exec.failure() {
            run.fail(&input, message);
            break;
        }
        if new {
            if run.pool.len() < budget.max_pool {
                run.pool.push(input);
            } else {
                let i = rng.random_range(fixed..run.pool.len());
                run.pool[i] = input;
            }
        }
    }
    run.report.distinct_errors = run.errors.len();
    run.report.distinct_accepted = run.accepted.len();
    run.report.pool = run.pool.len();
    run.report.seconds = started.elapsed().as_secs_f64();
    run.report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::ensure;

    fn picky(bytes: &[u8]) -> Result<Outcome, Violation> {
        if bytes.windows(3).any(|w| w == b"bad") {
            panic!("found it");
        }
        ensure(!bytes.contains(&b'!'), || "an exclamation".into())?;
        Ok(Outcome::Rejected(format!("{} bytes", bytes.len())))
    }

    fn generate(u: &mut Unstructured<'_>) -> arbitrary::Result<Vec<u8>> {
        let s: String = u.arbitrary()?;
        Ok(s.into_bytes())
    }

    #[test]
    fn failures_are_shrunk_and_named() {
        let target = Target {
            name: "driver-self-test",
            about: "",
            run: picky,
            generate,
            dictionary: &[],
        };
        let (exec, _) = execute(&target, b"xxbadxx");
        assert!(
            matches!(exec, Exec::Panicked(ref m) if m == "found it"),
            "{exec:?}"
        );
        assert_eq!(shrink(&target, b"xxxxxxbadxxxxx"), b"bad");
        assert_eq!(shrink(&target, b"abc!def"), b"!");
        assert!(expectation("ok-x", &Exec::Done(Outcome::Rejected("no".into()))).is_some());
        assert!(expectation("err-x", &Exec::Done(Outcome::Rejected("no".into()))).is_none());
        assert!(expectation("bug-nothing", &Exec::Done(Outcome::Rejected("no".into()))).is_some());
    }

    #[test]
    fn the_last_input_of_a_process_that_died_is_kept_and_tried_again() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        fs::write(dir.path().join("last-input-999999999"), b"killer").expect("write");
        let mine = dir
            .path()
            .join(format!("last-input-{}", std::process::id()));
        fs::write(&mine, b"running").expect("write");
        let (last, leftover) = LastInput::open(dir.path());
        assert_eq!(leftover.as_deref(), Some(b"killer".as_slice()));
        assert!(
            dir.path()
                .join(format!("crash-{:016x}", fnv(b"killer")))
                .exists()
        );
        last.set(b"now");
        assert_eq!(fs::read(&mine).expect("read"), b"now");
        drop(last);
        assert!(!mine.exists(), "a run that ends removes its last input");
    }
}
