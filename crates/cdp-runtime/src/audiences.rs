//! The audience definitions as a process knows them: the
//! `audience-definitions` topic folded (`cdp_pipeline::audience`), read
//! again when the topic grows, looked at no more than once per interval;
//! and what every fold with them does around the store: the options it
//! folds with ([`fold_options`]) and the changes it appends
//! ([`ChangeOutbox`]).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cdp_domain::audience::{Change, Definitions};
use cdp_domain::profile::AudienceOptions;
use cdp_domain::{CustomerId, FoldOptions, UnixMillis};
use cdp_log::{EventLog, LogError, Record};
use cdp_pipeline::audience::{DefinitionChange, DefinitionSet, MembershipChange};
use cdp_pipeline::topic;

struct Known {
    /// The topic's end offsets when it was last read.
    ends: Option<Vec<u64>>,
    set: DefinitionSet,
    usable: Arc<Definitions>,
    /// When the topic was last read successfully (none before the first
    /// success: until then there are no definitions to give, not an
    /// empty set, which would make every member exit).
    checked: Option<Instant>,
}

/// The definitions of one process, shared by its workers and services.
pub struct AudienceRegistry {
    log: Arc<dyn EventLog>,
    every: Duration,
    known: tokio::sync::Mutex<Known>,
    appends: tokio::sync::RwLock<()>,
    /// The changes of every fold of this process not appended yet.
    outbox: tokio::sync::Mutex<ChangeOutbox>,
}

impl AudienceRegistry {
    /// Looks at the topic's end at most once per `every`.
    pub fn new(log: Arc<dyn EventLog>, every: Duration) -> Self {
        AudienceRegistry {
            log,
            every,
            known: tokio::sync::Mutex::new(Known {
                ends: None,
                set: DefinitionSet::default(),
                usable: Arc::new(Definitions::default()),
                checked: None,
            }),
            appends: tokio::sync::RwLock::new(()),
            outbox: tokio::sync::Mutex::new(ChangeOutbox::default()),
        }
    }

    /// Queues the changes a fold of generation `generation` made with
    /// `options` (into the process's one outbox, before anything can
    /// fail) and appends every change pending. Returns how many were
    /// appended.
    pub async fn record(
        &self,
        generation: u32,
        changes: Vec<(CustomerId, Change)>,
        options: &FoldOptions,
    ) -> Result<usize, LogError> {
        let mut outbox = self.outbox.lock().await;
        outbox.queue(generation, changes, options);
        outbox.flush(self.log.as_ref()).await
    }

    /// Appends the changes an earlier append left pending. A sync calls it
    /// first (holding [`appends`](Self::appends) alone) and does not run
    /// when it fails: no commit is made durable while its changes are not
    /// in the log, whichever task made them.
    pub async fn flush_pending(&self) -> Result<usize, LogError> {
        self.outbox.lock().await.flush(self.log.as_ref()).await
    }

    /// Orders the store writes of a process's profile workers, audience
    /// timers and backfill with the appends of their changes: a fold
    /// holds it shared from its store commit to the append of its
    /// changes, and a sync (which makes every commit before it durable)
    /// holds it alone. So no sync makes a commit durable whose changes are
    /// not appended yet (a crash then would lose them: the redelivered
    /// events find themselves folded), and the changes of one customer are
    /// appended in the order they were made.
    pub fn appends(&self) -> &tokio::sync::RwLock<()> {
        &self.appends
    }

    /// The definitions a fold evaluates now; an error until the topic was
    /// read once.
    pub async fn current(&self) -> Result<Arc<Definitions>, LogError> {
        let mut known = self.known.lock().await;
        if known.checked.is_none_or(|at| at.elapsed() >= self.every)
            && let Err(e) = self.read(&mut known).await
        {
            // Read once already: go on with those definitions.
            if known.checked.is_none() {
                return Err(e);
            }
            tracing::warn!(error = %e, "audience definitions not read again; using the last ones");
        }
        Ok(Arc::clone(&known.usable))
    }

    /// The folded set, read again first (a writer checks a change
    /// against it).
    pub async fn latest(&self) -> Result<DefinitionSet, LogError> {
        let mut known = self.known.lock().await;
        self.read(&mut known).await?;
        Ok(known.set.clone())
    }

    /// Appends a change (after the caller checked it against
    /// [`latest`](Self::latest)) and reads the topic again.
    pub async fn append(&self, change: &DefinitionChange) -> Result<(), LogError> {
        let record = cdp_pipeline::audience::definition_record(change)
            .map_err(|e| LogError::Invalid(format!("definition record: {e}")))?;
        self.log
            .append(topic::AUDIENCE_DEFINITIONS, vec![record])
            .await?;
        let mut known = self.known.lock().await;
        self.read(&mut known).await
    }

    async fn read(&self, known: &mut Known) -> Result<(), LogError> {
        let started = Instant::now();
        let ends = self.log.end_offsets(topic::AUDIENCE_DEFINITIONS).await?;
        if known.ends.as_ref() == Some(&ends) {
            known.checked = Some(started);
            return Ok(());
        }
        let mut set = DefinitionSet::default();
        cdp_log::scan::<LogError>(self.log.as_ref(), topic::AUDIENCE_DEFINITIONS, 512, |r| {
            match cdp_pipeline::audience::read_definition(r) {
                Ok(change) => set.apply(change),
                Err(error) => {
                    // Written by a newer build, say: its name is held (its
                    // members stay) rather than taken for deleted.
                    tracing::warn!(
                        partition = r.partition,
                        offset = r.offset,
                        %error,
                        "an unreadable audience definition record"
                    );
                    set.hold_unreadable(&r.key);
                }
            }
            Ok(())
        })
        .await?;
        let (usable, problems) = set.usable();
        for (what, error) in problems {
            tracing::warn!(%what, field = %error.field, "an audience definition set aside");
        }
        tracing::info!(
            traits = usable.traits.len(),
            segments = usable.segments.len(),
            "audience definitions read"
        );
        known.usable = Arc::new(usable);
        known.set = set;
        known.ends = Some(ends);
        known.checked = Some(started);
        Ok(())
    }
}

/// `base` with the definitions `registry` holds now, evaluated at `now`
/// (`base` itself without a registry: the audience state is left alone).
pub async fn fold_options<'a>(
    registry: Option<&AudienceRegistry>,
    base: &'a FoldOptions,
    now: UnixMillis,
) -> Result<Cow<'a, FoldOptions>, LogError> {
    let Some(registry) = registry else {
        return Ok(Cow::Borrowed(base));
    };
    let mut options = base.clone();
    options.audiences = AudienceOptions::new(registry.current().await?, now);
    Ok(Cow::Owned(options))
}

/// Membership changes folded but not appended yet. A fold's changes are
/// queued before anything else can fail, and stay queued while appends
/// fail: a retried batch finds its events folded and reports none again.
#[derive(Debug, Default)]
pub struct ChangeOutbox {
    pending: Vec<Record>,
    /// The short name of the definitions last queued with (their shared
    /// copy, held weakly so its address is not reused): computed once per
    /// set, not per batch.
    named: Option<(std::sync::Weak<Definitions>, String)>,
}

impl ChangeOutbox {
    /// Queues the changes a fold of projection generation `generation`
    /// made with `options`' definitions.
    pub fn queue(
        &mut self,
        generation: u32,
        changes: Vec<(CustomerId, Change)>,
        options: &FoldOptions,
    ) {
        if changes.is_empty() {
            return;
        }
        let definitions = options
            .audiences
            .definitions
            .as_ref()
            .map(|defs| match &self.named {
                Some((known, id)) if std::ptr::eq(known.as_ptr(), Arc::as_ptr(defs)) => id.clone(),
                _ => {
                    let id = cdp_pipeline::audience::fingerprint_id(defs);
                    self.named = Some((Arc::downgrade(defs), id.clone()));
                    id
                }
            });
        for (customer_id, change) in changes {
            let change = MembershipChange {
                customer_id,
                generation,
                definitions: definitions.clone(),
                change,
            };
            match cdp_pipeline::audience::change_record(&change) {
                Ok(record) => self.pending.push(record),
                Err(error) => tracing::error!(%error, "an unencodable membership change"),
            }
        }
    }

    /// Appends what is queued to `audience-changes`; kept for the next
    /// call when the append fails. Returns how many were appended.
    pub async fn flush(&mut self, log: &dyn EventLog) -> Result<usize, LogError> {
        if self.pending.is_empty() {
            return Ok(0);
        }
        let records = std::mem::take(&mut self.pending);
        let count = records.len();
        if let Err(e) = log.append(topic::AUDIENCE_CHANGES, records.clone()).await {
            self.pending = records;
            return Err(e);
        }
        Ok(count)
    }
}

/// The latest backfill progress recorded for `generation` on
/// `audience-backfills`.
pub async fn latest_backfill(
    log: &dyn EventLog,
    generation: u32,
) -> Result<Option<cdp_pipeline::audience::BackfillProgress>, LogError> {
    let mut latest = None;
    cdp_log::scan::<LogError>(log, topic::AUDIENCE_BACKFILLS, 512, |r| {
        match cdp_pipeline::audience::read_backfill(r) {
            Ok(p) if p.generation == generation => latest = Some(p),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(partition = r.partition, offset = r.offset, %error, "an unreadable backfill record");
            }
        }
        Ok(())
    })
    .await?;
    Ok(latest)
}
