"""What the test client returns: the reply to a step, and at end of message the changes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeAlias

import attrs

from .. import protocol
from .._status import Status
from ._matchers import (
    ANY,
    BodyMatcher,
    IndexMatcher,
    Matcher,
    match_body,
    match_index,
    match_optional,
    match_text,
    to_text,
)

# --- end-of-message changes ---------------------------------------------------------
#
# Named and shaped like the context API calls that make them (``ctx.api.
# replace_header(name, index, value)`` <-> ``ReplaceHeader(name, index, value)``
# and ``has_replaced_header``); libmilter's wire names stay in the engine.
# Friendlier than the engine's reply classes: text is ``str`` (UTF-8; bytes
# that are not UTF-8 survive as surrogates), and the chunks of a body
# replacement are joined.


@attrs.frozen
class AddHeader:
    """``add_header(name, value)``: the milter appends header ``name: value``."""

    name: str
    value: str


@attrs.frozen
class InsertHeader:
    """``insert_header(index, name, value)``: the header goes at ``index`` (0 = top)."""

    index: int
    name: str
    value: str


@attrs.frozen
class ReplaceHeader:
    """``replace_header(name, index, value)``: the ``index``-th (1-based) header ``name``
    gets ``value``; ``None`` deletes it."""

    name: str
    index: int
    value: str | None


@attrs.frozen
class AddRecipient:
    """``add_recipient(rcpt, esmtp_args)``: a new envelope recipient."""

    rcpt: str
    esmtp_args: str | None = None


@attrs.frozen
class RemoveRecipient:
    """``remove_recipient(rcpt)``: an envelope recipient removed."""

    rcpt: str


@attrs.frozen
class ReplaceSender:
    """``replace_sender(sender, esmtp_args)``: a new envelope sender."""

    sender: str
    esmtp_args: str | None = None


@attrs.frozen
class ReplaceBody:
    """``append_body_chunk(...)`` calls: ``body`` is the whole new body, ``chunks`` as sent."""

    body: bytes
    chunks: tuple[bytes, ...]


@attrs.frozen
class Quarantine:
    """``quarantine(reason)``: the message goes to the MTA's hold queue."""

    reason: str


Modification: TypeAlias = (
    AddHeader
    | InsertHeader
    | ReplaceHeader
    | AddRecipient
    | RemoveRecipient
    | ReplaceSender
    | ReplaceBody
    | Quarantine
)
"""One end-of-message change, as the milter sent it."""


def modifications_of(replies: Sequence[protocol.Modification]) -> list[Modification]:
    """Turn the engine's modification replies into `Modification` objects, in order.

    Consecutive body chunks (they must be contiguous, protocol.md §6) become
    one `ReplaceBody`; progress packets are dropped (they are counted apart).
    """
    changes: list[Modification] = []
    chunks: list[bytes] = []

    def flush() -> None:
        if chunks:
            changes.append(ReplaceBody(b"".join(chunks), tuple(chunks)))
            chunks.clear()

    for reply in replies:
        if isinstance(reply, protocol.ReplaceBody):
            chunks.append(reply.chunk)
            continue
        flush()
        change = _modification_of(reply)
        if change is not None:
            changes.append(change)
    flush()
    return changes


def _modification_of(reply: protocol.Modification) -> Modification | None:
    match reply:
        case protocol.AddHeader(name=name, value=value):
            return AddHeader(to_text(name), to_text(value))
        case protocol.InsertHeader(index=index, name=name, value=value):
            return InsertHeader(index, to_text(name), to_text(value))
        case protocol.ChangeHeader(index=index, name=name, value=value):
            return ReplaceHeader(to_text(name), index, to_text(value) if value else None)
        case protocol.AddRecipient(rcpt=rcpt):
            return AddRecipient(to_text(rcpt))
        case protocol.AddRecipientExt(rcpt=rcpt, args=args):
            return AddRecipient(to_text(rcpt), None if args is None else to_text(args))
        case protocol.DeleteRecipient(rcpt=rcpt):
            return RemoveRecipient(to_text(rcpt))
        case protocol.ChangeSender(sender=sender, args=args):
            return ReplaceSender(to_text(sender), None if args is None else to_text(args))
        case protocol.Quarantine(reason=reason):
            return Quarantine(to_text(reason))
    return None  # progress


# --- replies ----------------------------------------------------------------------------

# "550-5.7.1 text" / "550 5.7.1 text" / "550 text": code, separator, optional
# extended code (class.subject.detail), text.
_LINE = re.compile(r"(?P<code>\d{3})(?:[ -](?:(?P<ext>[245]\.\d{1,3}\.\d{1,3})(?: |$))?)?")


@attrs.frozen
class StepReply:
    """The milter's answer to one step.

    - ``status``: CONTINUE, ACCEPT, REJECT, TEMPFAIL, DISCARD or SKIP as the
      milter replied (a custom reply is REJECT for 5xx, TEMPFAIL for 4xx);
      NOREPLY when the step's ``NOREPLY_*`` option was negotiated, so no reply
      was awaited.
    - ``text``: the custom SMTP reply (``y``) as sent, lines joined by CRLF,
      else ``None``; `smtp_code`, `extended_code` and `lines` take it apart.
    - ``sent``: False when the client did not send the step, like an MTA:
      the milter negotiated ``NO_*`` for it (status CONTINUE), it replied
      SKIP to an earlier body chunk (status SKIP), or it already decided the
      message or the connection (the status of that decision).
    - ``raw``: the engine's final reply object, if one was received (not
      compared: ``reply == StepReply(Status.CONTINUE)`` holds for a sent step).
    """

    status: Status
    text: str | None = None
    sent: bool = True
    raw: protocol.Reply | None = attrs.field(default=None, repr=False, eq=False)

    @property
    def smtp_code(self) -> int | None:
        """The reply code of the custom reply (``550``), or ``None``."""
        if self.text is None:
            return None
        match = _LINE.match(self.text)
        return int(match["code"]) if match else None

    @property
    def extended_code(self) -> str | None:
        """The extended status code of the custom reply's first line (``"5.7.1"``), if any."""
        if self.text is None:
            return None
        match = _LINE.match(self.text)
        return match["ext"] if match else None

    @property
    def lines(self) -> list[str]:
        """The text of each line of the custom reply, without codes (``[]`` if none)."""
        if self.text is None:
            return []
        result = []
        for line in self.text.split("\r\n"):
            match = _LINE.match(line)
            result.append(line[match.end() :] if match else line)
        return result


@attrs.frozen
class EomReply(StepReply):
    """The answer to end of message: the final status plus the changes, in order.

    ``modifications`` lists the changes as sent (body chunks joined into one
    `ReplaceBody`); ``progress`` counts the progress packets. The ``has_*``
    methods look for a change with exact values, `ANY`, compiled regexes or
    predicates (see `Matcher`); header names compare case-insensitively.
    """

    modifications: list[Modification] = attrs.field(factory=list, hash=False)
    progress: int = 0

    @property
    def replaced_body(self) -> bytes | None:
        """The new body if the milter replaced it, else ``None``."""
        for change in self.modifications:
            if isinstance(change, ReplaceBody):
                return change.body
        return None

    def has_added_header(self, name: Matcher, value: Matcher = ANY) -> bool:
        """Whether an `AddHeader` matches ``name`` (any case) and ``value``."""
        return any(
            isinstance(c, AddHeader) and _header(c, name) and match_text(value, c.value)
            for c in self.modifications
        )

    def has_inserted_header(
        self, name: Matcher, value: Matcher = ANY, *, index: IndexMatcher = ANY
    ) -> bool:
        """Whether an `InsertHeader` matches ``name`` (any case), ``value`` and ``index``."""
        return any(
            isinstance(c, InsertHeader)
            and _header(c, name)
            and match_text(value, c.value)
            and match_index(index, c.index)
            for c in self.modifications
        )

    def has_replaced_header(
        self, name: Matcher, value: Matcher | None = ANY, *, index: IndexMatcher = ANY
    ) -> bool:
        """Whether a `ReplaceHeader` matches ``name`` (any case), ``value`` and ``index``.

        ``value=None`` matches only a deletion (``replace_header(name, index, None)``).
        """
        return any(
            isinstance(c, ReplaceHeader)
            and _header(c, name)
            and match_optional(value, c.value)
            and match_index(index, c.index)
            for c in self.modifications
        )

    def has_added_recipient(self, rcpt: Matcher, esmtp_args: Matcher | None = ANY) -> bool:
        """Whether an `AddRecipient` matches ``rcpt`` and ``esmtp_args``.

        ``esmtp_args=None`` matches only a recipient added without ESMTP arguments.
        """
        return any(
            isinstance(c, AddRecipient)
            and match_text(rcpt, c.rcpt)
            and match_optional(esmtp_args, c.esmtp_args)
            for c in self.modifications
        )

    def has_removed_recipient(self, rcpt: Matcher) -> bool:
        """Whether a `RemoveRecipient` matches ``rcpt``."""
        return any(
            isinstance(c, RemoveRecipient) and match_text(rcpt, c.rcpt) for c in self.modifications
        )

    def has_replaced_sender(self, sender: Matcher, esmtp_args: Matcher | None = ANY) -> bool:
        """Whether a `ReplaceSender` matches ``sender`` and ``esmtp_args``.

        ``esmtp_args=None`` matches only a sender replaced without ESMTP arguments.
        """
        return any(
            isinstance(c, ReplaceSender)
            and match_text(sender, c.sender)
            and match_optional(esmtp_args, c.esmtp_args)
            for c in self.modifications
        )

    def has_replaced_body(self, body: BodyMatcher = ANY) -> bool:
        """Whether the body was replaced with one matching ``body`` (see `BodyMatcher`)."""
        return any(
            isinstance(c, ReplaceBody) and match_body(body, c.body) for c in self.modifications
        )

    def has_quarantine(self, reason: Matcher = ANY) -> bool:
        """Whether a `Quarantine` matches ``reason``."""
        return any(
            isinstance(c, Quarantine) and match_text(reason, c.reason) for c in self.modifications
        )


def _header(change: AddHeader | InsertHeader | ReplaceHeader, name: Matcher) -> bool:
    return match_text(name, change.name, ignore_case=True)


def status_of(reply: protocol.Reply) -> Status:
    """The status a final reply stands for (a custom reply by its first digit)."""
    if isinstance(reply, protocol.ReplyWithCode):
        return Status.REJECT if reply.is_permanent else Status.TEMPFAIL
    return _STATUS_OF_CODE[reply.code]


_STATUS_OF_CODE: dict[int, Status] = {
    protocol.ReplyCode.CONTINUE: Status.CONTINUE,
    protocol.ReplyCode.ACCEPT: Status.ACCEPT,
    protocol.ReplyCode.REJECT: Status.REJECT,
    protocol.ReplyCode.TEMPFAIL: Status.TEMPFAIL,
    protocol.ReplyCode.DISCARD: Status.DISCARD,
    protocol.ReplyCode.SKIP: Status.SKIP,
    # "421 shutdown" (Postfix): a temporary failure that ends the SMTP session.
    protocol.ReplyCode.SHUTDOWN: Status.TEMPFAIL,
}


def step_reply(reply: protocol.Reply) -> StepReply:
    text = to_text(reply.text) if isinstance(reply, protocol.ReplyWithCode) else None
    return StepReply(status_of(reply), text, raw=reply)
