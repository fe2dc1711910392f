//! The event log's idempotency-key index on ScyllaDB (Kafka cannot say
//! whether it has seen an event id). Keys expire after 7 days (the table's
//! `default_time_to_live`), longer than any SDK retries.
//!
//! Plain writes, not lightweight transactions: an LWT per event would cost
//! more than the append. Two retries of one event racing each other can both
//! be appended and both reported as new; every consumer ignores the second
//! (identity and the profile fold are idempotent per event id), so the cost
//! is one extra record, never a double count.

use async_trait::async_trait;
use cdp_log::{DedupeIndex, LogError};
use futures::future::try_join_all;

use crate::ScyllaStore;

fn log_error(e: cdp_store::StoreError) -> LogError {
    match e {
        cdp_store::StoreError::Unavailable(m) => LogError::Unavailable(m),
        other => LogError::Storage(other.to_string()),
    }
}

#[async_trait]
impl DedupeIndex for ScyllaStore {
    async fn lookup(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<(u32, u64)>>, LogError> {
        try_join_all(keys.iter().map(|key| async move {
            let result = self
                .session()
                .execute_unpaged(&self.st().idempotency_get, (key,))
                .await
                .map_err(|e| log_error(crate::exec_error(e)))?
                .into_rows_result()
                .map_err(|e| LogError::Storage(e.to_string()))?;
            let row: Option<(Option<i32>, Option<i64>)> = result
                .maybe_first_row()
                .map_err(|e| LogError::Storage(e.to_string()))?;
            Ok(match row {
                Some((Some(p), Some(o))) => Some((
                    u32::try_from(p).unwrap_or_default(),
                    u64::try_from(o).unwrap_or_default(),
                )),
                _ => None,
            })
        }))
        .await
    }

    async fn remember(&self, entries: &[(Vec<u8>, u32, u64)]) -> Result<Vec<(u32, u64)>, LogError> {
        try_join_all(entries.iter().map(|(key, partition, offset)| async move {
            let p = i32::try_from(*partition)
                .map_err(|_| LogError::Invalid(format!("partition {partition}")))?;
            let o = i64::try_from(*offset)
                .map_err(|_| LogError::Invalid(format!("offset {offset}")))?;
            self.write(&self.st().idempotency_put, (key, p, o))
                .await
                .map_err(log_error)?;
            Ok((*partition, *offset))
        }))
        .await
    }
}
