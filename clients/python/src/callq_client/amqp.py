"""RabbitMQ, on pika's asyncio connection (callbacks on the client's event loop).

- One connection, to the first node of the URL that answers; lost, it is
  made again with a jittered backoff (0.1 s doubling up to 5 s), going
  around the nodes, until the client closes. Calls in flight keep waiting
  (their reply queue is durable); their unconfirmed publishes are retried.
- The reply queue ``callq.reply.<client_id>``, declared as callq's Rust
  client declares its own: a durable quorum queue that expires an hour
  after its client is gone, bounded, refusing publishes past the bound.
  Consumed with a prefetch; the replies that arrive together are handed
  over together and acknowledged in batches (``multiple``).
- Calls go to the topic exchange ``callq.calls`` with the service as
  routing key, those of priority 5 and up to ``callq.calls.high`` (or,
  with ``calls_exchange=""``, to the default exchange with the queue name,
  ``callq.call.<service>`` or ``callq.high.<service>``), persistent, ``application/json``, ``mandatory``,
  with ``user_id`` = the URL's user (RabbitMQ checks it: workers answer
  only into reply queues of the publishing user) and ``message_id`` = the
  call id, on one channel in confirm mode shared by every call: confirms
  are pipelined, at most ``confirm_window`` outstanding, matched to their
  publish by delivery tag. A call returned as unroutable (no call queue
  bound for the service) fails with
  :class:`~callq_client.errors.NoSuchService`; a nack (the call queue is
  full) with :class:`~callq_client.errors.QueueFull`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

try:
    import pika
    import pika.exceptions
    import pika.spec
    from pika.adapters.asyncio_connection import AsyncioConnection
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"RabbitMQ needs pika ({exc}): pip install 'callq-client[amqp]'") from exc

from .envelope import HIGH_PRIORITY, call_queue
from .errors import ConfigError, Disconnected, NoSuchService, QueueFull
from .transport import Backoff, OnReplies, Transient, Transport, acquire, wait_for_event, wait_future
from .url import AmqpConfig, AmqpNode, redact

log = logging.getLogger("callq_client.amqp")

#: The exchange calls are published to, with the service as routing key.
CALLS_EXCHANGE = "callq.calls"

#: The reply queue's arguments: those callq's Rust client declares its own with.
REPLY_QUEUE_ARGUMENTS: Dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-expires": 3_600_000,
    # A quorum queue holds one more than x-max-length: 1,000,000 in all.
    "x-max-length": 999_999,
    "x-overflow": "reject-publish",
}

#: Replies acknowledged at once (with one `multiple` ack) at most; and the
#: longest a reply waits for its ack. Both well within the prefetch.
ACK_EVERY = 128
ACK_AFTER = 0.02

#: AMQP reply codes.
NO_ROUTE = 312
ACCESS_REFUSED = 403
NOT_FOUND = 404
PRECONDITION_FAILED = 406


def _ssl_context(cfg: AmqpConfig) -> Optional[ssl.SSLContext]:
    if not cfg.tls:
        return None
    context = ssl.create_default_context()
    extra = os.environ.get("SSL_CERT_FILE")
    try:
        if extra:
            context.load_verify_locations(cafile=extra)
        if cfg.cacertfile:
            context.load_verify_locations(cafile=cfg.cacertfile)
        if cfg.certfile and cfg.keyfile:
            context.load_cert_chain(cfg.certfile, cfg.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"the TLS files of the broker URL (or SSL_CERT_FILE) cannot be read: {exc}") from None
    return context


def _reply_code(reason: Optional[BaseException]) -> Optional[int]:
    code = getattr(reason, "reply_code", None)
    return code if isinstance(code, int) else None


class _Publisher:
    """The channel in confirm mode, and the publishes awaiting their confirm by delivery tag."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.next_tag = 0
        # Insertion order is tag order: a `multiple` confirm settles a prefix.
        self.pending: Dict[int, "asyncio.Future[Optional[BaseException]]"] = {}
        self.tag_of: Dict[str, int] = {}
        self.returned: Set[int] = set()
        self.closed = False

    def settle(self, tag: int, outcome: Optional[BaseException]) -> None:
        future = self.pending.pop(tag, None)
        self.returned.discard(tag)
        if future is not None and not future.done():
            future.set_result(outcome)

    def fail_all(self, outcome: BaseException) -> None:
        self.closed = True
        for tag in list(self.pending):
            self.settle(tag, outcome)
        self.tag_of.clear()


class AmqpTransport(Transport):
    """A client's connection to RabbitMQ."""

    def __init__(
        self,
        cfg: AmqpConfig,
        client_id: str,
        *,
        prefetch: int = 512,
        confirm_window: int = 1024,
        timeout: float = 10.0,
        calls_exchange: str = CALLS_EXCHANGE,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.reply_to = f"callq.reply.{client_id}"
        self.prefetch = prefetch
        self.timeout = timeout
        self.calls_exchange = calls_exchange
        self._ssl = _ssl_context(cfg)
        self._confirm_window = confirm_window
        self._window: Optional[asyncio.Semaphore] = None
        self._ready: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._on_replies: Optional[OnReplies] = None
        self._conn: Optional[Any] = None
        self._closed_future: Optional["asyncio.Future[None]"] = None
        self._pub: Optional[_Publisher] = None
        self._sub: Optional[Any] = None
        self._closing = False
        self._reconnecting: Optional["asyncio.Task[None]"] = None
        self._reopening: Optional["asyncio.Task[None]"] = None
        self._next_node = 0
        self._last_error = "not connected yet"
        # Replies taken but not yet handed over, and not yet acknowledged.
        self._batch: List[bytes] = []
        self._batch_tag = 0
        self._batch_channel: Optional[Any] = None
        self._flush_scheduled = False
        self._unacked = 0
        self._ack_timer: Optional[asyncio.TimerHandle] = None

    # -- connection ---------------------------------------------------------

    async def start(self, on_replies: OnReplies) -> None:
        self._loop = asyncio.get_running_loop()
        self._window = asyncio.Semaphore(self._confirm_window)
        self._ready = asyncio.Event()
        self._on_replies = on_replies
        until = time.monotonic() + self.timeout
        backoff = Backoff(0.1, 2.0)
        while True:
            if await self._connect_round(until):
                return
            if time.monotonic() + backoff.first >= until:
                raise Disconnected(
                    f"no RabbitMQ node of {redact(self.cfg.nodes[0].url)} answered within {self.timeout:.0f} s: "
                    f"{self._last_error}. Is RabbitMQ running there, and are the user, password and virtual host right?"
                )
            await asyncio.sleep(min(backoff.next(), max(0.0, until - time.monotonic())))

    async def _connect_round(self, until: float) -> bool:
        """Tries each node once, from the one that answered last; whether one did."""
        nodes = self.cfg.nodes
        per_node = max(0.5, (until - time.monotonic()) / len(nodes))
        for i in range(len(nodes)):
            index = (self._next_node + i) % len(nodes)
            node = nodes[index]
            try:
                await self._open(node, per_node)
            except (asyncio.CancelledError, ConfigError):
                raise
            except pika.exceptions.ProbableAuthenticationError as exc:
                raise ConfigError(
                    f"RabbitMQ at {node.host}:{node.port} refused the login of user {self.cfg.user!r} ({exc}): "
                    "check the user and password of the broker URL"
                ) from None
            except pika.exceptions.ProbableAccessDeniedError as exc:
                raise ConfigError(
                    f"RabbitMQ at {node.host}:{node.port} refused user {self.cfg.user!r} the virtual host "
                    f"{self.cfg.vhost!r} ({exc}): check the URL's virtual host and the user's permissions"
                ) from None
            except Exception as exc:  # noqa: BLE001 - every failure means: try the next node
                self._last_error = f"{node.host}:{node.port}: {exc!r}"
                log.warning("callq: RabbitMQ at %s:%s: %r", node.host, node.port, exc)
                continue
            self._next_node = index
            return True
        return False

    def _parameters(self, node: AmqpNode, timeout: float) -> Any:
        params = pika.URLParameters(node.url)
        params.connection_attempts = 1
        params.socket_timeout = timeout
        params.stack_timeout = timeout
        params.client_properties = {"connection_name": f"callq-py {self.client_id}"}
        if self._ssl is not None:
            params.ssl_options = pika.SSLOptions(self._ssl, server_hostname=node.host)
        return params

    async def _rpc(self, start: Callable[[Callable[[Any], None]], None], channel: Any, what: str) -> Any:
        """Runs one request of ``channel`` (``start(callback)``) and awaits its
        answer; the broker closing the channel instead fails it."""
        assert self._loop is not None
        future: "asyncio.Future[Any]" = self._loop.create_future()

        def done(frame: Any) -> None:
            if not future.done():
                future.set_result(frame)

        def closed(_channel: Any, reason: BaseException) -> None:
            if not future.done():
                future.set_exception(reason)

        channel.add_on_close_callback(closed)
        start(done)
        try:
            return await wait_future(future, self.timeout)
        except asyncio.TimeoutError:
            raise Transient(f"RabbitMQ did not answer {what} within {self.timeout:.0f} s") from None

    async def _open(self, node: AmqpNode, timeout: float) -> None:
        loop = self._loop
        assert loop is not None
        opened: "asyncio.Future[Any]" = loop.create_future()
        closed: "asyncio.Future[None]" = loop.create_future()

        def on_open(conn: Any) -> None:
            if not opened.done():
                opened.set_result(conn)

        def on_open_error(_conn: Any, err: BaseException) -> None:
            if not opened.done():
                opened.set_exception(err if isinstance(err, BaseException) else Disconnected(str(err)))

        def on_close(conn: Any, reason: BaseException) -> None:
            if not closed.done():
                closed.set_result(None)
            if not opened.done():
                opened.set_exception(reason)
            self._on_connection_closed(conn, reason)

        conn = AsyncioConnection(
            self._parameters(node, timeout),
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=on_close,
            custom_ioloop=loop,
        )
        try:
            await wait_future(opened, timeout + 1.0)
        except asyncio.TimeoutError:
            self._quietly_close(conn)
            raise Disconnected(f"no answer within {timeout:.1f} s") from None
        try:
            pub = await self._rpc(lambda cb: conn.channel(on_open_callback=cb), conn, "channel.open")
            publisher = await self._confirming(pub)
            sub = await self._rpc(lambda cb: conn.channel(on_open_callback=cb), conn, "channel.open")
            await self._rpc(lambda cb: sub.basic_qos(prefetch_count=self.prefetch, callback=cb), sub, "basic.qos")
            try:
                await self._rpc(
                    lambda cb: sub.queue_declare(
                        self.reply_to, durable=True, arguments=dict(REPLY_QUEUE_ARGUMENTS), callback=cb
                    ),
                    sub,
                    "queue.declare",
                )
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == ACCESS_REFUSED:
                    raise ConfigError(
                        f"RabbitMQ refused to let user {self.cfg.user!r} declare the reply queue {self.reply_to!r} "
                        f"({exc}): in the least-privilege set-up a client may declare only callq.reply.<user> and "
                        "callq.reply.<user>.<anything>; pick a client_id that starts with the user name and a dot"
                    ) from None
                if exc.reply_code == PRECONDITION_FAILED:
                    raise ConfigError(
                        f"the reply queue {self.reply_to!r} exists with other settings ({exc}): "
                        "delete it or use another client_id"
                    ) from None
                raise
            await self._rpc(
                lambda cb: sub.basic_consume(self.reply_to, self._on_message, callback=cb), sub, "basic.consume"
            )
        except BaseException:
            self._quietly_close(conn)
            raise
        sub.add_on_close_callback(self._on_consumer_closed)
        self._conn = conn
        self._closed_future = closed
        self._pub = publisher
        self._sub = sub
        assert self._ready is not None
        self._ready.set()
        log.info("callq: connected to RabbitMQ at %s:%s, replies on %s", node.host, node.port, self.reply_to)

    async def _confirming(self, channel: Any) -> _Publisher:
        """``channel`` in confirm mode, its confirms and returns matched to its publishes."""
        publisher = _Publisher(channel)
        await self._rpc(
            lambda cb: channel.confirm_delivery(lambda frame: self._on_confirm(publisher, frame), callback=cb),
            channel,
            "confirm.select",
        )
        channel.add_on_return_callback(
            lambda _ch, method, props, _body: self._on_return(publisher, method, props)
        )
        channel.add_on_close_callback(lambda _ch, reason: self._on_publisher_closed(publisher, reason))
        return publisher

    def _quietly_close(self, conn: Any) -> None:
        try:
            if conn.is_open:
                conn.close()
                return
        except Exception:  # noqa: BLE001 - it is going away either way
            pass
        try:
            conn._adapter_disconnect()  # not open (yet): drop the socket
        except Exception:  # noqa: BLE001
            pass

    def _on_connection_closed(self, conn: Any, reason: BaseException) -> None:
        if conn is not self._conn:
            return  # one that failed while opening, or one replaced already
        self._conn = None
        if self._ready is not None:
            self._ready.clear()
        if self._pub is not None:
            self._pub.fail_all(Transient(f"the connection was lost before the confirm ({reason!r})"))
            self._pub = None
        self._flush()
        self._batch_channel = None
        if self._closing:
            return
        self._last_error = repr(reason)
        log.warning("callq: the RabbitMQ connection was lost (%r); reconnecting", reason)
        if (self._reconnecting is None or self._reconnecting.done()) and self._loop is not None:
            self._reconnecting = self._loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while not self._closing:
            await asyncio.sleep(backoff.next())
            if self._closing:
                return
            try:
                if await self._connect_round(time.monotonic() + self.timeout):
                    return
            except ConfigError as exc:
                log.error("callq: reconnecting to RabbitMQ: %s", exc)

    def _on_consumer_closed(self, channel: Any, reason: BaseException) -> None:
        # Replies stop without their channel: start over on a new connection.
        if self._closing or channel is not self._sub or self._conn is None:
            return
        log.warning("callq: the reply channel closed (%r); connecting again", reason)
        self._quietly_close(self._conn)

    async def close(self) -> None:
        self._closing = True
        if self._ready is not None:
            self._ready.clear()
        for task in (self._reconnecting, self._reopening):
            if task is not None:
                task.cancel()
        self._flush()
        self._ack()
        conn, closed = self._conn, self._closed_future
        if self._pub is not None:
            self._pub.fail_all(Disconnected("the client closed"))
        if conn is not None and conn.is_open:
            conn.close()
            if closed is not None:
                try:
                    await wait_future(closed, self.timeout)
                except asyncio.TimeoutError:
                    log.warning("callq: the RabbitMQ connection did not close within %.0f s", self.timeout)
        self._conn = None

    # -- replies ------------------------------------------------------------

    def _on_message(self, channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        if self._batch_channel is not channel:
            self._flush()
            self._ack()
            self._batch_channel = channel
        self._batch.append(body)
        tag = method.delivery_tag or 0
        if tag > self._batch_tag:
            self._batch_tag = tag
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Hands the replies taken to the client at once, and acknowledges
        them (all up to the last, ``multiple``) once :data:`ACK_EVERY` are
        unacknowledged or :data:`ACK_AFTER` seconds passed."""
        self._flush_scheduled = False
        batch, self._batch = self._batch, []
        if batch and self._on_replies is not None:
            self._on_replies(batch)
        self._unacked += len(batch)
        if self._unacked >= ACK_EVERY or self._closing:
            self._ack()
        elif self._unacked and self._ack_timer is None and self._loop is not None:
            self._ack_timer = self._loop.call_later(ACK_AFTER, self._ack)

    def _ack(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        tag, self._batch_tag = self._batch_tag, 0
        self._unacked = 0
        channel = self._batch_channel
        if tag and channel is not None and channel.is_open:
            try:
                channel.basic_ack(tag, multiple=True)
            except pika.exceptions.AMQPError as exc:
                log.debug("callq: acknowledging replies: %r", exc)

    # -- calls --------------------------------------------------------------

    def _route(self, service: str, high: bool) -> Tuple[str, str]:
        if self.calls_exchange:
            return (f"{self.calls_exchange}.high" if high else self.calls_exchange), service
        return "", call_queue(service, HIGH_PRIORITY if high else None)

    async def publish(
        self, service: str, call_id: str, key: str, body: bytes, timeout: float, high: bool = False
    ) -> None:
        assert self._ready is not None and self._window is not None and self._loop is not None
        started = time.monotonic()
        if not await wait_for_event(self._ready, timeout):
            raise Transient(f"not connected to RabbitMQ ({self._last_error})")
        if not await acquire(self._window, timeout - (time.monotonic() - started)):
            raise Transient("the publishes awaiting confirms filled the window until the timeout")
        try:
            pub = self._pub
            if pub is None or pub.closed or not pub.channel.is_open:
                raise Transient("the publish channel is closed")
            exchange, routing_key = self._route(service, high)
            properties = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                user_id=self.cfg.user or None,
                message_id=call_id,
            )
            confirmed: "asyncio.Future[Optional[BaseException]]" = self._loop.create_future()
            tag = pub.next_tag + 1
            try:
                pub.channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
            except (pika.exceptions.AMQPError, ValueError) as exc:
                raise Transient(f"publishing: {exc!r}") from None
            pub.next_tag = tag
            pub.pending[tag] = confirmed
            pub.tag_of[call_id] = tag
            remaining = max(0.001, timeout - (time.monotonic() - started))
            try:
                outcome = await wait_future(confirmed, remaining)
            except asyncio.TimeoutError:
                pub.pending.pop(tag, None)
                raise Transient(f"no confirm within {remaining:.1f} s") from None
            finally:
                if pub.tag_of.get(call_id) == tag:
                    del pub.tag_of[call_id]
            if outcome is None:
                return
            if isinstance(outcome, NoSuchService) and str(outcome) == "unroutable":
                raise NoSuchService(
                    f"RabbitMQ returned the call to {service!r} as unroutable: no queue {call_queue(service, HIGH_PRIORITY if high else None)} is "
                    "bound (no worker of the service has started, or the name is wrong)"
                )
            raise outcome
        finally:
            self._window.release()

    def _on_confirm(self, pub: _Publisher, frame: Any) -> None:
        method = frame.method
        nack = isinstance(method, pika.spec.Basic.Nack)
        last = method.delivery_tag
        tags = [t for t in pub.pending if t <= last] if method.multiple else [last]
        for tag in tags:
            if nack:
                pub.settle(tag, QueueFull("RabbitMQ refused the call (nack): its call queue is full; try later"))
            elif tag in pub.returned:
                pub.settle(tag, NoSuchService("unroutable"))
            else:
                pub.settle(tag, None)

    def _on_return(self, pub: _Publisher, method: Any, properties: Any) -> None:
        # A mandatory publish nothing could route comes back before its confirm.
        tag = pub.tag_of.get(properties.message_id or "")
        if tag is not None:
            pub.returned.add(tag)
            if method.reply_code != NO_ROUTE:
                log.warning("callq: RabbitMQ returned a call: %s %s", method.reply_code, method.reply_text)

    def _on_publisher_closed(self, publisher: _Publisher, reason: BaseException) -> None:
        if _reply_code(reason) == NOT_FOUND:
            # No exchange callq.calls: no worker ever declared a call queue.
            outcome: BaseException = NoSuchService(
                f"no call queue to publish to ({reason}): no worker of the service has started (workers declare "
                "callq.call.<service> and the exchange callq.calls), or the name is wrong"
            )
        else:
            outcome = Transient(f"the publish channel closed before the confirm ({reason!r})")
        publisher.fail_all(outcome)
        if self._pub is not publisher or self._closing or self._conn is None or not self._conn.is_open:
            return
        self._pub = None
        if self._loop is not None and (self._reopening is None or self._reopening.done()):
            self._reopening = self._loop.create_task(self._reopen_publisher())

    async def _reopen_publisher(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            channel = await self._rpc(lambda cb: conn.channel(on_open_callback=cb), conn, "channel.open")
            publisher = await self._confirming(channel)
        except Exception as exc:  # noqa: BLE001 - the connection is going: the reconnect replaces it
            log.warning("callq: reopening the publish channel: %r", exc)
            return
        if conn is self._conn:
            self._pub = publisher
