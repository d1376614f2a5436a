//! The suite catches what it claims to: each test runs against the embedded
//! broker wrapped in a fault that breaks its guarantee, and must fail.
//! Run on the paused clock, so that the suite's timeouts cost nothing.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use callq_broker::{
    Broker, Consumer, Delivery, Disposition, Error, Message, QueueDepth, QueueSpec, Settle,
};
use callq_broker_embedded::EmbeddedBroker;
use callq_conformance as suite;
use tokio::sync::Mutex;

/// One way to break the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Guarantee 1: every 10th publish is confirmed and dropped.
    LoseEveryTenthPublish,
    /// Guarantee 2: consumers get one more than their prefetch.
    PrefetchPlusOne,
    /// Guarantee 3: redeliveries do not say so.
    ForgetRedelivered,
    /// Guarantee 3: delivery counts stay at 0.
    CountStuckAtZero,
    /// Guarantee 3: redeliveries lose their headers.
    DropHeadersOnRedelivery,
    /// Guarantee 4: one delivery more than the limit allows.
    LimitPlusOne,
    /// Guarantee 7: `DeadLetter` acks instead.
    DeadLetterAcks,
    /// Guarantee 7: `Ack` requeues instead.
    AckRequeues,
    /// Guarantee 5: messages are stored in swapped pairs.
    SwapPairs,
    /// Guarantee 6: the max length is ignored.
    Unbounded,
    /// Guarantee 7: settling a lost lease succeeds.
    LateSettleSucceeds,
    /// `NoSuchQueue`: publishing declares the queue.
    AutoDeclare,
    /// No fault: the embedded broker as it is.
    None,
}

struct Faulty {
    inner: EmbeddedBroker,
    fault: Fault,
    publishes: AtomicUsize,
    held: Mutex<Option<(String, Message)>>,
}

impl Faulty {
    fn new(fault: Fault) -> Self {
        Self {
            inner: EmbeddedBroker::new(),
            fault,
            publishes: AtomicUsize::new(0),
            held: Mutex::new(None),
        }
    }
}

fn faulty(fault: Fault) -> Arc<dyn Broker> {
    Arc::new(Faulty::new(fault))
}

#[async_trait]
impl Broker for Faulty {
    fn kind(&self) -> &'static str {
        "faulty"
    }

    async fn declare(&self, spec: &QueueSpec) -> Result<(), Error> {
        let mut spec = spec.clone();
        match self.fault {
            Fault::LimitPlusOne => spec.delivery_limit = spec.delivery_limit.map(|n| n + 1),
            Fault::Unbounded => spec.max_length = None,
            _ => {}
        }
        self.inner.declare(&spec).await
    }

    async fn publish(&self, queue: &str, message: Message) -> Result<(), Error> {
        match self.fault {
            Fault::LoseEveryTenthPublish
                if self.publishes.fetch_add(1, Ordering::Relaxed) % 10 == 9 =>
            {
                Ok(())
            }
            Fault::SwapPairs => {
                let mut held = self.held.lock().await;
                match held.take() {
                    None => {
                        *held = Some((queue.to_owned(), message));
                        Ok(())
                    }
                    Some((first_queue, first)) => {
                        self.inner.publish(queue, message).await?;
                        self.inner.publish(&first_queue, first).await
                    }
                }
            }
            Fault::AutoDeclare => {
                if let Err(Error::NoSuchQueue(_)) = self.inner.depth(queue).await {
                    self.inner.declare(&QueueSpec::plain(queue)).await?;
                }
                self.inner.publish(queue, message).await
            }
            _ => self.inner.publish(queue, message).await,
        }
    }

    async fn consume(&self, queue: &str, prefetch: u16) -> Result<Box<dyn Consumer>, Error> {
        let prefetch = match self.fault {
            Fault::PrefetchPlusOne => prefetch + 1,
            _ => prefetch,
        };
        Ok(Box::new(FaultyConsumer {
            inner: self.inner.consume(queue, prefetch).await?,
            fault: self.fault,
        }))
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, Error> {
        self.inner.depth(queue).await
    }
}

struct FaultyConsumer {
    inner: Box<dyn Consumer>,
    fault: Fault,
}

#[async_trait]
impl Consumer for FaultyConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, Error>> {
        let d = match self.inner.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        let mut headers = d.headers.clone();
        let mut redelivered = d.redelivered;
        let mut count = d.delivery_count;
        match self.fault {
            Fault::ForgetRedelivered => redelivered = false,
            Fault::CountStuckAtZero => count = 0,
            Fault::DropHeadersOnRedelivery if redelivered => headers.clear(),
            _ => {}
        }
        let (body, queue) = (d.body.clone(), d.queue.clone());
        let settle = FaultySettle {
            inner: d,
            fault: self.fault,
        };
        Some(Ok(Delivery::new(
            body,
            headers,
            redelivered,
            count,
            queue,
            Box::new(settle),
        )))
    }
}

struct FaultySettle {
    inner: Delivery,
    fault: Fault,
}

#[async_trait]
impl Settle for FaultySettle {
    async fn settle(self: Box<Self>, disposition: Disposition) -> Result<(), Error> {
        let disposition = match (self.fault, disposition) {
            (Fault::DeadLetterAcks, Disposition::DeadLetter { .. }) => Disposition::Ack,
            (Fault::AckRequeues, Disposition::Ack) => Disposition::Requeue,
            (_, d) => d,
        };
        match (self.fault, self.inner.settle(disposition).await) {
            (Fault::LateSettleSucceeds, Err(Error::LeaseLost)) => Ok(()),
            (_, result) => result,
        }
    }
}

/// Whether a test body fails (panics).
async fn fails(test: impl Future<Output = ()> + Send + 'static) -> bool {
    tokio::spawn(test).await.is_err()
}

macro_rules! caught {
    ($($name:ident: $fault:ident => $($test:ident),+;)*) => {
        $(
            #[tokio::test(start_paused = true)]
            async fn $name() {
                $(
                    assert!(
                        fails(suite::$test(faulty(Fault::$fault))).await,
                        concat!(stringify!($test), " passed against ", stringify!($fault))
                    );
                )+
            }
        )*
    };
}

caught! {
    lost_publish_is_caught: LoseEveryTenthPublish => confirmed_publish_is_never_lost;
    prefetch_overrun_is_caught: PrefetchPlusOne => no_delivery_beyond_prefetch, bounded_memory_under_a_slow_consumer;
    missing_redelivered_flag_is_caught: ForgetRedelivered =>
        consumer_drop_redelivers_with_flag_and_count, requeue_redelivers_with_flag_and_count,
        settle_after_consumer_drop_is_lease_lost;
    stuck_delivery_count_is_caught: CountStuckAtZero =>
        consumer_drop_redelivers_with_flag_and_count, requeue_redelivers_with_flag_and_count,
        delivery_limit_dead_letters;
    lost_headers_are_caught: DropHeadersOnRedelivery =>
        consumer_drop_redelivers_with_flag_and_count, requeue_redelivers_with_flag_and_count;
    late_delivery_limit_is_caught: LimitPlusOne => delivery_limit_dead_letters;
    dead_letter_as_ack_is_caught: DeadLetterAcks => dead_letter_and_ack_are_final;
    ack_as_requeue_is_caught: AckRequeues => dead_letter_and_ack_are_final;
    reordering_is_caught: SwapPairs => single_consumer_gets_publish_order;
    unbounded_queue_is_caught: Unbounded => bounded_memory_under_a_slow_consumer;
    successful_late_settle_is_caught: LateSettleSucceeds => settle_after_consumer_drop_is_lease_lost;
    auto_declare_is_caught: AutoDeclare => publish_to_undeclared_queue_fails;
}

// The wrapper itself is faithful: without a fault it passes the whole suite
// (this also runs the macro, as an adapter crate would).
mod without_fault {
    use super::{Fault, Faulty};

    callq_conformance::conformance_suite!(broker = Faulty::new(Fault::None), start_paused = true,);
}
