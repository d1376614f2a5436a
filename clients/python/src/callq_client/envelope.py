"""Call envelopes of callq's wire contract, version 1 (schemas/json/call.v1.schema.json).

Everything here is pure: no broker, no I/O. :func:`build_call` makes a body
with a fresh UUID v7 ``call_id`` and checks it against the contract's bounds
before anything is published, so that a call the workers would refuse as
``bad_request`` is refused here, with the reason, instead.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Mapping, Optional

#: The wire contract version this package speaks.
VERSION = 1

#: What every call queue's (or topic's) name starts with; the rest is the service.
CALL_QUEUE_PREFIX = "callq.call."

#: What the queue (or topic) of a service's high band starts with: calls of
#: priority ``HIGH_PRIORITY`` and up go there, and workers serve it first.
HIGH_QUEUE_PREFIX = "callq.high."

#: The lowest priority of the high band.
HIGH_PRIORITY = 5


def is_high(priority: Any) -> bool:
    """Whether a body's ``priority`` puts the call in its service's high band."""
    return isinstance(priority, int) and not isinstance(priority, bool) and HIGH_PRIORITY <= priority <= 9


def call_queue(service: str, priority: Any = None) -> str:
    """The queue (or topic) a call of ``service`` with ``priority`` goes to."""
    return (HIGH_QUEUE_PREFIX if is_high(priority) else CALL_QUEUE_PREFIX) + service


#: What every reply queue of callq's own clients starts with.
REPLY_QUEUE_PREFIX = "callq.reply."

#: The nil UUID: a ``bad_request`` reply to a call whose id could not be read.
NIL_CALL_ID = "00000000-0000-0000-0000-000000000000"

#: The bounds of the contract (DESIGN.md, "Wire contract (version 1)").
MAX_SERVICE = 238
MAX_TEXT = 255
#: The default body limits workers apply before parsing (operators may change them).
MAX_BODY_BYTES = 1024 * 1024
MAX_DEPTH = 64

_SERVICE = re.compile(r"^[A-Za-z0-9_.-]+$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_PRINTABLE = re.compile(r"^[!-~]+$")
_DATETIME = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$")

Json = Any
"""Any JSON value: what ``json.loads`` returns."""


class InvalidCall(ValueError):
    """A call that breaks the wire contract: it was not published.

    The message names the field and the rule; a worker would have answered
    the same call ``error``/``bad_request`` (or not at all, for a bad
    ``reply_to``).
    """


def uuid7() -> str:
    """A fresh UUID version 7 (RFC 9562), lowercase and hyphenated.

    48 bits of Unix time in milliseconds, the version, 12 random bits, the
    variant, 62 random bits: unique and ordered by time, as the contract
    asks of a ``call_id``.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68  # the top 12 of the 80 random bits
    rand_b = rand & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))


def rfc3339(at: datetime) -> str:
    """``at`` as the contract writes instants: RFC 3339 with ``T``, in UTC, ``Z``
    (milliseconds when there are any).

    A naive datetime is refused: its zone is unknown.
    """
    if at.tzinfo is None or at.utcoffset() is None:
        raise InvalidCall(f"the datetime {at!r} has no time zone: use an aware one, such as datetime.now(timezone.utc)")
    u = at.astimezone(timezone.utc)
    text = f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}"
    if u.microsecond:
        text += f".{u.microsecond // 1000:03d}"
    return text + "Z"


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 instant of a body, as an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))


@dataclass(frozen=True)
class CallOptions:
    """The optional fields of a call; ``None`` leaves a field out of the body.

    ``timeout`` (seconds) sets the deadline to now + timeout when no
    ``deadline`` is given; the client's default timeout applies when
    neither is.
    """

    #: Seconds from now to the call's deadline.
    timeout: Optional[float] = None
    #: The call's deadline: it is answered ``expired`` instead of run once this passes.
    deadline: Optional[datetime] = None
    #: The client's session with the service (the Kafka partition key, too).
    session_id: Optional[str] = None
    #: The publisher's own key for the request, carried to handlers.
    idempotency_key: Optional[str] = None
    #: A W3C ``traceparent`` the call's spans join.
    traceparent: Optional[str] = None
    #: Run no earlier than this (an option added within version 1; see the README).
    not_before: Optional[datetime] = None
    #: 0 to 9, higher first under backlog (added within version 1).
    priority: Optional[int] = None
    #: Calls of one key run at most the service's ``max_running_per_key`` at once (added within version 1).
    concurrency_key: Optional[str] = None
    #: The call's id; a fresh UUID v7 when ``None``. Give one to publish the same call again.
    call_id: Optional[str] = None
    #: Further fields, as they are (the contract ignores fields it does not know).
    extra: Mapping[str, Json] = field(default_factory=dict)


def build_call(
    service: str,
    method: str,
    args: Json = None,
    *,
    reply_to: Optional[str] = None,
    options: Optional[CallOptions] = None,
    default_timeout: Optional[float] = None,
    now: Optional[datetime] = None,
) -> Dict[str, Json]:
    """A call body (a dict, ready for :func:`encode`), checked against the contract.

    ``args`` is any JSON value (``None`` is sent as ``null``). The deadline
    is ``options.deadline``, else now + ``options.timeout``, else now +
    ``default_timeout``, else none. Raises :class:`InvalidCall` naming the
    first rule broken.
    """
    opts = options or CallOptions()
    body: Dict[str, Json] = {
        "v": VERSION,
        "call_id": (opts.call_id or uuid7()).lower(),
        "service": service,
        "method": method,
        "args": args,
    }
    if reply_to is not None:
        body["reply_to"] = reply_to
    if opts.session_id is not None:
        body["session_id"] = opts.session_id
    deadline = opts.deadline
    if deadline is None:
        timeout = opts.timeout if opts.timeout is not None else default_timeout
        if timeout is not None:
            if timeout <= 0:
                raise InvalidCall(f"timeout must be above 0 seconds, not {timeout}")
            deadline = (now or datetime.now(timezone.utc)) + timedelta(seconds=timeout)
    if deadline is not None:
        body["deadline"] = rfc3339(deadline)
    if opts.idempotency_key is not None:
        body["idempotency_key"] = opts.idempotency_key
    if opts.traceparent is not None:
        body["traceparent"] = opts.traceparent
    if opts.not_before is not None:
        body["not_before"] = rfc3339(opts.not_before)
    if opts.priority is not None:
        body["priority"] = opts.priority
    if opts.concurrency_key is not None:
        body["concurrency_key"] = opts.concurrency_key
    for key, value in opts.extra.items():
        if key in body:
            raise InvalidCall(f"extra field {key!r} would replace the contract's own field of that name")
        body[key] = value
    check_call(body)
    return body


def _text(body: Mapping[str, Json], key: str, low: int, high: int) -> None:
    value = body.get(key)
    if value is None:
        if key in body:
            raise InvalidCall(f"{key} is null: leave an unused optional field out of the body")
        return
    if not isinstance(value, str):
        raise InvalidCall(f"{key} must be a string, not {type(value).__name__}")
    if not low <= len(value) <= high:
        raise InvalidCall(f"{key} must be {low} to {high} characters long, not {len(value)}")


@functools.lru_cache(maxsize=256)
def check_reply_to(reply_to: str) -> None:
    """Raises :class:`InvalidCall` unless workers may answer into ``reply_to``
    (remembered: a client answers into one queue, checked once)."""
    _text({"reply_to": reply_to}, "reply_to", 1, MAX_TEXT)
    if not _PRINTABLE.match(reply_to):
        raise InvalidCall(f"reply_to {reply_to!r} must be printable ASCII without spaces")
    if reply_to.startswith("callq.") and not reply_to.startswith(REPLY_QUEUE_PREFIX):
        raise InvalidCall(
            f"reply_to {reply_to!r} names one of callq's own queues: a reply queue under callq. "
            f"must start with {REPLY_QUEUE_PREFIX!r}"
        )


def check_call(body: Mapping[str, Json]) -> None:
    """Raises :class:`InvalidCall` unless ``body`` keeps the rules of a call body.

    The same rules as schemas/json/call.v1.schema.json (which the package's
    tests check it against), plus the body limits workers apply.
    """
    v = body.get("v")
    if v != VERSION or isinstance(v, bool) or not isinstance(v, int):
        raise InvalidCall(f"v must be the integer {VERSION}, not {v!r}")
    call_id = body.get("call_id")
    if not isinstance(call_id, str) or not _UUID.match(call_id):
        raise InvalidCall(f"call_id must be a hyphenated UUID, not {call_id!r}")
    if call_id == NIL_CALL_ID:
        raise InvalidCall("call_id must not be the nil UUID")
    service = body.get("service")
    if not isinstance(service, str) or not _SERVICE.match(service) or len(service) > MAX_SERVICE:
        raise InvalidCall(
            f"service must be 1 to {MAX_SERVICE} of ASCII letters, digits, '_', '-' and '.', not {service!r}"
        )
    _text(body, "method", 1, MAX_TEXT)
    if "method" not in body:
        raise InvalidCall("method is missing")
    if "args" not in body:
        raise InvalidCall("args is missing (send null for no arguments)")
    reply_to = body.get("reply_to")
    if reply_to is not None or "reply_to" in body:
        if not isinstance(reply_to, str):
            raise InvalidCall(f"reply_to must be a string, not {reply_to!r}")
        check_reply_to(reply_to)
    for key in ("session_id", "idempotency_key", "concurrency_key"):
        if key in body:
            _text(body, key, 0, MAX_TEXT)
    for key in ("deadline", "not_before"):
        if key in body:
            _text(body, key, 1, 64)
            if not _DATETIME.match(body[key]):
                raise InvalidCall(
                    f"{key} {body[key]!r} is not an RFC 3339 date-time with a 'T' and an offset, "
                    "as 2026-11-22T12:00:05Z"
                )
    traceparent = body.get("traceparent")
    if "traceparent" in body:
        _text(body, "traceparent", 1, MAX_TEXT)
    if isinstance(traceparent, str):
        bad = (
            not _TRACEPARENT.match(traceparent)
            or traceparent.startswith("ff-")
            or (traceparent.startswith("00-") and len(traceparent) > 55)
            or traceparent[3:35] == "0" * 32
            or traceparent[36:52] == "0" * 16
        )
        if bad:
            raise InvalidCall(
                f"traceparent {traceparent!r} is not a valid W3C traceparent "
                "(version-traceid-parentid-flags, lowercase hex, ids not all zero)"
            )
    priority = body.get("priority")
    if "priority" in body and (isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9):
        raise InvalidCall(f"priority must be an integer from 0 to 9, not {priority!r}")


def depth(value: Json) -> int:
    """How deeply ``value`` nests objects and arrays (a scalar is 0)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            deepest = max(deepest, level)
            stack.extend((v, level + 1) for v in item)
    return deepest


def encode(body: Mapping[str, Json], *, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_DEPTH) -> bytes:
    """The body as UTF-8 JSON, refused (:class:`InvalidCall`) past the workers' limits."""
    try:
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidCall(f"the call is not JSON: {exc}") from None
    if len(data) > max_bytes:
        raise InvalidCall(f"the body is {len(data)} bytes; workers take at most {max_bytes}")
    # Nesting needs a bracket per level: count them (fast) before walking.
    nested = depth(body) if data.count(b"[") + data.count(b"{") > max_depth else 0
    if nested > max_depth:
        raise InvalidCall(f"the body nests {nested} levels; workers take at most {max_depth}")
    return data


def message_key(body: Mapping[str, Json]) -> str:
    """The Kafka record key of a call: its ``session_id``, else its ``call_id``."""
    session = body.get("session_id")
    return str(session) if session is not None else str(body["call_id"])

