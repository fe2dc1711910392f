//! `make bench-identity`: identity-resolution accuracy on a synthetic
//! population with ground truth (shared POS devices, family phones,
//! customers who change email, marketplace ids seen once, identifiers in
//! many forms). Prints pairwise precision, recall and F1 of the resolved
//! customers, on everyone and on each trap: with the default rules, with the
//! family phones on the block list, and with a phone outranking the loyalty
//! card (the trap), plus identity decisions per second; writes
//! `target/bench/identity.json`.

use cdp_domain::accuracy::{self, Evaluation, PopulationConfig};
use cdp_domain::rules::{IdentityRules, IdentityRulesConfig};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Identity-resolution accuracy and speed")]
struct Args {
    #[arg(long, default_value_t = 20_000)]
    customers: usize,
    #[arg(long, default_value_t = 8)]
    events_per_customer: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// People per field trap (shared tablets, a family's Zalo, placeholder
    /// and cashier's phones, recycled numbers, two SIMs, look-alike emails),
    /// as a share of the customers.
    #[arg(long, default_value_t = 0.03)]
    field_traps: f64,
    #[arg(long, default_value = "target/bench/identity.json")]
    out: std::path::PathBuf,
}

fn line(name: &str, e: &Evaluation) {
    println!(
        "  {name:<28} overall P {:.4} R {:.4} F1 {:.4} | families P {:.4} R {:.4} | email changers R {:.4} | {:>8.0} decisions/s",
        e.overall.precision,
        e.overall.recall,
        e.overall.f1,
        e.families.precision,
        e.families.recall,
        e.email_changers.recall,
        e.decisions_per_second
    );
}

fn json(e: &Evaluation) -> serde_json::Value {
    let s = |p: &accuracy::PairScore| serde_json::json!({"precision": p.precision, "recall": p.recall, "f1": p.f1});
    let traps: serde_json::Map<String, serde_json::Value> = e
        .traps
        .iter()
        .map(|(r, p)| (r.name().to_owned(), s(p)))
        .collect();
    serde_json::json!({
        "overall": s(&e.overall), "families": s(&e.families), "email_changers": s(&e.email_changers),
        "traps": traps,
        "decisions": e.decisions, "unresolvable": e.unresolvable, "decisions_per_second": e.decisions_per_second,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let population = accuracy::population(
        args.seed,
        &PopulationConfig {
            customers: args.customers,
            events_per_customer: args.events_per_customer,
            field_trap_share: args.field_traps,
            ..PopulationConfig::default()
        },
    );
    let default_rules = IdentityRules::default();
    let mut guarded = IdentityRulesConfig::default();
    if let Some(phone) = guarded.kinds.get_mut("phone") {
        phone
            .blocked
            .extend(population.family_phones.iter().cloned());
    }
    let guarded = IdentityRules::new(guarded)?;
    // The trap itself: a phone given at the counter outranking the loyalty card.
    let mut phone_first = IdentityRulesConfig::default();
    if let Some(phone) = phone_first.kinds.get_mut("phone") {
        phone.priority = 2;
    }
    let phone_first = IdentityRules::new(phone_first)?;
    println!(
        "identity resolution, {} customers, {} events, {} family phones (seed {})",
        args.customers,
        population.events.len(),
        population.family_phones.len(),
        args.seed
    );
    let unguarded = accuracy::evaluate(&population, &default_rules);
    let blocked = accuracy::evaluate(&population, &guarded);
    let trapped = accuracy::evaluate(&population, &phone_first);
    line("default rules", &unguarded);
    line("family phones blocked", &blocked);
    line("phone before loyalty card", &trapped);
    println!("  per trap, default rules (pairs touching its people):");
    println!(
        "    {:<28} {:>9} {:>9} {:>14} {:>11}",
        "trap", "precision", "recall", "predicted pairs", "true pairs"
    );
    for (role, s) in &unguarded.traps {
        println!(
            "    {:<28} {:>9.4} {:>9.4} {:>14} {:>11}",
            role.name(),
            s.precision,
            s.recall,
            s.predicted_pairs,
            s.true_pairs
        );
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let figures = serde_json::json!({
        "customers": args.customers, "events": population.events.len(), "seed": args.seed,
        "default_rules": json(&unguarded), "family_phones_blocked": json(&blocked),
        "phone_before_loyalty": json(&trapped),
    });
    std::fs::write(&args.out, serde_json::to_vec_pretty(&figures)?)?;
    println!("  written to {}", args.out.display());
    Ok(())
}
