#!/usr/bin/env python3
"""A client of callq written without callq: Python and pika, the wire contract only.

Run by tests/pika.rs against a cluster of real `callq` processes on RabbitMQ:

    pika_client.py AMQP_URL [--service echo] [--calls 50] [--timeout 30]

It follows DESIGN.md, "Wire contract (version 1)", and schemas/json/:

- declares a durable reply queue of its own and turns on publisher confirms;
- publishes `--calls` calls of `echo.echo` to the default exchange with the call
  queue `callq.call.<service>` as routing key (mandatory, persistent,
  `application/json`), each with a UUID v7 `call_id` and `args` `{"i": i}`;
- publishes malformed calls, as "Bad input" names them: three that still carry
  a readable `reply_to` (a missing field, truncated JSON, an unknown `v`) and
  must be answered `error`/`bad_request`, and one that is not JSON at all and
  can get no reply;
- reads replies until every call it can expect an answer to has one (bounded by
  `--timeout`), checks each against the reply contract, and prints one JSON
  summary line on stdout, which includes every malformed body (hex) so that the
  caller can find them in the dead-letter queue.

Exit status: 0 when every check held; 1 on a contract violation (the reason on
stderr); 2 when pika is missing; 3 when the watchdog fired.
"""

import argparse
import json
import os
import signal
import sys
import time
import uuid

from callq_wire import call as wire_call
from callq_wire import uuid7

try:
    import pika
    import pika.exceptions
except ImportError as exc:  # The test must fail, loudly, not skip.
    print(
        f"pika_client: cannot import pika with {sys.executable} ({exc}); "
        "install python3-pika (scripts/services does)",
        file=sys.stderr,
    )
    sys.exit(2)


def fail(message):
    """A contract violation: say what, exit 1."""
    print(f"pika_client: FAIL: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="amqp://user:password@host:port/vhost")
    parser.add_argument("--service", default="echo")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the replies")
    args = parser.parse_args()

    # The last resort: whatever blocks, the script ends.
    def watchdog(_signum, _frame):
        print(f"pika_client: FAIL: watchdog: still running after {args.timeout + 30:.0f} s", file=sys.stderr, flush=True)
        os._exit(3)

    signal.signal(signal.SIGALRM, watchdog)
    signal.alarm(int(args.timeout) + 30)

    started = time.monotonic()
    call_queue = f"callq.call.{args.service}"

    params = pika.URLParameters(args.url)
    params.connection_attempts = 1
    params.socket_timeout = 10
    params.stack_timeout = 15
    params.blocked_connection_timeout = 10
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError as exc:
        fail(f"cannot connect to RabbitMQ at {params.host}:{params.port} vhost {params.virtual_host!r}: {exc!r}")
    channel = connection.channel()

    # The workers declare the call queue; a publisher only checks it is there.
    try:
        channel.queue_declare(call_queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        fail(f"call queue {call_queue} does not exist (no worker of {args.service!r} declared it): {exc}")

    reply_queue = f"py.replies.{uuid.uuid4()}"
    channel.queue_declare(reply_queue, durable=True)
    channel.confirm_delivery()

    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)

    def publish(body):
        """Publishes one call; returns once RabbitMQ confirmed it."""
        try:
            channel.basic_publish(
                exchange="",
                routing_key=call_queue,
                body=body,
                properties=props,
                mandatory=True,
            )
        except pika.exceptions.UnroutableError:
            fail(f"RabbitMQ returned a call as unroutable: is {call_queue} gone?")
        except pika.exceptions.NackError:
            fail(f"RabbitMQ refused (nack) a call to {call_queue}: the queue may be full")

    # What each call_id must be answered with.
    expected = {}

    for i in range(args.calls):
        call_id = uuid7()
        call = wire_call(call_id, args.service, "echo", {"i": i}, reply_queue)
        publish(json.dumps(call).encode("utf-8"))
        expected[call_id] = ("ok", {"i": i})

    malformed = []

    def bad(kind, body, call_id=None):
        publish(body)
        malformed.append({"kind": kind, "call_id": call_id, "hex": body.hex()})
        if call_id is not None:
            expected[call_id] = ("bad_request", kind)

    # Valid JSON with a reply_to, but no `method` (a required field).
    cid = uuid7()
    bad(
        "missing_method",
        json.dumps(
            {"v": 1, "call_id": cid, "service": args.service, "args": {}, "reply_to": reply_queue}
        ).encode("utf-8"),
        cid,
    )
    # Truncated JSON: not JSON, but `call_id` and `reply_to` come before the cut.
    cid = uuid7()
    bad(
        "truncated_json",
        (
            f'{{"v":1,"call_id":"{cid}","reply_to":"{reply_queue}",'
            f'"service":"{args.service}","method":"echo","args":{{"i":'
        ).encode("utf-8"),
        cid,
    )
    # A version this contract does not know.
    cid = uuid7()
    bad(
        "unknown_version",
        json.dumps(
            {
                "v": 2,
                "call_id": cid,
                "service": args.service,
                "method": "echo",
                "args": {},
                "reply_to": reply_queue,
            }
        ).encode("utf-8"),
        cid,
    )
    # Not JSON, not even UTF-8: no reply is possible; it is only dead-lettered.
    bad("not_json", b"\xff\xfe garbage")

    # Read the replies: the first per call_id counts, later duplicates must agree.
    replies = {}
    duplicates = 0
    max_attempt = 0
    deadline = time.monotonic() + args.timeout
    for method, properties, body in channel.consume(reply_queue, inactivity_timeout=1.0):
        if method is not None:
            channel.basic_ack(method.delivery_tag)
            if properties.content_type != "application/json":
                fail(f"reply content type is {properties.content_type!r}, not application/json: {body!r}")
            try:
                reply = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                fail(f"reply is not UTF-8 JSON ({exc}): {body!r}")
            if not isinstance(reply, dict):
                fail(f"reply is not a JSON object: {reply!r}")
            if reply.get("v") != 1 or not is_int(reply.get("v")):
                fail(f"reply v is not the integer 1: {reply!r}")
            call_id = reply.get("call_id")
            if not isinstance(call_id, str) or call_id not in expected:
                fail(f"reply to a call this client did not send (or with an unreadable call_id): {reply!r}")
            attempt = reply.get("attempt")
            if not is_int(attempt) or attempt < 1:
                fail(f"reply attempt is not an integer >= 1: {reply!r}")
            max_attempt = max(max_attempt, attempt)
            if call_id in replies:
                duplicates += 1
                if reply.get("outcome") != replies[call_id].get("outcome"):
                    fail(f"two replies to {call_id} with different outcomes: {replies[call_id]!r} then {reply!r}")
                continue
            want, detail = expected[call_id]
            if want == "ok":
                if reply.get("outcome") != "ok":
                    fail(f"call {detail} answered {reply.get('outcome')!r}, not ok: {reply!r}")
                if "result" not in reply or reply["result"] != detail:
                    fail(f"echo of {detail} answered result {reply.get('result')!r}: {reply!r}")
            else:
                error = reply.get("error")
                if reply.get("outcome") != "error":
                    fail(f"malformed call ({detail}) answered {reply.get('outcome')!r}, not error: {reply!r}")
                if not isinstance(error, dict) or error.get("code") != "bad_request":
                    fail(f"malformed call ({detail}) answered without error.code bad_request: {reply!r}")
                if not isinstance(error.get("message"), str) or not error["message"]:
                    fail(f"malformed call ({detail}) answered without an error.message: {reply!r}")
                for m in malformed:
                    if m["call_id"] == call_id:
                        m["reply"] = reply
            replies[call_id] = reply
        if len(replies) == len(expected):
            break
        if time.monotonic() > deadline:
            missing = sorted(str(expected[c][1]) for c in expected if c not in replies)
            fail(
                f"{len(replies)} of {len(expected)} replies within {args.timeout} s; "
                f"no reply to: {', '.join(missing[:20])}"
            )
    channel.cancel()
    channel.queue_delete(reply_queue)
    connection.close()
    signal.alarm(0)

    ok = sum(1 for r in replies.values() if r["outcome"] == "ok")
    bad_requests = sum(
        1 for r in replies.values() if r["outcome"] == "error" and r["error"]["code"] == "bad_request"
    )
    summary = {
        "calls": args.calls,
        "ok": ok,
        "bad_request": bad_requests,
        "duplicates": duplicates,
        "max_attempt": max_attempt,
        "reply_queue": reply_queue,
        "malformed": malformed,
        "seconds": round(time.monotonic() - started, 3),
        "pika": pika.__version__,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
