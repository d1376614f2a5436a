//! Kafka-specific behaviour of the adapter, beyond the conformance suite:
//! rebalances between live consumers, single active consumer, and the
//! queue specs callq declares. Against the broker `CALLQ_KAFKA_URL` names
//! (`source scripts/kafka`), with the settings of `tests/conformance.rs`.

use std::time::Duration;

use callq_broker::{Broker, Consumer, Delivery, Disposition, Error, Message, QueueSpec};
use callq_broker_kafka::{KafkaBroker, Options};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(500);

async fn broker(revoke_wait: Duration) -> KafkaBroker {
    let url = std::env::var("CALLQ_KAFKA_URL")
        .unwrap_or_else(|_| panic!("CALLQ_KAFKA_URL is not set: run `source scripts/kafka` first"));
    let mut opts = Options::from_url(&url).unwrap_or_else(|e| panic!("CALLQ_KAFKA_URL={url}: {e}"));
    if !url.contains("session_timeout_ms") {
        opts.session_timeout = Duration::from_secs(2);
    }
    if !url.contains("fetch_wait_ms") {
        opts.fetch_wait = Duration::from_millis(10);
    }
    opts.revoke_wait = revoke_wait;
    KafkaBroker::connect_with(opts)
        .await
        .unwrap_or_else(|e| panic!("Kafka at {url}: {e}"))
}

fn unique(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("callq.kafka.{test}.{}-{nanos}", std::process::id())
}

async fn next(consumer: &mut Box<dyn Consumer>, what: &str) -> Delivery {
    match tokio::time::timeout(WAIT, consumer.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("waiting for {what}: {e}"),
        Ok(None) => panic!("waiting for {what}: the consumer ended"),
        Err(_) => panic!("nothing within {WAIT:?} while waiting for {what}"),
    }
}

fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.body).into_owned()
}

/// The first of two consumers to get a delivery: its index and the delivery.
async fn first_of(
    a: &mut Box<dyn Consumer>,
    b: &mut Box<dyn Consumer>,
    what: &str,
) -> (usize, Delivery) {
    let got = tokio::time::timeout(WAIT, async {
        tokio::select! {
            d = a.next() => (0, d),
            d = b.next() => (1, d),
        }
    })
    .await;
    match got {
        Ok((i, Some(Ok(d)))) => (i, d),
        Ok((i, other)) => panic!("waiting for {what}: consumer {i} gave {other:?}"),
        Err(_) => panic!("nothing within {WAIT:?} while waiting for {what}"),
    }
}

/// One consumer of a single active consumer queue gets the messages; when
/// it closes, the other takes over (a one-partition topic, one group).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_hands_over_on_close() {
    let broker = broker(Duration::from_secs(1)).await;
    let queue = unique("sac");
    let mut spec = QueueSpec::plain(&queue);
    spec.single_active_consumer = true;
    broker.declare(&spec).await.expect("declare");
    let mut consumers = [
        broker.consume(&queue, 10).await.expect("consume a"),
        broker.consume(&queue, 10).await.expect("consume b"),
    ];
    for i in 0..5 {
        broker
            .publish(&queue, Message::new(format!("m{i}")))
            .await
            .expect("publish");
    }
    let [a, b] = &mut consumers;
    let (active, first) = first_of(a, b, "the first message").await;
    assert_eq!(body(&first), "m0");
    first.settle(Disposition::Ack).await.expect("ack");
    let [a, b] = &mut consumers;
    let (active_consumer, other) = if active == 0 { (a, b) } else { (b, a) };
    for i in 1..5 {
        let d = next(active_consumer, "the active consumer's next").await;
        assert_eq!(body(&d), format!("m{i}"), "in order, all to the active one");
        d.settle(Disposition::Ack).await.expect("ack");
    }
    assert!(
        tokio::time::timeout(QUIET, other.next()).await.is_err(),
        "the waiting consumer got a delivery while the other was active"
    );
    let [a, b] = consumers;
    let (active_consumer, mut other) = if active == 0 { (a, b) } else { (b, a) };
    active_consumer.close().await;
    broker
        .publish(&queue, Message::new("after"))
        .await
        .expect("publish");
    let d = next(&mut other, "the takeover").await;
    assert_eq!(
        body(&d),
        "after",
        "nothing acked before was delivered again"
    );
    d.settle(Disposition::Ack).await.expect("ack");
    other.close().await;
}

/// A consumer joining the group revokes the partition of the one holding
/// it: that one finishes what it can within the revoke wait, commits it,
/// and lets go; its unfinished delivery is redelivered (once, with the
/// flag), its finished one never, and settling the lost one is
/// `LeaseLost`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_commits_what_finished_and_redelivers_the_rest() {
    let broker = broker(Duration::from_secs(2)).await;
    let queue = unique("revoke");
    broker
        .declare(&QueueSpec::plain(&queue))
        .await
        .expect("declare");
    for name in ["finished", "unfinished"] {
        broker
            .publish(&queue, Message::new(name))
            .await
            .expect("publish");
    }
    let mut a = broker.consume(&queue, 10).await.expect("consume a");
    let finished = next(&mut a, "the first delivery").await;
    let unfinished = next(&mut a, "the second delivery").await;
    assert_eq!(body(&finished), "finished");
    assert_eq!(body(&unfinished), "unfinished");
    // A second member joins: a rebalance revokes a's partition, and a's
    // revocation waits for its deliveries in hand. One is acked meanwhile.
    let mut b = broker.consume(&queue, 10).await.expect("consume b");
    tokio::time::sleep(Duration::from_secs(1)).await;
    finished
        .settle(Disposition::Ack)
        .await
        .expect("an ack during the revoke wait still counts");
    let (_, again) = first_of(&mut a, &mut b, "the redelivery of the unfinished one").await;
    assert_eq!(body(&again), "unfinished", "a finished delivery came back");
    assert!(again.redelivered, "a redelivery must say so: {again:?}");
    assert_eq!(again.delivery_count, 1, "{again:?}");
    assert_eq!(
        unfinished.settle(Disposition::Ack).await,
        Err(Error::LeaseLost),
        "the lost delivery cannot be settled"
    );
    again.settle(Disposition::Ack).await.expect("ack");
    let quiet = tokio::time::timeout(QUIET, async {
        tokio::select! {
            d = a.next() => d,
            d = b.next() => d,
        }
    })
    .await;
    assert!(quiet.is_err(), "more was delivered: {quiet:?}");
    a.close().await;
    b.close().await;
}

/// The specs callq declares map onto topics Kafka takes: expiring ones
/// (retention), transient ones, bounded ones; declaring again is a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callq_queue_specs_declare_and_redeclare() {
    let broker = broker(Duration::from_secs(1)).await;
    let id = unique("specs").replace('.', "-");
    for spec in [
        QueueSpec::calls(&id),
        QueueSpec::replies(&id),
        QueueSpec::control(format!("callq.worker.{id}")),
    ] {
        broker.declare(&spec).await.expect("declare");
        broker.declare(&spec).await.expect("declare again");
        broker
            .publish(&spec.name, Message::new("x").key("k"))
            .await
            .expect("publish");
        let depth = broker.depth(&spec.name).await.expect("depth");
        assert_eq!(depth.ready, 1, "{}: {depth:?}", spec.name);
    }
    // A call queue's topic has the partitions the URL asks for (the
    // default's one here), and says so.
    let partitions = broker
        .partitions(&QueueSpec::calls(&id).name)
        .await
        .expect("partitions");
    let wanted = std::env::var("CALLQ_KAFKA_URL")
        .ok()
        .and_then(|u| {
            u.split(['?', '&'])
                .find_map(|kv| kv.strip_prefix("partitions=").map(str::to_owned))
        })
        .map_or(1, |n| {
            n.parse()
                .expect("partitions= in CALLQ_KAFKA_URL is a number")
        });
    assert_eq!(partitions, Some(wanted));
    let bad = QueueSpec::plain("callq.reply.a:b");
    assert!(
        matches!(broker.declare(&bad).await, Err(Error::Refused(_))),
        "a name Kafka cannot take is refused"
    );
}

/// Two handles on the broker stand for two processes: neither knows what
/// the other's consumers received.
async fn broker_with(partitions: i32) -> KafkaBroker {
    let url = std::env::var("CALLQ_KAFKA_URL")
        .unwrap_or_else(|_| panic!("CALLQ_KAFKA_URL is not set: run `source scripts/kafka` first"));
    let mut opts = Options::from_url(&url).unwrap_or_else(|e| panic!("CALLQ_KAFKA_URL={url}: {e}"));
    opts.session_timeout = Duration::from_secs(2);
    opts.fetch_wait = Duration::from_millis(10);
    opts.revoke_wait = Duration::from_secs(1);
    opts.partitions = partitions;
    KafkaBroker::connect_with(opts)
        .await
        .unwrap_or_else(|e| panic!("Kafka at {url}: {e}"))
}

/// A fresh queue of `partitions` partitions, declared through two handles
/// that stand for two processes.
async fn two_processes(test: &str, partitions: i32) -> (KafkaBroker, KafkaBroker, String) {
    let (one, two) = (broker_with(partitions).await, broker_with(partitions).await);
    let queue = unique(test);
    for b in [&one, &two] {
        b.declare(&QueueSpec::plain(&queue)).await.expect("declare");
    }
    (one, two, queue)
}

/// A record that a consumer in another process received and lost comes
/// back flagged as a redelivery, though this process never saw it; a
/// record published after the partition changed hands does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_another_process_received_comes_back_flagged() {
    let (one, two, queue) = two_processes("flag", 1).await;
    for name in ["done", "lost"] {
        one.publish(&queue, Message::new(name))
            .await
            .expect("publish");
    }
    let mut a = one.consume(&queue, 1).await.expect("consume a");
    let done = next(&mut a, "the first delivery").await;
    assert!(
        !done.redelivered,
        "a partition never held before has only fresh records: {done:?}"
    );
    done.settle(Disposition::Ack).await.expect("ack");
    let lost = next(&mut a, "the second delivery").await;
    assert_eq!(body(&lost), "lost");
    assert!(!lost.redelivered, "{lost:?}");
    a.close().await;

    let mut b = two.consume(&queue, 1).await.expect("consume b");
    let again = next(&mut b, "the lost one, in the other process").await;
    assert_eq!(body(&again), "lost", "the acked one came back");
    assert!(
        again.redelivered,
        "the other process's consumer received it: the flag must be set: {again:?}"
    );
    again.settle(Disposition::Ack).await.expect("ack");
    two.publish(&queue, Message::new("later"))
        .await
        .expect("publish");
    let later = next(&mut b, "a record published after the hand-over").await;
    assert_eq!(body(&later), "later");
    assert!(!later.redelivered, "{later:?}");
    later.settle(Disposition::Ack).await.expect("ack");
    b.close().await;
}

/// Polls an assignment until `pred` holds; the adapter updates it from its
/// rebalance callbacks, which signal nothing to the application.
async fn assigned(what: &str, pred: impl Fn() -> bool) {
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while !pred() {
        assert!(
            tokio::time::Instant::now() < until,
            "{what}: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A consumer's assignment names the partitions it owns, and a message
/// published into one of them reaches its owner, whatever its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_into_a_partition_reaches_the_consumer_that_owns_it() {
    let (one, two, queue) = two_processes("partition", 2).await;
    let mut a = one.consume(&queue, 10).await.expect("consume a");
    let in_a = a.assignment().expect("Kafka partitions its queues");
    assigned("a owns both partitions", || in_a.get() == [0, 1]).await;
    let mut b = two.consume(&queue, 10).await.expect("consume b");
    let in_b = b.assignment().expect("Kafka partitions its queues");
    assigned("a and b own one partition each", || {
        in_a.get().len() == 1 && in_b.get().len() == 1 && in_a.get() != in_b.get()
    })
    .await;
    let target = in_b.get()[0];
    for i in 0..10 {
        one.publish(
            &queue,
            Message::new(format!("m{i}"))
                .key(format!("key-{i}"))
                .partition(target),
        )
        .await
        .expect("publish");
    }
    for i in 0..10 {
        let d = next(&mut b, "a message published into b's partition").await;
        assert_eq!(body(&d), format!("m{i}"), "in order, all to b");
        d.settle(Disposition::Ack).await.expect("ack");
    }
    let quiet = tokio::time::timeout(QUIET, a.next()).await;
    assert!(
        quiet.is_err(),
        "a got a message of b's partition: {quiet:?}"
    );
    a.close().await;
    b.close().await;
}
