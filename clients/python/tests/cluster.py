"""What the tests against a live cluster share: the environment that
tests/proc_python_client.rs sets for them.

- ``CALLQ_PYCLIENT_URL``: the cluster's broker URL (``amqp://`` or ``kafka://``);
- ``CALLQ_PYCLIENT_OUTBOX_DIR``: a directory the workers' ``mail.send`` may write to;
- ``CALLQ_PYCLIENT_KILL_PID``: the worker process the kill tests kill;
- ``CALLQ_PYCLIENT_REPORT``: where the kill test writes its figures (JSON);
- ``CALLQ_PYCLIENT_CALLS``: the calls the kill test keeps in flight (2,000).

Without them the tests fail, saying so: they never skip.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import List

import pytest


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: the cluster tests run against processes that tests/proc_python_client.rs starts "
            "(cargo nextest run --test proc_python_client); run the unit tests alone with pytest -m 'not broker'"
        )
    return value


def url() -> str:
    return env("CALLQ_PYCLIENT_URL")


def outbox(name: str) -> Path:
    directory = Path(env("CALLQ_PYCLIENT_OUTBOX_DIR"))
    assert directory.is_absolute(), directory
    return directory / f"{name}.outbox"


def lines(path: Path) -> List[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def wait_for_line(path: Path, needle: str, timeout: float) -> None:
    """Waits (bounded) until a line of ``path`` starts with ``needle``."""
    until = time.monotonic() + timeout
    while not any(line.startswith(needle) for line in lines(path)):
        if time.monotonic() > until:
            pytest.fail(f"{path} has no line of {needle} after {timeout} s: {lines(path)[-5:]}")
        time.sleep(0.02)
