//! Generations of the projections.
//!
//! The identity graph, the profiles and the timeline are projections of the
//! log: they can be rebuilt from it. A rebuild writes a new **generation**
//! (its own redb file or ScyllaDB keyspace) while the active one keeps
//! serving; one write of the active pointer then switches every reader and
//! worker to it, and the old generation can be dropped.
//!
//! [`Generations`] is the port (the registry plus each generation's stores);
//! [`LiveStores`] is what services hold: the active generation's stores,
//! swapped in one step when the pointer moves ([`LiveStores::refresh`]).
//! It is not a store itself: a request or a batch takes one generation's
//! stores with [`LiveStores::current`] and uses them throughout, so it
//! never reads one generation and writes another.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use cdp_domain::UnixMillis;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{EmbeddedStore, IdentityStore, ProfileStore, StoreError};

/// The generation every deployment starts with.
pub const FIRST_GENERATION: u32 = 1;

/// One generation as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationInfo {
    pub id: u32,
    pub created_at: UnixMillis,
    pub active: bool,
}

/// The stores of one generation.
#[derive(Clone)]
pub struct ProjectionStores {
    pub generation: u32,
    pub identity: Arc<dyn IdentityStore>,
    pub profiles: Arc<dyn ProfileStore>,
}

/// The registry of generations and their stores.
#[async_trait]
pub trait Generations: Send + Sync + 'static {
    /// The generation that serves ([`FIRST_GENERATION`] until another is
    /// activated).
    async fn active(&self) -> Result<u32, StoreError>;

    /// The generations that exist, oldest first.
    async fn list(&self) -> Result<Vec<GenerationInfo>, StoreError>;

    /// The stores of generation `id`, created empty when it does not exist.
    async fn open(&self, id: u32) -> Result<ProjectionStores, StoreError>;

    /// Makes `id` the active generation, in one write. It must exist and be
    /// newer than the active one (a retired generation stopped following
    /// the log, so going back would serve stale views).
    async fn activate(&self, id: u32) -> Result<(), StoreError>;

    /// Deletes generation `id` and its data. The active one cannot be dropped.
    async fn drop_generation(&self, id: u32) -> Result<(), StoreError>;

    /// The highest generation number ever opened, dropped ones included.
    /// A new generation takes a number above it: records a dropped
    /// generation left in the log name its number, and a reused number
    /// would mix them into the new generation's history.
    async fn highest(&self) -> Result<u32, StoreError>;
}

/// Checks an activation against the registry's state.
pub fn check_activation(list: &[GenerationInfo], active: u32, id: u32) -> Result<(), StoreError> {
    if !list.iter().any(|g| g.id == id) {
        return Err(StoreError::Invalid(format!(
            "generation {id} does not exist (rebuild it first)"
        )));
    }
    if id <= active {
        return Err(StoreError::Invalid(format!(
            "generation {id} is not newer than the active generation {active}"
        )));
    }
    Ok(())
}

/// The active generation's stores, as every service holds them: take the
/// generation active at the last [`refresh`](Self::refresh) with
/// [`current`](Self::current), once per request or batch.
pub struct LiveStores {
    generations: Arc<dyn Generations>,
    current: RwLock<ProjectionStores>,
    /// The generation served, announced on every switch.
    switched: tokio::sync::watch::Sender<u32>,
}

impl LiveStores {
    /// Opens the active generation.
    pub async fn open(generations: Arc<dyn Generations>) -> Result<Self, StoreError> {
        let active = generations.active().await?;
        let stores = generations.open(active).await?;
        tracing::info!(generation = active, "projection generation open");
        Ok(LiveStores {
            generations,
            current: RwLock::new(stores),
            switched: tokio::sync::watch::Sender::new(active),
        })
    }

    /// The stores of the generation active at the last refresh.
    pub fn current(&self) -> ProjectionStores {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn generation(&self) -> u32 {
        self.current().generation
    }

    /// The generation served, updated when [`refresh`](Self::refresh)
    /// switches to another one.
    pub fn switches(&self) -> tokio::sync::watch::Receiver<u32> {
        self.switched.subscribe()
    }

    pub fn generations(&self) -> &Arc<dyn Generations> {
        &self.generations
    }

    /// A token that fires when `parent` does, or when this process switches
    /// away from `generation`.
    pub fn until_switch(&self, generation: u32, parent: &CancellationToken) -> CancellationToken {
        let token = parent.child_token();
        let fire = token.clone();
        let mut switches = self.switches();
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

    /// Reads the active pointer and, when it moved, opens the new active
    /// generation and swaps it in. Returns the generation now served.
    pub async fn refresh(&self) -> Result<u32, StoreError> {
        let active = self.generations.active().await?;
        let served = self.generation();
        if active == served {
            return Ok(active);
        }
        let stores = self.generations.open(active).await?;
        {
            let mut current = match self.current.write() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            *current = stores;
        }
        self.switched.send_replace(active);
        tracing::info!(
            from = served,
            to = active,
            "switched to a new projection generation"
        );
        Ok(active)
    }
}

/// The registry file of the embedded generations.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    active: u32,
    generations: Vec<(u32, UnixMillis)>,
    /// The highest number ever opened (absent in registries written
    /// before it was kept: then the highest listed).
    #[serde(default)]
    highest: u32,
}

/// Embedded generations: generation 1 in `dir/store.redb` and
/// `dir/views.redb` (where the embedded store always was), generation `n`
/// in `dir/gen-n/`,
/// the registry in `dir/generations.json` (replaced atomically).
pub struct EmbeddedGenerations {
    dir: PathBuf,
    cache_bytes: usize,
    seal: crate::ViewSeal,
    state: Mutex<(Registry, BTreeMap<u32, EmbeddedStore>)>,
}

fn storage<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Storage(e.to_string())
}

fn now_ms() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl EmbeddedGenerations {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        let path = dir.join("generations.json");
        let registry = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                what: "generation registry",
                reason: format!("{}: {e}", path.display()),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry {
                active: FIRST_GENERATION,
                generations: vec![(FIRST_GENERATION, now_ms())],
                highest: FIRST_GENERATION,
            },
            Err(e) => return Err(storage(e)),
        };
        Ok(EmbeddedGenerations {
            dir: dir.to_path_buf(),
            cache_bytes: 256 << 20,
            seal: crate::ViewSeal::clear(),
            state: Mutex::new((registry, BTreeMap::new())),
        })
    }

    /// Every generation's views sealed under customer keys from `seal`.
    pub fn with_seal(mut self, seal: crate::ViewSeal) -> Self {
        self.seal = seal;
        self
    }

    /// The page cache of each generation's store.
    pub fn with_cache(mut self, cache_bytes: usize) -> Self {
        self.cache_bytes = cache_bytes;
        self
    }

    fn dir_of(&self, id: u32) -> PathBuf {
        if id == FIRST_GENERATION {
            self.dir.clone()
        } else {
            self.dir.join(format!("gen-{id}"))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Registry, BTreeMap<u32, EmbeddedStore>)> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Writes the registry to a temporary file, syncs it and renames it
    /// over the old one: a crash leaves either the old or the new registry.
    fn save(&self, registry: &Registry) -> Result<(), StoreError> {
        use std::io::Write as _;
        let path = self.dir.join("generations.json");
        let tmp = self.dir.join("generations.json.tmp");
        let bytes = serde_json::to_vec_pretty(registry).map_err(storage)?;
        let mut f = std::fs::File::create(&tmp).map_err(storage)?;
        f.write_all(&bytes).map_err(storage)?;
        f.sync_all().map_err(storage)?;
        std::fs::rename(&tmp, &path).map_err(storage)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(storage)
    }
}

#[async_trait]
impl Generations for EmbeddedGenerations {
    async fn active(&self) -> Result<u32, StoreError> {
        Ok(self.lock().0.active)
    }

    async fn list(&self) -> Result<Vec<GenerationInfo>, StoreError> {
        let state = self.lock();
        Ok(state
            .0
            .generations
            .iter()
            .map(|&(id, created_at)| GenerationInfo {
                id,
                created_at,
                active: id == state.0.active,
            })
            .collect())
    }

    async fn open(&self, id: u32) -> Result<ProjectionStores, StoreError> {
        if id == 0 {
            return Err(StoreError::Invalid(
                "generations are numbered from 1".into(),
            ));
        }
        let mut state = self.lock();
        let store = match state.1.get(&id) {
            Some(s) => s.clone(),
            None => {
                // redb opens a file once per process: keep the handle.
                let store = EmbeddedStore::open_with_cache(&self.dir_of(id), self.cache_bytes)?
                    .with_seal(self.seal.clone());
                // A graph written before sealing: its claims hashed first.
                store.seal_claims()?;
                state.1.insert(id, store.clone());
                store
            }
        };
        if !state.0.generations.iter().any(|g| g.0 == id) {
            let mut registry = Registry {
                active: state.0.active,
                generations: state.0.generations.clone(),
                highest: state.0.highest.max(id),
            };
            registry.generations.push((id, now_ms()));
            registry.generations.sort_unstable();
            self.save(&registry)?;
            state.0 = registry;
        }
        Ok(ProjectionStores {
            generation: id,
            identity: Arc::new(store.clone()),
            profiles: Arc::new(store),
        })
    }

    async fn activate(&self, id: u32) -> Result<(), StoreError> {
        let list = self.list().await?;
        let mut state = self.lock();
        check_activation(&list, state.0.active, id)?;
        let registry = Registry {
            active: id,
            generations: state.0.generations.clone(),
            highest: state.0.highest,
        };
        self.save(&registry)?;
        state.0 = registry;
        tracing::info!(generation = id, "generation activated");
        Ok(())
    }

    async fn drop_generation(&self, id: u32) -> Result<(), StoreError> {
        let mut state = self.lock();
        if id == state.0.active {
            return Err(StoreError::Invalid(format!(
                "generation {id} is active and cannot be dropped"
            )));
        }
        if !state.0.generations.iter().any(|g| g.0 == id) {
            return Err(StoreError::Invalid(format!(
                "generation {id} does not exist"
            )));
        }
        state.1.remove(&id);
        let registry = Registry {
            active: state.0.active,
            generations: state
                .0
                .generations
                .iter()
                .copied()
                .filter(|g| g.0 != id)
                .collect(),
            highest: state.0.highest.max(id),
        };
        self.save(&registry)?;
        state.0 = registry;
        // The data goes after the registry forgot it: a crash in between
        // leaves files nothing refers to, never a registered empty generation.
        let gone = |r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(storage(e)),
            _ => Ok(()),
        };
        if id == FIRST_GENERATION {
            for f in crate::embedded::FILES {
                gone(std::fs::remove_file(self.dir.join(f)))?;
            }
        } else {
            gone(std::fs::remove_dir_all(self.dir_of(id)))?;
        }
        tracing::info!(generation = id, "generation dropped");
        Ok(())
    }

    async fn highest(&self) -> Result<u32, StoreError> {
        let state = self.lock();
        let listed = state.0.generations.iter().map(|g| g.0).max();
        Ok(listed.unwrap_or(FIRST_GENERATION).max(state.0.highest))
    }
}
