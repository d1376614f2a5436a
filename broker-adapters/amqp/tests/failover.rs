//! A broker URL that names several nodes: the adapter connects through
//! whichever node answers, and when the node its connections go through
//! is lost, its next operations go through another.
//!
//! The nodes are TCP relays of the test's own in front of the RabbitMQ that
//! `CALLQ_AMQP_URL` names (or RabbitMQ on this machine): a relay that stops
//! drops every connection through it and refuses new ones, as a killed node
//! does; a relay that takes connections and never answers plays a hung one.
//! Nothing here skips: a broker that cannot be reached fails the tests.
#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use callq_broker::{Broker, Disposition, Error, Message, QueueSpec};
use callq_broker_amqp::{AmqpBroker, Options};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

fn url() -> String {
    std::env::var("CALLQ_AMQP_URL").unwrap_or_else(|_| callq_broker_amqp::DEFAULT_URL.into())
}

/// The broker's URL cut around its host: `(scheme://userinfo@, host:port, /vhost?query)`.
fn parts() -> (String, String, String) {
    let url = url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let at = rest.find('@').map_or(0, |i| i + 1);
    let end = rest[at..].find(['/', '?']).map_or(rest.len(), |i| at + i);
    (
        format!("{scheme}://{}", &rest[..at]),
        rest[at..end].to_owned(),
        rest[end..].to_owned(),
    )
}

/// A URL naming `hosts` as the nodes of the test's broker.
fn url_of(hosts: &[String]) -> String {
    let (head, _, tail) = parts();
    format!("{head}{}{tail}", hosts.join(","))
}

/// An address nothing listens on.
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// A TCP relay to the broker on a port of its own, which can be stopped
/// (its connections dropped, new ones refused) and started again.
struct Relay {
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
    /// Connections relayed since it started.
    relayed: Arc<AtomicUsize>,
}

impl Relay {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut relay = Self {
            addr,
            task: None,
            relayed: Arc::default(),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&mut self, listener: TcpListener) {
        let target = parts().1;
        let relayed = self.relayed.clone();
        self.task = Some(tokio::spawn(async move {
            // The connections die with this task (and so with `stop`).
            let mut links = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(Ok(mut broker)) =
                    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&target)).await
                else {
                    continue;
                };
                relayed.fetch_add(1, Ordering::AcqRel);
                links.spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                });
            }
        }));
    }

    /// Drops every connection and refuses new ones.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Takes connections again, on the same port.
    fn restart(&mut self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        self.serve(socket.listen(64).unwrap());
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }
}

/// One message through `queue`, published and consumed, retried until it
/// makes it or `within` passes (each step bounded by the adapter's own
/// timeouts): how long it took.
async fn roundtrip(broker: &AmqpBroker, queue: &str, within: Duration) -> Duration {
    let started = Instant::now();
    let body = format!("{:?}", started);
    let mut last = None;
    while started.elapsed() < within {
        let sent =
            callq_broker::publish_within(broker, queue, &Message::new(body.clone()), within).await;
        if let Err(e) = sent {
            last = Some(e);
            continue;
        }
        match broker.consume(queue, 16).await {
            Ok(mut consumer) => loop {
                let next = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await;
                match next {
                    Ok(Some(Ok(d))) => {
                        let mine = d.body.as_ref() == body.as_bytes();
                        let _ = d.settle(Disposition::Ack).await;
                        if mine {
                            return started.elapsed();
                        }
                    }
                    Ok(Some(Err(e))) => {
                        last = Some(e);
                        break;
                    }
                    Ok(None) => {
                        last = Some(Error::Closed);
                        break;
                    }
                    Err(_) => {
                        last = Some(Error::Timeout(Duration::from_secs(10)));
                        break;
                    }
                }
            },
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no roundtrip through {queue} within {within:?}: {last:?}");
}

/// A dead node and two live ones (relays): the adapter connects, and each
/// time the relay its connections go through stops, its next publish and
/// consume go through the other one, within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_fail_over_to_the_next_node() {
    let mut a = Relay::start().await;
    let mut b = Relay::start().await;
    let url = url_of(&[dead_address(), a.host(), b.host()]);
    let broker = AmqpBroker::connect_with(Options {
        url,
        timeout: Duration::from_secs(5),
        ..Options::default()
    })
    .await
    .unwrap();
    assert_eq!(broker.place().matches(',').count(), 2, "{}", broker.place());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let spec = QueueSpec::plain(format!("callq.failover.{stamp}"));
    broker.declare(&spec).await.unwrap();
    roundtrip(&broker, &spec.name, Duration::from_secs(20)).await;
    let mut cut = 0;
    for turn in 0..4 {
        let (down, up) = if turn % 2 == 0 {
            (&mut a, &mut b)
        } else {
            (&mut b, &mut a)
        };
        let before = down.relayed.load(Ordering::Acquire) + up.relayed.load(Ordering::Acquire);
        let carried = down.relayed.load(Ordering::Acquire);
        down.stop().await;
        let took = roundtrip(&broker, &spec.name, Duration::from_secs(20)).await;
        let reconnected =
            down.relayed.load(Ordering::Acquire) + up.relayed.load(Ordering::Acquire) > before;
        eprintln!(
            "turn {turn}: relay {} stopped ({carried} connections through it so far); \
             roundtrip {took:?}, reconnected: {reconnected}",
            down.addr
        );
        if reconnected {
            cut += 1;
        }
        down.restart();
    }
    assert!(
        cut > 0,
        "no stopped relay carried a connection: the failover was never needed"
    );
    broker
        .declare(&spec)
        .await
        .expect("declares go through the live node too");
}

/// No node answers: connecting fails within the timeout (plus one backoff
/// pause), naming every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_answering_fails_in_bounded_time_naming_every_node() {
    let hosts = [dead_address(), dead_address(), dead_address()];
    let started = Instant::now();
    let e = AmqpBroker::connect_with(Options {
        url: url_of(&hosts),
        timeout: Duration::from_secs(2),
        ..Options::default()
    })
    .await
    .unwrap_err()
    .to_string();
    let took = started.elapsed();
    eprintln!("refused after {took:?}: {e}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    for host in &hosts {
        assert!(e.contains(host.as_str()), "{host} missing in: {e}");
    }
}

/// A node that takes the TCP connection and never answers (a hung one)
/// holds a connection attempt for its share of the timeout only: the
/// adapter connects through the live node within the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_costs_its_share_of_the_timeout_only() {
    // The kernel completes the handshakes of a listener nobody accepts on.
    let hung = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live = Relay::start().await;
    for order in [
        [hung.local_addr().unwrap().to_string(), live.host()],
        [live.host(), hung.local_addr().unwrap().to_string()],
    ] {
        let started = Instant::now();
        let broker = AmqpBroker::connect_with(Options {
            url: url_of(&order),
            timeout: Duration::from_secs(4),
            ..Options::default()
        })
        .await
        .unwrap();
        let took = started.elapsed();
        eprintln!("connected through {order:?} in {took:?}");
        assert!(took < Duration::from_secs(4), "took {took:?}");
        drop(broker);
    }
}
