"""The client against a live cluster (coordinator and worker processes of
callq), on RabbitMQ or Kafka alike: every outcome the cluster gives today."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator, List

import pytest

from callq_client import (
    AsyncClient,
    CallCancelled,
    CallError,
    CallExpired,
    Client,
    InvalidCall,
    NoSuchService,
    build_call,
    connect_async,
    uuid7,
)

from .cluster import env, lines, outbox, url

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with Client(url(), default_timeout=30.0, connect_timeout=20.0) as c:
        yield c


def test_call_returns_the_result(client: Client) -> None:
    assert client.call("echo", "echo", {"hello": "world", "n": [1, 2.5, None]}) == {
        "hello": "world",
        "n": [1, 2.5, None],
    }
    assert client.call("echo", "echo") is None
    assert client.call("echo", "sleep", {"ms": 20}) == {"slept_ms": 20}


def test_every_option_reaches_the_worker(client: Client) -> None:
    result = client.call(
        "echo",
        "echo",
        {"opts": True},
        timeout=20,
        session_id="s-1",
        idempotency_key="order-1",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        priority=5,
        concurrency_key="k",
        extra={"x_note": "carried"},
    )
    assert result == {"opts": True}


def test_submit_keeps_many_calls_in_flight(client: Client) -> None:
    futures: List["concurrent.futures.Future[Any]"] = [client.submit("echo", "echo", {"i": i}) for i in range(500)]
    assert [f.result(timeout=60) for f in futures] == [{"i": i} for i in range(500)]


def test_call_async_from_another_event_loop(client: Client) -> None:
    async def run() -> List[Any]:
        return list(await asyncio.gather(*(client.call_async("echo", "echo", i) for i in range(100))))

    assert asyncio.run(run()) == list(range(100))


def test_the_asyncio_client_on_its_own_loop() -> None:
    async def run() -> None:
        async with await connect_async(url(), connect_timeout=20.0) as c:
            assert isinstance(c, AsyncClient)
            tasks = [c.submit("echo", "echo", {"i": i}) for i in range(200)]
            assert [await t for t in tasks] == [{"i": i} for i in range(200)]
            assert c.stats().in_flight == 0

    asyncio.run(run())


def test_a_handler_error_raises_call_error(client: Client) -> None:
    with pytest.raises(CallError) as err:
        client.call("echo", "sleep", {"ms": "soon"})
    assert err.value.outcome == "error" and err.value.code == "invalid_args"
    assert "ms" in err.value.message and err.value.attempt == 1
    with pytest.raises(CallError) as unknown:
        client.call("echo", "no_such_method", {})
    assert unknown.value.code == "unknown_method"


def test_a_bad_argument_is_answered_bad_request(client: Client) -> None:
    # The client refuses a body that breaks the contract before publishing...
    with pytest.raises(InvalidCall):
        client.call("echo", "m" * 256, {})
    # ...and a body published anyway (validate=False) is answered by the
    # worker with error/bad_request, carrying the call's own id.
    body = build_call("echo", "echo", {})
    body["method"] = "m" * 256
    reply = client.send(body, validate=False, timeout=30)
    assert reply.outcome == "error" and reply.code == "bad_request", reply.body
    assert reply.call_id == body["call_id"]
    err = reply.error()
    assert isinstance(err, CallError) and err.code == "bad_request"
    # An unknown version likewise.
    body = build_call("echo", "echo", {})
    body["v"] = 2
    assert client.send(body, validate=False, timeout=30).code == "bad_request"


def test_a_deadline_passed_before_the_call_ran_is_expired(client: Client) -> None:
    # A deadline already behind: the worker answers expired without running it.
    body = build_call("echo", "echo", {"late": True})
    body["deadline"] = (datetime.now(timezone.utc) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    reply = client.send(body, timeout=30)
    assert reply.outcome == "expired", reply.body
    assert reply.code == "deadline_passed"
    err = reply.error()
    assert isinstance(err, CallExpired) and not err.by_client
    with pytest.raises(CallExpired):
        reply.unwrap()


def test_a_deadline_reached_while_waiting_raises_call_expired(client: Client) -> None:
    with pytest.raises(CallExpired) as err:
        client.call("echo", "sleep", {"ms": 3000}, timeout=1.0)
    assert err.value.by_client and err.value.code == "deadline_passed"
    # The call finishes later; its reply is dropped, and the client goes on.
    assert client.call("echo", "echo", "after") == "after"


def test_a_service_nobody_serves_is_refused(client: Client) -> None:
    with pytest.raises(NoSuchService):
        client.call("nobody_serves_this", "echo", {}, timeout=10)


def test_the_same_call_published_twice_is_answered_once(client: Client) -> None:
    inner = client.inner
    body = build_call("echo", "echo", {"twice": True}, reply_to=client.reply_to, default_timeout=30)
    data = __import__("json").dumps(body).encode()
    before = client.stats()

    async def run() -> Any:
        waiter = inner.router.expect(body["call_id"])
        for _ in range(2):
            await inner.transport.publish("echo", body["call_id"], body["call_id"], data, 20)
        return await asyncio.wait_for(waiter, 30)

    reply = asyncio.run_coroutine_threadsafe(run(), client._loop).result(40)
    assert reply.result == {"twice": True}
    # The second copy is answered too, or dropped as a spare: never a second outcome.
    assert client.stats().delivered == before.delivered + 1


def test_a_mail_is_sent_once(client: Client) -> None:
    box = outbox("once")
    call_id = uuid7()
    result = client.call("mail", "send", {"outbox": str(box), "to": "a@example.org", "subject": "hi"}, call_id=call_id)
    assert result == {"sent": True, "to": "a@example.org"}
    assert [line.split("\t")[0] for line in lines(box)].count(call_id) == 1


def test_a_second_call_with_the_same_idempotency_key_gets_the_first_outcome(client: Client) -> None:
    key = "order-" + uuid7()
    box = outbox(key)
    first = client.call("mail", "send", {"outbox": str(box), "to": "first@example.org"}, idempotency_key=key)
    second_id = uuid7()
    second = client.call(
        "mail", "send", {"outbox": str(box), "to": "second@example.org"}, idempotency_key=key, call_id=second_id
    )
    assert first == second == {"sent": True, "to": "first@example.org"}
    assert len(lines(box)) == 1, lines(box)


def test_calls_with_one_concurrency_key_run_one_at_a_time(client: Client) -> None:
    # The cluster's workers run one `echo` call per key at a time.
    keys = ["account-" + uuid7() for _ in range(2)]
    futures = [
        (keys[i % 2], client.submit("echo", "span", {"ms": 20}, concurrency_key=keys[i % 2], timeout=120))
        for i in range(30)
    ]
    runs: dict = {key: [] for key in keys}
    for key, future in futures:
        result = future.result(timeout=180)
        runs[key].append((result["started_us"], result["ended_us"]))
    for key, spans in runs.items():
        spans.sort()
        for (_, ended), (started, _) in zip(spans, spans[1:]):
            assert started >= ended, f"two calls of {key} ran at once: {spans}"
    # Calls of the two keys did run at once.
    first, second = runs[keys[0]], runs[keys[1]]
    assert any(a0 < b1 and b0 < a1 for a0, a1 in first for b0, b1 in second), runs


def test_urgent_calls_overtake_a_backlog(client: Client) -> None:
    # A backlog of ten times the worker's capacity (64), then, once its
    # first call is answered, calls of priority 9: published last, they end
    # before most of the backlog (in publish order they would end last).
    backlog = [client.submit("echo", "span", {"ms": 200}, timeout=120) for _ in range(640)]
    concurrent.futures.wait(backlog, timeout=120, return_when=concurrent.futures.FIRST_COMPLETED)
    urgent = [client.submit("echo", "span", {"ms": 200}, priority=9, timeout=120) for _ in range(10)]
    last_urgent = max(f.result(timeout=180)["ended_us"] for f in urgent)
    after = sum(1 for f in backlog if f.result(timeout=180)["ended_us"] > last_urgent)
    assert after >= len(backlog) // 4, f"only {after} of {len(backlog)} backlog calls ended after the urgent ones"


def test_a_delayed_call_runs_no_earlier_than_its_not_before(client: Client) -> None:
    box = outbox("delayed-" + uuid7())
    due = datetime.now(timezone.utc) + timedelta(seconds=2)
    result = client.call("mail", "send", {"outbox": str(box), "to": "later@example.org"}, not_before=due, timeout=60)
    assert result == {"sent": True, "to": "later@example.org"}
    assert datetime.now(timezone.utc) >= due
    assert len(lines(box)) == 1


def test_a_call_an_operator_cancels_raises_call_cancelled(client: Client) -> None:
    call_id = uuid7()
    waiting = client.submit("echo", "sleep", {"ms": 50_000}, call_id=call_id, timeout=90)
    # Queued or running, the call ends `cancelled`: it never runs, or its
    # sleep stops.
    done = subprocess.run(
        [env("CALLQ_PYCLIENT_CALLQ"), "cancel", call_id],
        env={**os.environ, "CALLQ_BROKER": url()},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout) == {"decision": "cancelled"}
    with pytest.raises(CallCancelled):
        waiting.result(timeout=60)
