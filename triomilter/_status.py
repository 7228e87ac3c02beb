"""What handlers return: `Status`, and `Result` = `Ok[T] | Err` (SPEC §2.1, §2.2)."""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

import attrs
from typing_extensions import TypeAliasType

from .protocol import ACCEPT, CONTINUE, DISCARD, REJECT, SKIP, TEMPFAIL, Reply, ReplyWithCode

T = TypeVar("T")


class Status(enum.Enum):
    """A handler's verdict, with libmilter's meaning per stage (protocol.md §6).

    - ``CONTINUE``: go on (at end of message: accept the message as changed).
    - ``REJECT`` / ``TEMPFAIL``: reject or temporarily fail the connection
      (connect, HELO), the message, or at RCPT just that recipient; a custom
      reply set with ``ctx.api.set_error_reply`` is used when its class
      (5xx/4xx) matches.
    - ``ACCEPT``: accept the connection or message without further filtering.
    - ``DISCARD``: accept the message and throw it away (not at connect/HELO).
    - ``NOREPLY``: send nothing; only, and then always, for stages whose
      ``NOREPLY_*`` step was negotiated.
    - ``SKIP``: in ``on_body`` only, when SKIP was negotiated: no more body.
    - ``ALL_OPTS``: in ``on_negotiate`` only: take everything the MTA offers.
    """

    CONTINUE = "continue"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    ACCEPT = "accept"
    DISCARD = "discard"
    NOREPLY = "noreply"
    SKIP = "skip"
    ALL_OPTS = "all_opts"

    # Members are singletons: identity hashing is exact and runs in C.
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"Status.{self.name}"


@attrs.frozen
class Ok(Generic[T]):
    """Success: ``Ok(Status.CONTINUE)``. Matches ``case Ok(status):``."""

    value: T


@attrs.frozen
class Err:
    """Failure: the stage is answered TEMPFAIL and the milter goes on.

    ``error`` says why (a `MilterError`, any exception, or a message); it is
    logged with the connection id.
    """

    error: BaseException | str


Result = TypeAliasType("Result", Ok[T] | Err, type_params=(T,))
"""``Result[T]`` is ``Ok[T] | Err``, the return type of handlers that may fail.

In a handler annotated ``-> Result[Status]`` a raised `MilterError` counts as
``Err`` (like Rust's ``?``); any other exception is a panic.
"""


# --- what a status says on the wire --------------------------------------------

_SIMPLE_REPLIES: dict[Status, Reply] = {
    Status.CONTINUE: CONTINUE,
    Status.ACCEPT: ACCEPT,
    Status.DISCARD: DISCARD,
    Status.SKIP: SKIP,
}


def reply_for(
    status: Status, error_reply: bytes | None, *, faked_noreply: bool = False
) -> Reply | None:
    """The reply ``status`` stands for, or None if it stands for none here.

    REJECT and TEMPFAIL carry the handler's custom SMTP reply when its class
    matches (5xx, 4xx), as libmilter does. NOREPLY is CONTINUE where the MTA
    could not skip the reply (``faked_noreply``: libmilter fakes it too).
    Whether the reply suits the command is the engine's to check.
    """
    reply = _SIMPLE_REPLIES.get(status)
    if reply is not None:
        return reply
    if status is Status.REJECT:
        return ReplyWithCode(error_reply) if error_reply and error_reply[:1] == b"5" else REJECT
    if status is Status.TEMPFAIL:
        return ReplyWithCode(error_reply) if error_reply and error_reply[:1] == b"4" else TEMPFAIL
    if status is Status.NOREPLY and faked_noreply:
        return CONTINUE
    return None
