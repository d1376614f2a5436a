//! The cluster under a load with a worker killed every 200 ms: every call
//! ends in exactly one final outcome, none is lost, `fatal` only follows a
//! granted trace, and no mail is sent twice.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use callq_coordinator::MemoryStore;
use callq_testkit::ClusterOptions;
use callq_testkit::chaos::{self, ChaosSpec};

#[tokio::test(start_paused = true)]
async fn a_worker_killed_every_200_ms_loses_no_call() {
    let dir = std::env::temp_dir().join(format!("callq-failover-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = ChaosSpec {
        cluster: ClusterOptions {
            capacity: 16,
            ..ClusterOptions::default()
        },
        workers: 4,
        standbys: 0,
        calls: 2_400,
        concurrency: 64,
        mail_every: 3,
        work: Duration::from_millis(70),
        kill_every: Duration::from_millis(200),
        max_kills: usize::MAX,
        replace_killed: true,
        timeout: Duration::from_secs(120),
        outbox: dir.join("mail.outbox"),
        progress: false,
    };
    let report = chaos::run(&spec, MemoryStore::default()).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    report.print();

    assert_eq!(report.violations(), Vec::<String>::new());
    assert_eq!(report.ended.len(), 2_400, "every call ended");
    // The faults really happened and were really survived.
    assert!(report.kills.len() >= 5, "{} kills", report.kills.len());
    assert!(report.retried_ok() > 0, "no call was retried");
    assert!(!report.fatal().is_empty(), "no kill landed after a trace");
    assert!(report.deaths as usize >= report.kills.len() / 2);
}
