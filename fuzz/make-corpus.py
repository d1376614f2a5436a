#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets: fuzz/corpus/<target>/.

The seeds are the examples of the JSON Schema files (schemas/json/), the
examples of DESIGN.md and docs/REPLAY.md, and the hostile bodies the tests
feed the decoders (schemas/src/decode.rs, schemas/tests/, node/src/capture.rs):
each a file named after what it is. Run from anywhere:

    python3 fuzz/make-corpus.py

It replaces every file of fuzz/corpus/ (findings live in fuzz/regressions/,
which it leaves alone). Inputs longer than the fuzzers' -max_len (4096
bytes, see scripts/fuzz) are not written.
"""

import copy
import json
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
MAX_LEN = 4096

ID = "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f"
NIL = "00000000-0000-0000-0000-000000000000"


def text(value):
    """Compact JSON, UTF-8 kept as it is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def schema_examples(name):
    path = ROOT / "schemas" / "json" / f"{name}.v1.schema.json"
    return json.loads(path.read_text())["examples"]


def edited(base, **fields):
    """`base` with fields set; a value of `...` removes the field."""
    body = copy.deepcopy(base)
    for key, value in fields.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def call_seeds():
    good = schema_examples("call")[0]
    minimal = {"v": 1, "call_id": ID, "service": "echo", "method": "echo", "args": 1}
    seeds = {"schema-example": text(good), "minimal": text(minimal)}
    # DESIGN.md's example, spaced and wrapped as it is there.
    seeds["design-example"] = (
        b'{"v": 1, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f",\n'
        b' "service": "bank", "method": "transfer", "args": {"from": "a", "to": "b", "cents": 500},\n'
        b' "reply_to": "callq.reply.shop-1", "session_id": "s-42",\n'
        b' "deadline": "2026-11-22T12:00:05Z", "idempotency_key": "order-981",\n'
        b' "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}'
    )
    cases = {
        "args-array": edited(good, args=[1, "two", [3]]),
        "args-brackets-in-strings": edited(good, args={"t": '[[{{"', "reply_to": "x"}),
        "args-float": edited(good, args={"f": 0.1, "e": 1.5e300, "n": -0.0}),
        "unknown-field": edited(good, urgency={"level": 3}),
        "call-id-uppercase": edited(good, call_id=ID.upper()),
        "call-id-braced": edited(good, call_id="{" + ID + "}"),
        "call-id-short": edited(good, call_id=ID[1:]),
        "call-id-nil": edited(good, call_id=NIL),
        "call-id-number": edited(good, call_id=42),
        "deadline-offset-fraction": edited(good, deadline="2026-11-22T12:00:05.123456789+05:30"),
        "deadline-lowercase": edited(good, deadline="2026-11-22t12:00:05z"),
        "deadline-minus-zero": edited(good, deadline="2026-11-22T12:00:05-00:00"),
        "deadline-leap-second": edited(good, deadline="2016-12-31T23:59:60Z"),
        "deadline-no-offset": edited(good, deadline="2026-11-22T12:00:05"),
        "deadline-february-30": edited(good, deadline="2026-02-30T12:00:05Z"),
        "deadline-unix": edited(good, deadline=1795348805),
        "reply-to-server-named": edited(good, reply_to="amq.gen-JzTY20BRgKO-HjmUJj0wLg"),
        "reply-to-255": edited(good, reply_to="r" * 255),
        "reply-to-256": edited(good, reply_to="r" * 256),
        "reply-to-empty": edited(good, reply_to=""),
        "reply-to-space": edited(good, reply_to="reply queue"),
        "reply-to-non-ascii": edited(good, reply_to="r\u00e9ponse"),
        "reply-to-coordinator": edited(good, reply_to="callq.coordinator"),
        "reply-to-call-queue": edited(good, reply_to="callq.call.bank"),
        "reply-to-number": edited(good, reply_to=5),
        "service-238": edited(good, service="s" * 238),
        "service-239": edited(good, service="s" * 239),
        "service-slash": edited(good, service="a/b"),
        "service-newline": edited(good, service="bank\n"),
        "service-non-ascii": edited(good, service="b\u00e4nk"),
        "service-empty": edited(good, service=""),
        "method-empty": edited(good, method=""),
        "method-non-ascii-255": edited(good, method="\u043f" * 255),
        "method-256": edited(good, method="m" * 256),
        "session-id-array": edited(good, session_id=["s-42"]),
        "idempotency-key-object": edited(good, idempotency_key={"k": 1}),
        "traceparent-number": edited(good, traceparent=1),
        "v-2": edited(good, v=2),
        "v-0": edited(good, v=0),
        "v-string": edited(good, v="1"),
        "v-99-no-method": edited(good, v=99, method=...),
        "no-service": edited(good, service=...),
        "no-args": edited(good, args=...),
    }
    seeds.update({name: text(body) for name, body in cases.items()})
    raw = {
        "not-json": b"not json",
        "invalid-utf8": b"\xff\xfe",
        "empty": b"",
        "a-string": ('"' + ID + '"').encode(),
        "an-array": text([1, ID, "bank", "transfer", {}, "callq.reply.shop-1"]),
        "deep-array": b"[" * 100 + b"]" * 100,
        "deep-args": text(edited(good, args=[])).replace(b'"args":[]', b'"args":' + b"[" * 70 + b"]" * 70),
        "duplicate-v": text(good).replace(b'"v":1,', b'"v":1,"v":1,', 1),
        "v-float": text(good).replace(b'"v":1,', b'"v":1.0,', 1),
        "lone-surrogate": text(edited(good, session_id="X")).replace(b'"X"', b'"\\ud800"'),
        "escaped-reply-to": text(edited(good, reply_to="q")).replace(b'"q"', b'"q\\u002e1"'),
        "truncated": text(good)[:60],
        "trailing-garbage": text(good) + b" x",
    }
    seeds.update(raw)
    return seeds


def reply_seeds():
    seeds = {f"schema-example-{i}": text(e) for i, e in enumerate(schema_examples("reply"))}
    ok = {"v": 1, "call_id": ID, "attempt": 1, "outcome": "ok", "result": {"balance": 1200}}
    err = {"v": 1, "call_id": ID, "attempt": 1, "outcome": "error", "error": {"code": "c", "message": "m"}}
    cases = {
        "ok-null-result": edited(ok, result=None),
        "bad-request-nil-id": edited(err, call_id=NIL, error={"code": "bad_request", "message": "not json"}),
        "expired": edited(err, outcome="expired", error={"code": "deadline_passed", "message": "late"}),
        "fatal-traces": edited(err, outcome="fatal", attempt=2,
                               error={"code": "worker_lost_after_traces", "message": "lost", "traces": ["mail.sent"]}),
        "call-id-simple-form": edited(ok, call_id=ID.replace("-", "")),
        "attempt-0": edited(ok, attempt=0),
        "attempt-float": edited(ok, attempt=1.5),
        "attempt-above-u32": edited(ok, attempt=4294967296),
        "ok-without-result": edited(ok, result=...),
        "fatal-without-error": edited(err, outcome="fatal", error=...),
        "outcome-unknown": edited(ok, outcome="maybe"),
        "outcome-uppercase": edited(ok, outcome="OK"),
        "error-without-code": edited(err, error={"message": "m"}),
        "error-a-string": edited(err, error="c"),
        "traces-numbers": edited(err, error={"code": "c", "message": "m", "traces": [1]}),
        "v-2": edited(ok, v=2),
        "call-id-number": edited(ok, call_id=42),
    }
    seeds.update({name: text(body) for name, body in cases.items()})
    seeds["not-json"] = b"{not json"
    seeds["deep-result"] = text(edited(ok, result=[])).replace(b'"result":[]', b'"result":' + b"[" * 70 + b"]" * 70)
    return seeds


def protocol_seeds():
    seeds = {}
    for side in ("request", "answer"):
        for i, e in enumerate(schema_examples(side)):
            seeds[f"{side}-{e['type']}-{i}"] = text(e)
    requests = schema_examples("request")
    heartbeat = requests[0]
    lease = {"call_id": ID, "copy": 1, "token": "0193c1e2-7c00-7000-8000-0000000000aa"}
    head = {"v": 1, "worker_id": "w-2", "reply_to": "callq.worker.w-2"}
    more = {
        "request-abandon": {**head, "type": "abandon", "lease": lease, "attempt": 2, "kept": ["pg.tx"]},
        "request-unclaim": {**head, "type": "unclaim", "lease": lease},
        "request-completed": {**head, "type": "completed", "calls": [
            {"lease": lease, "attempt": 1},
            {"lease": lease, "attempt": 1, "reply": {"v": 1, "call_id": ID, "attempt": 1, "outcome": "ok", "result": None}}]},
        "request-leave": {**head, "type": "leave"},
        "request-agent-heartbeat": {**head, "type": "agent_heartbeat", "services": ["bank"], "workers": 2},
        "request-drain": {**head, "type": "drain", "req_id": ID, "worker": "w-1"},
        "request-expires": {**head, "type": "status", "req_id": ID, "expires_ms": 1795348805000},
        "answer-drain": {"v": 1, "type": "drain"},
        "answer-draining": {"v": 1, "epoch": 3, "type": "draining", "req_id": ID, "found": True},
        "answer-resume-done": {"v": 1, "type": "resume", "req_id": ID, "decision": {"decision": "done", "reply": None}},
        "answer-resume-superseded": {"v": 1, "type": "resume", "req_id": ID,
                                     "decision": {"decision": "superseded", "attempt": 3}},
        "answer-trace-refused": {"v": 1, "type": "trace", "req_id": ID,
                                 "decision": {"decision": "refused", "reason": "revoked", "superseded": True}},
        "answer-complete-accepted": {"v": 1, "type": "complete", "req_id": ID, "decision": {"decision": "accepted"}},
        # Hostile: what the schema tests refuse.
        "bad-unknown-type": edited(heartbeat, type="shutdown"),
        "bad-type-null": edited(heartbeat, type=None),
        "bad-no-type": edited(heartbeat, type=...),
        "bad-v-string": edited(heartbeat, v="1"),
        "bad-v-2": edited(heartbeat, v=2),
        "bad-capacity-float": edited(heartbeat, capacity=1.5),
        "bad-capacity-above-u32": edited(heartbeat, capacity=4294967296),
        "bad-state": edited(heartbeat, state="Active"),
        "bad-services-numbers": edited(heartbeat, services=[1]),
        "bad-in-flight-object": edited(heartbeat, in_flight={}),
    }
    seeds.update({name: text(body) for name, body in more.items()})
    seeds["bad-not-json"] = b'{"v": 1, "type": '
    seeds["bad-deep"] = b'{"v":1,"type":"leave","x":' + b"[" * 200 + b"]" * 200 + b"}"
    return seeds


def peek_seeds():
    seeds = {name: body for name, body in call_seeds().items()
             if name in ("schema-example", "design-example", "escaped-reply-to", "deep-array",
                         "truncated", "not-json", "reply-to-coordinator", "v-99-no-method")}
    seeds["deep-then-fields"] = (
        b'{"args": ' + b"[" * 1000 + b"1" + b"]" * 1000
        + b', "reply_to": "callq.reply.x", "call_id": "' + ID.encode() + b'", "v": 99}'
    )
    seeds["escaped-quote-before"] = b'{"a": "x\\"y", "reply_to": "q\\u002e1"}'
    seeds["reply-to-number"] = b'{"reply_to": 5}'
    seeds["nested-reply-to"] = b'{"args": {"reply_to": "no"}}'
    seeds["cut-in-args"] = b'{"reply_to": "r", "args": [1, 2'
    seeds["escaped-key"] = b'{"reply\\u005fto": "callq.reply.x", "v": 1}'
    seeds["duplicate-keys"] = b'{"reply_to": "a", "reply_to": 5, "v": 1, "v": "2"}'
    seeds["call-id-braced"] = ('{"call_id": "{' + ID + '}"}').encode()
    return seeds


def capture_seeds():
    header = {"callq_capture": 1, "broker": "amqp", "service": "echo"}
    call = {"type": "call", "at_ms": 12, "attempt": 1, "headers": {},
            "body": {"v": 1, "call_id": ID, "service": "echo", "method": "echo", "args": {"a": 1}}}
    reply = {"type": "reply", "at_ms": 15,
             "body": {"v": 1, "call_id": ID, "attempt": 1, "outcome": "ok", "result": {"a": 1}}}
    kafka = dict(call, ts_ms=1700000000123, partition=2, offset=41)
    bad_input = {"type": "call", "at_ms": 4, "attempt": 2, "headers": {"x": "y"}, "body_text": "{not json"}

    def lines(*records):
        return b"".join(text(r) + b"\n" for r in records)

    return {
        "replay-doc": lines(header, call, reply),
        "kafka-origin": lines(dict(header, broker="kafka"), kafka, reply),
        "body-text": lines(dict(header, broker="embedded"), bad_input),
        "bad-lines": lines(header, call) + b'{"type": "gossip", "at_ms": 1}\n\n{"type": "reply", "at_ms": 9, "bo',
        "not-json-line": lines(header) + b"{not json\n" + lines(reply),
        "invalid-utf8-line": lines(header) + b'{"type": "call", "at_ms": 1, "body_text": "\xff"}\n' + lines(reply),
        "crlf": lines(header).replace(b"\n", b"\r\n") + lines(call).replace(b"\n", b"\r\n"),
        "unknown-version": lines(edited(header, callq_capture=9)),
        "no-header": lines(call),
        "header-not-json": b"callq capture\n",
        "header-missing-service": lines(edited(header, service=...)),
        "empty": b"",
    }


def main():
    targets = {
        "call": call_seeds(),
        "reply": reply_seeds(),
        "protocol": protocol_seeds(),
        "peek": peek_seeds(),
        "capture": capture_seeds(),
    }
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    for target, seeds in targets.items():
        folder = CORPUS / target
        folder.mkdir(parents=True)
        written = 0
        for name, body in sorted(seeds.items()):
            if len(body) > MAX_LEN:
                continue
            (folder / name).write_bytes(body)
            written += 1
        print(f"{target}: {written} seeds in {folder.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
