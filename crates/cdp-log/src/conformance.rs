//! The conformance suite of the [`EventLog`] port. Every implementation runs
//! it (the embedded log in this crate's tests, Kafka against a real broker),
//! so the implementations cannot drift apart. Each check panics with a
//! message on failure.
//!
//! [`event_log_test_suite!`](crate::event_log_test_suite) turns the suite
//! into one test per case for a [`LogUnderTest`], so the first failure does
//! not hide the others (the shape of Quickwit's `metastore_test_suite!`).

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

use crate::{Appended, EventLog, Membership, Record, Topic};

/// The topics the suite appends to: open a log under test with them.
pub const TOPICS: [Topic; 4] = [
    Topic::new("conformance-a"),
    Topic::new("conformance-b"),
    Topic::new("conformance-c"),
    Topic::new("conformance-d"),
];

/// Partitions a log under test should have (the split check needs two or more).
pub const PARTITIONS: u32 = 4;

/// An implementation of the port as the suite runs it: a fresh log (its
/// own files or topics) for every case.
#[async_trait]
pub trait LogUnderTest: Send + Sync + Sized + 'static {
    /// Opens a fresh, empty log with [`TOPICS`] and [`PARTITIONS`].
    async fn open() -> Self;
    fn log(&self) -> &dyn EventLog;
}

/// One test per conformance case for a [`LogUnderTest`]:
/// `event_log_test_suite!(module_name, Fixture)`, optionally followed by
/// attributes for every test (`#[ignore = "needs Kafka"]`). The calling
/// crate needs `tokio` with its test macros.
#[macro_export]
macro_rules! event_log_test_suite {
    ($module:ident, $fixture:ty $(, #[$attr:meta])*) => {
        $crate::event_log_test_suite!(@cases $module, $fixture, [$(#[$attr])*];
            keeps_order_per_key,
            resumes_from_committed_positions,
            poll_wakes_up_on_append,
            members_split_partitions,
            deduplicates_by_idempotency_key,
            locates_records_by_idempotency_key,
            refuses_unknown_topics);
    };
    (@cases $module:ident, $fixture:ty, $attrs:tt; $($case:ident),+) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;
            $($crate::event_log_test_suite!(@case $fixture, $attrs, $case);)+
        }
    };
    (@case $fixture:ty, [$($attr:tt)*], $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $($attr)*
        async fn $case() {
            let fixture = <$fixture as $crate::conformance::LogUnderTest>::open().await;
            $crate::conformance::$case(
                $crate::conformance::LogUnderTest::log(&fixture),
                stringify!($case),
            )
            .await;
        }
    };
}

fn record(key: &str, value: &str) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        headers: vec![("traceparent".into(), b"00-abc-def-01".to_vec())],
        idempotency_key: None,
    }
}

fn positions(appended: &[Appended]) -> Vec<(u32, u64)> {
    appended
        .iter()
        .map(|a| match a {
            Appended::New { partition, offset } | Appended::Duplicate { partition, offset } => {
                (*partition, *offset)
            }
        })
        .collect()
}

/// Drains a subscription until `want` records arrived or `patience` passed.
async fn drain(
    sub: &mut dyn crate::Subscription,
    want: usize,
    patience: Duration,
) -> Vec<crate::LogRecord> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut got = Vec::new();
    while got.len() < want && tokio::time::Instant::now() < deadline {
        match sub.poll(want - got.len(), Duration::from_millis(200)).await {
            Ok(batch) => got.extend(batch),
            Err(e) => panic!("poll failed: {e}"),
        }
    }
    got
}

/// Records with one key land in one partition, in order, with increasing
/// offsets; values, keys and headers come back as written.
pub async fn keeps_order_per_key(log: &dyn EventLog, prefix: &str) {
    let key = format!("{prefix}-customer-1");
    let appended = log
        .append(
            TOPICS[0],
            (0..10).map(|i| record(&key, &format!("v{i}"))).collect(),
        )
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let pos = positions(&appended);
    assert!(
        pos.iter().all(|(p, _)| *p == pos[0].0),
        "one key spread over partitions: {pos:?}"
    );
    assert!(
        pos.windows(2).all(|w| w[1].1 == w[0].1 + 1),
        "offsets not consecutive: {pos:?}"
    );
    let read = log
        .read(TOPICS[0], pos[0].0, pos[0].1, 10)
        .await
        .unwrap_or_else(|e| panic!("read failed: {e}"));
    let values: Vec<String> = read
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    assert_eq!(values, (0..10).map(|i| format!("v{i}")).collect::<Vec<_>>());
    assert_eq!(read[0].key, key.as_bytes());
    assert_eq!(
        read[0].header("traceparent"),
        Some(b"00-abc-def-01".as_slice())
    );
    let ends = log
        .end_offsets(TOPICS[0])
        .await
        .unwrap_or_else(|e| panic!("end offsets: {e}"));
    assert!(
        ends[pos[0].0 as usize] > pos[9].1,
        "end offset {ends:?} is not past the last append"
    );
}

/// A group member sees every record once, commits, and a new member of the
/// same group resumes after the committed position.
pub async fn resumes_from_committed_positions(log: &dyn EventLog, prefix: &str) {
    let group = format!("{prefix}-group");
    let topic = TOPICS[1];
    let mut sub = log
        .subscribe(&group, topic, Membership::default())
        .await
        .unwrap_or_else(|e| panic!("subscribe failed: {e}"));
    let already = drain(sub.as_mut(), usize::MAX, Duration::from_millis(500))
        .await
        .len();
    let records: Vec<Record> = (0..20)
        .map(|i| record(&format!("{prefix}-k{}", i % 5), &format!("{prefix}-{i}")))
        .collect();
    log.append(topic, records)
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let got = drain(sub.as_mut(), 20, Duration::from_secs(20)).await;
    let ours: Vec<_> = got
        .iter()
        .filter(|r| r.value.starts_with(prefix.as_bytes()))
        .collect();
    assert_eq!(
        ours.len(),
        20,
        "expected 20 new records after {already} old ones, got {}",
        ours.len()
    );

    // Commit only the first half of each partition's records.
    let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for r in &got {
        by_partition.entry(r.partition).or_default().push(r.offset);
    }
    let mut commit = Vec::new();
    let mut uncommitted = 0;
    for (p, offsets) in &by_partition {
        let half = offsets.len() / 2;
        commit.push((*p, offsets[0] + half as u64));
        uncommitted += offsets.len() - half;
    }
    sub.commit(&commit)
        .await
        .unwrap_or_else(|e| panic!("commit failed: {e}"));
    drop(sub);

    let mut again = log
        .subscribe(&group, topic, Membership::default())
        .await
        .unwrap_or_else(|e| panic!("subscribe failed: {e}"));
    let redelivered = drain(again.as_mut(), uncommitted, Duration::from_secs(20)).await;
    assert_eq!(
        redelivered.len(),
        uncommitted,
        "uncommitted records must be delivered again"
    );
    for (p, from) in &commit {
        assert!(
            redelivered
                .iter()
                .filter(|r| r.partition == *p)
                .all(|r| r.offset >= *from),
            "a committed record was delivered again"
        );
    }
    let committed = log
        .committed(&group, topic)
        .await
        .unwrap_or_else(|e| panic!("committed: {e}"));
    for (p, from) in &commit {
        assert_eq!(committed[*p as usize], *from);
    }
}

/// A poll with nothing to read waits, and wakes up for a new append.
pub async fn poll_wakes_up_on_append(log: &dyn EventLog, prefix: &str) {
    let group = format!("{prefix}-waker");
    let mut sub = log
        .subscribe(&group, TOPICS[2], Membership::default())
        .await
        .unwrap_or_else(|e| panic!("subscribe failed: {e}"));
    drain(sub.as_mut(), usize::MAX, Duration::from_millis(500)).await;
    let writer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        log.append(TOPICS[2], vec![record(prefix, "wake")]).await
    };
    let reader = sub.poll(10, Duration::from_secs(20));
    let (appended, polled) = tokio::join!(writer, reader);
    appended.unwrap_or_else(|e| panic!("append failed: {e}"));
    let polled = polled.unwrap_or_else(|e| panic!("poll failed: {e}"));
    assert!(
        polled.iter().any(|r| r.value == b"wake"),
        "poll did not return the new record"
    );
}

/// Members of one group split the partitions between them.
pub async fn members_split_partitions(log: &dyn EventLog, prefix: &str) {
    let n = log.partitions(TOPICS[3]);
    assert!(
        n >= 2,
        "open the log under test with {PARTITIONS} partitions, not {n}"
    );
    let group = format!("{prefix}-split");
    let mut a = log
        .subscribe(
            &group,
            TOPICS[3],
            Membership {
                index: 0,
                members: 2,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe failed: {e}"));
    let mut b = log
        .subscribe(
            &group,
            TOPICS[3],
            Membership {
                index: 1,
                members: 2,
            },
        )
        .await
        .unwrap_or_else(|e| panic!("subscribe failed: {e}"));
    let records: Vec<Record> = (0..40)
        .map(|i| record(&format!("{prefix}-{i}"), prefix))
        .collect();
    log.append(TOPICS[3], records)
        .await
        .unwrap_or_else(|e| panic!("append failed: {e}"));
    let mut got_a = drain(a.as_mut(), 40, Duration::from_secs(3)).await;
    let got_b = drain(b.as_mut(), 40, Duration::from_secs(3)).await;
    got_a.retain(|r| r.value == prefix.as_bytes());
    let got_b: Vec<_> = got_b
        .into_iter()
        .filter(|r| r.value == prefix.as_bytes())
        .collect();
    assert_eq!(
        got_a.len() + got_b.len(),
        40,
        "every record goes to exactly one member"
    );
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both members get a share"
    );
    let pa: std::collections::BTreeSet<u32> = got_a.iter().map(|r| r.partition).collect();
    assert!(
        got_b.iter().all(|r| !pa.contains(&r.partition)),
        "a partition went to both members"
    );
}

/// A record whose idempotency key was seen is not appended again, by a log
/// that says it deduplicates; one that does not appends every record.
pub async fn deduplicates_by_idempotency_key(log: &dyn EventLog, prefix: &str) {
    let mut r = record(prefix, "once");
    r.idempotency_key = Some(format!("{prefix}-event-1").into_bytes());
    let first = log
        .append(TOPICS[0], vec![r.clone(), r.clone()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let again = log
        .append(TOPICS[0], vec![r])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(first[0], Appended::New { .. }));
    if !log.deduplicates() {
        assert!(
            matches!(first[1], Appended::New { .. }) && matches!(again[0], Appended::New { .. }),
            "a log that does not deduplicate appended {first:?} then {again:?}"
        );
        return;
    }
    let pos = positions(&first)[0];
    assert_eq!(
        first[1],
        Appended::Duplicate {
            partition: pos.0,
            offset: pos.1
        }
    );
    assert_eq!(
        again[0],
        Appended::Duplicate {
            partition: pos.0,
            offset: pos.1
        }
    );
}

/// A log that deduplicates finds a record by its idempotency key, and
/// nothing for a key it never saw.
pub async fn locates_records_by_idempotency_key(log: &dyn EventLog, prefix: &str) {
    let mut r = record(prefix, "findable");
    r.idempotency_key = Some(format!("{prefix}-event-9").into_bytes());
    let appended = log
        .append(TOPICS[0], vec![record(prefix, "before"), r])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let found = log
        .locate(TOPICS[0], format!("{prefix}-event-9").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let missing = log
        .locate(TOPICS[0], format!("{prefix}-never").as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(missing, None);
    if !log.deduplicates() {
        assert_eq!(found, None, "a log that does not deduplicate cannot locate");
        return;
    }
    assert_eq!(found, Some(positions(&appended)[1]));
    let (partition, offset) = positions(&appended)[1];
    let read = log
        .read(TOPICS[0], partition, offset, 1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read[0].value, b"findable".to_vec());
}

/// A [`crate::DedupeIndex`] remembers where keys landed and knows nothing
/// of keys it was not told.
pub async fn dedupe_index_remembers(index: &dyn crate::DedupeIndex, prefix: &str) {
    let keys: Vec<Vec<u8>> = (0..3)
        .map(|i| format!("{prefix}-dedupe-{i}").into_bytes())
        .collect();
    let unknown = index
        .lookup(&keys)
        .await
        .unwrap_or_else(|e| panic!("lookup: {e}"));
    assert_eq!(unknown, vec![None, None, None]);
    let remembered = index
        .remember(&[(keys[0].clone(), 2, 40), (keys[1].clone(), 3, 7)])
        .await
        .unwrap_or_else(|e| panic!("remember: {e}"));
    assert_eq!(remembered, vec![(2, 40), (3, 7)]);
    let known = index
        .lookup(&keys)
        .await
        .unwrap_or_else(|e| panic!("lookup: {e}"));
    assert_eq!(known, vec![Some((2, 40)), Some((3, 7)), None]);
}

/// A topic the log was not opened with is refused by name, never created
/// on the fly or mixed up with another.
pub async fn refuses_unknown_topics(log: &dyn EventLog, prefix: &str) {
    let stranger = Topic::new("conformance-not-opened");
    assert_eq!(log.partitions(stranger), 0);
    let refused = log
        .append(stranger, vec![record(prefix, "lost")])
        .await
        .expect_err("an append to an unknown topic must fail");
    assert!(
        refused.to_string().contains("conformance-not-opened"),
        "the error names the topic: {refused}"
    );
    assert!(log.read(stranger, 0, 0, 1).await.is_err());
    assert!(
        log.subscribe(prefix, stranger, Membership::default())
            .await
            .is_err()
    );
}
