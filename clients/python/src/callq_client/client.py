"""The clients: :class:`AsyncClient` (asyncio) and :class:`Client` (any
thread; it runs an :class:`AsyncClient` in an event loop of its own).

Both offer the same calls: ``call`` (blocking; :class:`Client` only),
``call_async`` (a coroutine), ``submit`` (a future, for many calls in
flight) and ``send`` (a prepared body, returning the :class:`Reply`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Dict, List, Mapping, Optional, TypeVar

from . import url as urls
from .envelope import (
    CallOptions,
    InvalidCall,
    build_call,
    check_call,
    encode,
    is_high,
    message_key,
    parse_rfc3339,
    uuid7,
)
from .errors import CallExpired, CallqError, ConfigError, Disconnected, PublishError
from .reply import Reply, Router
from .transport import Backoff, Transient, Transport, acquire, wait_future

log = logging.getLogger("callq_client")

T = TypeVar("T")


@dataclass(frozen=True)
class ClientOptions:
    """How a client runs; every field has a default."""

    #: The client's id: its replies arrive on ``callq.reply.<client_id>``.
    #: Default: ``<user>.py-<uuid>`` on RabbitMQ (a name the least-privilege
    #: set-up lets the user declare), ``py-<uuid>`` on Kafka.
    client_id: Optional[str] = None
    #: Seconds until a call's deadline when the call sets none.
    default_timeout: float = 30.0
    #: Calls in flight at most; further calls wait for a place.
    max_in_flight: int = 10_000
    #: Publishes awaiting their confirm at most.
    confirm_window: int = 1024
    #: Replies the consumer takes ahead.
    prefetch: int = 512
    #: Seconds for connecting and for each wait on the broker but a confirm.
    connect_timeout: float = 10.0
    #: RabbitMQ: the exchange calls are published to; ``""`` publishes to the
    #: default exchange with the call queue's name as routing key.
    calls_exchange: str = "callq.calls"


@dataclass(frozen=True)
class Stats:
    """What the client saw so far."""

    in_flight: int
    delivered: int
    duplicates: int
    late: int
    strangers: int
    unreadable: int
    republished: int


def _transport(url: Optional[str], opts: ClientOptions) -> Transport:
    cfg = urls.parse(url)
    if isinstance(cfg, urls.AmqpConfig):
        client_id = opts.client_id or f"{cfg.user or 'anonymous'}.py-{uuid7().replace('-', '')}"
        _check_client_id(client_id)
        from .amqp import AmqpTransport

        return AmqpTransport(
            cfg,
            client_id,
            prefetch=opts.prefetch,
            confirm_window=opts.confirm_window,
            timeout=opts.connect_timeout,
            calls_exchange=opts.calls_exchange,
        )
    client_id = opts.client_id or f"py-{uuid7().replace('-', '')}"
    _check_client_id(client_id)
    from .kafka import KafkaTransport

    return KafkaTransport(cfg, client_id, confirm_window=opts.confirm_window, prefetch=opts.prefetch)


def _check_client_id(client_id: str) -> None:
    name = f"callq.reply.{client_id}"
    ok = 0 < len(name) <= 249 and all(c.isascii() and (c.isalnum() or c in "._-") for c in client_id)
    if not client_id or not ok:
        raise ConfigError(
            f"client_id {client_id!r} cannot name a reply queue and topic: use 1 to 237 of ASCII letters, digits, "
            "'.', '_' and '-'"
        )


class AsyncClient:
    """A client for asyncio code: every method runs in the loop it was connected in.

    ::

        client = await AsyncClient.connect()          # CALLQ_BROKER
        result = await client.call_async("echo", "echo", {"hi": 1})
        await client.close()
    """

    def __init__(self, transport: Transport, opts: ClientOptions) -> None:
        if opts.max_in_flight < 1 or opts.confirm_window < 1 or opts.prefetch < 1:
            raise ConfigError("max_in_flight, confirm_window and prefetch must be at least 1")
        if opts.default_timeout <= 0:
            raise ConfigError("default_timeout must be above 0 seconds")
        self.transport = transport
        self.opts = opts
        self.router = Router()
        self._slots = asyncio.Semaphore(opts.max_in_flight)
        self._closed = False
        self._republished = 0
        # A transport that polls for replies asks whether any are awaited.
        if hasattr(transport, "waiting"):
            transport.waiting = lambda: len(self.router) > 0

    @classmethod
    async def connect(cls, url: Optional[str] = None, **options: Any) -> "AsyncClient":
        """Connects to the broker ``url`` names (default: ``CALLQ_BROKER``),
        makes the reply queue or topic and starts reading it. ``options``
        are :class:`ClientOptions` fields."""
        opts = _options(options)
        client = cls(_transport(url, opts), opts)
        await client.transport.start(client._on_replies)
        return client

    @property
    def reply_to(self) -> str:
        """The reply queue (RabbitMQ) or topic (Kafka, before any ``topic_prefix``)."""
        return self.transport.reply_to

    def stats(self) -> Stats:
        r = self.router
        return Stats(len(r), r.delivered, r.duplicates, r.late, r.strangers, r.unreadable, self._republished)

    def _on_replies(self, bodies: List[bytes]) -> None:
        for body in bodies:
            if self.router.deliver(body) == "unreadable":
                log.warning("callq: dropped a message on %s that is no reply: %r", self.reply_to, body[:200])

    async def call_async(
        self,
        service: str,
        method: str,
        args: Any = None,
        *,
        timeout: Optional[float] = None,
        deadline: Optional[datetime] = None,
        session_id: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        traceparent: Optional[str] = None,
        call_id: Optional[str] = None,
        not_before: Optional[datetime] = None,
        priority: Optional[int] = None,
        concurrency_key: Optional[str] = None,
        extra: Optional[Mapping[str, Any]] = None,
    ) -> Any:
        """Calls ``service.method(args)``; its result, or the outcome's error
        (:class:`~callq_client.CallError`, :class:`~callq_client.CallFatal`,
        :class:`~callq_client.CallExpired`, :class:`~callq_client.CallCancelled`)."""
        opts = CallOptions(
            timeout=timeout,
            deadline=deadline,
            session_id=session_id,
            idempotency_key=idempotency_key,
            traceparent=traceparent,
            call_id=call_id,
            not_before=not_before,
            priority=priority,
            concurrency_key=concurrency_key,
            extra=dict(extra or {}),
        )
        body = build_call(
            service, method, args, reply_to=self.reply_to, options=opts, default_timeout=self.opts.default_timeout
        )
        reply = await self._send(body, encode(body))
        return reply.unwrap()

    def submit(self, service: str, method: str, args: Any = None, **kwargs: Any) -> "asyncio.Task[Any]":
        """:meth:`call_async` as a task of the running loop: start many, await them later."""
        return asyncio.get_running_loop().create_task(self.call_async(service, method, args, **kwargs))

    async def send(self, body: Dict[str, Any], *, validate: bool = True, timeout: Optional[float] = None) -> Reply:
        """Publishes a call body as it is (its ``reply_to`` set to this
        client's) and returns its first reply, whatever the outcome.

        ``validate=False`` publishes a body that breaks the contract (to see
        what the cluster answers to it); otherwise one that does raises
        :class:`~callq_client.InvalidCall`. The wait ends at the body's
        ``deadline`` (else the client's default timeout), or after
        ``timeout`` seconds when given: then :class:`~callq_client.CallExpired`
        (``by_client``) is raised.
        Publishing the same ``call_id`` again while it is in flight on this
        client is refused.
        """
        body = dict(body)
        body["reply_to"] = self.reply_to
        if validate:
            check_call(body)
            data = encode(body)
        else:
            data = json.dumps(body).encode("utf-8")
        return await self._send(body, data, timeout)

    async def _send(self, body: Mapping[str, Any], data: bytes, timeout: Optional[float] = None) -> Reply:
        """Publishes ``data``, the encoded ``body``, and awaits its first reply."""
        if self._closed:
            raise Disconnected("the client is closed")
        call_id = str(body.get("call_id", "")).lower()
        service = str(body.get("service", ""))
        give_up = time.monotonic() + (timeout if timeout is not None else self._timeout_of(body))
        if give_up <= time.monotonic():
            raise CallExpired(
                call_id, "deadline_passed", "the call's deadline had passed before it was published", by_client=True
            )
        if not await acquire(self._slots, give_up - time.monotonic()):
            raise CallExpired(
                call_id,
                "deadline_passed",
                f"{self.opts.max_in_flight} calls were in flight until the deadline: this one was never published",
                by_client=True,
            )
        try:
            try:
                waiter = self.router.expect(call_id)
            except ValueError as exc:
                raise InvalidCall(str(exc)) from None
            try:
                key = message_key(body) if body.get("call_id") else ""
                high = is_high(body.get("priority"))
                await self._publish_until(service, call_id, key, data, give_up, waiter, high)
                remaining = give_up - time.monotonic()
                if remaining <= 0 and not waiter.done():
                    raise asyncio.TimeoutError
                return await wait_future(waiter, remaining)
            except asyncio.TimeoutError:
                raise CallExpired(
                    call_id,
                    "deadline_passed",
                    "no outcome before the call's deadline: the client stopped waiting (a late reply is dropped)",
                    by_client=True,
                ) from None
            finally:
                if not waiter.done():
                    self.router.forget(call_id)
        finally:
            self._slots.release()

    def _timeout_of(self, body: Mapping[str, Any]) -> float:
        deadline = body.get("deadline")
        if isinstance(deadline, str):
            try:
                return (parse_rfc3339(deadline) - datetime.now(timezone.utc)).total_seconds()
            except ValueError:
                pass
        return self.opts.default_timeout

    async def _publish_until(
        self,
        service: str,
        call_id: str,
        key: str,
        data: bytes,
        give_up: float,
        waiter: "asyncio.Future[Reply]",
        high: bool = False,
    ) -> None:
        """Publishes until the broker confirms, retrying with the same body
        (so the same ``call_id``) after what may be transient, until
        ``give_up``; stops early when the outcome came already."""
        backoff = Backoff(0.005, 1.0)
        tries = 0
        while True:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                raise PublishError(
                    f"the call {call_id} to {service!r} was not confirmed by the broker before its deadline "
                    f"({tries} tries)"
                )
            try:
                await self.transport.publish(service, call_id, key or call_id, data, remaining, high)
                return
            except Transient as exc:
                tries += 1
                pause = backoff.next()
                if waiter.done():
                    return
                if time.monotonic() + pause >= give_up:
                    raise PublishError(
                        f"the call {call_id} to {service!r} was not confirmed by the broker before its deadline: "
                        f"{exc} ({tries} tries)"
                    ) from None
                log.info("callq: publishing call %s again in %.3f s: %s", call_id, pause, exc)
                self._republished += 1
                await asyncio.sleep(pause)

    async def close(self) -> None:
        """Fails the calls still waiting (:class:`~callq_client.Disconnected`) and disconnects."""
        if self._closed:
            return
        self._closed = True
        self.router.fail_all(Disconnected("the client was closed while the call was in flight"))
        await self.transport.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_exc: Any) -> None:
        await self.close()


def _options(options: Mapping[str, Any]) -> ClientOptions:
    try:
        return ClientOptions(**options)
    except TypeError as exc:
        known = ", ".join(ClientOptions.__dataclass_fields__)
        raise ConfigError(f"{exc}: the client's options are {known}") from None


class Client:
    """A client for any code, threads included: it runs its own event loop
    in a daemon thread.

    ::

        with Client() as client:                       # CALLQ_BROKER
            print(client.call("echo", "echo", {"hi": 1}))
            futures = [client.submit("echo", "echo", {"i": i}) for i in range(1000)]
            results = [f.result() for f in futures]
    """

    def __init__(self, url: Optional[str] = None, **options: Any) -> None:
        opts = _options(options)
        urls.parse(url)  # a bad URL fails here, before a thread starts
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="callq-client", daemon=True)
        self._thread.start()
        self._inner: Optional[AsyncClient] = None

        async def connect() -> AsyncClient:
            transport = _transport(url, opts)
            client = AsyncClient(transport, opts)
            await transport.start(client._on_replies)
            return client

        try:
            self._inner = self._run_coro(connect(), opts.connect_timeout * 3 + 5)
        except BaseException:
            self._stop_loop()
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _run_coro(self, coro: Awaitable[T], timeout: Optional[float]) -> T:
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise Disconnected(f"the client's event loop did not answer within {timeout} s") from None

    @property
    def inner(self) -> AsyncClient:
        if self._inner is None:
            raise Disconnected("the client is closed")
        return self._inner

    @property
    def reply_to(self) -> str:
        return self.inner.reply_to

    def stats(self) -> Stats:
        return self.inner.stats()

    def submit(self, service: str, method: str, args: Any = None, **kwargs: Any) -> "concurrent.futures.Future[Any]":
        """Starts a call and returns at once: a future of its result (or of
        the outcome's error). Takes :meth:`AsyncClient.call_async`'s options."""
        return asyncio.run_coroutine_threadsafe(self.inner.call_async(service, method, args, **kwargs), self._loop)

    def call(self, service: str, method: str, args: Any = None, **kwargs: Any) -> Any:
        """Calls ``service.method(args)`` and waits: its result, or the
        outcome's error. Takes :meth:`AsyncClient.call_async`'s options."""
        return self.submit(service, method, args, **kwargs).result()

    async def call_async(self, service: str, method: str, args: Any = None, **kwargs: Any) -> Any:
        """:meth:`call` for asyncio code, from any event loop."""
        return await asyncio.wrap_future(self.submit(service, method, args, **kwargs))

    def send(self, body: Dict[str, Any], *, validate: bool = True, timeout: Optional[float] = None) -> Reply:
        """:meth:`AsyncClient.send`, blocking."""
        future = asyncio.run_coroutine_threadsafe(
            self.inner.send(body, validate=validate, timeout=timeout), self._loop
        )
        return future.result()

    def close(self) -> None:
        """Fails the calls still waiting and disconnects; idempotent."""
        inner, self._inner = self._inner, None
        if inner is not None:
            try:
                self._run_coro(inner.close(), inner.opts.connect_timeout + 10)
            except CallqError as exc:
                log.warning("callq: closing: %s", exc)
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._loop.is_running():
            self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def connect(url: Optional[str] = None, **options: Any) -> Client:
    """A :class:`Client` connected to ``url`` (default: ``CALLQ_BROKER``)."""
    return Client(url, **options)


async def connect_async(url: Optional[str] = None, **options: Any) -> AsyncClient:
    """An :class:`AsyncClient` connected to ``url`` (default: ``CALLQ_BROKER``)."""
    return await AsyncClient.connect(url, **options)

