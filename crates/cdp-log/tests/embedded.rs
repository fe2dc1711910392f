//! The event-log conformance suite on the embedded log, plus what only the
//! embedded log promises: durability across a reopen.

use async_trait::async_trait;
use cdp_log::conformance::{LogUnderTest, PARTITIONS, TOPICS};
use cdp_log::{Appended, EmbeddedLog, EventLog, Record, Topic};

/// A fresh embedded log in a temporary directory.
struct Embedded {
    log: EmbeddedLog,
    _dir: tempfile::TempDir,
}

#[async_trait]
impl LogUnderTest for Embedded {
    async fn open() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let log = EmbeddedLog::open(dir.path(), &TOPICS, PARTITIONS).expect("the log opens");
        Embedded { log, _dir: dir }
    }

    fn log(&self) -> &dyn EventLog {
        &self.log
    }
}

cdp_log::event_log_test_suite!(embedded_log, Embedded);

const TOPIC: Topic = Topic::new("touchpoints");

#[tokio::test]
async fn the_memory_dedupe_index_conforms() {
    cdp_log::conformance::dedupe_index_remembers(&cdp_log::MemoryDedupe::default(), "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let appended = {
        let log = EmbeddedLog::open(dir.path(), &[TOPIC], 3).unwrap();
        let records = (0..50)
            .map(|i| Record {
                key: format!("k{i}").into_bytes(),
                value: vec![i as u8],
                ..Record::default()
            })
            .collect();
        log.append(TOPIC, records).await.unwrap()
    };
    let log = EmbeddedLog::open(dir.path(), &[TOPIC], 8).unwrap();
    assert_eq!(
        log.partitions(TOPIC),
        3,
        "partition count is fixed at creation"
    );
    let ends = log.end_offsets(TOPIC).await.unwrap();
    assert_eq!(ends.iter().sum::<u64>(), 50);
    for a in appended {
        let Appended::New { partition, offset } = a else {
            panic!("unexpected duplicate")
        };
        assert_eq!(
            log.read(TOPIC, partition, offset, 1).await.unwrap().len(),
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_added_later_is_created_with_the_partitions_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let added = Topic::new("added-later");
    {
        let log = EmbeddedLog::open(dir.path(), &[TOPIC], 3).unwrap();
        assert_eq!(log.partitions(added), 0);
    }
    let log = EmbeddedLog::open(dir.path(), &[TOPIC, added], 5).unwrap();
    assert_eq!(log.partitions(TOPIC), 3);
    assert_eq!(log.partitions(added), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_group_committed_without_losing_any() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), &[TOPIC], 4).unwrap();
    let mut tasks = Vec::new();
    for t in 0..16 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let r = Record {
                    key: format!("t{t}-{i}").into_bytes(),
                    value: vec![1],
                    ..Record::default()
                };
                log.append(TOPIC, vec![r]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ends = log.end_offsets(TOPIC).await.unwrap();
    assert_eq!(ends.iter().sum::<u64>(), 400);
}
