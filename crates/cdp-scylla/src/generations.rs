//! Projection generations on ScyllaDB: generation 1 is the configured
//! keyspace, generation `n` the keyspace `<keyspace>_g<n>`. The registry
//! and the active pointer live in the configured keyspace, beside the
//! event log's idempotency index, which belongs to no generation.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use cdp_store::{
    FIRST_GENERATION, GenerationInfo, Generations, ProjectionStores, StoreError,
    generations::check_activation,
};
use tokio::sync::Mutex;
use tracing::info;

use crate::{Lwt, ScyllaConfig, ScyllaStore, exec_error, now_ms, prepare_error, storage};

pub struct ScyllaGenerations {
    config: ScyllaConfig,
    /// Generation 1: also the home of the registry.
    base: ScyllaStore,
    open: Mutex<BTreeMap<u32, ScyllaStore>>,
    seal: cdp_store::ViewSeal,
}

impl ScyllaGenerations {
    /// Connects to the configured keyspace (creating it and the registry
    /// when missing).
    pub async fn connect(config: &ScyllaConfig) -> Result<Self, StoreError> {
        let base = ScyllaStore::connect(config).await?;
        Self::with_base(config, base).await
    }

    /// Uses an open store of the configured keyspace as generation 1.
    pub async fn with_base(config: &ScyllaConfig, base: ScyllaStore) -> Result<Self, StoreError> {
        let ks = base.keyspace().to_owned();
        // The first generation and the pointer exist from the start.
        for cql in [
            format!(
                "INSERT INTO {ks}.generations (id, created_at) VALUES ({FIRST_GENERATION}, {}) IF NOT EXISTS",
                now_ms()
            ),
            format!(
                "INSERT INTO {ks}.generation_active (k, id) VALUES (0, {FIRST_GENERATION}) IF NOT EXISTS"
            ),
        ] {
            base.session()
                .query_unpaged(cql, ())
                .await
                .map_err(exec_error)?;
        }
        let mut open = BTreeMap::new();
        open.insert(FIRST_GENERATION, base.clone());
        Ok(ScyllaGenerations {
            config: config.clone(),
            base,
            open: Mutex::new(open),
            seal: cdp_store::ViewSeal::clear(),
        })
    }

    /// Every generation's views sealed under customer keys from `seal`.
    pub fn with_seal(mut self, seal: cdp_store::ViewSeal) -> Self {
        self.base = self.base.clone().with_seal(seal.clone());
        let open = self.open.get_mut();
        for store in open.values_mut() {
            *store = store.clone().with_seal(seal.clone());
        }
        self.seal = seal;
        self
    }

    /// The store of generation 1, which also holds the log's idempotency index.
    pub fn base(&self) -> &ScyllaStore {
        &self.base
    }

    fn keyspace_of(&self, id: u32) -> String {
        if id == FIRST_GENERATION {
            self.config.keyspace.clone()
        } else {
            format!("{}_g{id}", self.config.keyspace)
        }
    }

    fn ks(&self) -> &str {
        self.base.keyspace()
    }
}

fn to_i32(id: u32) -> Result<i32, StoreError> {
    i32::try_from(id).map_err(|_| StoreError::Invalid(format!("generation {id} is too large")))
}

#[async_trait]
impl Generations for ScyllaGenerations {
    async fn active(&self) -> Result<u32, StoreError> {
        let rows = self
            .base
            .session()
            .query_unpaged(
                format!("SELECT id FROM {}.generation_active WHERE k = 0", self.ks()),
                (),
            )
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(storage)?;
        let row: Option<(Option<i32>,)> = rows.maybe_first_row().map_err(storage)?;
        Ok(row
            .and_then(|(id,)| id)
            .and_then(|id| u32::try_from(id).ok())
            .unwrap_or(FIRST_GENERATION))
    }

    async fn list(&self) -> Result<Vec<GenerationInfo>, StoreError> {
        let active = self.active().await?;
        let rows = self
            .base
            .session()
            .query_unpaged(
                format!("SELECT id, created_at FROM {}.generations", self.ks()),
                (),
            )
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(storage)?;
        let mut list = Vec::new();
        for row in rows.rows::<(i32, Option<i64>)>().map_err(storage)? {
            let (id, created_at) = row.map_err(storage)?;
            let id = u32::try_from(id).map_err(|_| StoreError::Corrupt {
                what: "generation registry",
                reason: format!("generation id {id}"),
            })?;
            list.push(GenerationInfo {
                id,
                created_at: created_at.unwrap_or(0),
                active: id == active,
            });
        }
        list.sort_by_key(|g| g.id);
        Ok(list)
    }

    async fn open(&self, id: u32) -> Result<ProjectionStores, StoreError> {
        if id == 0 {
            return Err(StoreError::Invalid(
                "generations are numbered from 1".into(),
            ));
        }
        let mut open = self.open.lock().await;
        let store = match open.get(&id) {
            Some(s) => s.clone(),
            None => {
                let config = ScyllaConfig {
                    keyspace: self.keyspace_of(id),
                    ..self.config.clone()
                };
                let store = ScyllaStore::connect(&config)
                    .await?
                    .with_seal(self.seal.clone());
                // A graph written before sealing: its claims hashed first.
                store.seal_claims().await?;
                open.insert(id, store.clone());
                store
            }
        };
        self.base
            .session()
            .query_unpaged(
                format!(
                    "INSERT INTO {}.generations (id, created_at) VALUES (?, ?) IF NOT EXISTS",
                    self.ks()
                ),
                (to_i32(id)?, now_ms()),
            )
            .await
            .map_err(exec_error)?;
        if id > self.kept_highest().await? {
            // One projection service opens generations; a lost race only
            // keeps a lower mark, which the listed generations still cover.
            self.base
                .session()
                .query_unpaged(
                    format!(
                        "INSERT INTO {}.generation_active (k, id) VALUES ({HIGHEST_ROW}, ?)",
                        self.ks()
                    ),
                    (to_i32(id)?,),
                )
                .await
                .map_err(exec_error)?;
        }
        Ok(ProjectionStores {
            generation: id,
            identity: Arc::new(store.clone()),
            profiles: Arc::new(store),
        })
    }

    async fn activate(&self, id: u32) -> Result<(), StoreError> {
        let active = self.active().await?;
        check_activation(&self.list().await?, active, id)?;
        let statement = self
            .base
            .session()
            .prepare(format!(
                "UPDATE {}.generation_active SET id = ? WHERE k = 0 IF id = ?",
                self.ks()
            ))
            .await
            .map_err(prepare_error)?;
        // Conditional on the pointer read above: two racing activations
        // cannot move it backwards.
        match self
            .base
            .lwt(&statement, (to_i32(id)?, to_i32(active)?))
            .await?
        {
            Lwt::Applied => {}
            Lwt::NotApplied => {
                return Err(StoreError::Invalid(format!(
                    "the active generation changed while activating {id}; check and retry"
                )));
            }
            Lwt::Unknown(e) => {
                if self.active().await? != id {
                    return Err(e);
                }
            }
        }
        info!(generation = id, keyspace = %self.keyspace_of(id), "generation activated");
        Ok(())
    }

    async fn drop_generation(&self, id: u32) -> Result<(), StoreError> {
        if id == self.active().await? {
            return Err(StoreError::Invalid(format!(
                "generation {id} is active and cannot be dropped"
            )));
        }
        if !self.list().await?.iter().any(|g| g.id == id) {
            return Err(StoreError::Invalid(format!(
                "generation {id} does not exist"
            )));
        }
        self.base
            .session()
            .query_unpaged(
                format!("DELETE FROM {}.generations WHERE id = ?", self.ks()),
                (to_i32(id)?,),
            )
            .await
            .map_err(exec_error)?;
        let store = self.open.lock().await.remove(&id);
        if id == FIRST_GENERATION {
            // Its keyspace also holds the registry and the log's index.
            self.base.truncate().await?;
        } else {
            let store = match store {
                Some(s) => s,
                None => {
                    ScyllaStore::connect(&ScyllaConfig {
                        keyspace: self.keyspace_of(id),
                        ..self.config.clone()
                    })
                    .await?
                }
            };
            store.drop_keyspace().await?;
        }
        info!(generation = id, "generation dropped");
        Ok(())
    }

    async fn highest(&self) -> Result<u32, StoreError> {
        let listed = self.list().await?.iter().map(|g| g.id).max();
        Ok(self
            .kept_highest()
            .await?
            .max(listed.unwrap_or(FIRST_GENERATION)))
    }
}

impl ScyllaGenerations {
    /// The high-water mark kept in the registry (without the listed ones).
    async fn kept_highest(&self) -> Result<u32, StoreError> {
        let rows = self
            .base
            .session()
            .query_unpaged(
                format!(
                    "SELECT id FROM {}.generation_active WHERE k = {HIGHEST_ROW}",
                    self.ks()
                ),
                (),
            )
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(storage)?;
        let row: Option<(Option<i32>,)> = rows.maybe_first_row().map_err(storage)?;
        Ok(row
            .and_then(|(id,)| id)
            .and_then(|id| u32::try_from(id).ok())
            .unwrap_or(FIRST_GENERATION))
    }
}

/// The row of `generation_active` that keeps the highest generation number
/// ever opened (row 0 is the active pointer).
const HIGHEST_ROW: i32 = 1;
