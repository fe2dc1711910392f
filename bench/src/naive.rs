//! The simplest correct design a reader would write, to compare against:
//! one process, one redb file, and for each event one durable transaction
//! that looks its identifiers up, reads the profile, folds the event into it
//! with the same domain fold, and writes it back. No log, no batching, no
//! merges (the first known identifier wins).

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use cdp_domain::profile::{ProfileAccess, ProfileSlot, fold_resolved};
use cdp_domain::{
    CustomerId, FoldOptions, IdentityRules, RawTouchpoint, ResolvedTouchpoint, ValidationLimits,
    validate,
};
use redb::{Database, Durability, ReadableTable, Table, TableDefinition};

const IDS: TableDefinition<&str, u128> = TableDefinition::new("ids");
const PROFILES: TableDefinition<u128, &[u8]> = TableDefinition::new("profiles");

struct Access<'a, 'b>(&'a mut Table<'b, u128, &'static [u8]>);

impl ProfileAccess for Access<'_, '_> {
    type Error = anyhow::Error;

    fn load(&mut self, customer: CustomerId) -> anyhow::Result<Option<ProfileSlot>> {
        match self.0.get(customer.0.as_u128())? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    fn save(&mut self, customer: CustomerId, slot: ProfileSlot) -> anyhow::Result<()> {
        self.0
            .insert(customer.0.as_u128(), serde_json::to_vec(&slot)?.as_slice())?;
        Ok(())
    }
}

/// Events per second of the naive design over `events`.
pub fn run(dir: &Path, events: &[RawTouchpoint]) -> anyhow::Result<f64> {
    let db = Database::create(dir.join("naive.redb")).context("naive store")?;
    let rules = IdentityRules::default();
    let limits = ValidationLimits::default();
    let options = FoldOptions::default();
    let started = Instant::now();
    for raw in events {
        let now = cdp_e2e::now_ms();
        let Ok(t) = validate(
            raw,
            &rules,
            &limits,
            cdp_domain::Context {
                now,
                fresh_event_id: uuid::Uuid::new_v4(),
            },
        ) else {
            continue;
        };
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut ids = tx.open_table(IDS)?;
            let mut known = None;
            for id in &t.personal.identifiers {
                if let Some(c) = ids.get(id.key().as_str())? {
                    known = Some(c.value());
                    break;
                }
            }
            let customer = known.unwrap_or_else(|| t.envelope.event_id.0.as_u128());
            for id in &t.personal.identifiers {
                ids.insert(id.key().as_str(), customer)?;
            }
            let mut profiles = tx.open_table(PROFILES)?;
            fold_resolved(
                &mut Access(&mut profiles),
                &ResolvedTouchpoint {
                    customer_id: CustomerId(uuid::Uuid::from_u128(customer)),
                    merges: Vec::new(),
                    touchpoint: t,
                },
                &options,
            )?;
        }
        tx.commit()?;
    }
    Ok(events.len() as f64 / started.elapsed().as_secs_f64())
}
