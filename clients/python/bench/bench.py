#!/usr/bin/env python3
"""The Python client's throughput and latency: ``echo.echo`` calls with a
fixed number in flight, on the cluster ``CALLQ_BROKER`` (or ``--url``) names.

    python bench/bench.py [--calls 20000] [--in-flight 256] [--warm-up 2000] [--api async|submit] [--json]

``async`` (the default) drives :class:`AsyncClient.call_async` from
``--in-flight`` tasks, each starting its next call when the last ended;
``submit`` drives :meth:`Client.submit` from the main thread, a new call as
each one ends. ``--warm-up`` calls go first, unmeasured, on the same
client (its connection, reply queue or topic and consumer settle). Prints calls/s and latency percentiles (one JSON line with
``--json``). tests/proc_python_client.rs runs it beside callq's Rust
client on the same cluster (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from callq_client import AsyncClient, Client  # noqa: E402


def percentile(sorted_ms: List[float], q: float) -> float:
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


async def run_async(url: Optional[str], calls: int, in_flight: int, warm_up: int) -> Dict[str, Any]:
    client = await AsyncClient.connect(url, max_in_flight=in_flight)
    latencies: List[float] = []
    next_call = 0
    args = {"n": 1}

    async def lane(total: int) -> None:
        nonlocal next_call
        while next_call < total:
            next_call += 1
            t = time.perf_counter()
            await client.call_async("echo", "echo", args, timeout=120)
            latencies.append(time.perf_counter() - t)

    if warm_up:
        await asyncio.gather(*(lane(warm_up) for _ in range(min(in_flight, warm_up))))
        latencies.clear()
        next_call = 0
    started = time.perf_counter()
    await asyncio.gather(*(lane(calls) for _ in range(min(in_flight, calls))))
    elapsed = time.perf_counter() - started
    stats = client.stats()
    await client.close()
    return {"elapsed": elapsed, "latencies": latencies, "duplicates": stats.duplicates, "republished": stats.republished}


def run_submit(url: Optional[str], calls: int, in_flight: int, warm_up: int) -> Dict[str, Any]:
    latencies: List[float] = []
    errors: List[str] = []
    done = threading.Event()
    lock = threading.Lock()
    with Client(url, max_in_flight=in_flight) as client:
        warm = [client.submit("echo", "echo", {"n": 1}, timeout=120) for _ in range(warm_up)]
        for f in warm:
            f.result()
        state = {"started": 0, "ended": 0}

        def start() -> None:
            t = time.perf_counter()
            future = client.submit("echo", "echo", {"n": 1}, timeout=120)

            def ended(f: Any) -> None:
                failure = f.exception()
                with lock:
                    if failure is None:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors.append(repr(failure))
                    state["ended"] += 1
                    more = state["started"] < calls
                    if more:
                        state["started"] += 1
                    if state["ended"] == calls:
                        done.set()
                if more:
                    start()

            future.add_done_callback(ended)

        started = time.perf_counter()
        with lock:
            first = min(in_flight, calls)
            state["started"] = first
        for _ in range(first):
            start()
        if not done.wait(600):
            raise SystemExit(f"bench: {state['ended']} of {calls} calls ended within 600 s")
        elapsed = time.perf_counter() - started
        stats = client.stats()
    if errors:
        raise SystemExit(f"bench: {len(errors)} calls failed: {sorted(set(errors))[:5]}")
    return {"elapsed": elapsed, "latencies": latencies, "duplicates": stats.duplicates, "republished": stats.republished}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="the broker URL (default: CALLQ_BROKER)")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--warm-up", type=int, default=2000, help="unmeasured calls first")
    parser.add_argument("--api", choices=("async", "submit"), default="async")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    if args.api == "async":
        run = asyncio.run(run_async(args.url, args.calls, args.in_flight, args.warm_up))
    else:
        run = run_submit(args.url, args.calls, args.in_flight, args.warm_up)
    ms = sorted(x * 1000 for x in run["latencies"])
    result = {
        "api": args.api,
        "calls": len(ms),
        "in_flight": args.in_flight,
        "seconds": round(run["elapsed"], 3),
        "rate": round(len(ms) / run["elapsed"], 1),
        "p50_ms": round(percentile(ms, 0.50), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "max_ms": round(ms[-1], 3) if ms else 0.0,
        "duplicates": run["duplicates"],
        "republished": run["republished"],
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"{result['calls']} calls ({args.api}, {args.in_flight} in flight) in {result['seconds']} s: "
            f"{result['rate']:.0f} calls/s, p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
