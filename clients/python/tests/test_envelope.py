"""Call bodies: ids, deadlines, every option, the contract's bounds, and the
shipped JSON Schema (schemas/json/call.v1.schema.json) agreeing with them."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, List

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from callq_client import CallOptions, InvalidCall, build_call, check_call, encode, uuid7
from callq_client.envelope import MAX_BODY_BYTES, MAX_DEPTH, message_key, rfc3339

from .conftest import load_schema

CALL = Draft202012Validator(load_schema("call"), format_checker=FormatChecker())
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def schema_errors(body: Dict[str, Any]) -> List[str]:
    return [e.message for e in CALL.iter_errors(body)]


def test_call_ids_are_uuid_v7_lowercase_and_time_ordered() -> None:
    ids = [uuid7() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert text == str(u) == text.lower()
    # The first 48 bits are the time in ms: the ids never go back in time.
    stamps = [int(i.replace("-", "")[:12], 16) for i in ids]
    assert stamps == sorted(stamps)
    now_ms = int(datetime.now(timezone.utc).timestamp() * 1000)
    assert abs(stamps[-1] - now_ms) < 5_000


def test_a_minimal_call_validates_against_the_schema() -> None:
    body = build_call("echo", "echo", {"i": 1})
    assert set(body) == {"v", "call_id", "service", "method", "args"}
    assert body["v"] == 1 and body["args"] == {"i": 1}
    assert schema_errors(body) == []


def test_every_option_is_carried_and_validates_against_the_schema() -> None:
    deadline = datetime(2026, 11, 22, 12, 0, 5, tzinfo=timezone.utc)
    body = build_call(
        "bank",
        "transfer",
        {"from": "a", "to": "b", "cents": 500},
        reply_to="callq.reply.shop-1",
        options=CallOptions(
            deadline=deadline,
            session_id="s-42",
            idempotency_key="order-981",
            traceparent=TRACEPARENT,
            not_before=deadline - timedelta(seconds=5),
            priority=7,
            concurrency_key="account-a",
            extra={"x_custom": [1, 2]},
        ),
    )
    assert body["deadline"] == "2026-11-22T12:00:05Z"
    assert body["not_before"] == "2026-11-22T12:00:00Z"
    assert body["session_id"] == "s-42"
    assert body["idempotency_key"] == "order-981"
    assert body["traceparent"] == TRACEPARENT
    assert body["priority"] == 7 and body["concurrency_key"] == "account-a"
    assert body["x_custom"] == [1, 2]
    assert body["reply_to"] == "callq.reply.shop-1"
    assert schema_errors(body) == []
    # Compact UTF-8 JSON that reads back the same.
    assert json.loads(encode(body)) == body


def test_the_deadline_is_now_plus_the_timeout_in_utc() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=timezone(timedelta(hours=2)))
    body = build_call("echo", "echo", None, options=CallOptions(timeout=1.5), now=now)
    assert body["deadline"] == "2026-01-02T01:04:07.178Z"
    assert schema_errors(body) == []
    assert build_call("echo", "echo", None, default_timeout=30.0)["deadline"].endswith("Z")
    # An explicit deadline wins over the default timeout.
    d = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert build_call("echo", "echo", None, options=CallOptions(deadline=d), default_timeout=5)["deadline"] == (
        "2030-01-01T00:00:00Z"
    )


def test_a_naive_datetime_is_refused() -> None:
    with pytest.raises(InvalidCall, match="time zone"):
        build_call("echo", "echo", None, options=CallOptions(deadline=datetime(2030, 1, 1)))


def test_the_kafka_key_is_the_session_else_the_call_id() -> None:
    body = build_call("echo", "echo", None)
    assert message_key(body) == body["call_id"]
    assert message_key(build_call("echo", "echo", None, options=CallOptions(session_id="s-1"))) == "s-1"


def test_a_given_call_id_is_kept_lowercase() -> None:
    cid = uuid7().upper()
    assert build_call("echo", "echo", None, options=CallOptions(call_id=cid))["call_id"] == cid.lower()


# Bodies that break a rule: the client refuses each before publishing, and
# the shipped schema refuses each too (the two agree).
GOOD: Dict[str, Any] = {"v": 1, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f", "service": "echo", "method": "echo", "args": {}}
BAD: Dict[str, Dict[str, Any]] = {
    "v 2": {"v": 2},
    "v text": {"v": "1"},
    "v true": {"v": True},
    "call_id nil": {"call_id": "00000000-0000-0000-0000-000000000000"},
    "call_id not a uuid": {"call_id": "order-1"},
    "service empty": {"service": ""},
    "service with a slash": {"service": "a/b"},
    "service too long": {"service": "s" * 239},
    "method empty": {"method": ""},
    "method too long": {"method": "m" * 256},
    "reply_to a call queue": {"reply_to": "callq.call.echo"},
    "reply_to the coordinator": {"reply_to": "callq.coordinator"},
    "reply_to with a space": {"reply_to": "my replies"},
    "reply_to empty": {"reply_to": ""},
    "reply_to too long": {"reply_to": "r" * 256},
    "session_id too long": {"session_id": "s" * 256},
    "idempotency_key too long": {"idempotency_key": "k" * 256},
    "deadline without T": {"deadline": "2026-11-22 12:00:05Z"},
    "deadline without offset": {"deadline": "2026-11-22T12:00:05"},
    "traceparent version ff": {"traceparent": "ff" + TRACEPARENT[2:]},
    "traceparent zero trace id": {"traceparent": "00-" + "0" * 32 + TRACEPARENT[35:]},
    "traceparent zero parent id": {"traceparent": TRACEPARENT[:36] + "0" * 16 + "-01"},
    "traceparent upper case": {"traceparent": TRACEPARENT.upper()},
    "traceparent 00 with more": {"traceparent": TRACEPARENT + "-x"},
    "session_id null": {"session_id": None},
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_body_that_breaks_a_rule_is_refused_by_the_client_and_by_the_schema(name: str) -> None:
    body = {**GOOD, **BAD[name]}
    with pytest.raises(InvalidCall):
        check_call(body)
    assert schema_errors(body), f"the schema accepts {name}: {body}"


@pytest.mark.parametrize("missing", ["v", "call_id", "service", "method", "args"])
def test_a_body_without_a_required_field_is_refused(missing: str) -> None:
    body = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(InvalidCall):
        check_call(body)
    assert schema_errors(body)


def test_edge_values_that_are_legal_pass_both() -> None:
    for extra in (
        {"service": "s" * 238},
        {"method": "m" * 255},
        {"reply_to": "billing.replies"},
        {"reply_to": "callq.reply.x"},
        {"reply_to": "r" * 255},
        {"session_id": ""},
        {"deadline": "2026-11-22T12:00:05.123456+02:00"},
        {"args": None},
        {"traceparent": "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more"},
        {"call_id": GOOD["call_id"].upper()},
    ):
        body = {**GOOD, **extra}
        check_call(body)
        assert schema_errors(body) == [], extra


def test_build_call_refuses_what_the_contract_refuses() -> None:
    with pytest.raises(InvalidCall, match="service"):
        build_call("no such/service", "m", None)
    with pytest.raises(InvalidCall, match="method"):
        build_call("echo", "m" * 300, None)
    with pytest.raises(InvalidCall, match="priority"):
        build_call("echo", "echo", None, options=CallOptions(priority=10))
    with pytest.raises(InvalidCall, match="timeout"):
        build_call("echo", "echo", None, options=CallOptions(timeout=0))
    with pytest.raises(InvalidCall, match="replace"):
        build_call("echo", "echo", None, options=CallOptions(extra={"service": "other"}))


def test_the_body_limits_of_workers_are_kept() -> None:
    deep: Any = 0
    for _ in range(MAX_DEPTH):  # with the envelope itself: one level too deep
        deep = [deep]
    with pytest.raises(InvalidCall, match="nests"):
        encode(build_call("echo", "echo", deep))
    encode(build_call("echo", "echo", deep[0]))
    with pytest.raises(InvalidCall, match="bytes"):
        encode(build_call("echo", "echo", "x" * MAX_BODY_BYTES))
    with pytest.raises(InvalidCall, match="not JSON"):
        encode(build_call("echo", "echo", {"x": object()}))
    with pytest.raises(InvalidCall, match="not JSON"):
        encode(build_call("echo", "echo", float("nan")))


def test_rfc3339_writes_what_the_schema_calls_a_date_time() -> None:
    for at in (
        datetime(2026, 11, 22, 12, 0, 5, tzinfo=timezone.utc),
        datetime(2026, 11, 22, 12, 0, 5, 1000, tzinfo=timezone(timedelta(hours=-5))),
        datetime.now(timezone.utc),
    ):
        body = {**GOOD, "deadline": rfc3339(at)}
        assert schema_errors(body) == []
        check_call(body)


def test_priorities_from_five_go_to_the_high_band() -> None:
    from callq_client.envelope import call_queue, is_high

    assert call_queue("bank") == "callq.call.bank"
    assert [call_queue("bank", p) for p in range(5)] == ["callq.call.bank"] * 5
    assert [call_queue("bank", p) for p in range(5, 10)] == ["callq.high.bank"] * 5
    # Not a priority the contract allows: not the high band.
    assert not any(is_high(p) for p in (None, True, 10, "9", 7.0))
