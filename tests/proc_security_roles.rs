//! The least-privilege set-up of docs/SECURITY.md on RabbitMQ: the users,
//! permissions and exchange of `deploy/rabbitmq/definitions.json` loaded
//! into a virtual host of the test's own, the cluster running as
//! `callq-cluster` with a cluster key and `worker.reply_owners`, an
//! operator as `callq-operator`, and the attacker as the client role
//! `client-example`, which may publish calls and read its own replies.
//!
//! Every attack is refused with evidence: RabbitMQ's `ACCESS_REFUSED` (or
//! `PRECONDITION_FAILED` for a forged `user_id`) for what the role may not
//! do, a dead letter for each call the workers refuse; no reply lands in
//! another client's queue, nothing reaches the coordinator, no worker
//! stops, no slot leaks, and good calls are answered right after.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use callq_broker::{
    COORDINATOR_QUEUE, HEARTBEAT_QUEUE, Message, QueueSpec, dead_queue, reply_queue, worker_queue,
};
use callq_broker_signed::{ClusterKey, Signed};
use callq_node::{Admin, CallOptions, Client, ClientOptions};
use callq_schemas::protocol::{AnswerBody, ClusterStatus, WorkerState};
use callq_schemas::{Call, Outcome};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use serde_json::{Value, json};
use support::outcomes::Recorder;
use support::{Proc, count, rabbitmqctl, wait_status};

const DEFINITIONS: &str = include_str!("../deploy/rabbitmq/definitions.json");

/// The users of the set-up, with the victim: a second client.
const USERS: [&str; 4] = [
    "callq-cluster",
    "callq-operator",
    "client-example",
    "client-victim",
];

/// The shipped definitions for `vhost`, with a copy of the example client
/// as `client-victim`; loaded, and each user given `password`.
fn load_roles(vhost: &str, password: &str) {
    let mut defs: Value = serde_json::from_str(DEFINITIONS).unwrap();
    let text = serde_json::to_string(&defs).unwrap();
    assert!(text.contains("client-example"), "{text}");
    for list in ["users", "permissions", "topic_permissions"] {
        let entries = defs[list].as_array_mut().unwrap();
        let victim: Vec<Value> = entries
            .iter()
            .filter(|e| e.to_string().contains("client-example"))
            .map(|e| {
                serde_json::from_str(&e.to_string().replace("client-example", "client-victim"))
                    .unwrap()
            })
            .collect();
        entries.extend(victim);
    }
    let text = serde_json::to_string(&defs)
        .unwrap()
        .replace("\"vhost\":\"callq\"", &format!("\"vhost\":\"{vhost}\""))
        .replace("{\"name\":\"callq\"}", &format!("{{\"name\":\"{vhost}\"}}"));
    let file = std::env::temp_dir().join(format!("{vhost}.definitions.json"));
    std::fs::write(&file, text).unwrap();
    rabbitmqctl(&["import_definitions", file.to_str().unwrap()]);
    // The import is asynchronous: wait for its last part to show.
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while !rabbitmqctl(&["list_topic_permissions", "-p", vhost]).contains("client-victim") {
        assert!(
            std::time::Instant::now() < until,
            "the definitions did not load"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for user in USERS {
        rabbitmqctl(&["change_password", user, password]);
    }
    // guest keeps no rights here: only the roles act in this virtual host.
    rabbitmqctl(&["clear_permissions", "-p", vhost, "guest"]);
}

fn url(user: &str, password: &str, vhost: &str) -> String {
    format!("amqp://{user}:{password}@127.0.0.1:5672/{vhost}")
}

/// Publishes one message with plain lapin, for what callq's adapter never
/// sends (a forged `user_id`, none at all, headers of other types, a body
/// that is not UTF-8); the broker's verdict as text.
async fn raw_publish(
    url: &str,
    exchange: &str,
    routing_key: &str,
    props: BasicProperties,
    body: &[u8],
) -> Result<(), String> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let published = async {
        let confirm = ch
            .basic_publish(exchange.into(), routing_key.into(), options, body, props)
            .await?;
        confirm.await
    };
    let verdict = match tokio::time::timeout(Duration::from_secs(30), published).await {
        Err(_) => Err("no confirm within 30 s".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(other)) => Err(format!("{other:?}")),
    };
    let _ = conn.close(200, "done".into()).await;
    verdict
}

fn props() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// What the broker said to a publish or declare the role may not make.
fn assert_refused(what: &str, verdict: Result<(), String>, code: &str) {
    match verdict {
        Ok(()) => panic!("{what}: the broker took it"),
        Err(e) => assert!(
            e.contains(code),
            "{what}: refused, but not with {code}: {e}"
        ),
    }
}

/// A call body for `echo` with `reply_to` set to `reply_to`.
fn call_to(reply_to: &str) -> Vec<u8> {
    let mut call = serde_json::to_value(Call::new("echo", "echo", json!({"n": 1}))).unwrap();
    call["reply_to"] = json!(reply_to);
    serde_json::to_vec(&call).unwrap()
}

/// The calls the workers must refuse, each becoming one dead letter and no
/// reply: hostile bodies and `reply_to`s, and calls that name another's
/// reply queue. Published through `callq.calls` as the client role.
fn hostile(victim_queue: &str) -> Vec<(&'static str, Vec<u8>)> {
    let mut deep = "[".repeat(100_000);
    deep.push_str(&"]".repeat(100_000));
    let mut big = serde_json::to_value(Call::new("echo", "echo", json!({}))).unwrap();
    big["reply_to"] = json!("callq.reply.client-example.big");
    big["args"] = json!({"pad": "x".repeat(10 << 20)});
    let mut unknown = serde_json::to_value(Call::new("echo", "echo", json!({}))).unwrap();
    unknown["v"] = json!(99);
    unknown["reply_to"] = json!("callq.reply.client-example.v");
    let owned_256 = format!("callq.reply.client-example.{}", "a".repeat(229));
    assert_eq!(owned_256.len(), 256);
    vec![
        (
            "a call answering into the victim's queue",
            call_to(victim_queue),
        ),
        ("reply_to empty", call_to("")),
        ("reply_to of 256 bytes", call_to(&owned_256)),
        ("reply_to of 10 KB", call_to(&"r".repeat(10_000))),
        ("reply_to callq.coordinator", call_to(COORDINATOR_QUEUE)),
        ("reply_to callq.heartbeats", call_to(HEARTBEAT_QUEUE)),
        ("reply_to a call queue", call_to("callq.call.echo")),
        ("reply_to a dead-letter queue", call_to("callq.dead.echo")),
        ("100,000-deep nesting", deep.into_bytes()),
        ("10 MiB", serde_json::to_vec(&big).unwrap()),
        ("unknown version", serde_json::to_vec(&unknown).unwrap()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_role_can_forge_nothing_under_the_documented_roles() {
    let vhost = support::Vhost::create("roles");
    let dir = support::temp_dir("roles");
    let password = format!("pw-{}", uuid::Uuid::now_v7().simple());
    load_roles(&vhost.name, &password);
    let cluster_url = url("callq-cluster", &password, &vhost.name);
    let client_url = url("client-example", &password, &vhost.name);

    let key_file = dir.join("cluster.key");
    std::fs::write(&key_file, format!("{}\n", "5a".repeat(32))).unwrap();
    let key = ClusterKey::from_file(&key_file).unwrap();
    let env = [
        ("CALLQ_CLUSTER_KEY_FILE", key_file.to_str().unwrap()),
        ("CALLQ_WORKER__REPLY_OWNERS", "true"),
        ("CALLQ_WORKER__TRUSTED_PUBLISHERS", "callq-cluster"),
    ];
    let mut coordinator =
        Proc::spawn_env("coordinator", &["coordinator"], &cluster_url, &dir, &env);
    let mut workers: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|id| {
            let args = ["worker", "--services", "echo", "--worker-id", id];
            Proc::spawn_env(id, &args, &cluster_url, &dir, &env)
        })
        .collect();
    let operator = support::amqp(&url("callq-operator", &password, &vhost.name)).await;
    let admin = Admin::connect(
        Arc::new(Signed::new(operator, key)),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let active = |s: &ClusterStatus| count(s, WorkerState::Active) == 2;
    let status = wait_status(&admin, "2 active workers", Duration::from_secs(90), active).await;
    let ids: Vec<String> = status.workers.iter().map(|w| w.worker_id.clone()).collect();

    // The two clients, each on its own reply queue, recording every reply.
    let attacker = support::amqp(&client_url).await;
    let victim_broker = support::amqp(&url("client-victim", &password, &vhost.name)).await;
    let victim = Recorder::for_client(victim_broker.clone(), "client-victim.q").await;
    let own = Recorder::for_client(attacker.clone(), "client-example.q").await;
    let (warm, _) = victim
        .call_after(
            Call::new("echo", "echo", json!({"warm": 1})),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(warm.outcome, Outcome::Ok, "{warm:?}");

    // What the client role may not do at all: the broker refuses it.
    let forged_order =
        serde_json::to_vec(&callq_schemas::protocol::Answer::new(AnswerBody::Drain {})).unwrap();
    let mut control = vec![
        (COORDINATOR_QUEUE.to_owned(), "a request to the coordinator"),
        (HEARTBEAT_QUEUE.to_owned(), "a heartbeat"),
        (
            reply_queue("client-victim.q"),
            "a reply into the victim's queue",
        ),
        (dead_queue("echo"), "a dead letter"),
    ];
    for id in &ids {
        control.push((worker_queue(id), "an order to a worker"));
    }
    for (queue, what) in &control {
        let verdict = attacker
            .publish(queue, Message::new(forged_order.clone()))
            .await
            .map_err(|e| e.to_string());
        assert_refused(what, verdict, "ACCESS_REFUSED");
        // Without the adapter, on the default exchange as a raw client.
        let raw = raw_publish(&client_url, "", queue, props(), &forged_order).await;
        assert_refused(what, raw, "ACCESS_REFUSED");
    }
    for (queue, what) in [
        (COORDINATOR_QUEUE, "reading the coordinator's queue"),
        (HEARTBEAT_QUEUE, "reading the heartbeats"),
        (
            "callq.reply.client-victim.q",
            "reading the victim's replies",
        ),
    ] {
        let verdict = attacker
            .consume(queue, 1)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert_refused(what, verdict, "ACCESS_REFUSED");
    }
    let verdict = attacker
        .declare(&QueueSpec::replies("client-victim.x"))
        .await
        .map_err(|e| e.to_string());
    assert_refused(
        "declaring a queue in the victim's name",
        verdict,
        "ACCESS_REFUSED",
    );
    let verdict = attacker
        .declare(&QueueSpec::calls("echo"))
        .await
        .map_err(|e| e.to_string());
    assert_refused("declaring a call queue", verdict, "ACCESS_REFUSED");
    // A call in the victim's name: RabbitMQ checks user_id.
    let forged_user = props().with_user_id(ShortString::from("client-victim"));
    let verdict = raw_publish(
        &client_url,
        "callq.calls",
        "echo",
        forged_user,
        &call_to("callq.reply.client-victim.q"),
    )
    .await;
    assert_refused(
        "a call carrying the victim's user_id",
        verdict,
        "PRECONDITION_FAILED",
    );

    // What the workers refuse: each becomes one dead letter, unanswered.
    let victim_queue = reply_queue("client-victim.q");
    let mut refused: u64 = 0;
    for (what, body) in hostile(&victim_queue) {
        let message = Message::new(body);
        attacker
            .publish("callq.call.echo", message)
            .await
            .unwrap_or_else(|e| panic!("{what}: the client role may publish calls: {e}"));
        refused += 1;
    }
    // What callq's adapter cannot send: no user_id, a body not UTF-8.
    raw_publish(
        &client_url,
        "callq.calls",
        "echo",
        props(),
        &call_to(&victim_queue),
    )
    .await
    .unwrap();
    refused += 1;
    // (Its bad_request answer goes to a queue nobody declared: dropped.)
    let mut not_utf8 = call_to("callq.reply.client-example.void");
    not_utf8.extend_from_slice(&[0xff, 0xfe, 0x80]);
    let own_user = || props().with_user_id(ShortString::from("client-example"));
    raw_publish(&client_url, "callq.calls", "echo", own_user(), &not_utf8)
        .await
        .unwrap();
    refused += 1;
    // Headers of the wrong type on calls that are otherwise good: each is
    // answered once, `ok` (a header callq cannot read as text is ignored)
    // or `bad_request` (dead-lettered too).
    let mut answered = Vec::new();
    for (name, value) in [
        ("integer", AMQPValue::LongLongInt(4_294_967_295)),
        ("table", AMQPValue::FieldTable(FieldTable::default())),
        ("bool", AMQPValue::Boolean(true)),
    ] {
        let call = Call::new("echo", "echo", json!({"header": name}));
        answered.push(call.call_id);
        let mut body = serde_json::to_value(&call).unwrap();
        body["reply_to"] = json!("callq.reply.client-example.q");
        let mut headers = FieldTable::default();
        headers.insert("callq-attempt".into(), value);
        let p = own_user().with_headers(headers);
        raw_publish(
            &client_url,
            "callq.calls",
            "echo",
            p,
            &serde_json::to_vec(&body).unwrap(),
        )
        .await
        .unwrap();
    }
    own.wait_answered(&answered, Duration::from_secs(60)).await;
    for (id, replies) in own.replies() {
        eprintln!("a call with a header of the wrong type: {replies:?}");
        assert_eq!(replies.len(), 1, "{id}: {replies:?}");
        match replies[0].outcome {
            Outcome::Ok => {}
            _ if replies[0]
                .error
                .as_ref()
                .is_some_and(|e| e.code == "bad_request") =>
            {
                refused += 1
            }
            _ => panic!("{replies:?}"),
        }
    }

    // Every refused call is a dead letter; nothing else is.
    let until = tokio::time::Instant::now() + Duration::from_secs(90);
    let cluster = support::amqp(&cluster_url).await;
    loop {
        let depth = cluster.depth(&dead_queue("echo")).await.unwrap().ready;
        if depth >= refused {
            assert_eq!(depth, refused, "more dead letters than refused calls");
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{depth} of {refused} refused calls dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Good calls of both clients are answered after the attack: the
    // victim's through the recorder, the attacker's through callq's client
    // as the role uses it (no call queue declared).
    let client = Client::connect(
        attacker.clone(),
        ClientOptions {
            client_id: "client-example.cli".into(),
            declare_call_queues: false,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let reply = client
        .call("echo", "echo", json!({"after": 1}), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(reply.outcome, Outcome::Ok, "{reply:?}");
    let (after, _) = victim
        .call_after(
            Call::new("echo", "echo", json!({"after": 2})),
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(after.outcome, Outcome::Ok, "{after:?}");

    // The victim heard only its own two calls; the attacker only the calls
    // it owned the reply queue of.
    let heard = victim.replies();
    assert_eq!(
        heard.len(),
        2,
        "the victim's queue got replies it did not ask for: {heard:?}"
    );
    let own_heard = own.replies();
    assert_eq!(own_heard.len(), answered.len(), "{own_heard:?}");
    let settled = wait_status(&admin, "load back to 0", Duration::from_secs(60), |s| {
        active(s) && s.workers.iter().all(|w| w.free == w.capacity) && s.open_calls == 0
    })
    .await;
    assert_eq!(
        settled.unauthenticated_dropped, 0,
        "something reached the coordinator's queues unsigned"
    );
    assert_eq!(
        cluster.depth(&dead_queue("echo")).await.unwrap().ready,
        refused
    );
    for w in &mut workers {
        assert!(w.running(), "{} exited:\n{}", w.name, w.log());
    }
    assert!(coordinator.running(), "{}", coordinator.log());
    cli_call_as_the_client_role(&dir, &client_url).await;
}

/// `callq call` as the client role, with the settings docs/SECURITY.md
/// gives it, is answered: a call of the normal band, and one of priority 9
/// through the high band's exchange.
async fn cli_call_as_the_client_role(dir: &Path, client_url: &str) {
    for priority in ["0", "9"] {
        let out = std::process::Command::new(support::callq_bin())
            .args([
                "call",
                "echo",
                "echo",
                "{\"cli\": true}",
                "--timeout-ms",
                "60000",
                "--priority",
                priority,
            ])
            .env("CALLQ_BROKER", client_url)
            .env("CALLQ_CLIENT__CLIENT_ID", "client-example.cli2")
            .env("CALLQ_CLIENT__DECLARE_CALL_QUEUES", "false")
            .current_dir(dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("\"ok\""),
            "callq call --priority {priority} as the client role: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
