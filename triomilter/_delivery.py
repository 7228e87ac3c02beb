"""The message as an MTA delivers it after a milter's end-of-message changes.

Sans-IO, for `triomilter check`: the header list and the envelope of one
message, changed the way Postfix or Sendmail changes them (protocol.md §8,
and what the end-to-end tests saw both MTAs do), and a unified diff.

Header changes, both MTAs:

- the MTA's own ``Received:`` header is at the top of its list (the milter
  never saw it): an insert index counts it (index 0 goes above it, 1 right
  below it) and a change index does not; `triomilter check` does not write
  it (it would differ at every run), but places headers as if it were there;
- without HEADER_LEADING_SPACE the MTA writes one space after the colon of
  every header a milter adds or changes; with it, the value as sent;
- folded values (``\\n`` + whitespace) get the message's line end;
- change: the ``index``-th (1-based, 0 counts as 1) field of that name, in
  any case; an empty value deletes it; deleting a missing field does
  nothing; changing a missing one adds it.

Where they differ (``Mta``):

- Postfix appends added headers and missing-field changes at the end, and
  writes a changed field's name as the milter spelled it;
- Sendmail keeps the field's own spelling, adds a header *before* the first
  field of the same name if there is one (its ``addheader()``), and its
  header list holds the headers its configuration may add itself
  (``Return-Path:``, ``Received:``, ``Resent-Date:``, ``Date:``,
  ``Resent-From:``, ``From:``, ``Full-Name:``, ``Resent-Message-Id:``,
  ``Message-Id:``, in that order, before the message's own), which an
  insert index counts; a deleted field stays in the list, unwritten (a
  later index still counts it).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from difflib import SequenceMatcher

import attrs

from ._mail import HeaderField
from .testing import (
    AddHeader,
    AddRecipient,
    InsertHeader,
    Modification,
    Quarantine,
    RemoveRecipient,
    ReplaceBody,
    ReplaceHeader,
    ReplaceSender,
)
from .testing._matchers import to_bytes


class Mta(enum.Enum):
    """The MTA whose behaviour `triomilter check` imitates."""

    POSTFIX = "postfix"
    SENDMAIL = "sendmail"

    @property
    def title(self) -> str:
        return self.value.capitalize()


class Origin(enum.Enum):
    """Where a header of the delivered message comes from."""

    ORIGINAL = " "
    ADDED = "+"
    CHANGED = "~"
    DELETED = "-"
    MTA = "."
    """The MTA's own (not written by `triomilter check`)."""


# Sendmail's configuration headers (cf/m4/proto.m4 ``H`` lines), in its list
# before the message's own; Received: is a trace header (H_TRACE).
_SENDMAIL_PREPARED = (
    b"Return-Path",
    b"Received",
    b"Resent-Date",
    b"Date",
    b"Resent-From",
    b"From",
    b"Full-Name",
    b"Resent-Message-Id",
    b"Message-Id",
)


@attrs.define
class Entry:
    """One header of the MTA's list.

    ``raw`` is the field as written (with line ends); None if it is not
    written (the MTA's own, or deleted). ``user`` marks the fields Sendmail
    counts for a change index (the message's and the milter's).
    """

    name: bytes
    raw: bytes | None
    origin: Origin
    user: bool = True
    before: bytes | None = None
    """The field as it was before a change or deletion (for the report)."""

    @property
    def written(self) -> bool:
        return self.raw is not None and self.origin is not Origin.MTA


@attrs.define
class Envelope:
    """The envelope: sender and recipients, each with its ESMTP arguments."""

    sender: bytes
    sender_args: tuple[bytes, ...] = ()
    recipients: list[tuple[bytes, tuple[bytes, ...]]] = attrs.Factory(list)


@attrs.define
class Delivery:
    """One message after the milter's changes, as the MTA would deliver it."""

    entries: list[Entry]
    envelope: Envelope
    newline: bytes
    body: bytes | None = None
    """The replaced body (with the message's line ends), or None: unchanged."""
    quarantine: str | None = None
    notes: list[str] = attrs.Factory(list)
    """What the MTA did with a change that is worth saying (a removal matching nothing)."""

    @property
    def headers(self) -> list[Entry]:
        """The header fields written, in order."""
        return [entry for entry in self.entries if entry.written]

    def header_bytes(self) -> bytes:
        return b"".join(entry.raw for entry in self.headers if entry.raw is not None)


class HeaderList:
    """The MTA's header list, changed like ``mta`` changes it."""

    def __init__(
        self,
        fields: Sequence[HeaderField],
        mta: Mta,
        *,
        leading_space: bool,
        newline: bytes,
    ) -> None:
        self.mta = mta
        self.leading_space = leading_space
        self.newline = newline
        if mta is Mta.SENDMAIL:
            prepared = [Entry(name, None, Origin.MTA, user=False) for name in _SENDMAIL_PREPARED]
        else:
            prepared = [Entry(b"Received", None, Origin.MTA, user=False)]
        self.entries = prepared + [Entry(f.name, f.raw, Origin.ORIGINAL) for f in fields]

    def field(self, name: bytes, value: bytes) -> bytes:
        """A field as the MTA writes a milter's header (protocol.md §8)."""
        space = b"" if self.leading_space else b" "
        return name + b":" + space + value.replace(b"\n", self.newline) + self.newline

    def add(self, name: bytes, value: bytes) -> None:
        entry = Entry(name, self.field(name, value), Origin.ADDED)
        if self.mta is Mta.POSTFIX:
            self.entries.append(entry)
            return
        # Sendmail's milter_addheader(): a header its configuration prepared
        # (not a trace header) takes the value where it stands.
        for old in self.entries:
            if _same(old.name, name) and old.origin is Origin.MTA and not _is_trace(old.name):
                old.raw, old.origin, old.user = entry.raw, Origin.ADDED, True
                return
        self._sendmail_addheader(entry)

    def insert(self, index: int, name: bytes, value: bytes) -> None:
        # Before the index-th header of the list (0: the top); a header Postfix
        # deleted is out of its list, Sendmail's stays in (unwritten).
        position = len(self.entries)
        for at, entry in enumerate(self.entries):
            if index <= 0:
                position = at
                break
            if self.mta is Mta.SENDMAIL or entry.origin is not Origin.DELETED:
                index -= 1
        self.entries.insert(position, Entry(name, self.field(name, value), Origin.ADDED))

    def change(self, name: bytes, index: int, value: bytes) -> None:
        target = self._find(name, max(index, 1))
        if target is None:
            if value:
                entry = Entry(name, self.field(name, value), Origin.ADDED)
                if self.mta is Mta.POSTFIX:
                    self.entries.append(entry)
                else:
                    self._sendmail_addheader(entry)
            return
        if target.origin is not Origin.ADDED and target.before is None:
            target.before = target.raw
        if not value:
            target.raw, target.origin = None, Origin.DELETED
            return
        spelling = name if self.mta is Mta.POSTFIX else target.name
        target.name = spelling
        target.raw = self.field(spelling, value)
        if target.origin is not Origin.ADDED:
            target.origin = Origin.CHANGED
        target.user = True

    def _find(self, name: bytes, index: int) -> Entry | None:
        """The field a change of (``name``, ``index``) applies to, as the MTA finds it."""
        prepared: Entry | None = None
        for entry in self.entries:
            if not _same(entry.name, name):
                continue
            if entry.user and (self.mta is Mta.SENDMAIL or entry.raw is not None):
                index -= 1
                if index <= 0:
                    return entry
            elif self.mta is Mta.SENDMAIL and not entry.user and not _is_trace(entry.name):
                prepared = entry  # milter_changeheader(): a prepared header, if no user one
        return prepared

    def _sendmail_addheader(self, entry: Entry) -> None:
        """Sendmail's ``addheader()``: before the first header of that name, else at the end."""
        for position, old in enumerate(self.entries):
            if _same(old.name, entry.name):
                self.entries.insert(position, entry)
                return
        self.entries.append(entry)


def _same(a: bytes, b: bytes) -> bool:
    return a.lower() == b.lower()


def _is_trace(name: bytes) -> bool:
    return name.lower() == b"received"


def _bare(address: bytes) -> bytes:
    address = address.strip()
    if address.startswith(b"<") and address.endswith(b">"):
        address = address[1:-1]
    return address.lower()


def deliver(
    fields: Sequence[HeaderField],
    envelope: Envelope,
    changes: Iterable[Modification],
    mta: Mta,
    *,
    leading_space: bool,
    newline: bytes,
) -> Delivery:
    """Apply the milter's ``changes``, in order, to a message and its envelope."""
    headers = HeaderList(fields, mta, leading_space=leading_space, newline=newline)
    result = Delivery(
        headers.entries,
        Envelope(envelope.sender, envelope.sender_args, list(envelope.recipients)),
        newline,
    )
    for change in changes:
        _apply(change, headers, result)
    result.entries = headers.entries
    return result


def _apply(change: Modification, headers: HeaderList, result: Delivery) -> None:
    envelope = result.envelope
    match change:
        case AddHeader(name=name, value=value):
            headers.add(to_bytes(name), to_bytes(value))
        case InsertHeader(index=index, name=name, value=value):
            headers.insert(index, to_bytes(name), to_bytes(value))
        case ReplaceHeader(name=name, index=index, value=value):
            headers.change(to_bytes(name), index, b"" if value is None else to_bytes(value))
        case AddRecipient(rcpt=rcpt, esmtp_args=args):
            envelope.recipients.append((to_bytes(rcpt), _args(args)))
        case RemoveRecipient(rcpt=rcpt):
            kept = [r for r in envelope.recipients if _bare(r[0]) != _bare(to_bytes(rcpt))]
            if len(kept) == len(envelope.recipients):
                result.notes.append(f"remove recipient {rcpt}: no such recipient")
            envelope.recipients = kept
        case ReplaceSender(sender=sender, esmtp_args=args):
            envelope.sender, envelope.sender_args = to_bytes(sender), _args(args)
        case ReplaceBody(body=body):
            result.body = body if headers.newline == b"\r\n" else body.replace(b"\r\n", b"\n")
        case Quarantine(reason=reason):
            result.quarantine = reason


def _args(args: str | None) -> tuple[bytes, ...]:
    return tuple(to_bytes(args).split()) if args else ()


# --- unified diff -----------------------------------------------------------------------


def split_lines(data: bytes) -> list[bytes]:
    """The lines of ``data`` without their line ends."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line.removesuffix(b"\r") for line in lines]


MAX_DIFF_LINES = 20000
"""Longer sides are not compared line by line: the diff replaces them whole."""


def unified_diff(
    old: Sequence[bytes], new: Sequence[bytes], old_name: bytes, new_name: bytes, context: int = 3
) -> list[bytes]:
    """A unified diff of two lists of lines (``diff -u``), as output lines ending in ``\\n``.

    Empty if they are equal. Above `MAX_DIFF_LINES` on both sides the
    comparison would take too long: one hunk replaces everything.
    """
    if list(old) == list(new):
        return []
    out = [b"--- " + old_name + b"\n", b"+++ " + new_name + b"\n"]
    if len(old) > MAX_DIFF_LINES and len(new) > MAX_DIFF_LINES:
        groups = [[("replace", 0, len(old), 0, len(new))]]
    else:
        groups = list(SequenceMatcher(None, old, new, autojunk=False).get_grouped_opcodes(context))
    for group in groups:
        first, last = group[0], group[-1]
        i1, i2, j1, j2 = first[1], last[2], first[3], last[4]
        out.append(b"@@ -" + _range(i1, i2) + b" +" + _range(j1, j2) + b" @@\n")
        for tag, a1, a2, b1, b2 in group:
            if tag == "equal":
                out += [b" " + line + b"\n" for line in old[a1:a2]]
                continue
            out += [b"-" + line + b"\n" for line in old[a1:a2]]
            out += [b"+" + line + b"\n" for line in new[b1:b2]]
    return out


def _range(start: int, stop: int) -> bytes:
    length = stop - start
    first = start + 1 if length else start
    return str(first).encode() if length == 1 else f"{first},{length}".encode()
