"""Replies: reading them, the error each outcome raises, and the first
final outcome per call id winning over later copies."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List

import pytest
from jsonschema import Draft202012Validator

from callq_client import (
    BadReply,
    CallCancelled,
    CallError,
    CallExpired,
    CallFatal,
    OutcomeError,
    Router,
    outcome_error,
    parse_reply,
    uuid7,
)

from .conftest import load_schema

REPLY = Draft202012Validator(load_schema("reply"))


def reply(call_id: str, outcome: str = "ok", attempt: int = 1, **fields: Any) -> Dict[str, Any]:
    body: Dict[str, Any] = {"v": 1, "call_id": call_id, "attempt": attempt, "outcome": outcome, **fields}
    return body


def raw(body: Dict[str, Any]) -> bytes:
    return json.dumps(body).encode("utf-8")


def test_the_schemas_examples_read_as_replies() -> None:
    for example in load_schema("reply")["examples"]:
        r = parse_reply(raw(example))
        assert r.call_id == example["call_id"] and r.outcome == example["outcome"]


def test_each_outcome_maps_to_its_error() -> None:
    cid = uuid7()
    ok = parse_reply(raw(reply(cid, result={"balance": 1200})))
    assert ok.ok and ok.unwrap() == {"balance": 1200} and ok.error() is None
    assert parse_reply(raw(reply(cid, result=None))).unwrap() is None

    cases = [
        ("error", {"code": "insufficient_funds", "message": "a has 300"}, CallError),
        ("error", {"code": "bad_request", "message": "method is too long"}, CallError),
        ("fatal", {"code": "worker_lost_after_traces", "message": "lost", "traces": ["mail.sent"]}, CallFatal),
        ("expired", {"code": "deadline_passed", "message": "too late"}, CallExpired),
        ("cancelled", {"code": "cancelled", "message": "the caller cancelled it"}, CallCancelled),
    ]
    for outcome, error, kind in cases:
        assert isinstance(error, dict)
        body = reply(cid, outcome, attempt=2, error=error)
        if outcome != "cancelled":  # not in reply.v1 yet: the cluster does not produce it
            assert list(REPLY.iter_errors(body)) == [], body
        r = parse_reply(raw(body))
        err = outcome_error(r)
        assert isinstance(err, kind) and isinstance(err, OutcomeError)
        assert err.outcome == outcome and err.code == error["code"] and err.message == error["message"]
        assert err.call_id == cid and err.attempt == 2 and err.reply == body
        assert cid in str(err) and error["code"] in str(err)
        with pytest.raises(kind):
            r.unwrap()
        if isinstance(err, CallFatal):
            assert err.traces == ["mail.sent"]
        if isinstance(err, CallExpired):
            assert not err.by_client


def test_fatal_without_traces_has_an_empty_list() -> None:
    err = parse_reply(raw(reply(uuid7(), "fatal", error={"code": "c", "message": "m"}))).error()
    assert isinstance(err, CallFatal) and err.traces == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        raw({"v": 2, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f", "attempt": 1, "outcome": "ok", "result": 1}),
        raw({"v": 1, "call_id": "x", "attempt": 1, "outcome": "ok", "result": 1}),
        raw({"v": 1, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f", "attempt": 0, "outcome": "ok", "result": 1}),
        raw({"v": 1, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f", "attempt": 1, "outcome": "maybe"}),
        raw({"v": 1, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f", "attempt": 1, "outcome": "ok"}),
        raw({"v": 1, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f", "attempt": 1, "outcome": "error"}),
    ],
)
def test_what_is_no_reply_is_refused(body: bytes) -> None:
    with pytest.raises(BadReply):
        parse_reply(body)


def test_unknown_fields_are_ignored_and_ids_compared_in_lowercase() -> None:
    cid = uuid7()
    r = parse_reply(raw(reply(cid.upper(), result=1, later_field={"x": 1})))
    assert r.call_id == cid


def test_the_first_final_outcome_wins_and_later_copies_are_dropped() -> None:
    async def run() -> None:
        router = Router()
        a, b = uuid7(), uuid7()
        fa, fb = router.expect(a), router.expect(b)
        assert len(router) == 2
        # A reply may come before the publish is confirmed: it waits in the future.
        assert router.deliver(raw(reply(a, "ok", attempt=2, result="first"))) == "delivered"
        assert router.deliver(raw(reply(a, "ok", attempt=1, result="second"))) == "duplicate"
        assert router.deliver(raw(reply(a, "error", error={"code": "x", "message": "y"}))) == "duplicate"
        assert (await fa).result == "first" and (await fa).attempt == 2
        assert router.deliver(raw(reply(uuid7(), result=0))) == "stranger"
        assert router.deliver(b"garbage") == "unreadable"
        assert not fb.done()
        assert router.deliver(raw(reply(b, "fatal", error={"code": "w", "message": "m", "traces": ["t"]}))) == (
            "delivered"
        )
        assert (await fb).outcome == "fatal"
        assert (router.delivered, router.duplicates, router.strangers, router.unreadable) == (2, 2, 1, 1)
        assert len(router) == 0

    asyncio.run(run())


def test_a_reply_after_the_caller_gave_up_is_late_and_then_a_duplicate() -> None:
    async def run() -> None:
        router = Router()
        cid = uuid7()
        future = router.expect(cid)
        router.forget(cid)
        assert future.cancelled()
        assert router.deliver(raw(reply(cid, result=1))) == "late"
        assert router.deliver(raw(reply(cid, result=1))) == "duplicate"
        assert (router.late, router.duplicates, router.delivered) == (1, 1, 0)

    asyncio.run(run())


def test_one_call_id_cannot_be_awaited_twice_at_once() -> None:
    async def run() -> None:
        router = Router()
        cid = uuid7()
        router.expect(cid)
        with pytest.raises(ValueError, match="already in flight"):
            router.expect(cid.upper())

    asyncio.run(run())


def test_closing_fails_every_waiting_call() -> None:
    async def run() -> None:
        router = Router()
        futures: List["asyncio.Future[Any]"] = [router.expect(uuid7()) for _ in range(3)]
        router.fail_all(RuntimeError("closed"))
        for f in futures:
            with pytest.raises(RuntimeError):
                await f

    asyncio.run(run())


def test_the_memory_of_finished_calls_is_bounded() -> None:
    async def run() -> None:
        router = Router(remember=10)
        ids = [uuid7() for _ in range(20)]
        for cid in ids:
            router.expect(cid)
            router.deliver(raw(reply(cid, result=1)))
        assert router.deliver(raw(reply(ids[-1], result=1))) == "duplicate"
        assert router.deliver(raw(reply(ids[0], result=1))) == "stranger"  # forgotten long ago

    asyncio.run(run())
