"""callq_client: publish calls to a callq cluster on RabbitMQ or Kafka and await their outcomes.

::

    from callq_client import Client, CallError

    with Client() as client:                  # the broker CALLQ_BROKER names
        print(client.call("echo", "echo", {"hello": "world"}))

The same API on both brokers; the URL picks one (``amqp://``, ``amqps://``,
``kafka://``, ``kafkas://``). See the package's README.
"""

from .client import AsyncClient, Client, ClientOptions, Stats, connect, connect_async
from .envelope import CallOptions, InvalidCall, build_call, check_call, encode, uuid7
from .errors import (
    CallCancelled,
    CallError,
    CallExpired,
    CallFatal,
    CallqError,
    ConfigError,
    Disconnected,
    NoSuchService,
    OutcomeError,
    PublishError,
    QueueFull,
)
from .reply import BadReply, Reply, Router, outcome_error, parse_reply
from .url import DEFAULT_URL

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadReply",
    "CallCancelled",
    "CallError",
    "CallExpired",
    "CallFatal",
    "CallOptions",
    "CallqError",
    "Client",
    "ClientOptions",
    "ConfigError",
    "DEFAULT_URL",
    "Disconnected",
    "InvalidCall",
    "NoSuchService",
    "OutcomeError",
    "PublishError",
    "QueueFull",
    "Reply",
    "Router",
    "Stats",
    "build_call",
    "check_call",
    "connect",
    "connect_async",
    "encode",
    "outcome_error",
    "parse_reply",
    "uuid7",
]
