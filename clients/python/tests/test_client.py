"""The client's logic on a broker of its own making: retries of an
unconfirmed publish with the same call id, the first outcome per call,
errors per outcome, the deadline, and the bound on calls in flight."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List, Optional

import pytest

from callq_client import (
    AsyncClient,
    CallError,
    CallExpired,
    CallFatal,
    ClientOptions,
    ConfigError,
    InvalidCall,
    NoSuchService,
    PublishError,
)
from callq_client.transport import OnReplies, Transient, Transport


class FakeBroker(Transport):
    """Answers every call like a worker of `echo` would, after `delay`;
    fails the first `fail_first` publishes of each call as unconfirmed, and
    answers each call `copies` times."""

    def __init__(self, delay: float = 0.0, fail_first: int = 0, copies: int = 1, confirm: bool = True) -> None:
        self.reply_to = "callq.reply.fake"
        self.delay = delay
        self.fail_first = fail_first
        self.copies = copies
        self.confirm = confirm
        self.published: List[Dict[str, Any]] = []
        self.tries: Dict[str, int] = {}
        self.running = 0
        self.most_running = 0
        self.on_replies: Optional[OnReplies] = None
        self.high: List[bool] = []

    async def start(self, on_replies: OnReplies) -> None:
        self.on_replies = on_replies

    async def publish(
        self, service: str, call_id: str, key: str, body: bytes, timeout: float, high: bool = False
    ) -> None:
        if service == "nobody":
            raise NoSuchService("no call queue for nobody")
        self.tries[call_id] = self.tries.get(call_id, 0) + 1
        if self.tries[call_id] <= self.fail_first:
            raise Transient("no confirm (fake)")
        if not self.confirm:
            await asyncio.sleep(timeout)
            raise Transient("no confirm within the timeout (fake)")
        call = json.loads(body)
        assert call["call_id"] == call_id and key
        self.high.append(high)
        self.published.append(call)
        asyncio.get_running_loop().create_task(self._answer(call))

    async def _answer(self, call: Dict[str, Any]) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await asyncio.sleep(self.delay)
        self.running -= 1
        method = call["method"]
        if method == "echo":
            body: Dict[str, Any] = {"outcome": "ok", "result": call["args"]}
        elif method == "fail":
            body = {"outcome": "error", "error": {"code": "invalid_args", "message": "no"}}
        elif method == "fatal":
            body = {
                "outcome": "fatal",
                "error": {"code": "worker_lost_after_traces", "message": "lost", "traces": ["mail.sent"]},
            }
        else:
            return  # never answered
        reply = {"v": 1, "call_id": call["call_id"], "attempt": 1, **body}
        assert self.on_replies is not None
        for _ in range(self.copies):
            self.on_replies([json.dumps(reply).encode()])

    async def close(self) -> None:
        pass


async def client_on(broker: FakeBroker, **opts: Any) -> AsyncClient:
    client = AsyncClient(broker, ClientOptions(**opts))
    await broker.start(client._on_replies)
    return client


def test_an_unconfirmed_publish_is_retried_with_the_same_call_id() -> None:
    async def run() -> None:
        broker = FakeBroker(fail_first=3)
        client = await client_on(broker)
        assert await client.call_async("echo", "echo", {"x": 1}, timeout=5) == {"x": 1}
        (call_id, tries), = broker.tries.items()
        assert tries == 4 and [c["call_id"] for c in broker.published] == [call_id]
        assert client.stats().republished == 3

    asyncio.run(run())


def test_a_call_of_priority_five_or_more_goes_to_the_high_band() -> None:
    async def run() -> None:
        broker = FakeBroker()
        client = await client_on(broker)
        for priority in (None, 0, 4, 5, 9):
            assert await client.call_async("echo", "echo", priority, priority=priority, timeout=5) == priority
        assert broker.high == [False, False, False, True, True]

    asyncio.run(run())


def test_duplicates_are_dropped_and_each_call_gets_one_outcome() -> None:
    async def run() -> None:
        broker = FakeBroker(copies=3, delay=0.01)
        client = await client_on(broker)
        results = await asyncio.gather(*(client.call_async("echo", "echo", i) for i in range(200)))
        assert results == list(range(200))
        stats = client.stats()
        assert (stats.delivered, stats.duplicates, stats.in_flight) == (200, 400, 0)

    asyncio.run(run())


def test_outcomes_raise_their_errors() -> None:
    async def run() -> None:
        client = await client_on(FakeBroker())
        with pytest.raises(CallError) as err:
            await client.call_async("echo", "fail")
        assert err.value.code == "invalid_args"
        with pytest.raises(CallFatal) as fatal:
            await client.call_async("mail", "fatal")
        assert fatal.value.traces == ["mail.sent"]
        reply = await client.send({"v": 1, "call_id": "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f", "service": "echo",
                                   "method": "fail", "args": None})
        assert reply.outcome == "error" and isinstance(reply.error(), CallError)

    asyncio.run(run())


def test_no_outcome_by_the_deadline_is_expired_by_the_client() -> None:
    async def run() -> None:
        client = await client_on(FakeBroker())
        with pytest.raises(CallExpired) as err:
            await client.call_async("echo", "never", timeout=0.2)
        assert err.value.by_client and err.value.code == "deadline_passed"
        assert client.stats().in_flight == 0

    asyncio.run(run())


def test_a_publish_never_confirmed_fails_at_the_deadline() -> None:
    async def run() -> None:
        client = await client_on(FakeBroker(confirm=False))
        with pytest.raises(PublishError, match="not confirmed"):
            await client.call_async("echo", "echo", timeout=0.3)
        with pytest.raises(NoSuchService):
            await client.call_async("nobody", "echo", timeout=1)

    asyncio.run(run())


def test_calls_in_flight_are_bounded() -> None:
    async def run() -> None:
        broker = FakeBroker(delay=0.02)
        client = await client_on(broker, max_in_flight=8)
        tasks = [client.submit("echo", "echo", i) for i in range(100)]
        assert [await t for t in tasks] == list(range(100))
        assert broker.most_running <= 8

    asyncio.run(run())


def test_bad_calls_and_options_are_refused_before_publishing() -> None:
    async def run() -> None:
        broker = FakeBroker()
        client = await client_on(broker)
        with pytest.raises(InvalidCall):
            await client.call_async("echo", "m" * 256)
        assert broker.published == []
        with pytest.raises(ConfigError):
            AsyncClient(broker, ClientOptions(max_in_flight=0))

    asyncio.run(run())


def test_the_same_call_id_twice_at_once_is_refused() -> None:
    async def run() -> None:
        client = await client_on(FakeBroker(delay=0.1))
        cid = "0193c1e2-7a4b-7c1d-9f00-3b2a1c0d9e8f"
        first = client.submit("echo", "echo", 1, call_id=cid)
        await asyncio.sleep(0.01)
        with pytest.raises(InvalidCall, match="already in flight"):
            await client.call_async("echo", "echo", 2, call_id=cid)
        assert await first == 1

    asyncio.run(run())


def test_a_deadline_already_passed_is_expired_without_publishing() -> None:
    async def run() -> None:
        from datetime import datetime, timedelta, timezone

        broker = FakeBroker()
        client = await client_on(broker)
        past = datetime.now(timezone.utc) - timedelta(seconds=1)
        with pytest.raises(CallExpired) as err:
            await client.call_async("echo", "echo", 1, deadline=past)
        assert err.value.by_client and broker.published == []

    asyncio.run(run())
