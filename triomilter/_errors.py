"""Errors of the milter API (SPEC §2.1, §2.3)."""

from __future__ import annotations


class MilterError(Exception):
    """A milter operation failed; every context API failure is one.

    Raised in a handler annotated ``-> Result[...]`` it becomes ``Err``: the
    stage is answered TEMPFAIL and the milter goes on. Raised in a handler
    annotated ``-> Status`` it is a panic, like any other exception.
    """


class StageError(MilterError):
    """The call is not allowed in this stage (e.g. ``add_header`` outside ``on_eom``)."""


class ActionNotNegotiated(MilterError):
    """The action needs a flag the milter did not request or the MTA did not grant."""


class InvalidArgument(MilterError, ValueError):
    """An argument cannot go on the wire (NUL byte, CR/LF, bad reply code, index < 0...)."""


class MacroDecodeError(MilterError):
    """Not raised any more: kept so that code catching it still imports.

    ``ctx.api.macro_value`` never fails; bytes that are not UTF-8 become
    U+FFFD. ``ctx.api.macro_bytes`` gives the exact bytes.
    """


class ConnectionLost(MilterError):
    """The MTA connection closed while a change was being sent."""


class MilterPanic(Exception):
    """The milter was shut down because a handler panicked.

    Raised by ``serve()``; ``__cause__`` is the handler's original exception.
    """


class ForcedShutdown(Exception):
    """A second SIGTERM/SIGINT stopped the server at once, without draining.

    Raised by ``serve()``/``serve_listener()``; ``signal`` is the signal number.
    The command line exits with 128 + that number (143 for SIGTERM).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped at once by a second signal ({signum})")
        self.signal = signum
