"""The session state machine shared by both roles (protocol.md §3, §6, §7).

Everything that decides which command may come next, which replies a command
may get, and how a reply changes the state lives in this file. It does not
know which role we play: the milter role turns a refusal into a
`RemoteProtocolError` (the MTA sent it), the MTA role into a
`LocalProtocolError` (we were about to send it).

Theory of operation. A session is negotiated once (``O``), then runs
connections (``C`` ... ``Q``/``K``), each running messages (``M`` ... ``E``
or ``A``). The main flow is a table: in each state, the commands that may
follow and the state each leads to. Stages an MTA skips (disabled by ``NO_*``
or simply empty, like a message without a body) are skipped over, as
libmilter allows. A few commands sit outside the table because they may come
almost anywhere:

- ``D`` (macros) precedes any command once negotiated; never answered.
- ``U`` (unknown SMTP command) may come at any point after negotiation and
  does not move the state.
- ``A`` ends an open message; outside a message it is ignored. Postfix sends
  ``A`` after every message and sometimes several in a row.
- ``Q`` ends the session from any state; ``K`` ends the connection but keeps
  the negotiation and expects a new ``C``.
- ``M`` or ``H`` inside a message: libmilter aborts the open message and
  processes the command (Sendmail sends no ``A`` after a milter decided).

Replies move the state too (libmilter): a final reply to ``E`` ends the
message; ``a``, ``r``, ``t``, ``d``, ``y`` (or ``4``) to a message-level
command end it early; only ``a`` does so after ``R`` (the others are about
that recipient). Before the final reply to ``E`` come the changes, each
needing its negotiated action, body chunks in one contiguous run.

An error is final (h11's rule): once the peer sent something invalid the
session is in `State.ERROR` and every later call raises.
"""

from __future__ import annotations

import enum
import functools

from ._constants import ACTION_OF_REPLY, NO_FLAG, NOREPLY_FLAG, ProtocolOpts, command_name
from ._constants import CommandCode as C
from ._constants import ReplyCode as R


class State(enum.Enum):
    """Where a session is."""

    # Members are singletons: identity hashing is exact and, unlike Enum's
    # name hashing, runs in C (a state lookup happens on every command).
    __hash__ = object.__hash__

    NEGOTIATE = "waiting for option negotiation"
    CONNECT = "waiting for CONNECT"
    SESSION = "connected, between messages"
    MAIL = "after MAIL"
    RCPT = "after RCPT"
    DATA = "after DATA"
    HEADERS = "in the headers"
    EOH = "after end of headers"
    BODY = "in the body"
    EOM = "waiting for the end-of-message verdict"
    CLOSED = "closed"
    ERROR = "after a protocol error"


MESSAGE_STATES = frozenset(
    {State.MAIL, State.RCPT, State.DATA, State.HEADERS, State.EOH, State.BODY, State.EOM}
)

_CONTENT: dict[int, State] = {
    C.HEADER: State.HEADERS,
    C.EOH: State.EOH,
    C.BODY: State.BODY,
    C.EOM: State.EOM,
}

TRANSITIONS: dict[State, dict[int, State]] = {
    State.NEGOTIATE: {C.OPTNEG: State.CONNECT},
    State.CONNECT: {C.CONNECT: State.SESSION},
    State.SESSION: {C.HELO: State.SESSION, C.MAIL: State.MAIL},
    State.MAIL: {C.RCPT: State.RCPT, C.DATA: State.DATA, **_CONTENT},
    State.RCPT: {C.RCPT: State.RCPT, C.DATA: State.DATA, **_CONTENT},
    State.DATA: dict(_CONTENT),
    State.HEADERS: dict(_CONTENT),
    State.EOH: {C.BODY: State.BODY, C.EOM: State.EOM},
    State.BODY: {C.BODY: State.BODY, C.EOM: State.EOM},
    State.EOM: {},
    State.CLOSED: {},
    State.ERROR: {},
}

# What each command may be answered with (protocol.md §6). SKIP is further
# limited to sessions that negotiated it; modifications and progress are
# allowed before the final reply to EOM only.
_MESSAGE_REPLIES = frozenset(
    {R.CONTINUE, R.ACCEPT, R.REJECT, R.TEMPFAIL, R.DISCARD, R.REPLYCODE, R.SHUTDOWN}
)
_CONNECTION_REPLIES = frozenset(
    {R.CONTINUE, R.ACCEPT, R.REJECT, R.TEMPFAIL, R.REPLYCODE, R.SHUTDOWN}
)
FINAL_REPLIES: dict[int, frozenset[int]] = {
    C.OPTNEG: frozenset({R.OPTNEG}),
    C.CONNECT: _CONNECTION_REPLIES,
    C.HELO: _CONNECTION_REPLIES,
    C.MAIL: _MESSAGE_REPLIES,
    C.RCPT: _MESSAGE_REPLIES,
    C.DATA: _MESSAGE_REPLIES,
    C.HEADER: _MESSAGE_REPLIES,
    C.EOH: _MESSAGE_REPLIES,
    C.BODY: _MESSAGE_REPLIES | {R.SKIP},
    C.EOM: _MESSAGE_REPLIES,
    C.UNKNOWN: frozenset({R.CONTINUE, R.REJECT, R.TEMPFAIL, R.REPLYCODE, R.SHUTDOWN}),
}
EOM_MODIFICATIONS = frozenset(
    {
        R.ADDHEADER,
        R.INSHEADER,
        R.CHGHEADER,
        R.ADDRCPT,
        R.ADDRCPT_PAR,
        R.DELRCPT,
        R.CHGFROM,
        R.REPLBODY,
        R.QUARANTINE,
        R.PROGRESS,
    }
)

# Commands that always owe a reply unless their NOREPLY_* step is negotiated.
REPLYING_COMMANDS = frozenset(FINAL_REPLIES)

_DECIDING = frozenset({R.ACCEPT, R.REJECT, R.TEMPFAIL, R.DISCARD, R.REPLYCODE, R.SHUTDOWN})
_MESSAGE_LEVEL = frozenset({C.MAIL, C.DATA, C.HEADER, C.EOH, C.BODY})

# Flags returned by SessionState.command().
ACCEPTED = 0
ABORTS = 1
"""The command ends an open message first (an abort is due before it)."""
IGNORED = 2
"""The command has no effect and no event (``A`` outside a message)."""
ENDS = 4
"""The command ends the connection (``Q``, ``K``)."""

_NO_CONNECT_BIT = int(ProtocolOpts.NO_CONNECT)
_NO_BITS = tuple((int(code), int(flag)) for code, flag in NO_FLAG.items())
_NOREPLY_BITS = tuple((int(code), int(flag)) for code, flag in NOREPLY_FLAG.items())
_EOM = int(C.EOM)


class SessionState:
    """The state of one session, advanced by commands and replies.

    Besides the position in the flow it holds what the negotiation decided
    for the flow: the commands the MTA will not send (``NO_*``, skipped over)
    and those that get no reply (``NOREPLY_*``, `silent`).
    """

    __slots__ = ("after_connect", "body_run", "silent", "state", "table")

    def __init__(self) -> None:
        self.state = State.NEGOTIATE
        # Where a connection starts: CONNECT, or SESSION when NO_CONNECT was agreed.
        self.after_connect = State.CONNECT
        self.table = TRANSITIONS
        self.silent: frozenset[int] = frozenset()
        """Commands that get no reply (their ``NOREPLY_*`` step was negotiated)."""
        self.body_run = 0
        """Where end-of-message body replacement is: 0 before any ``b``, 1 in
        the run, 2 once another change followed it (set back at each EOM)."""

    @property
    def in_message(self) -> bool:
        return self.state in MESSAGE_STATES

    def command(self, code: int) -> int | None:
        """Advance for command ``code``; None if it may not come now.

        Returns a combination of `ABORTS`, `IGNORED`, `ENDS` (or `ACCEPTED`).
        The state is unchanged when None is returned.
        """
        state = self.state
        # The main flow first: it is the table, and every message walks it.
        nxt = self.table[state].get(code)
        if nxt is not None:
            self.state = nxt
            return ACCEPTED
        if state is State.NEGOTIATE or state is State.CLOSED or state is State.EOM:
            if code == C.QUIT and state is not State.CLOSED:
                self.state = State.CLOSED
                return ENDS
            return None
        if state is State.ERROR:
            return None
        in_message = state in MESSAGE_STATES
        if code == C.UNKNOWN:
            return ACCEPTED
        if code == C.ABORT:
            if in_message:
                self.state = State.SESSION
                return ACCEPTED
            return IGNORED
        if code == C.QUIT:
            self.state = State.CLOSED
            return ENDS | (ABORTS if in_message else 0)
        if code == C.QUIT_NC:
            self.state = self.after_connect
            return ENDS | (ABORTS if in_message else 0)
        if in_message and (code == C.MAIL or code == C.HELO):
            # Only if the command is not disabled (NO_MAIL, NO_HELO): the table
            # between messages then lacks it, like any other disabled command.
            nxt = self.table[State.SESSION].get(code)
            if nxt is not None:
                self.state = nxt
                return ABORTS
        return None

    def expects_reply(self, code: int) -> bool:
        """Whether command ``code`` owes a final reply in this session."""
        return code in REPLYING_COMMANDS and code not in self.silent

    def expected(self) -> list[str]:
        """Names of the commands that may come now (for error messages)."""
        codes = list(self.table[self.state])
        if self.state not in (State.NEGOTIATE, State.CLOSED, State.EOM, State.ERROR):
            codes += [C.MACRO, C.UNKNOWN, C.ABORT, C.QUIT, C.QUIT_NC]
            if self.state in MESSAGE_STATES:
                codes += [c for c in (C.MAIL, C.HELO) if c in self.table[State.SESSION]]
        elif self.state is State.NEGOTIATE:
            codes.append(C.QUIT)
        return [C(code).name for code in dict.fromkeys(codes)]

    def negotiated(self, opts: int) -> None:
        """The ``O`` reply with protocol steps ``opts`` was sent or received.

        The commands the MTA will not send (``NO_*``) are skipped over by the
        flow, so with ``NO_MAIL`` a message starts at its first RCPT (or
        whatever comes first); the ``NOREPLY_*`` ones become `silent`.
        """
        self.after_connect = State.SESSION if opts & _NO_CONNECT_BIT else State.CONNECT
        self.state = self.after_connect
        disabled, self.silent = _steps(int(opts))
        self.table = skip_over(disabled) if disabled else TRANSITIONS

    def failed(self) -> None:
        """The peer broke the protocol: the session cannot go on."""
        self.state = State.ERROR

    def final_reply(self, command: int, reply: int) -> None:
        """Apply the state change of a final reply to ``command``."""
        if command == C.EOM or (
            reply in _DECIDING
            and (command in _MESSAGE_LEVEL or (command == C.RCPT and reply == R.ACCEPT))
            and self.state in MESSAGE_STATES
        ):
            self.state = State.SESSION

    def change(self, command: int, reply: int, actions: int) -> str | None:
        """Check a reply to ``command`` that is not a final one: why not, or None.

        Only end of message takes such replies: changes whose action was
        negotiated, and progress. Body-replacement packets must be
        contiguous: Postfix refuses a ``b`` after the run ended ("body
        replacement requests can't currently be mixed with other requests").
        """
        if command != _EOM or reply not in EOM_MODIFICATIONS:
            return f"is not a valid reply to {command_name(command)}"
        needed = ACTION_OF_REPLY.get(reply)
        if needed is not None and not actions & needed:
            return f"needs the {needed!r} action, which was not negotiated"
        run = self.body_run
        if reply == R.REPLBODY:
            if run == 2:
                return "chunks must be contiguous: another change came between"
            self.body_run = 1
        elif run == 1 and reply != R.PROGRESS:
            self.body_run = 2
        return None


@functools.lru_cache(maxsize=64)
def _steps(opts: int) -> tuple[frozenset[int], frozenset[int]]:
    """The commands disabled (``NO_*``) and silenced (``NOREPLY_*``) by ``opts``."""
    disabled = frozenset(code for code, flag in _NO_BITS if opts & flag)
    silent = frozenset(code for code, flag in _NOREPLY_BITS if opts & flag)
    return disabled, silent


@functools.lru_cache(maxsize=64)
def skip_over(disabled: frozenset[int]) -> dict[State, dict[int, State]]:
    """The transition table with the ``disabled`` commands skipped over.

    Cached: a milter negotiates the same steps on every connection, and the
    tables are only read.
    """
    table: dict[State, dict[int, State]] = {}
    for state, moves in TRANSITIONS.items():
        reachable = dict(moves)
        frontier = [nxt for code, nxt in moves.items() if code in disabled]
        seen = {state}
        while frontier:
            via = frontier.pop()
            if via in seen:
                continue
            seen.add(via)
            for code, nxt in TRANSITIONS[via].items():
                reachable.setdefault(code, nxt)
                if code in disabled:
                    frontier.append(nxt)
        table[state] = {code: nxt for code, nxt in reachable.items() if code not in disabled}
    return table
