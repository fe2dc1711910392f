//! `cdp-bench --identity`: identity-resolution accuracy scored on the real
//! store through the running service. The population of
//! `cdp_domain::accuracy` with its field traps (shared store tablets, a
//! family's Zalo, placeholder and cashier's phones, recycled numbers, two
//! SIMs, look-alike emails, family home phones, email changers) goes in over
//! gRPC as adapters would send it, with the default rules and no operator
//! list; then each event's recorded decision (`IdentityService/GetDecision`)
//! and the customer it belongs to now (`GetProfile`) are compared with the
//! truth: pairwise precision and recall overall and per trap.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cdp_domain::accuracy::{self, PopulationConfig, Role};
use cdp_e2e::{Backend, CdpProcess, to_api};
use cdp_proto::v1::identity_service_client::IdentityServiceClient;
use cdp_proto::v1::ingest_service_client::IngestServiceClient;
use cdp_proto::v1::profile_service_client::ProfileServiceClient;
use cdp_proto::v1::projection_service_client::ProjectionServiceClient;
use cdp_proto::v1::{
    GetDecisionRequest, GetProfileRequest, TrackBatchRequest, get_profile_request::Lookup,
};
use serde_json::{Value, json};
use tokio_stream::StreamExt as _;

/// Scores the population through a running platform.
pub async fn run(
    backend: Backend,
    config: &str,
    customers: usize,
    field_traps: f64,
    seed: u64,
    backlog: bool,
) -> anyhow::Result<Value> {
    let mut population = accuracy::population(
        seed,
        &PopulationConfig {
            customers,
            field_trap_share: field_traps,
            ..PopulationConfig::default()
        },
    );
    // The population's calendar ends an hour ago (the service refuses
    // events from the future).
    let last = population
        .events
        .iter()
        .filter_map(|(_, e)| e.occurred_at)
        .max()
        .unwrap_or(0);
    let shift = cdp_e2e::now_ms() - 3_600_000 - last;
    for (_, e) in &mut population.events {
        e.occurred_at = e.occurred_at.map(|at| at + shift);
    }
    eprintln!(
        "[bench] identity through the service ({backend:?}): {} people, {} events",
        population.roles.len(),
        population.events.len()
    );
    let cdp = CdpProcess::start_on(backend, config);
    let mut ingest = IngestServiceClient::new(cdp.ingest_channel().await);
    let mut projections = ProjectionServiceClient::new(cdp.projection_channel().await);
    let started = Instant::now();
    let mut sent = Vec::with_capacity(population.events.len());
    // In stream order, as a live stream brings them: the events of each six
    // hours of the population's calendar (at most 500) are resolved before
    // the next arrive. A backlog is resolved partition by partition, so
    // events of one person keyed by different identifiers may be decided
    // out of their order (see docs/identity.md); a live stream is not.
    const WINDOW_MS: i64 = 6 * 3_600_000;
    let mut chunks: Vec<&[(usize, cdp_domain::RawTouchpoint)]> = Vec::new();
    let mut from = 0;
    for i in 1..=population.events.len() {
        let window = |k: usize| population.events[k].1.occurred_at.unwrap_or(0) / WINDOW_MS;
        let split = i == population.events.len()
            || i - from >= 500
            || (!backlog && window(i) != window(from));
        if split {
            chunks.push(&population.events[from..i]);
            from = i;
        }
    }
    for chunk in chunks {
        let touchpoints: Vec<_> = chunk.iter().map(|(_, raw)| to_api(raw)).collect();
        let r = ingest
            .track_batch(TrackBatchRequest {
                touchpoints: touchpoints.clone(),
            })
            .await?
            .into_inner();
        if let Some(bad) = r.results.iter().find(|x| !x.violations.is_empty()) {
            bail!(
                "the service rejected {} generated events, the first: {:?}",
                r.rejected,
                bad.violations
            );
        }
        sent.extend(
            chunk
                .iter()
                .map(|(person, _)| *person)
                .zip(touchpoints.into_iter().map(|t| t.event_id)),
        );
        if !backlog {
            crate::drain(&mut projections, Instant::now(), Duration::from_secs(600)).await?;
        }
    }
    crate::drain(&mut projections, Instant::now(), Duration::from_secs(3600)).await?;
    let pipeline_secs = started.elapsed().as_secs_f64();

    let channel = cdp.query_channel().await;
    let decisions: Vec<(usize, Option<String>)> = tokio_stream::iter(sent)
        .map(|(person, event_id)| {
            let mut identity = IdentityServiceClient::new(channel.clone());
            async move {
                let d = identity
                    .get_decision(GetDecisionRequest { event_id })
                    .await?
                    .into_inner();
                Ok::<_, anyhow::Error>((person, d.resolved.then_some(d.customer_id)))
            }
        })
        .then(|f| f)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    // The customer each decision's customer belongs to now (merges followed).
    let mut profiles = ProfileServiceClient::new(channel.clone());
    let mut now_of: HashMap<String, String> = HashMap::new();
    let mut records = Vec::with_capacity(decisions.len());
    let mut unresolved = 0usize;
    for (person, customer) in decisions {
        let Some(customer) = customer else {
            unresolved += 1;
            continue;
        };
        if !now_of.contains_key(&customer) {
            let p = profiles
                .get_profile(GetProfileRequest {
                    lookup: Some(Lookup::CustomerId(customer.clone())),
                    timeline_limit: 0,
                    as_of: None,
                })
                .await
                .with_context(|| format!("GetProfile {customer}"))?
                .into_inner()
                .profile
                .context("a profile without a body")?;
            now_of.insert(customer.clone(), p.customer_id);
        }
        let now = now_of.get(&customer).cloned().unwrap_or(customer);
        records.push((person, uuid::Uuid::parse_str(&now)?));
    }
    let overall = accuracy::score(&records);
    let traps: Vec<(Role, accuracy::PairScore)> = Role::ALL
        .iter()
        .filter(|r| population.roles.contains(r))
        .map(|r| {
            (
                *r,
                accuracy::score_touching(&records, &population.roles, *r),
            )
        })
        .collect();
    let s = |p: &accuracy::PairScore| {
        json!({"precision": p.precision, "recall": p.recall, "f1": p.f1,
               "predicted_pairs": p.predicted_pairs, "true_pairs": p.true_pairs})
    };
    Ok(json!({
        "backend": format!("{backend:?}"),
        "mode": if backlog { "backlog" } else { "live" },
        "people": population.roles.len(),
        "events": population.events.len(),
        "unresolved_events": unresolved,
        "pipeline_secs": pipeline_secs,
        "overall": s(&overall),
        "traps": traps.iter().map(|(r, p)| (r.name().to_owned(), s(p))).collect::<serde_json::Map<_, _>>(),
    }))
}

pub fn print(r: &Value) {
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "\n== identity through the service ({}, {}): {} people, {} events, {} unresolved ==",
        r["backend"].as_str().unwrap_or("?"),
        r["mode"].as_str().unwrap_or("?"),
        r["people"],
        r["events"],
        r["unresolved_events"]
    );
    let o = &r["overall"];
    println!(
        "  overall: precision {:.4}, recall {:.4}, F1 {:.4}",
        f(o, "precision"),
        f(o, "recall"),
        f(o, "f1")
    );
    println!(
        "  {:<28} {:>9} {:>9} {:>15} {:>11}",
        "trap (pairs touching it)", "precision", "recall", "predicted pairs", "true pairs"
    );
    if let Some(traps) = r["traps"].as_object() {
        for (name, t) in traps {
            println!(
                "  {:<28} {:>9.4} {:>9.4} {:>15} {:>11}",
                name,
                f(t, "precision"),
                f(t, "recall"),
                t["predicted_pairs"],
                t["true_pairs"]
            );
        }
    }
}
