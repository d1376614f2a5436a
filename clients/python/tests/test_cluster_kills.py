"""The client against a live cluster while a worker process is killed
(SIGKILL, as `kill -9`): a traced call ends fatal with its traces, and a
load of calls in flight ends with exactly one outcome per call."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from typing import Any, Dict, Tuple

import pytest

from callq_client import AsyncClient, CallFatal, Client, OutcomeError, uuid7

from .cluster import env, lines, outbox, url, wait_for_line

pytestmark = pytest.mark.broker


def kill9() -> int:
    pid = int(env("CALLQ_PYCLIENT_KILL_PID"))
    os.kill(pid, signal.SIGKILL)
    return pid


def test_fatal_carries_the_traces_when_the_worker_dies_after_one() -> None:
    box = outbox("fatal")
    call_id = uuid7()
    with Client(url(), connect_timeout=20.0) as client:
        future = client.submit(
            "mail", "send", {"outbox": str(box), "to": "b@example.org", "after_ms": 30_000}, call_id=call_id, timeout=60
        )
        # The trace is granted and the line written: the effect happened.
        wait_for_line(box, call_id, 30)
        kill9()
        with pytest.raises(CallFatal) as fatal:
            future.result(timeout=60)
    err = fatal.value
    assert err.call_id == call_id and err.outcome == "fatal"
    assert err.code == "worker_lost_after_traces", err.reply
    assert err.traces == ["mail.sent"]
    assert [line.split("\t")[0] for line in lines(box)].count(call_id) == 1


def test_a_worker_killed_mid_load_every_call_gets_exactly_one_outcome() -> None:
    calls = int(os.environ.get("CALLQ_PYCLIENT_CALLS") or 2000)
    box = outbox("load")
    report_path = env("CALLQ_PYCLIENT_REPORT")

    async def run() -> Dict[str, Any]:
        client = await AsyncClient.connect(url(), connect_timeout=20.0, max_in_flight=calls)
        outcomes: Dict[str, Tuple[str, Any]] = {}
        counts: Counter[str] = Counter()
        started = time.monotonic()

        async def one(i: int, call_id: str) -> None:
            try:
                if i % 3 == 0:
                    args: Any = {"outbox": str(box), "to": f"u{i}@example.org", "after_ms": 40}
                    result = await client.call_async("mail", "send", args, call_id=call_id, timeout=150)
                else:
                    result = await client.call_async("echo", "sleep", {"ms": 40}, call_id=call_id, timeout=150)
                outcome: Tuple[str, Any] = ("ok", result)
            except OutcomeError as exc:
                outcome = (exc.outcome, exc.code)
            except Exception as exc:  # noqa: BLE001 - recorded, and the test fails on it
                outcome = ("client_error", repr(exc))
            assert call_id not in outcomes, f"a second outcome for {call_id}"
            outcomes[call_id] = outcome
            counts[outcome[0]] += 1

        ids = [uuid7() for _ in range(calls)]
        tasks = [asyncio.ensure_future(one(i, cid)) for i, cid in enumerate(ids)]
        # Every call is published and in flight; kill a worker once some
        # have ended, while it holds calls.
        until = time.monotonic() + 60
        while len(outcomes) < min(100, calls // 10) and time.monotonic() < until:
            await asyncio.sleep(0.01)
        in_flight_at_kill = client.stats().in_flight
        ended_at_kill = len(outcomes)
        killed = kill9()
        killed_at = time.monotonic() - started
        await asyncio.wait_for(asyncio.gather(*tasks), 170)
        stats = client.stats()
        await client.close()
        mail_lines = Counter(line.split("\t")[0] for line in lines(box))
        mail_ok = [cid for i, cid in enumerate(ids) if i % 3 == 0 and outcomes[cid][0] == "ok"]
        mail_fatal = [cid for i, cid in enumerate(ids) if i % 3 == 0 and outcomes[cid][0] == "fatal"]
        return {
            "calls": calls,
            "outcomes": dict(counts),
            "distinct_call_ids": len(outcomes),
            "ended_at_kill": ended_at_kill,
            "in_flight_at_kill": in_flight_at_kill,
            "killed_pid": killed,
            "killed_after_s": round(killed_at, 3),
            "seconds": round(time.monotonic() - started, 3),
            "delivered": stats.delivered,
            "duplicates_dropped": stats.duplicates,
            "late": stats.late,
            "republished": stats.republished,
            "mail_ok": len(mail_ok),
            "mail_ok_lines_once": sum(1 for c in mail_ok if mail_lines[c] == 1),
            "mail_fatal": len(mail_fatal),
            "mail_lines_doubled": sum(1 for n in mail_lines.values() if n > 1),
            # fatal only where a trace was granted (the coordinator says so
            # by its code).
            "fatal_other": sum(1 for o, d in outcomes.values() if o == "fatal" and d != "worker_lost_after_traces"),
            # A traceless call never ends fatal: its next attempt runs.
            "echo_not_ok": sum(1 for i, c in enumerate(ids) if i % 3 and outcomes[c][0] != "ok"),
            "echo_wrong": sum(
                1 for i, c in enumerate(ids) if i % 3 and outcomes[c][0] == "ok" and outcomes[c][1] != {"slept_ms": 40}
            ),
            "others": sorted({f"{o}: {d}" for o, d in outcomes.values() if o not in ("ok", "fatal")})[:10],
        }

    report = asyncio.run(run())
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f)
    print(json.dumps(report))
    assert report["distinct_call_ids"] == calls, report
    assert report["delivered"] == calls, report
    # The killed worker's traceless calls were run again and ended ok; its
    # calls past a trace ended fatal. Nothing else.
    assert set(report["outcomes"]) <= {"ok", "fatal"}, report
    assert report["in_flight_at_kill"] > 0, report
    assert report["echo_not_ok"] == 0, report
    assert report["fatal_other"] == 0, report
    assert report["echo_wrong"] == 0, report
    assert report["mail_ok_lines_once"] == report["mail_ok"], report
    assert report["mail_lines_doubled"] == 0, report
    assert sum(report["outcomes"].values()) == calls


