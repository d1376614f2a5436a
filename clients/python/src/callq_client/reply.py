"""Reply envelopes (schemas/json/reply.v1.schema.json), the error each
outcome maps to, and the table of calls awaiting one, which keeps the first
final outcome per ``call_id`` and drops later copies."""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .errors import CallCancelled, CallError, CallExpired, CallFatal, OutcomeError

#: The outcomes of the contract. ``cancelled`` is in the contract, though
#: the cluster does not produce it yet.
OUTCOMES = ("ok", "error", "fatal", "expired", "cancelled")


class BadReply(ValueError):
    """A message on the reply queue that is no reply of version 1."""


@dataclass(frozen=True)
class Reply:
    """One reply: ``call_id``, ``attempt``, ``outcome``, and ``result``
    (``ok``) or ``code``/``message``/``traces`` (the others); ``body`` is
    all of it as it came."""

    call_id: str
    attempt: int
    outcome: str
    result: Any
    code: Optional[str]
    message: Optional[str]
    traces: List[str]
    body: Dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def error(self) -> Optional[OutcomeError]:
        """The error this outcome raises; ``None`` for ``ok``."""
        return outcome_error(self)

    def unwrap(self) -> Any:
        """The result of an ``ok`` reply; raises the outcome's error otherwise."""
        err = outcome_error(self)
        if err is not None:
            raise err
        return self.result


def parse_reply(data: bytes) -> Reply:
    """A reply body read from the broker; :class:`BadReply` when it is none.

    Checks what the client relies on (version, id, attempt, a known
    outcome, ``result`` or ``error``); unknown fields are ignored, as the
    contract says.
    """
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadReply(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadReply(f"not a JSON object: {type(body).__name__}")
    v = body.get("v")
    if v != 1 or isinstance(v, bool) or not isinstance(v, int):
        raise BadReply(f"unknown wire version v={v!r}")
    call_id = body.get("call_id")
    if not isinstance(call_id, str) or len(call_id) != 36:
        raise BadReply(f"call_id is not a hyphenated UUID: {call_id!r}")
    attempt = body.get("attempt")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise BadReply(f"attempt is not an integer >= 1: {attempt!r}")
    outcome = body.get("outcome")
    if outcome not in OUTCOMES:
        raise BadReply(f"unknown outcome {outcome!r}")
    code: Optional[str] = None
    message: Optional[str] = None
    traces: List[str] = []
    if outcome == "ok":
        if "result" not in body:
            raise BadReply("an ok reply without result")
    else:
        error = body.get("error")
        if not isinstance(error, dict):
            raise BadReply(f"a {outcome} reply without error")
        code = str(error.get("code", ""))
        message = str(error.get("message", ""))
        raw = error.get("traces") or []
        traces = [str(t) for t in raw] if isinstance(raw, list) else []
    return Reply(
        call_id=call_id.lower(),
        attempt=attempt,
        outcome=str(outcome),
        result=body.get("result"),
        code=code,
        message=message,
        traces=traces,
        body=body,
    )


def outcome_error(reply: Reply) -> Optional[OutcomeError]:
    """The typed error of a reply's outcome: ``error`` :class:`CallError`,
    ``fatal`` :class:`CallFatal` (with the traces), ``expired``
    :class:`CallExpired`, ``cancelled`` :class:`CallCancelled`; ``None`` for ``ok``."""
    code = reply.code or ""
    message = reply.message or ""
    kw: Dict[str, Any] = {"attempt": reply.attempt, "reply": reply.body}
    if reply.outcome == "ok":
        return None
    if reply.outcome == "fatal":
        return CallFatal(reply.call_id, code, message, traces=reply.traces, **kw)
    if reply.outcome == "expired":
        return CallExpired(reply.call_id, code, message, **kw)
    if reply.outcome == "cancelled":
        return CallCancelled(reply.call_id, code, message, **kw)
    return CallError(reply.call_id, code, message, **kw)


class Router:
    """The calls awaiting their outcome, by ``call_id``.

    :meth:`expect` registers a call before it is published (its reply may
    come before the confirm); :meth:`deliver` hands a reply to its call: the
    first final outcome per id wins, any later copy is a duplicate and is
    dropped. Ids whose outcome came are remembered (the last
    ``remember`` of them) so that a late copy counts as a duplicate, not as
    a stranger's reply.
    """

    def __init__(self, remember: int = 100_000) -> None:
        self._waiting: Dict[str, "asyncio.Future[Reply]"] = {}
        # Ids whose wait ended: True when their outcome came, False when the caller gave up.
        self._done: "OrderedDict[str, bool]" = OrderedDict()
        self._remember = remember
        #: Replies handed to their call.
        self.delivered = 0
        #: Later copies of a reply that was delivered, dropped.
        self.duplicates = 0
        #: Replies to calls whose caller had stopped waiting (past the deadline), dropped.
        self.late = 0
        #: Replies to no call of this client (another client's, or one long forgotten), dropped.
        self.strangers = 0
        #: Messages that were no reply, dropped.
        self.unreadable = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self, call_id: str, loop: Optional[asyncio.AbstractEventLoop] = None) -> "asyncio.Future[Reply]":
        """A future for ``call_id``'s first reply; an id already awaited is refused."""
        call_id = call_id.lower()
        if call_id in self._waiting:
            raise ValueError(f"call {call_id} is already in flight on this client")
        future: "asyncio.Future[Reply]" = (loop or asyncio.get_running_loop()).create_future()
        self._waiting[call_id] = future
        return future

    def forget(self, call_id: str) -> None:
        """Stops awaiting ``call_id`` (the caller gave up); a reply that comes later is dropped."""
        call_id = call_id.lower()
        future = self._waiting.pop(call_id, None)
        if future is not None:
            self._remember_done(call_id, answered=False)
            if not future.done():
                future.cancel()

    def deliver(self, data: bytes) -> str:
        """Hands a reply message to its call. What became of it: ``delivered``,
        ``duplicate``, ``late``, ``stranger`` or ``unreadable``."""
        try:
            reply = parse_reply(data)
        except BadReply:
            self.unreadable += 1
            return "unreadable"
        return self.deliver_reply(reply)

    def deliver_reply(self, reply: Reply) -> str:
        future = self._waiting.pop(reply.call_id, None)
        if future is None:
            answered = self._done.get(reply.call_id)
            if answered is None:
                self.strangers += 1
                return "stranger"
            if answered:
                self.duplicates += 1
                return "duplicate"
            # The first reply after the caller gave up: later copies are duplicates.
            self._done[reply.call_id] = True
            self.late += 1
            return "late"
        if future.done():  # cancelled by a caller that went away
            self._remember_done(reply.call_id, answered=True)
            self.late += 1
            return "late"
        self._remember_done(reply.call_id, answered=True)
        future.set_result(reply)
        self.delivered += 1
        return "delivered"

    def fail_all(self, exc: BaseException) -> None:
        """Fails every call still awaiting an outcome with ``exc`` (the client closes)."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(exc)

    def _remember_done(self, call_id: str, answered: bool) -> None:
        self._done[call_id] = answered
        if len(self._done) > self._remember:
            self._done.popitem(last=False)
