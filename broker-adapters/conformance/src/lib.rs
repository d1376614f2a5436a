//! The conformance suite of callq's broker contract.
//!
//! The contract (`callq-broker`) lists seven guarantees in its rustdoc. This
//! crate pins each of them with tests that run unchanged against every
//! adapter: embedded, RabbitMQ, Kafka. A test is an `async fn` taking an
//! `Arc<dyn Broker>`; it panics with a message naming the broken guarantee
//! when the broker breaks it. The [`conformance_suite!`] macro turns them all
//! into `#[tokio::test]`s of the calling crate.
//!
//! | test | guarantee |
//! |---|---|
//! | [`confirmed_publish_is_never_lost`] | 1. a confirmed publish is never lost |
//! | [`no_delivery_beyond_prefetch`] | 2. no delivery beyond prefetch |
//! | [`consumer_drop_redelivers_with_flag_and_count`] | 3. redelivery when a lease is lost |
//! | [`requeue_redelivers_with_flag_and_count`] | 3. redelivery on [`Disposition::Requeue`] |
//! | [`delivery_limit_dead_letters`] | 4. delivery limit |
//! | [`past_the_limit_unjudged_goes_to_the_limit_queue`] | 4. delivery limit, with a [`QueueSpec::limit_dead_letter`] queue |
//! | [`release_redelivers_without_counting`] | 8. release does not count |
//! | [`dead_letter_and_ack_are_final`] | 7. settling is final |
//! | [`single_consumer_gets_publish_order`] | 5. per-queue FIFO for a single consumer |
//! | [`bounded_memory_under_a_slow_consumer`] | 6. bounded memory |
//! | [`settle_after_consumer_drop_is_lease_lost`] | 7. a lost lease changes nothing |
//! | [`publish_to_undeclared_queue_fails`] | [`Broker::publish`]'s `NoSuchQueue` (adapter-dependent, see its docs) |
//! | [`consumers_are_counted`] | [`Broker::consumers`], where the broker can tell |
//!
//! Every test declares fresh queues named `callq.conformance.<test>.<uuid>`,
//! so tests may run in parallel against one real broker and leave no state a
//! later run could trip over (the queues are left behind: point the suite at
//! a throwaway virtual host or cluster). Every wait is bounded by [`WAIT`]; a
//! check that nothing arrives waits [`QUIET`].
//!
//! # Running the suite against an adapter
//!
//! 1. In the adapter crate's `Cargo.toml`:
//!
//!    ```toml
//!    [dev-dependencies]
//!    callq-conformance.workspace = true
//!    # `#[tokio::test]` expands in your crate; `test-util` only for `start_paused`.
//!    tokio = { workspace = true, features = ["macros", "rt", "test-util"] }
//!    ```
//!
//! 2. Add `tests/conformance.rs`, with an expression that builds the broker.
//!    It is evaluated once per test inside an `async fn`, so it may `.await`;
//!    it gives the adapter's broker type (any `B: Broker`). Any further
//!    `key = value` pairs are passed on to `#[tokio::test(...)]`.
//!
//!    ```ignore
//!    // In-process adapter: the paused clock makes every "nothing arrives
//!    // within QUIET" check instant.
//!    callq_conformance::conformance_suite!(
//!        broker = callq_broker_embedded::EmbeddedBroker::new(),
//!        start_paused = true,
//!    );
//!    ```
//!
//!    ```ignore
//!    // A real broker: run on the real clock (the paused clock would fire
//!    // timeouts while the runtime waits on the network). The test command
//!    // makes sure the broker runs; a broker that cannot be reached fails
//!    // every test, it never skips them.
//!    callq_conformance::conformance_suite!(
//!        broker = callq_broker_amqp::AmqpBroker::connect(
//!            &std::env::var("CALLQ_AMQP_URL").expect("CALLQ_AMQP_URL"),
//!        )
//!        .await
//!        .expect("connect to RabbitMQ"),
//!        flavor = "multi_thread",
//!    );
//!    ```
//!
//! 3. `cargo nextest run -p <adapter> --test conformance` (for a real
//!    broker, with the broker running: `scripts/test` starts RabbitMQ).
//!    The tests are named after the functions of this crate, so
//!    `-E 'test(delivery_limit)'` runs one.
//!
//! An adapter that cannot give a guarantee does not skip its test: it
//! documents the deviation in its rustdoc and in `docs/ARCHITECTURE.md`,
//! and the contract is changed first.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use callq_broker::{
    ATTEMPT_HEADER, Broker, Consumer, DEAD_REASON_HEADER, Delivery, Disposition, Error, Message,
    QueueDepth, QueueSpec, RELEASED_HEADER, call_queue, call_queue_for, high_queue,
};

/// How long any single wait on the broker may take before the test fails as
/// hung.
pub const WAIT: Duration = Duration::from_secs(10);

/// How long a test waits to be confident that nothing arrives.
pub const QUIET: Duration = Duration::from_millis(500);

/// How often a test polls a queue's depth while waiting for a value.
const POLL: Duration = Duration::from_millis(10);

/// Shares a broker as the tests take it; [`conformance_suite!`] calls it on
/// the broker its expression builds.
pub fn shared<B: Broker>(broker: B) -> Arc<dyn Broker> {
    Arc::new(broker)
}

/// Expands into one `#[tokio::test]` per test of this crate, each running
/// against a broker built by the given expression.
///
/// ```ignore
/// callq_conformance::conformance_suite!(
///     broker = callq_broker_embedded::EmbeddedBroker::new(),
///     start_paused = true,
/// );
/// ```
///
/// `broker = <expr>` is evaluated once per test inside an `async fn` (it may
/// `.await`) and must give a [`Broker`] (by value; see [`shared`]). Any further
/// `key = value` pairs (`start_paused = true`, `flavor = "multi_thread"`)
/// go to `#[tokio::test(...)]`. The calling crate needs `tokio` with the
/// `macros` and `rt` features (and `test-util` for `start_paused`). Invoke it
/// once per module: the tests take the names of this crate's functions.
#[macro_export]
macro_rules! conformance_suite {
    (broker = $make:expr $(, $key:ident = $value:tt)* $(,)?) => {
        $crate::conformance_suite!(
            @tests ($($key = $value),*) $make;
            confirmed_publish_is_never_lost,
            no_delivery_beyond_prefetch,
            consumer_drop_redelivers_with_flag_and_count,
            requeue_redelivers_with_flag_and_count,
            delivery_limit_dead_letters,
            past_the_limit_unjudged_goes_to_the_limit_queue,
            release_redelivers_without_counting,
            dead_letter_and_ack_are_final,
            single_consumer_gets_publish_order,
            bounded_memory_under_a_slow_consumer,
            settle_after_consumer_drop_is_lease_lost,
            publish_to_undeclared_queue_fails,
            consumers_are_counted,
            each_band_of_a_service_keeps_its_calls,
        );
    };
    (@tests $args:tt $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[::tokio::test $args]
            async fn $test() {
                let broker = $crate::shared($make);
                $crate::$test(broker).await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------
// Helpers: every wait bounded, every failure says what was expected.

/// A fresh queue name for one test.
fn unique(test: &str) -> String {
    format!("callq.conformance.{test}.{}", uuid::Uuid::now_v7())
}

/// Awaits `future` for at most [`WAIT`]; a hang fails the test.
async fn within<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(WAIT, future).await {
        Ok(output) => output,
        Err(_) => panic!("nothing within {WAIT:?} while waiting for {what}: lost or hung"),
    }
}

async fn declare(broker: &dyn Broker, spec: &QueueSpec) {
    if let Err(e) = within("declare", broker.declare(spec)).await {
        panic!("declaring {spec:?} failed: {e}");
    }
}

async fn publish(broker: &dyn Broker, queue: &str, message: Message) {
    if let Err(e) = within("a publish confirm", broker.publish(queue, message)).await {
        panic!("publish to `{queue}` failed: {e}");
    }
}

async fn consume(broker: &dyn Broker, queue: &str, prefetch: u16) -> Box<dyn Consumer> {
    match within("consume", broker.consume(queue, prefetch)).await {
        Ok(consumer) => consumer,
        Err(e) => panic!("consuming `{queue}` failed: {e}"),
    }
}

async fn depth(broker: &dyn Broker, queue: &str) -> QueueDepth {
    match within("depth", broker.depth(queue)).await {
        Ok(depth) => depth,
        Err(e) => panic!("depth of `{queue}` failed: {e}"),
    }
}

/// The next delivery, within [`WAIT`].
async fn next(consumer: &mut Box<dyn Consumer>, what: &str) -> Delivery {
    match within(what, consumer.next()).await {
        Some(Ok(delivery)) => delivery,
        Some(Err(e)) => panic!("waiting for {what}: the consumer failed: {e}"),
        None => panic!("waiting for {what}: the consumer ended"),
    }
}

/// Fails if a delivery arrives within [`QUIET`].
async fn quiet(consumer: &mut Box<dyn Consumer>, why: &str) {
    if let Ok(got) = tokio::time::timeout(QUIET, consumer.next()).await {
        panic!("expected no delivery within {QUIET:?} ({why}), got {got:?}");
    }
}

async fn settle(delivery: Delivery, disposition: Disposition) {
    let what = format!("settling with {disposition:?}");
    if let Err(e) = within(&what, delivery.settle(disposition)).await {
        panic!("{what} failed: {e}");
    }
}

/// Waits until the queue's depth is `expected`, polling.
async fn wait_depth(broker: &dyn Broker, queue: &str, expected: QueueDepth, why: &str) {
    let mut last = depth(broker, queue).await;
    let polls = WAIT.as_millis() / POLL.as_millis();
    for _ in 0..polls {
        if last == expected {
            return;
        }
        tokio::time::sleep(POLL).await;
        last = depth(broker, queue).await;
    }
    panic!("depth of `{queue}` is {last:?}, expected {expected:?} ({why})");
}

fn empty() -> QueueDepth {
    QueueDepth {
        ready: 0,
        unsettled: 0,
    }
}

fn body(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.body).into_owned()
}

/// Every header of `sent` arrives unchanged (a broker may add its own).
fn assert_headers_kept(sent: &Message, got: &Delivery, why: &str) {
    for (key, value) in &sent.headers {
        assert_eq!(
            got.headers.get(key),
            Some(value),
            "header `{key}` changed on {why}: sent {:?}, got {:?}",
            sent.headers,
            got.headers
        );
    }
}

fn assert_first(delivery: &Delivery, why: &str) {
    assert!(
        !delivery.redelivered && delivery.delivery_count == 0,
        "a first delivery must have redelivered = false and delivery_count = 0 ({why}), got {delivery:?}"
    );
}

fn assert_redelivery(delivery: &Delivery, count: u32, why: &str) {
    assert!(
        delivery.redelivered,
        "a redelivery must carry redelivered = true ({why}), got {delivery:?}"
    );
    assert_eq!(
        delivery.delivery_count, count,
        "wrong delivery_count ({why}): {delivery:?}"
    );
}

fn assert_exactly_once(received: &[String], expected: &BTreeSet<String>, why: &str) {
    let mut seen = BTreeSet::new();
    let duplicates: Vec<_> = received
        .iter()
        .filter(|b| !seen.insert(b.as_str()))
        .collect();
    assert!(
        duplicates.is_empty(),
        "{why}: delivered more than once: {duplicates:?}"
    );
    let missing: Vec<_> = expected
        .iter()
        .filter(|b| !seen.contains(b.as_str()))
        .collect();
    assert!(missing.is_empty(), "{why}: never delivered: {missing:?}");
    let extra: Vec<_> = seen.iter().filter(|b| !expected.contains(**b)).collect();
    assert!(
        extra.is_empty(),
        "{why}: delivered but never confirmed: {extra:?}"
    );
}

// ---------------------------------------------------------------------------
// The tests.

/// Guarantee 1: 200 publishes from concurrent tasks, all confirmed, are all
/// delivered, each exactly once.
pub async fn confirmed_publish_is_never_lost(broker: Arc<dyn Broker>) {
    const N: usize = 200;
    let queue = unique("confirmed");
    declare(&*broker, &QueueSpec::plain(&queue)).await;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let broker = Arc::clone(&broker);
            let queue = queue.clone();
            tokio::spawn(async move {
                let body = format!("confirmed-{i}");
                broker
                    .publish(&queue, Message::new(body.clone()))
                    .await
                    .map(|()| body)
            })
        })
        .collect();
    let mut confirmed = BTreeSet::new();
    for result in within("200 publish confirms", futures::future::join_all(tasks)).await {
        match result {
            Ok(Ok(body)) => {
                confirmed.insert(body);
            }
            Ok(Err(e)) => panic!("a publish to a healthy, unbounded queue failed: {e}"),
            Err(e) => panic!("a publish task failed: {e}"),
        }
    }
    assert_eq!(confirmed.len(), N);

    let mut consumer = consume(&*broker, &queue, 50).await;
    let mut received = Vec::with_capacity(N);
    // Stop at the first wait of WAIT, to name the missing messages below.
    while received.len() < N {
        match tokio::time::timeout(WAIT, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                received.push(body(&delivery));
                settle(delivery, Disposition::Ack).await;
            }
            Ok(Some(Err(e))) => panic!("the consumer failed: {e}"),
            Ok(None) => panic!("the consumer ended"),
            Err(_) => break,
        }
    }
    assert_exactly_once(&received, &confirmed, "confirmed publishes");
    quiet(
        &mut consumer,
        "every confirmed message was delivered and acked",
    )
    .await;
    wait_depth(&*broker, &queue, empty(), "all acked").await;
}

/// Guarantee 2: a consumer with prefetch 3 holds 3 of 10 ready messages and
/// gets a 4th only once it settles one.
pub async fn no_delivery_beyond_prefetch(broker: Arc<dyn Broker>) {
    const N: usize = 10;
    let queue = unique("prefetch");
    declare(&*broker, &QueueSpec::plain(&queue)).await;
    for i in 0..N {
        publish(&*broker, &queue, Message::new(format!("prefetch-{i}"))).await;
    }
    let mut consumer = consume(&*broker, &queue, 3).await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(
            next(
                &mut consumer,
                &format!("delivery {} of the prefetch of 3", i + 1),
            )
            .await,
        );
    }
    quiet(&mut consumer, "the consumer holds its prefetch of 3").await;
    let mut received: Vec<String> = Vec::new();
    let first = held.remove(0);
    received.push(body(&first));
    settle(first, Disposition::Ack).await;
    held.push(next(&mut consumer, "a 4th delivery after one ack").await);
    quiet(&mut consumer, "the consumer again holds its prefetch of 3").await;
    // Drain: every message exactly once, never more than 3 held.
    while received.len() < N {
        let oldest = held.remove(0);
        received.push(body(&oldest));
        settle(oldest, Disposition::Ack).await;
        if received.len() + held.len() < N {
            held.push(next(&mut consumer, "the next delivery while draining").await);
        }
        assert!(held.len() <= 3, "more than the prefetch held");
    }
    let all = (0..N).map(|i| format!("prefetch-{i}")).collect();
    assert_exactly_once(&received, &all, "prefetch drain");
}

/// Guarantee 3: dropping a consumer with an unsettled delivery redelivers it
/// with `redelivered` set and the count one higher, body and headers intact.
pub async fn consumer_drop_redelivers_with_flag_and_count(broker: Arc<dyn Broker>) {
    let queue = unique("drop");
    declare(&*broker, &QueueSpec::plain(&queue)).await;
    let sent = Message::new("lease-lost")
        .header(ATTEMPT_HEADER, "1")
        .header("x-conformance", "kept");
    publish(&*broker, &queue, sent.clone()).await;

    let mut consumer = consume(&*broker, &queue, 1).await;
    let first = next(&mut consumer, "the first delivery").await;
    assert_first(&first, "published once");
    drop(consumer); // `first` stays unsettled: its lease is lost

    for count in 1..=2 {
        let mut consumer = consume(&*broker, &queue, 1).await;
        let again = next(
            &mut consumer,
            &format!("redelivery {count} after the consumer was dropped"),
        )
        .await;
        assert_redelivery(
            &again,
            count,
            "consumer dropped with the delivery unsettled",
        );
        assert_eq!(again.body, sent.body, "the redelivered body changed");
        assert_headers_kept(&sent, &again, "redelivery");
        if count == 2 {
            settle(again, Disposition::Ack).await;
            quiet(&mut consumer, "the redelivered message was acked").await;
        }
        // Otherwise drop the consumer with `again` unsettled.
    }
    drop(first);
    wait_depth(&*broker, &queue, empty(), "the message was acked").await;
}

/// Guarantee 3: [`Disposition::Requeue`] redelivers with `redelivered` set and
/// the count one higher, body and headers intact.
pub async fn requeue_redelivers_with_flag_and_count(broker: Arc<dyn Broker>) {
    let queue = unique("requeue");
    declare(&*broker, &QueueSpec::plain(&queue)).await;
    let sent = Message::new("requeue-me").header("x-conformance", "kept");
    publish(&*broker, &queue, sent.clone()).await;
    let mut consumer = consume(&*broker, &queue, 1).await;
    let first = next(&mut consumer, "the first delivery").await;
    assert_first(&first, "published once");
    settle(first, Disposition::Requeue).await;
    for count in 1..=2 {
        let again = next(&mut consumer, &format!("redelivery {count} after Requeue")).await;
        assert_redelivery(&again, count, "settled with Requeue");
        assert_eq!(again.body, sent.body, "the requeued body changed");
        assert_headers_kept(&sent, &again, "requeue");
        let disposition = if count == 2 {
            Disposition::Ack
        } else {
            Disposition::Requeue
        };
        settle(again, disposition).await;
    }
    quiet(&mut consumer, "the requeued message was acked").await;
    wait_depth(&*broker, &queue, empty(), "the message was acked").await;
}

/// Guarantee 8: [`Disposition::Release`] redelivers with `redelivered` set
/// and the count unchanged, body and headers intact; released more times
/// than the delivery limit allows, the message is still delivered, and a
/// `Requeue` after that counts on from where it stood.
pub async fn release_redelivers_without_counting(broker: Arc<dyn Broker>) {
    let queue = unique("release");
    let dead = unique("release.dead");
    declare(
        &*broker,
        &QueueSpec::plain(&queue)
            .delivery_limit(1)
            .dead_letter(&dead),
    )
    .await;
    let sent = Message::new("release-me").header("x-conformance", "kept");
    publish(&*broker, &queue, sent.clone()).await;
    let mut consumer = consume(&*broker, &queue, 1).await;
    let first = next(&mut consumer, "the first delivery").await;
    assert_first(&first, "published once");
    settle(first, Disposition::Requeue).await;
    let mut again = next(&mut consumer, "the redelivery after Requeue").await;
    assert_redelivery(&again, 1, "settled with Requeue");
    for round in 1..=4 {
        settle(again, Disposition::Release).await;
        again = next(&mut consumer, &format!("delivery after release {round}")).await;
        assert_redelivery(&again, 1, "released: the count stays");
        assert_eq!(again.body, sent.body, "the released body changed");
        assert_headers_kept(&sent, &again, "release");
    }
    // The limit (1) is reached: one more Requeue dead-letters it.
    settle(again, Disposition::Requeue).await;
    let mut dead_consumer = consume(&*broker, &dead, 1).await;
    let dead_letter = next(&mut dead_consumer, "the dead letter after the limit").await;
    assert_eq!(
        dead_letter.body, sent.body,
        "the dead letter's body changed"
    );
    settle(dead_letter, Disposition::Ack).await;
    quiet(&mut consumer, "the message was dead-lettered").await;
}

/// Guarantee 4: with a delivery limit of 2 a message is delivered three
/// times (counts 0, 1, 2), then moves to the dead-letter queue with reason
/// `delivery_limit`, whether its lease ends by `Requeue` or by a dropped
/// consumer.
pub async fn delivery_limit_dead_letters(broker: Arc<dyn Broker>) {
    let queue = unique("limit");
    let dead = unique("limit.dead");
    declare(
        &*broker,
        &QueueSpec::plain(&queue)
            .delivery_limit(2)
            .dead_letter(&dead),
    )
    .await;
    let mut dead_consumer = consume(&*broker, &dead, 1).await;

    for (name, by_drop) in [("poison-requeued", false), ("poison-dropped", true)] {
        let sent = Message::new(name).header("x-conformance", "kept");
        publish(&*broker, &queue, sent.clone()).await;
        let mut consumer = consume(&*broker, &queue, 1).await;
        for count in 0..=2 {
            let delivery = next(&mut consumer, &format!("delivery {count} of {name}")).await;
            assert_eq!(delivery.body, sent.body);
            assert_eq!(
                delivery.delivery_count, count,
                "wrong delivery_count under a delivery limit of 2: {delivery:?}"
            );
            if by_drop {
                drop(consumer);
                drop(delivery);
                consumer = consume(&*broker, &queue, 1).await;
            } else {
                settle(delivery, Disposition::Requeue).await;
            }
        }
        quiet(
            &mut consumer,
            &format!("{name} was delivered 3 times under a delivery limit of 2"),
        )
        .await;
        // Before the next message is published: a consumer merely dropped
        // might still be handed it on a networked broker.
        within("closing the consumer", consumer.close()).await;
        wait_depth(
            &*broker,
            &queue,
            empty(),
            "the message went to the dead-letter queue",
        )
        .await;

        let dead_letter = next(
            &mut dead_consumer,
            &format!("{name} in the dead-letter queue"),
        )
        .await;
        assert_eq!(dead_letter.body, sent.body);
        assert_eq!(
            dead_letter
                .headers
                .get(DEAD_REASON_HEADER)
                .map(String::as_str),
            Some("delivery_limit"),
            "the dead letter must say why: {dead_letter:?}"
        );
        assert_headers_kept(&sent, &dead_letter, "dead-lettering");
        assert_eq!(dead_letter.queue, dead);
        settle(dead_letter, Disposition::Ack).await;
    }
    quiet(&mut dead_consumer, "each message was dead-lettered once").await;
}

/// Guarantee 4 with a [`QueueSpec::limit_dead_letter`] queue: a message
/// that passes the limit of 1 by `Requeue` or by dropped consumers goes
/// there with reason `delivery_limit`, while one a consumer settles
/// `DeadLetter` goes to the dead-letter queue. The limit queue is declared
/// along with the queue, without a delivery limit of its own, and what its
/// own consumer dead-letters goes on to the same dead-letter queue.
pub async fn past_the_limit_unjudged_goes_to_the_limit_queue(broker: Arc<dyn Broker>) {
    let queue = unique("lost");
    let dead = unique("lost.dead");
    let lost = unique("lost.lost");
    let mut spec = QueueSpec::plain(&queue)
        .delivery_limit(1)
        .dead_letter(&dead);
    spec.limit_dead_letter = Some(lost.clone());
    declare(&*broker, &spec).await;
    let mut lost_consumer = consume(&*broker, &lost, 3).await;
    let mut dead_consumer = consume(&*broker, &dead, 3).await;

    let judged = Message::new("judged").header("x-conformance", "kept");
    publish(&*broker, &queue, judged.clone()).await;
    let mut consumer = consume(&*broker, &queue, 1).await;
    let delivery = next(&mut consumer, "the message to judge").await;
    let reason = "conformance: judged".to_owned();
    settle(delivery, Disposition::DeadLetter { reason }).await;
    let dead_letter = next(&mut dead_consumer, "the judged message").await;
    assert_eq!(dead_letter.body, judged.body, "{dead_letter:?}");
    settle(dead_letter, Disposition::Ack).await;

    for (name, by_drop) in [("unjudged-requeued", false), ("unjudged-dropped", true)] {
        let sent = Message::new(name).header("x-conformance", "kept");
        publish(&*broker, &queue, sent.clone()).await;
        for count in 0..=1 {
            let delivery = next(&mut consumer, &format!("delivery {count} of {name}")).await;
            assert_eq!(delivery.body, sent.body);
            if by_drop {
                drop(consumer);
                drop(delivery);
                consumer = consume(&*broker, &queue, 1).await;
            } else {
                settle(delivery, Disposition::Requeue).await;
            }
        }
        let past = next(&mut lost_consumer, &format!("{name} in the limit queue")).await;
        assert_past_limit_fresh(&past, &sent, &lost);
        let reason = format!("conformance: {name} answered");
        settle(past, Disposition::DeadLetter { reason }).await;
        let dead_letter = next(&mut dead_consumer, &format!("{name} dead-lettered")).await;
        assert_eq!(dead_letter.body, sent.body, "{dead_letter:?}");
        assert_eq!(
            dead_letter
                .headers
                .get(DEAD_REASON_HEADER)
                .map(String::as_str),
            Some(format!("conformance: {name} answered").as_str()),
        );
        settle(dead_letter, Disposition::Ack).await;
    }
    // A released copy that passes the limit arrives there as a new
    // message too, and a lease it loses there counts from 0.
    let sent = Message::new("released").header("x-conformance", "kept");
    publish(&*broker, &queue, sent.clone()).await;
    let first = next(&mut consumer, "the message to release").await;
    settle(first, Disposition::Requeue).await;
    let again = next(&mut consumer, "the redelivery to release").await;
    settle(again, Disposition::Release).await;
    let released = next(&mut consumer, "the released copy").await;
    settle(released, Disposition::Requeue).await;
    let past = next(&mut lost_consumer, "the released copy in the limit queue").await;
    assert_past_limit_fresh(&past, &sent, &lost);
    // The limit queue has no delivery limit of its own: lost there again
    // and again (past the queue's limit of 1), the message comes back.
    let mut held = past;
    for count in 1..=3 {
        drop(held);
        drop(lost_consumer);
        lost_consumer = consume(&*broker, &lost, 3).await;
        held = next(
            &mut lost_consumer,
            &format!("the limit queue's redelivery {count}"),
        )
        .await;
        assert_eq!(held.body, sent.body, "{held:?}");
        assert_eq!(
            held.delivery_count, count,
            "counted afresh in the limit queue: {held:?}"
        );
    }
    settle(held, Disposition::Ack).await;

    quiet(&mut consumer, "every message passed the limit").await;
    quiet(&mut lost_consumer, "only the unjudged passed the limit").await;
    quiet(&mut dead_consumer, "each message was dead-lettered once").await;
}

/// A message that passed the limit into `lost`: the body and the message's
/// headers, with reason `delivery_limit`, as a first delivery there.
fn assert_past_limit_fresh(past: &Delivery, sent: &Message, lost: &str) {
    assert_eq!(past.body, sent.body, "{past:?}");
    assert_eq!(past.queue, lost);
    assert_eq!(
        past.headers.get(DEAD_REASON_HEADER).map(String::as_str),
        Some("delivery_limit"),
        "the message past the limit must say why: {past:?}"
    );
    assert_headers_kept(sent, past, "moving past the limit");
    assert_eq!(past.delivery_count, 0, "not counted afresh: {past:?}");
    assert!(
        !past.headers.contains_key(RELEASED_HEADER),
        "it still carries the released count: {past:?}"
    );
}

/// Guarantee 7: [`Disposition::DeadLetter`] moves the message to the
/// dead-letter queue with the reason; [`Disposition::Ack`] removes it.
pub async fn dead_letter_and_ack_are_final(broker: Arc<dyn Broker>) {
    let queue = unique("final");
    let dead = unique("final.dead");
    declare(&*broker, &QueueSpec::plain(&queue).dead_letter(&dead)).await;
    let poison = Message::new("to-dead-letter").header("x-conformance", "kept");
    publish(&*broker, &queue, poison.clone()).await;
    publish(&*broker, &queue, Message::new("to-ack")).await;

    let mut consumer = consume(&*broker, &queue, 2).await;
    for _ in 0..2 {
        let delivery = next(&mut consumer, "a delivery to settle").await;
        let disposition = if delivery.body == poison.body {
            Disposition::DeadLetter {
                reason: "conformance: poison".into(),
            }
        } else {
            Disposition::Ack
        };
        settle(delivery, disposition).await;
    }
    quiet(&mut consumer, "both messages were settled for good").await;
    wait_depth(&*broker, &queue, empty(), "acked and dead-lettered").await;

    let mut dead_consumer = consume(&*broker, &dead, 2).await;
    let dead_letter = next(&mut dead_consumer, "the dead letter").await;
    assert_eq!(
        dead_letter.body, poison.body,
        "the acked message was dead-lettered"
    );
    assert_eq!(
        dead_letter
            .headers
            .get(DEAD_REASON_HEADER)
            .map(String::as_str),
        Some("conformance: poison"),
        "the dead letter must carry the reason: {dead_letter:?}"
    );
    assert_headers_kept(&poison, &dead_letter, "dead-lettering");
    settle(dead_letter, Disposition::Ack).await;
    quiet(&mut dead_consumer, "only the one message was dead-lettered").await;
    wait_depth(&*broker, &dead, empty(), "the dead letter was acked").await;
}

/// Guarantee 5: 500 messages published one after another reach a single
/// consumer that acks each in publish order.
pub async fn single_consumer_gets_publish_order(broker: Arc<dyn Broker>) {
    const N: usize = 500;
    let queue = unique("fifo");
    declare(&*broker, &QueueSpec::plain(&queue)).await;
    let mut consumer = consume(&*broker, &queue, 10).await;
    let publisher = {
        let broker = Arc::clone(&broker);
        let queue = queue.clone();
        tokio::spawn(async move {
            for i in 0..N {
                publish(&*broker, &queue, Message::new(format!("{i:04}"))).await;
            }
        })
    };
    for i in 0..N {
        let delivery = next(&mut consumer, &format!("message {i} of {N}")).await;
        let expected = format!("{i:04}");
        assert_eq!(
            body(&delivery),
            expected,
            "out of publish order: expected message {expected}, got {delivery:?}"
        );
        settle(delivery, Disposition::Ack).await;
    }
    if let Err(e) = within("the publisher", publisher).await {
        panic!("the publisher failed: {e}");
    }
    quiet(&mut consumer, "all 500 were delivered").await;
}

/// Guarantee 6: a queue of max length 50 refuses publishes beyond it with
/// `QueueFull` and never holds more ready; a slow consumer with prefetch 5 never
/// holds more than 5; every confirmed message is consumed exactly once and
/// no refused one ever is.
pub async fn bounded_memory_under_a_slow_consumer(broker: Arc<dyn Broker>) {
    const MAX: usize = 50;
    const PREFETCH: u16 = 5;
    const REFUSED: usize = 10;
    const MORE: usize = 150;
    let queue = unique("bounded");
    declare(&*broker, &QueueSpec::plain(&queue).max_length(MAX)).await;

    let mut confirmed = BTreeSet::new();
    for i in 0..MAX {
        let body = format!("fill-{i}");
        publish(&*broker, &queue, Message::new(body.clone())).await;
        confirmed.insert(body);
    }
    let mut refused = BTreeSet::new();
    for i in 0..REFUSED {
        let body = format!("refused-{i}");
        match within(
            "a publish beyond max_length",
            broker.publish(&queue, Message::new(body.clone())),
        )
        .await
        {
            Err(Error::QueueFull { max, .. }) => {
                assert_eq!(max, MAX, "QueueFull names the wrong max")
            }
            other => panic!(
                "publish {} beyond max_length {MAX}: expected QueueFull, got {other:?}",
                i + 1
            ),
        }
        refused.insert(body);
    }
    let full = depth(&*broker, &queue).await;
    assert!(
        full.ready <= MAX as u64,
        "the queue holds more than max_length {MAX} ready: {full:?}"
    );

    // A publisher keeps pushing, retrying on QueueFull, while a slow consumer drains.
    let publisher = {
        let broker = Arc::clone(&broker);
        let queue = queue.clone();
        tokio::spawn(async move {
            let (mut confirmed, mut refusals) = (Vec::with_capacity(MORE), 0usize);
            for i in 0..MORE {
                let body = format!("more-{i}");
                loop {
                    match broker.publish(&queue, Message::new(body.clone())).await {
                        Ok(()) => break,
                        Err(Error::QueueFull { .. }) => {
                            refusals += 1;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err(e) => panic!("publish failed with {e}, expected Ok or QueueFull"),
                    }
                }
                confirmed.push(body);
                let now = depth(&*broker, &queue).await;
                assert!(
                    now.ready <= MAX as u64,
                    "the queue holds more than max_length {MAX} ready: {now:?}"
                );
                assert!(
                    now.unsettled <= u64::from(PREFETCH),
                    "the only consumer (prefetch {PREFETCH}) holds more: {now:?}"
                );
            }
            (confirmed, refusals)
        })
    };

    let total = MAX + MORE;
    let mut consumer = consume(&*broker, &queue, PREFETCH).await;
    let mut held = std::collections::VecDeque::new();
    for _ in 0..PREFETCH {
        held.push_back(next(&mut consumer, "filling the prefetch").await);
    }
    quiet(&mut consumer, "a slow consumer holds its prefetch of 5").await;
    let mut received = Vec::with_capacity(total);
    while received.len() < total {
        let Some(oldest) = held.pop_front() else {
            panic!("nothing held with {} of {total} received", received.len());
        };
        received.push(body(&oldest));
        settle(oldest, Disposition::Ack).await;
        tokio::time::sleep(Duration::from_millis(2)).await; // slow
        if received.len() + held.len() < total {
            held.push_back(
                next(
                    &mut consumer,
                    &format!("message {} of {total}", received.len() + held.len() + 1),
                )
                .await,
            );
        }
        let now = depth(&*broker, &queue).await;
        assert!(
            now.ready <= MAX as u64 && now.unsettled <= u64::from(PREFETCH),
            "max_length {MAX} or prefetch {PREFETCH} exceeded: {now:?}"
        );
    }
    let (more, refusals) = match within("the publisher", publisher).await {
        Ok(done) => done,
        Err(e) => panic!("the publisher failed: {e}"),
    };
    assert!(
        refusals > 0,
        "the publisher never met a full queue: the test proves nothing"
    );
    confirmed.extend(more);
    assert_exactly_once(&received, &confirmed, "bounded queue");
    assert!(
        received.iter().all(|b| !refused.contains(b)),
        "a publish refused with QueueFull was stored"
    );
    quiet(&mut consumer, "every confirmed message was consumed").await;
    wait_depth(&*broker, &queue, empty(), "all acked").await;
}

/// Guarantee 7: settling a delivery whose consumer was dropped fails with
/// `LeaseLost`, and changes nothing: the message is delivered again and is
/// neither acked nor dead-lettered.
pub async fn settle_after_consumer_drop_is_lease_lost(broker: Arc<dyn Broker>) {
    let queue = unique("leaselost");
    let dead = unique("leaselost.dead");
    declare(&*broker, &QueueSpec::plain(&queue).dead_letter(&dead)).await;
    publish(&*broker, &queue, Message::new("ack-too-late")).await;
    publish(&*broker, &queue, Message::new("dead-letter-too-late")).await;

    let mut consumer = consume(&*broker, &queue, 2).await;
    let a = next(&mut consumer, "the first delivery").await;
    let b = next(&mut consumer, "the second delivery").await;
    drop(consumer);
    for (delivery, disposition) in [
        (a, Disposition::Ack),
        (
            b,
            Disposition::DeadLetter {
                reason: "too late".into(),
            },
        ),
    ] {
        let what = format!("settling with {disposition:?} after the consumer was dropped");
        let result = within(&what, delivery.settle(disposition)).await;
        assert_eq!(result, Err(Error::LeaseLost), "{what}");
    }

    let mut consumer = consume(&*broker, &queue, 2).await;
    let mut received = Vec::new();
    for _ in 0..2 {
        let again = next(&mut consumer, "a redelivery after the lease was lost").await;
        assert_redelivery(&again, 1, "the consumer was dropped");
        received.push(body(&again));
        settle(again, Disposition::Ack).await;
    }
    let both = ["ack-too-late", "dead-letter-too-late"]
        .map(String::from)
        .into();
    assert_exactly_once(&received, &both, "settled after the lease was lost");
    let mut dead_consumer = consume(&*broker, &dead, 1).await;
    quiet(&mut dead_consumer, "a late DeadLetter must change nothing").await;
}

/// [`Broker::publish`] to a queue never declared fails with `NoSuchQueue`,
/// as do publishing to and consuming a name longer than any queue may have.
///
/// Adapter-dependent: the contract requires it only "when the broker can
/// tell" (a Kafka cluster that auto-creates topics cannot). Such an adapter
/// must still refuse: it checks the queues it has declared itself.
pub async fn publish_to_undeclared_queue_fails(broker: Arc<dyn Broker>) {
    let queue = unique("undeclared");
    let result = within(
        "a publish to an undeclared queue",
        broker.publish(&queue, Message::new("nowhere")),
    )
    .await;
    assert_eq!(
        result,
        Err(Error::NoSuchQueue(queue.clone())),
        "publish to an undeclared queue"
    );
    // A name no queue can have (RabbitMQ's limit is 255 bytes, Kafka's 249
    // characters), as a hostile `reply_to` may carry: an error, neither a
    // panic nor a broken connection.
    for long in [format!("{queue}.{}", "x".repeat(256)), "q".repeat(10_000)] {
        let result = within(
            "a publish to a queue name past any broker's limit",
            broker.publish(&long, Message::new("nowhere")),
        )
        .await;
        assert!(
            matches!(result, Err(Error::NoSuchQueue(_))),
            "publish to a {}-byte queue name: {result:?}",
            long.len()
        );
        let consumed = within(
            "consuming a queue name past any broker's limit",
            broker.consume(&long, 1),
        )
        .await;
        assert!(
            consumed.is_err(),
            "consuming a {}-byte queue name succeeded",
            long.len()
        );
    }
    // The broker serves on.
    let ok = unique("after_long_names");
    declare(broker.as_ref(), &QueueSpec::plain(&ok)).await;
    publish(broker.as_ref(), &ok, Message::new("still here")).await;
    let mut consumer = consume(broker.as_ref(), &ok, 1).await;
    let d = next(&mut consumer, "the message published after the refusals").await;
    assert_eq!(d.body.as_ref(), b"still here");
    settle(d, Disposition::Ack).await;
}

/// [`Broker::consumers`]: none on a queue nobody consumes or that does not
/// exist, one while a consumer is open, none again once it is closed; or
/// `None` every time, from an adapter that cannot tell.
pub async fn consumers_are_counted(broker: Arc<dyn Broker>) {
    let count = |queue: String| {
        let broker = broker.clone();
        async move {
            match within("counting consumers", broker.consumers(&queue)).await {
                Ok(n) => n,
                Err(e) => panic!("counting the consumers of `{queue}` failed: {e}"),
            }
        }
    };
    let queue = unique("consumers");
    let missing = count(unique("consumers_missing")).await;
    declare(&*broker, &QueueSpec::plain(&queue)).await;
    let before = count(queue.clone()).await;
    let consumer = consume(&*broker, &queue, 1).await;
    let during = count(queue.clone()).await;
    within("closing the consumer", consumer.close()).await;
    // A broker may count a consumer gone a moment after it closed
    // (RabbitMQ's quorum queues apply it through their log).
    let mut after = count(queue.clone()).await;
    for _ in 0..WAIT.as_millis() / POLL.as_millis() {
        if after != Some(1) {
            break;
        }
        tokio::time::sleep(POLL).await;
        after = count(queue.clone()).await;
    }
    let seen = [missing, before, during, after];
    assert!(
        seen == [Some(0), Some(0), Some(1), Some(0)] || seen == [None; 4],
        "consumers of a missing queue, before, during and after a consumer: {seen:?}"
    );
}

/// The two bands of a service's calls ([`QueueSpec::call_bands`]): a call
/// published by priority ([`call_queue_for`]) reaches its own band's queue
/// and only that one, headers kept (on RabbitMQ through each band's
/// exchange).
pub async fn each_band_of_a_service_keeps_its_calls(broker: Arc<dyn Broker>) {
    let service = format!("conformance-bands-{}", uuid::Uuid::now_v7().simple());
    for spec in QueueSpec::call_bands(&service) {
        declare(&*broker, &spec).await;
    }
    let sent = |text: &str| Message::new(text.to_owned()).header(ATTEMPT_HEADER, "1");
    for (priority, text) in [
        (None, "normal"),
        (Some(4), "four"),
        (Some(5), "five"),
        (Some(9), "nine"),
    ] {
        publish(&*broker, &call_queue_for(&service, priority), sent(text)).await;
    }
    for (queue, expected) in [
        (call_queue(&service), ["normal", "four"]),
        (high_queue(&service), ["five", "nine"]),
    ] {
        let mut consumer = consume(&*broker, &queue, 4).await;
        let mut got = BTreeSet::new();
        for _ in expected {
            let d = next(&mut consumer, &format!("{expected:?} in `{queue}`")).await;
            assert_headers_kept(&sent(&body(&d)), &d, "a call of a band");
            got.insert(body(&d));
            settle(d, Disposition::Ack).await;
        }
        let expected: BTreeSet<String> = expected.iter().map(|t| (*t).to_owned()).collect();
        assert_eq!(got, expected, "the calls of `{queue}`");
        quiet(&mut consumer, "each band holds its own calls only").await;
    }
}
