"""The broker URL: the same ``CALLQ_BROKER`` the Rust processes read.

- ``amqp://user:password@host:port/vhost[?heartbeat=N]`` (RabbitMQ),
  ``amqps://...`` over TLS, with the RabbitMQ URI keys ``cacertfile``,
  ``certfile`` and ``keyfile`` for PEM files; several nodes of one cluster
  as ``amqp://u:p@host1:port1,host2:port2/vhost`` or as whole URLs
  separated by commas.
- ``kafka://host:port[,host:port...][?key=value&...]`` (Kafka),
  ``kafkas://...`` over TLS; the keys of callq's Kafka adapter
  (``topic_prefix``, ``group_prefix``, ``partitions``, ``replication``,
  ``client_id``, ``timeout_ms``, ``confirm_timeout_ms``, ``fetch_wait_ms``,
  ``session_timeout_ms``, ``revoke_wait_ms``) and any librdkafka setting
  (a key with a dot, such as ``ssl.key.location``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .errors import ConfigError

#: The URL used when neither an argument nor ``CALLQ_BROKER`` names one (the Rust processes' default).
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"

#: The variable the broker URL is read from.
URL_VAR = "CALLQ_BROKER"

_SCHEMES = ("amqp", "amqps", "kafka", "kafkas")
_AMQP_TLS_KEYS = ("cacertfile", "certfile", "keyfile")
_KAFKA_KEYS = (
    "partitions",
    "replication",
    "group_prefix",
    "topic_prefix",
    "client_id",
    "session_timeout_ms",
    "revoke_wait_ms",
    "fetch_wait_ms",
    "timeout_ms",
    "confirm_timeout_ms",
)


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = []
    for one in url.split(","):
        if "://" in one and "@" in one:
            scheme, rest = one.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            one = f"{scheme}://{user}:***@{host}"
        parts.append(one)
    return ",".join(parts)


@dataclass(frozen=True)
class AmqpNode:
    """One RabbitMQ node: what pika connects to."""

    url: str
    host: str
    port: int


@dataclass(frozen=True)
class AmqpConfig:
    """A RabbitMQ broker: its nodes (all of one user and virtual host)."""

    nodes: List[AmqpNode]
    user: Optional[str]
    vhost: str
    tls: bool
    cacertfile: Optional[str] = None
    certfile: Optional[str] = None
    keyfile: Optional[str] = None


@dataclass(frozen=True)
class KafkaConfig:
    """A Kafka broker: bootstrap servers and callq's Kafka adapter options."""

    bootstrap: str
    tls: bool = False
    topic_prefix: str = ""
    group_prefix: str = ""
    partitions: int = 1
    replication: Optional[int] = None
    client_id: str = "callq-py"
    timeout_s: float = 10.0
    confirm_timeout_s: float = 30.0
    fetch_wait_ms: int = 100
    librdkafka: Dict[str, str] = field(default_factory=dict)


BrokerConfig = "AmqpConfig | KafkaConfig"


def broker_url(url: Optional[str] = None) -> str:
    """``url``, else ``CALLQ_BROKER``, else :data:`DEFAULT_URL`."""
    if url:
        return url
    return os.environ.get(URL_VAR) or DEFAULT_URL


def parse(url: Optional[str] = None) -> "AmqpConfig | KafkaConfig":
    """The broker ``url`` names (see the module's docs); :class:`ConfigError` saying what is wrong."""
    text = broker_url(url).strip()
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"unsupported broker URL {redact(text)!r}: callq speaks amqp:// and amqps:// (RabbitMQ, amqps over TLS) "
            "and kafka:// and kafkas:// (Kafka, kafkas over TLS); set CALLQ_BROKER to one of them"
        )
    if scheme.startswith("amqp"):
        return _parse_amqp(text)
    return _parse_kafka(text, tls=scheme == "kafkas")


def _split_urls(text: str) -> List[str]:
    """Whole URLs separated by commas: a piece that starts with a scheme begins a new URL."""
    out: List[str] = []
    for piece in text.split(","):
        if "://" in piece or not out:
            out.append(piece)
        else:
            out[-1] += "," + piece
    return out


def _parse_amqp(text: str) -> AmqpConfig:
    nodes: List[AmqpNode] = []
    users = set()
    vhosts = set()
    tls_any = False
    tls_files: Dict[str, str] = {}
    for one in _split_urls(text):
        scheme, rest = one.split("://", 1)
        scheme = scheme.lower()
        if scheme not in ("amqp", "amqps"):
            raise ConfigError(f"a RabbitMQ URL mixes in {scheme}://: {redact(text)!r}")
        tls = scheme == "amqps"
        tls_any = tls_any or tls
        creds, _, hostpart = rest.rpartition("@")
        hosts, slash, tail = hostpart.partition("/")
        path, _, query = tail.partition("?")
        if not slash and "?" in hosts:
            hosts, _, query = hosts.partition("?")
        vhost = unquote(path) if path else "/"
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = []
        for k, v in pairs:
            if k in _AMQP_TLS_KEYS:
                tls_files[k] = v
            else:
                kept.append((k, v))
        user = unquote(creds.split(":", 1)[0]) if creds else None
        users.add(user)
        vhosts.add(vhost)
        for host in hosts.split(","):
            host = host.strip()
            if not host:
                raise ConfigError(f"an empty host in the broker URL {redact(text)!r}")
            name, port = _host_port(host, 5671 if tls else 5672, text)
            auth = f"{creds}@" if creds else ""
            netloc = f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
            node_url = f"{scheme}://{auth}{netloc}/{path}"
            if kept:
                node_url += "?" + urlencode(kept)
            nodes.append(AmqpNode(url=node_url, host=name, port=port))
    if len(users) > 1 or len(vhosts) > 1:
        raise ConfigError(
            f"the broker URL's nodes differ in user or virtual host ({redact(text)!r}): the nodes of one broker share both"
        )
    if tls_files and not tls_any:
        raise ConfigError("cacertfile, certfile and keyfile are for amqps:// URLs; use amqps:// or leave them out")
    if ("certfile" in tls_files) != ("keyfile" in tls_files):
        raise ConfigError("certfile and keyfile go together: a client certificate needs its key")
    return AmqpConfig(
        nodes=nodes,
        user=users.pop(),
        vhost=vhosts.pop(),
        tls=tls_any,
        cacertfile=tls_files.get("cacertfile"),
        certfile=tls_files.get("certfile"),
        keyfile=tls_files.get("keyfile"),
    )


def _host_port(host: str, default: int, text: str) -> Tuple[str, int]:
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port_text = host.partition(":")
    if not port_text:
        return name, default
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad port {port_text!r} in the broker URL {redact(text)!r}") from None
    if not 0 < port < 65536:
        raise ConfigError(f"bad port {port} in the broker URL {redact(text)!r}")
    return name, port


def _parse_kafka(text: str, tls: bool) -> KafkaConfig:
    rest = text.split("://", 1)[1]
    hosts, _, query = rest.partition("?")
    hosts = hosts.rstrip("/")
    if not hosts or "@" in hosts or "/" in hosts:
        raise ConfigError(
            f"not a Kafka URL: {redact(text)!r} (expected kafka://host:port[,host:port...], or kafkas://... for TLS)"
        )
    values: Dict[str, object] = {}
    librdkafka: Dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):

        def number(v: str = value, k: str = key) -> int:
            try:
                n = int(v)
            except ValueError:
                raise ConfigError(f"bad value in the Kafka URL: {k}={v}") from None
            if n < 0:
                raise ConfigError(f"bad value in the Kafka URL: {k}={v}")
            return n

        if key in ("topic_prefix", "group_prefix", "client_id"):
            values[key] = value
        elif key == "partitions":
            n = number()
            if n < 1:
                raise ConfigError(f"bad value in the Kafka URL: partitions={value}")
            values[key] = n
        elif key == "replication":
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"bad value in the Kafka URL: replication={value}") from None
        elif key == "timeout_ms":
            values["timeout_s"] = number() / 1000
        elif key == "confirm_timeout_ms":
            values["confirm_timeout_s"] = number() / 1000
        elif key == "fetch_wait_ms":
            values["fetch_wait_ms"] = number()
        elif key in ("session_timeout_ms", "revoke_wait_ms"):
            number()  # the workers' consumer groups: nothing a client uses
        elif "." in key:
            librdkafka[key] = value
        else:
            raise ConfigError(
                f"unknown setting {key!r} in the Kafka URL: callq's keys are {', '.join(_KAFKA_KEYS)}, "
                "and librdkafka's have a dot"
            )
    return KafkaConfig(bootstrap=hosts, tls=tls, librdkafka=librdkafka, **values)  # type: ignore[arg-type]


def parsed_host(url: str) -> str:
    """``host:port`` of one URL, for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"
