//! The event-log conformance suite on the embedded log, plus what only the
//! embedded log promises: durability across a reopen.

use cdp_log::{Appended, EmbeddedLog, EventLog, Record, Topic, conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_log_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), 4).unwrap();
    conformance::run_all(&log, "embedded").await;
}

#[tokio::test]
async fn the_memory_dedupe_index_conforms() {
    conformance::dedupe_index_remembers(&cdp_log::MemoryDedupe::default(), "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let appended = {
        let log = EmbeddedLog::open(dir.path(), 3).unwrap();
        let records = (0..50)
            .map(|i| Record {
                key: format!("k{i}").into_bytes(),
                value: vec![i as u8],
                ..Record::default()
            })
            .collect();
        log.append(Topic::Touchpoints, records).await.unwrap()
    };
    let log = EmbeddedLog::open(dir.path(), 8).unwrap();
    assert_eq!(
        log.partitions(Topic::Touchpoints),
        3,
        "partition count is fixed at creation"
    );
    let ends = log.end_offsets(Topic::Touchpoints).await.unwrap();
    assert_eq!(ends.iter().sum::<u64>(), 50);
    for a in appended {
        let Appended::New { partition, offset } = a else {
            panic!("unexpected duplicate")
        };
        assert_eq!(
            log.read(Topic::Touchpoints, partition, offset, 1)
                .await
                .unwrap()
                .len(),
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_group_committed_without_losing_any() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), 4).unwrap();
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
                log.append(Topic::Touchpoints, vec![r]).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ends = log.end_offsets(Topic::Touchpoints).await.unwrap();
    assert_eq!(ends.iter().sum::<u64>(), 400);
}
