"""The errors the client raises.

Two families:

- :class:`OutcomeError` and its kinds: the call got a final outcome other
  than ``ok`` (:class:`CallError`, :class:`CallFatal`, :class:`CallExpired`,
  :class:`CallCancelled`). The reply is there (``.reply``); the call is over.
- The rest of :class:`CallqError`: the client could not get an outcome (a
  bad URL or option, a call the contract refuses, a publish the broker never
  confirmed, a service nobody serves, a lost connection).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .envelope import InvalidCall

__all__ = [
    "CallqError",
    "ConfigError",
    "InvalidCall",
    "OutcomeError",
    "CallError",
    "CallFatal",
    "CallExpired",
    "CallCancelled",
    "PublishError",
    "NoSuchService",
    "QueueFull",
    "Disconnected",
]


class CallqError(Exception):
    """Every error of this package, but :class:`InvalidCall` (a ``ValueError``)."""


class ConfigError(CallqError, ValueError):
    """A broker URL or an option the client cannot use; the message says what to change."""


class OutcomeError(CallqError):
    """The call ended in an outcome other than ``ok``.

    ``outcome`` is the reply's (``error``, ``fatal``, ``expired``,
    ``cancelled``), ``code`` and ``message`` its ``error``'s, ``attempt`` the
    attempt that decided it, ``reply`` the whole reply body.
    """

    outcome = "error"

    def __init__(
        self,
        call_id: str,
        code: str,
        message: str,
        *,
        attempt: Optional[int] = None,
        reply: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(f"{self.outcome} {code}: {message} (call {call_id})")
        self.call_id = call_id
        self.code = code
        self.message = message
        self.attempt = attempt
        self.reply: Dict[str, Any] = reply if reply is not None else {}


class CallError(OutcomeError):
    """Outcome ``error``: the handler's own deterministic error, or callq's
    (``bad_request``, ``unknown_method``, ``delivery_limit``, ...)."""

    outcome = "error"


class CallFatal(OutcomeError):
    """Outcome ``fatal``: the call left traces (``traces``, e.g. ``["mail.sent"]``)
    and its worker was lost, so its effect is unknown: a person or a
    compensation must decide. Not safe to retry blindly."""

    outcome = "fatal"

    def __init__(
        self,
        call_id: str,
        code: str,
        message: str,
        *,
        traces: Optional[List[str]] = None,
        attempt: Optional[int] = None,
        reply: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(call_id, code, message, attempt=attempt, reply=reply)
        self.traces: List[str] = list(traces or [])


class CallExpired(OutcomeError):
    """Outcome ``expired``: the deadline passed before the call ran.

    ``by_client`` is true when no reply came before the deadline and the
    client gave up waiting (as callq's Rust client does); a call that had
    started by then may still finish, and its late reply is dropped.
    """

    outcome = "expired"

    def __init__(
        self,
        call_id: str,
        code: str,
        message: str,
        *,
        attempt: Optional[int] = None,
        reply: Optional[Dict[str, Any]] = None,
        by_client: bool = False,
    ) -> None:
        super().__init__(call_id, code, message, attempt=attempt, reply=reply)
        self.by_client = by_client


class CallCancelled(OutcomeError):
    """Outcome ``cancelled``: the call was cancelled before it left a trace."""

    outcome = "cancelled"


class PublishError(CallqError):
    """The call could not be published: the broker never confirmed it before
    the call's deadline (the client retried it, always with the same
    ``call_id``), or refused it."""


class NoSuchService(PublishError):
    """No call queue or topic for the service: no worker of it ever started
    (workers declare it), or the name is wrong."""


class QueueFull(PublishError):
    """The service's call queue is at its bound and refused the call; try later."""


class Disconnected(CallqError):
    """The client is closed, or lost its broker and the call's deadline passed
    before it was back."""
