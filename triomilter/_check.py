"""`triomilter check`: what it runs (options), what happened (records, verdicts), macros.

The model of a check: `CheckOptions` in; per milter connection a
`SessionRecord`, per message a `MessageRecord` with every step, the
changes, the `Verdict` and the delivered form; the whole in a
`CheckReport`. `MacroBook` keeps the macro values of the simulated
session and decides, like the imitated MTA, which are sent at each stage.
The run itself is `_check_run`; the report's rendering `_check_output`.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import attrs

from ._delivery import Delivery, Envelope, Mta
from ._mail import HeaderField
from ._milter import Milter
from ._status import Status
from .protocol import MacroStage
from .testing import POSTFIX_MACROS, SENDMAIL_MACROS, Address, Modification


class Verdict(enum.Enum):
    """What became of a message; the exit status of `triomilter check` is the worst one."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    TEMPFAILED = "tempfailed"
    DISCARDED = "discarded"
    ERROR = "error"

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self]


EXIT_STATUS: Mapping[Verdict, int] = {
    Verdict.ACCEPTED: 0,
    Verdict.REJECTED: 1,
    Verdict.TEMPFAILED: 3,
    Verdict.DISCARDED: 4,
    Verdict.ERROR: 5,
}
"""Exit status per verdict; 2 is left to usage errors (as for every command)."""

_SEVERITY = (
    Verdict.ACCEPTED,
    Verdict.DISCARDED,
    Verdict.REJECTED,
    Verdict.TEMPFAILED,
    Verdict.ERROR,
)


def worst(verdicts: Sequence[Verdict]) -> Verdict:
    """The most severe verdict: error, tempfailed, rejected, discarded, accepted."""
    return max(verdicts, key=_SEVERITY.index, default=Verdict.ACCEPTED)


VERDICT_OF_STATUS = {
    Status.REJECT: Verdict.REJECTED,
    Status.TEMPFAIL: Verdict.TEMPFAILED,
    Status.DISCARD: Verdict.DISCARDED,
    Status.ACCEPT: Verdict.ACCEPTED,
    Status.CONTINUE: Verdict.ACCEPTED,
}
DECISIVE = frozenset({Status.ACCEPT, Status.REJECT, Status.TEMPFAIL, Status.DISCARD})


# --- options ----------------------------------------------------------------------------


@attrs.frozen
class CheckOptions:
    """What `triomilter check` was asked to do (the command line, parsed)."""

    target: Milter[Any, Any] | str
    """A milter run in memory, or the socket spec of a running one."""
    inputs: tuple[str, ...]
    mta: Mta = Mta.POSTFIX
    sender: str | None = None
    """``ADDRESS [ESMTP-ARG...]``; None: from the headers."""
    recipients: tuple[str, ...] = ()
    client_name: str | None = None
    client_address: str | None = None
    helo: str | None = None
    macros: Mapping[str, str | None] = attrs.field(factory=dict)
    """Macro values given on the command line (None: never sent)."""
    step_timeout: float = 30.0
    keep_body: bool = False
    """Spool each body (for ``--output`` and ``--diff``)."""


# --- what happened -------------------------------------------------------------------------


@attrs.define
class StepRecord:
    """One step: what was sent, its macros, the reply and how long it took."""

    stage: str
    args: list[bytes] = attrs.Factory(list)
    macros: dict[str, str] | None = None
    sent: bool = True
    status: str | None = None
    """``CONTINUE``... as the milter answered; ``NOREPLY`` when no reply is due."""
    reply: str | None = None
    """A custom SMTP reply (``550 5.7.1 text``)."""
    note: str | None = None
    ms: float | None = None


@attrs.define
class Negotiation:
    offer: tuple[int, int, int]
    version: int = 0
    actions: int = 0
    opts: int = 0
    macros: dict[str, list[str]] = attrs.Factory(dict)


@attrs.define
class SessionRecord:
    """One connection to the milter."""

    negotiation: Negotiation
    steps: list[StepRecord] = attrs.Factory(list)
    error: str | None = None


@attrs.define
class MessageRecord:
    """One message: its steps, the changes, the verdict and the delivered form."""

    name: str
    session: int
    envelope: Envelope
    steps: list[StepRecord] = attrs.Factory(list)
    verdict: Verdict = Verdict.ACCEPTED
    reply: str | None = None
    """What the SMTP client would be told (the custom reply or the MTA's own)."""
    decided_at: str | None = None
    changes: list[Modification] = attrs.Factory(list)
    progress: int = 0
    delivery: Delivery | None = None
    refused: list[tuple[bytes, str]] = attrs.Factory(list)
    """Recipients the milter refused, with the reply."""
    error: str | None = None
    fields: list[HeaderField] = attrs.Factory(list)
    separator: bytes = b""
    newline: bytes = b"\r\n"
    body_size: int = 0
    body: BinaryIO | None = None
    """The spooled body as read (``keep_body``), rewound."""


@attrs.define
class CheckReport:
    milter: str
    """The milter's name (in memory) or the socket spec it was reached at."""
    mta: Mta
    in_memory: bool = False
    sessions: list[SessionRecord] = attrs.Factory(list)
    messages: list[MessageRecord] = attrs.Factory(list)
    error: str | None = None

    @property
    def verdict(self) -> Verdict:
        verdicts = [message.verdict for message in self.messages]
        if self.error is not None or any(s.error for s in self.sessions):
            verdicts.append(Verdict.ERROR)
        return worst(verdicts)


# --- macros -------------------------------------------------------------------------------


def canonical(name: str) -> str:
    """A macro name without braces: ``{auth_type}`` and ``auth_type`` are the same."""
    return name[1:-1] if name.startswith("{") and name.endswith("}") else name


def wire_name(name: str) -> str:
    """A macro name as MTAs send it: one letter bare, longer ones in braces."""
    name = canonical(name)
    return name if len(name) == 1 else f"{{{name}}}"


def stage_lists(
    mta: Mta, requested: Mapping[MacroStage, list[str]]
) -> dict[MacroStage, tuple[str, ...]]:
    """The macro list of each stage once the milter asked for its own (protocol.md §4.2).

    Postfix replaces a stage's list by a non-empty request (an empty one
    keeps the default). Sendmail replaces it by any request, but uses a
    milter's end-of-message list only if the milter also asked for an
    end-of-headers list (its ``MI_LFLAGS_SYM(SMFIM_EOH)`` bug); else its own.
    """
    defaults = POSTFIX_MACROS if mta is Mta.POSTFIX else SENDMAIL_MACROS
    lists = dict(defaults)
    for stage, names in requested.items():
        if mta is Mta.POSTFIX and not names:
            continue
        if mta is Mta.SENDMAIL and stage is MacroStage.EOM:
            continue
        lists[stage] = tuple(names)
    if mta is Mta.SENDMAIL and MacroStage.EOH in requested:
        lists[MacroStage.EOM] = tuple(requested.get(MacroStage.EOM, ()))
    return lists


class MacroBook:
    """The macro values of the simulated session and which are sent at each stage."""

    def __init__(
        self,
        mta: Mta,
        lists: Mapping[MacroStage, tuple[str, ...]],
        given: Mapping[str, str | None],
    ) -> None:
        self.mta = mta
        self.values: dict[str, str] = {}
        self._given = {canonical(name): value for name, value in given.items()}
        self.lists = dict(lists)
        listed = {canonical(name) for names in self.lists.values() for name in names}
        extra = [wire_name(n) for n, v in self._given.items() if v and n not in listed]
        # A given macro in no list is sent at CONNECT: visible at every later stage.
        self.lists[MacroStage.CONNECT] = (*self.lists.get(MacroStage.CONNECT, ()), *extra)

    def value(self, name: str) -> str | None:
        key = canonical(name)
        if key in self._given:
            return self._given[key]
        return self.values.get(key)

    def at(self, stage: MacroStage) -> dict[str, str] | None:
        """The macros sent before the command of ``stage`` (None: no macro packet).

        Postfix sends a macro packet before every command, even an empty one;
        Sendmail only when it has values to send.
        """
        found: dict[str, str] = {}
        for name in self.lists.get(stage, ()):
            value = self.value(name)
            if value:
                found[name] = value
        if self.mta is Mta.POSTFIX:
            return found
        return found or None


# --- the client's side: names, addresses ---------------------------------------------------


MTA_HOSTNAME = "mx.example.net"
MTA_ADDRESS = "198.51.100.25"
DEFAULT_CLIENT_PORT = 49152


def parse_client_address(text: str) -> Address:
    """``--client-address``: an IP (``192.0.2.1``, ``2001:db8::1``) with an optional
    port (``192.0.2.1:2525``, ``[2001:db8::1]:2525``), a UNIX socket (``unix:/path``),
    or ``unknown``."""
    if text.lower() == "unknown":
        return None
    if text.startswith(("unix:", "local:", "/")):
        return text.partition(":")[2] if not text.startswith("/") else text
    host, port = text, DEFAULT_CLIENT_PORT
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = _port(rest.removeprefix(":"), text)
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = _port(number, text)
    try:
        ipaddress.ip_address(host.removeprefix("IPv6:"))
    except ValueError:
        raise ValueError(
            f"client address {text!r}: give an IP address (and :PORT), unix:/path or unknown"
        ) from None
    return (host, port)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"client address {whole!r}: bad port {text!r}")
    return int(text)


def angle(address: bytes) -> bytes:
    """An address as an SMTP client gives it: in angle brackets (``<>`` for none)."""
    address = address.strip()
    if address.startswith(b"<") and address.endswith(b">"):
        return address
    return b"<" + address + b">"


def bare(address: bytes) -> bytes:
    return address.strip().removeprefix(b"<").removesuffix(b">")


def parse_path(text: str) -> tuple[bytes, tuple[bytes, ...]]:
    """``--from``/``--rcpt``: ``ADDRESS [ESMTP-ARG...]`` (``<>`` or empty: null sender)."""
    words = text.encode("utf-8", "surrogateescape").split()
    if not words:
        return b"<>", ()
    return angle(words[0]), tuple(words[1:])
