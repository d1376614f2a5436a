#!/usr/bin/env python3
"""A client of callq written without callq: Python and confluent-kafka, the wire contract only.

Run by tests/kafka_python.rs against a cluster of real `callq` processes on a
Kafka-protocol broker:

    kafka_client.py BOOTSTRAP [--service echo] [--calls 30] [--timeout 30]

It follows DESIGN.md, "Wire contract (version 1)":

- creates a reply topic of its own (`callq.reply.<client>`, one partition);
- produces `--calls` calls of `echo.echo` to the topic `callq.call.<service>`
  (keyed by `call_id`, idempotent producer, `acks=all`, each delivery report
  awaited), each with a UUID v7 `call_id` and `args` `{"i": i}`, and one call
  without a `method`, which must be answered `error`/`bad_request`;
- reads its reply topic from the start until every call has a reply (bounded
  by `--timeout`), checks each, and prints one JSON summary line on stdout.

Exit status: 0 when every check held; 1 on a contract violation (the reason on
stderr); 2 when confluent-kafka is missing.
"""

import argparse
import json
import sys
import time
import uuid

from callq_wire import call as wire_call
from callq_wire import uuid7

try:
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
except ImportError as exc:  # The test must fail, loudly, not skip.
    print(
        f"kafka_client: cannot import confluent_kafka with {sys.executable} ({exc}); "
        "install python3-confluent-kafka (scripts/services does)",
        file=sys.stderr,
    )
    sys.exit(2)


def fail(message):
    """A contract violation: say what, exit 1."""
    print(f"kafka_client: FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bootstrap", help="host:port of the Kafka-protocol broker")
    parser.add_argument("--service", default="echo")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args()
    started = time.monotonic()

    reply_topic = f"callq.reply.py-{uuid.uuid4().hex}"
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    for topic, future in admin.create_topics([NewTopic(reply_topic, 1, 1)]).items():
        try:
            future.result(timeout=args.timeout)
        except Exception as exc:  # noqa: BLE001 - any failure ends the run
            fail(f"cannot create the reply topic {topic}: {exc}")

    producer = Producer(
        {"bootstrap.servers": args.bootstrap, "enable.idempotence": True, "acks": "all"}
    )
    reports = []

    def report(err, msg):
        reports.append(err)

    expected = {}
    call_topic = f"callq.call.{args.service}"
    for i in range(args.calls):
        call_id = uuid7()
        body = wire_call(call_id, args.service, "echo", {"i": i}, reply_topic)
        producer.produce(call_topic, json.dumps(body).encode("utf-8"), key=call_id, callback=report)
        expected[call_id] = ("ok", {"i": i})
    bad_id = uuid7()
    bad = {"v": 1, "call_id": bad_id, "service": args.service, "args": {}, "reply_to": reply_topic}
    producer.produce(call_topic, json.dumps(bad).encode("utf-8"), key=bad_id, callback=report)
    expected[bad_id] = ("bad_request", "no method")
    if producer.flush(args.timeout) != 0:
        fail(f"calls still unconfirmed after {args.timeout} s")
    errors = [e for e in reports if e is not None]
    if errors or len(reports) != len(expected):
        fail(f"{len(errors)} calls refused by the broker, {len(reports)} reports: {errors[:3]}")

    consumer = Consumer(
        {"bootstrap.servers": args.bootstrap, "group.id": reply_topic, "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(reply_topic, 0, 0)])
    replies = {}
    duplicates = 0
    deadline = time.monotonic() + args.timeout
    while len(replies) < len(expected):
        if time.monotonic() > deadline:
            missing = sorted(str(expected[c][1]) for c in expected if c not in replies)
            fail(f"{len(replies)} of {len(expected)} replies within {args.timeout} s; no reply to: {missing[:20]}")
        msg = consumer.poll(0.2)
        if msg is None:
            continue
        if msg.error():
            fail(f"reading replies: {msg.error()}")
        try:
            reply = json.loads(msg.value().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            fail(f"reply is not UTF-8 JSON ({exc}): {msg.value()!r}")
        call_id = reply.get("call_id") if isinstance(reply, dict) else None
        if reply.get("v") != 1 or call_id not in expected:
            fail(f"reply to a call this client did not send, or not v1: {reply!r}")
        if call_id in replies:
            duplicates += 1
            continue
        want, detail = expected[call_id]
        if want == "ok":
            if reply.get("outcome") != "ok" or reply.get("result") != detail:
                fail(f"call {detail} answered {reply!r}")
        else:
            error = reply.get("error") or {}
            if reply.get("outcome") != "error" or error.get("code") != "bad_request":
                fail(f"the call with {detail} answered {reply!r}, not error/bad_request")
        replies[call_id] = reply
    consumer.close()

    summary = {
        "calls": args.calls,
        "ok": sum(1 for r in replies.values() if r["outcome"] == "ok"),
        "bad_request": sum(1 for r in replies.values() if r["outcome"] == "error"),
        "duplicates": duplicates,
        "seconds": round(time.monotonic() - started, 3),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
