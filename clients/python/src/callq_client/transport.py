"""What the client needs of a broker, whichever it is: a reply queue or
topic of its own, consumed; and a publish of a call that returns once the
broker confirmed it (many may be in flight at once)."""

from __future__ import annotations

import abc
import asyncio
import random
from typing import Callable, List, Optional, TypeVar

T = TypeVar("T")

#: Hands the bodies of reply messages to the client, in the client's loop.
OnReplies = Callable[[List[bytes]], None]


class Transient(Exception):
    """A publish that may succeed when tried again (no confirm in time, a
    nack, a lost connection): the client publishes the same body again."""


class Transport(abc.ABC):
    """One broker connection of a client."""

    #: The name a call's ``reply_to`` carries.
    reply_to: str = ""

    @abc.abstractmethod
    async def start(self, on_replies: OnReplies) -> None:
        """Connects, makes the reply queue or topic and starts consuming it."""

    @abc.abstractmethod
    async def publish(
        self, service: str, call_id: str, key: str, body: bytes, timeout: float, high: bool = False
    ) -> None:
        """Publishes one call and returns once the broker confirmed it:
        into the service's high band when ``high``, else its call queue.

        Raises :class:`Transient` when trying again may help, and
        :class:`~callq_client.errors.PublishError` (or a subclass) when it
        cannot.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stops consuming and disconnects; bounded in time."""

    @property
    def kind(self) -> str:
        return type(self).__name__


class Backoff:
    """Jittered exponential pauses: each in the upper half of a bound that
    doubles from ``first`` up to ``cap``."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self._bound = first

    def next(self) -> float:
        bound = self._bound
        self._bound = min(self._bound * 2, self.cap)
        return bound / 2 + random.random() * bound / 2

    def reset(self) -> None:
        self._bound = self.first


async def wait_for_event(event: asyncio.Event, timeout: Optional[float]) -> bool:
    """Whether ``event`` was set within ``timeout`` seconds."""
    if event.is_set():
        return True
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        return False
    return True


async def acquire(semaphore: asyncio.Semaphore, timeout: float) -> bool:
    """Whether a place of ``semaphore`` was taken within ``timeout`` seconds
    (at once, without a timer, when one is free)."""
    if not semaphore.locked():
        await semaphore.acquire()
        return True
    try:
        await asyncio.wait_for(semaphore.acquire(), max(0.0, timeout))
    except asyncio.TimeoutError:
        return False
    return True


async def wait_future(future: "asyncio.Future[T]", timeout: float) -> T:
    """``future``'s result, awaited at most ``timeout`` seconds; raises
    :class:`asyncio.TimeoutError` then, leaving ``future`` as it is. Costs a
    timer and no task (unlike ``wait_for`` with ``shield``), which counts
    with thousands of calls in flight."""
    if not future.done():
        loop = asyncio.get_running_loop()
        woken: "asyncio.Future[None]" = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        timer = loop.call_later(max(0.0, timeout), wake)
        future.add_done_callback(wake)
        try:
            await woken
        finally:
            timer.cancel()
            future.remove_done_callback(wake)
        if not future.done():
            raise asyncio.TimeoutError
    return future.result()
