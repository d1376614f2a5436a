"""RabbitMQ only: the broker closes the client's connection while 2,000
calls are in flight (`rabbitmqctl close_connection`); the client connects
again, publishes what was not confirmed again with the same call ids, reads
the replies kept in its durable reply queue, and every call ends ok, once.

(On Kafka librdkafka reconnects by itself; nothing of the client's own is
there to test.)"""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Dict, List
from urllib.parse import unquote, urlsplit

import pytest

from callq_client import AsyncClient

from .cluster import url

pytestmark = pytest.mark.broker


def connections_of(vhost: str, needle: str) -> List[str]:
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "-p", vhost, "pid", "client_properties"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [line.split("\t", 1)[0] for line in out.splitlines() if needle in line]


def test_the_client_reconnects_and_every_call_ends_once() -> None:
    broker = url()
    assert broker.startswith("amqp"), "a RabbitMQ test: run it against an amqp:// cluster"
    vhost = unquote(urlsplit(broker).path.lstrip("/")) or "/"
    calls = 2000

    async def run() -> None:
        client = await AsyncClient.connect(broker, connect_timeout=20.0)
        results: Dict[int, object] = {}

        async def one(i: int) -> None:
            results[i] = await client.call_async("echo", "sleep", {"ms": 200}, timeout=120)

        pids = await asyncio.get_running_loop().run_in_executor(None, connections_of, vhost, client.reply_to[12:])
        assert len(pids) == 1, pids
        tasks = [asyncio.ensure_future(one(i)) for i in range(calls)]
        until = time.monotonic() + 60
        while len(results) < 100 and time.monotonic() < until:
            await asyncio.sleep(0.01)
        closed_at = len(results)
        subprocess.run(
            ["rabbitmqctl", "-q", "close_connection", pids[0], "closed by the reconnect test"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        await asyncio.wait_for(asyncio.gather(*tasks), 150)
        stats = client.stats()
        print(f"closed after {closed_at} outcomes; {stats}")
        await client.close()
        assert closed_at < calls, "the connection closed after the load ended: the test proved nothing"
        assert sorted(results) == list(range(calls))
        assert all(r == {"slept_ms": 200} for r in results.values())
        assert stats.delivered == calls and stats.in_flight == 0

    asyncio.run(run())
