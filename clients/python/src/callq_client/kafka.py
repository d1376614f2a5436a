"""Kafka, on confluent-kafka (librdkafka).

- Calls are records of the topic ``<topic_prefix>callq.call.<service>``,
  keyed by ``session_id`` or else ``call_id``, from an idempotent producer
  (``acks=all``): a publish returns once its delivery report says the
  record is stored; many are in flight at once (librdkafka pipelines
  them), at most ``confirm_window`` awaiting their report. The call topic
  must exist (workers create it): a call to a service without one fails at
  once with :class:`~callq_client.errors.NoSuchService`.
- Replies come on the client's own topic ``<topic_prefix>callq.reply.<client_id>``,
  made at start (the URL's ``partitions`` and ``replication``, records kept
  an hour) and read from the end it had then, on every partition, without a
  consumer group's rebalances.
- librdkafka reconnects by itself (backoff up to 1 s) and does its network
  I/O in threads of its own. The client's event loop serves the delivery
  reports and takes the replies without blocking (``poll(0)``,
  ``consume(timeout=0)``), every millisecond while a publish awaits its
  report or a call its reply, and not at all while nothing is in flight:
  no thread of Python's, so no handing over of the interpreter lock on the
  way of a call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Set

try:
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        f"Kafka needs confluent-kafka ({exc}): pip install 'callq-client[kafka]'"
    ) from exc

from .envelope import HIGH_PRIORITY, call_queue
from .errors import ConfigError, Disconnected, NoSuchService, PublishError, QueueFull
from .transport import OnReplies, Transient, Transport, acquire, wait_future
from .url import KafkaConfig

log = logging.getLogger("callq_client.kafka")

#: How often the event loop serves delivery reports and takes replies while
#: anything is in flight, in seconds.
PUMP_EVERY = 0.001

#: How long reply records are kept (the Rust client's reply topics keep them as long).
REPLY_RETENTION_MS = 3_600_000


class KafkaTransport(Transport):
    """A client's producer and reply reader on Kafka."""

    def __init__(self, cfg: KafkaConfig, client_id: str, *, confirm_window: int = 1024, prefetch: int = 512) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.reply_to = f"callq.reply.{client_id}"
        self.reply_topic = cfg.topic_prefix + self.reply_to
        self.confirm_window = confirm_window
        self.prefetch = prefetch
        self._window: Optional[asyncio.Semaphore] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._producer: Optional[Any] = None
        self._consumer: Optional[Any] = None
        self._admin: Optional[Any] = None
        self._closed = False
        self._pump_handle: Optional[asyncio.TimerHandle] = None
        self._reports_due = 0
        #: Whether the client awaits replies (set by the client): the loop
        #: polls for them only then.
        self.waiting: Callable[[], bool] = lambda: True
        self._topics: Set[str] = set()
        self._on_replies: Optional[OnReplies] = None

    def _common(self) -> Dict[str, Any]:
        conf: Dict[str, Any] = {
            "bootstrap.servers": self.cfg.bootstrap,
            "client.id": self.cfg.client_id,
            "socket.timeout.ms": int(self.cfg.timeout_s * 1000),
            "allow.auto.create.topics": False,
            "reconnect.backoff.max.ms": 1000,
        }
        if self.cfg.tls:
            conf["security.protocol"] = "ssl"
            conf["ssl.endpoint.identification.algorithm"] = "https"
            ca = os.environ.get("SSL_CERT_FILE")
            if ca and not any(k.startswith("ssl.ca.") for k in self.cfg.librdkafka):
                if not os.access(ca, os.R_OK):
                    raise ConfigError(f"SSL_CERT_FILE={ca} names the CAs a kafkas:// connection trusts, but it cannot be read")
                conf["ssl.ca.location"] = ca
            else:
                conf["ssl.ca.location"] = "probe"
        return conf

    def _with_extra(self, conf: Dict[str, Any]) -> Dict[str, Any]:
        conf.update(self.cfg.librdkafka)
        return conf

    async def start(self, on_replies: OnReplies) -> None:
        self._on_replies = on_replies
        self._loop = asyncio.get_running_loop()
        self._window = asyncio.Semaphore(self.confirm_window)
        await self._loop.run_in_executor(None, self._start_blocking)

    def _start_blocking(self) -> None:
        timeout = self.cfg.timeout_s
        try:
            self._admin = AdminClient(self._with_extra(self._common()))
            self._producer = Producer(
                self._with_extra(
                    {
                        **self._common(),
                        "enable.idempotence": True,
                        "acks": "all",
                        "linger.ms": 1,
                        "message.timeout.ms": int(self.cfg.confirm_timeout_s * 1000),
                        "queue.buffering.max.messages": max(2 * self.confirm_window, 1000),
                    }
                )
            )
        except KafkaException as exc:
            raise ConfigError(f"Kafka client settings: {exc}") from None
        topic = NewTopic(
            self.reply_topic,
            num_partitions=self.cfg.partitions,
            replication_factor=self.cfg.replication if self.cfg.replication is not None else -1,
            config={"retention.ms": str(REPLY_RETENTION_MS)},
        )
        futures = self._admin.create_topics([topic], request_timeout=timeout, operation_timeout=timeout)
        try:
            futures[self.reply_topic].result(timeout=timeout + 1)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise Disconnected(
                    f"cannot create the reply topic {self.reply_topic} on Kafka at {self.cfg.bootstrap}: {exc}"
                ) from None
        except Exception as exc:  # noqa: BLE001 - concurrent.futures.TimeoutError and the like
            raise Disconnected(
                f"no answer from Kafka at {self.cfg.bootstrap} within {timeout:.0f} s creating the reply topic "
                f"{self.reply_topic} ({exc!r}): is the broker running there?"
            ) from None
        partitions = self._partitions(self.reply_topic, time.monotonic() + timeout)
        consumer = Consumer(
            self._with_extra(
                {
                    **self._common(),
                    "group.id": f"{self.cfg.group_prefix}{self.reply_topic}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "enable.partition.eof": False,
                    "fetch.wait.max.ms": self.cfg.fetch_wait_ms,
                    "fetch.queue.backoff.ms": 10,
                    "queued.min.messages": max(1, min(self.prefetch, 1000)),
                }
            )
        )
        # From each partition's end as it is now: no call of this client
        # was published yet, so no reply of it can be before that.
        assignment = []
        for p in partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(self.reply_topic, p), timeout=timeout)
            assignment.append(TopicPartition(self.reply_topic, p, high))
        consumer.assign(assignment)
        self._consumer = consumer

    def _partitions(self, topic: str, until: float) -> List[int]:
        """The partitions of ``topic`` once its metadata shows it (a topic just made may take a moment)."""
        assert self._admin is not None
        while True:
            meta = self._admin.list_topics(topic=topic, timeout=max(0.5, until - time.monotonic()))
            info = meta.topics.get(topic)
            if info is not None and info.error is None and info.partitions:
                return sorted(info.partitions)
            if time.monotonic() >= until:
                raise Disconnected(f"the topic {topic} does not show in Kafka's metadata at {self.cfg.bootstrap}")
            time.sleep(0.05)

    def _kick(self) -> None:
        """Makes sure the loop polls soon."""
        if self._pump_handle is None and not self._closed and self._loop is not None:
            self._pump_handle = self._loop.call_later(PUMP_EVERY, self._pump)

    def _pump(self) -> None:
        """Serves the delivery reports and takes the replies that are there,
        without waiting; again in :data:`PUMP_EVERY` while anything is in flight."""
        self._pump_handle = None
        if self._closed:
            return
        producer, consumer = self._producer, self._consumer
        assert producer is not None and consumer is not None
        if self._reports_due:
            producer.poll(0)  # runs the publishes' on_delivery here
        try:
            records = consumer.consume(num_messages=self.prefetch, timeout=0)
        except (KafkaException, RuntimeError) as exc:
            log.warning("callq: reading replies from %s: %s", self.reply_topic, exc)
            records = []
        bodies = []
        for record in records:
            err = record.error()
            if err is not None:
                log.warning("callq: reading replies from %s: %s", self.reply_topic, err)
                continue
            value = record.value()
            if value is not None:
                bodies.append(value)
        if bodies and self._on_replies is not None:
            self._on_replies(bodies)
        if self._reports_due or self.waiting():
            self._kick()

    async def _ensure_topic(self, topic: str, service: str) -> None:
        if topic in self._topics:
            return
        loop = asyncio.get_running_loop()
        admin = self._admin
        assert admin is not None

        def exists() -> bool:
            meta = admin.list_topics(topic=topic, timeout=self.cfg.timeout_s)
            info = meta.topics.get(topic)
            return info is not None and info.error is None and bool(info.partitions)

        try:
            found = await loop.run_in_executor(None, exists)
        except KafkaException as exc:
            raise Transient(f"reading Kafka's metadata: {exc}") from None
        if not found:
            raise NoSuchService(
                f"no topic {topic} on Kafka at {self.cfg.bootstrap}: no worker of service {service!r} has started "
                "(workers create their call topics), or the name (or the URL's topic_prefix) is wrong"
            )
        self._topics.add(topic)

    async def publish(
        self, service: str, call_id: str, key: str, body: bytes, timeout: float, high: bool = False
    ) -> None:
        assert self._window is not None and self._producer is not None
        started = time.monotonic()
        topic = self.cfg.topic_prefix + call_queue(service, HIGH_PRIORITY if high else None)
        await self._ensure_topic(topic, service)
        if not await acquire(self._window, timeout):
            raise Transient("the publishes awaiting their delivery report filled the window until the timeout")
        try:
            reported: "asyncio.Future[Optional[Any]]" = asyncio.get_running_loop().create_future()

            def on_delivery(err: Optional[Any], _msg: Any) -> None:
                # Runs in the loop, within poll() (see _pump).
                self._reports_due -= 1
                if not reported.done():
                    reported.set_result(err)

            while True:
                try:
                    self._producer.produce(topic, body, key=key.encode("utf-8"), on_delivery=on_delivery)
                    self._reports_due += 1
                    self._kick()
                    break
                except BufferError:
                    if time.monotonic() - started > timeout:
                        raise Transient("librdkafka's queue stayed full") from None
                    self._producer.poll(0)
                    await asyncio.sleep(0.005)
                except KafkaException as exc:
                    raise PublishError(f"Kafka refused the call to {service!r}: {exc}") from None
            remaining = max(0.001, timeout - (time.monotonic() - started))
            try:
                err = await wait_future(reported, remaining)
            except asyncio.TimeoutError:
                raise Transient(f"no delivery report within {remaining:.1f} s") from None
            if err is None:
                return
            code = err.code()
            if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC):
                self._topics.discard(topic)
                raise NoSuchService(f"no topic {topic} on Kafka: {err}")
            if code == KafkaError.MSG_SIZE_TOO_LARGE:
                raise PublishError(f"Kafka refused the call to {service!r} as too large: {err}")
            if code == KafkaError.POLICY_VIOLATION:
                raise QueueFull(f"Kafka refused the call to {service!r}: {err}")
            raise Transient(f"delivery failed: {err}")
        finally:
            self._window.release()

    async def close(self) -> None:
        self._closed = True
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        loop = asyncio.get_running_loop()

        def finish() -> None:
            if self._consumer is not None:
                try:
                    self._consumer.close()
                except (KafkaException, RuntimeError):
                    pass
            if self._producer is not None:
                self._producer.flush(2.0)

        await loop.run_in_executor(None, finish)

    async def delete_reply_topic(self) -> None:
        """Deletes the client's reply topic (Kafka keeps a topic until it is deleted)."""
        if self._admin is None:
            return
        admin = self._admin
        topic = self.reply_topic
        timeout = self.cfg.timeout_s

        def delete() -> None:
            try:
                admin.delete_topics([topic], operation_timeout=timeout)[topic].result(timeout=timeout + 1)
            except Exception as exc:  # noqa: BLE001 - best effort
                log.info("callq: deleting %s: %r", topic, exc)

        await asyncio.get_running_loop().run_in_executor(None, delete)
