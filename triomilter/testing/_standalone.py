"""A context for calling one handler directly, without any MTA session.

Decorated handlers stay plain callables; to unit-test one in isolation it
needs a `Context`. `HandlerContext` makes one whose API records what the
handler asks for instead of sending it::

    harness = HandlerContext(data=Scan(), macros={MacroStage.EOM: {"i": "4ABC"}})
    assert await eom(harness.ctx) is Status.CONTINUE
    assert harness.modifications == [AddHeader("X-Scanned", "yes")]

The same validation runs as in a real session (stage, negotiated actions,
NUL/CR/LF, indices...), so a handler that passes here behaves the same
behind an MTA. For whole conversations, use `open_in_memory`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Generic

import trio
from typing_extensions import TypeVar

from .._context import Context
from .._stage import Stage
from .._tasks import ConnectionTasks
from ..protocol import (
    ALL_ACTIONS,
    COMMAND_OF_MACRO_STAGE,
    Actions,
    MacroStage,
    MacroStore,
    Modification,
    Progress,
)
from ._results import Modification as Change
from ._results import modifications_of

D = TypeVar("D", default=None)
M = TypeVar("M", default=None)


class _Recorder:
    """Stands in for the dispatcher's session behind `Context` (a `ContextHost`)."""

    def __init__(
        self,
        stage: Stage,
        actions: Actions,
        macros: Mapping[MacroStage, Mapping[str, str | bytes]],
        nursery: trio.Nursery | None,
    ) -> None:
        self.stage = stage
        self.actions = actions
        self.connection_id = "handler-test"
        self.error_reply: bytes | None = None
        self.requested_macros: dict[MacroStage, bytes] = {}
        self.sent: list[Modification] = []
        self.progress = 0
        self.panicked = False
        self.in_message = stage not in (Stage.NEGOTIATE, Stage.CONNECT, Stage.HELO, Stage.CLOSE)
        self.tasks = ConnectionTasks(nursery, _raise) if nursery is not None else None
        self._macros = MacroStore()
        for stage_, values in macros.items():
            payload = bytes((COMMAND_OF_MACRO_STAGE[stage_],))
            for name, value in values.items():
                raw = value.encode() if isinstance(value, str) else value
                payload += name.encode() + b"\0" + raw + b"\0"
            self._macros.define(payload)

    def macro(self, name: bytes) -> bytes | None:
        return self._macros.get(name)

    async def queue(self, change: Modification | Progress, flush: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        if isinstance(change, Progress):
            self.progress += 1
        else:
            self.sent.append(change)


def _raise(exc: BaseException) -> None:
    # In a real session a background task's exception is a panic; in a test it
    # must not pass unseen: it fails the test's nursery.
    raise exc


class HandlerContext(Generic[D, M]):
    """A `Context` for calling a handler directly, and what the handler did with it.

    ``data`` is the per-connection data (``ctx.data``, ``ctx.connection_data``);
    ``message_data`` a factory for ``ctx.message_data``; ``macros`` maps a
    `MacroStage` to ``{name: value}`` (visible with libmilter's scoping);
    ``stage`` is the stage the handler pretends to run in (end-of-message
    actions need `Stage.EOM`); ``actions`` what the MTA granted (all by
    default); ``nursery`` backs ``ctx.connection_nursery`` (an exception
    escaping a background task fails that nursery, so the test sees it).
    """

    def __init__(
        self,
        data: D | None = None,
        *,
        message_data: Callable[[], M] | None = None,
        macros: Mapping[MacroStage, Mapping[str, str | bytes]] | None = None,
        stage: Stage = Stage.EOM,
        actions: Actions = ALL_ACTIONS,
        nursery: trio.Nursery | None = None,
    ) -> None:
        self._recorder = _Recorder(stage, actions, macros or {}, nursery)
        self.ctx: Context[D, M] = Context(self._recorder, message_data)
        self.ctx.data = data

    @property
    def stage(self) -> Stage:
        """The stage the handler runs in (``ctx.stage``); settable between calls."""
        return self._recorder.stage

    @stage.setter
    def stage(self, stage: Stage) -> None:
        self._recorder.stage = stage

    @property
    def modifications(self) -> list[Change]:
        """The end-of-message changes the handler made, in order."""
        return modifications_of(self._recorder.sent)

    @property
    def progress(self) -> int:
        """How many times the handler signalled progress."""
        return self._recorder.progress

    @property
    def error_reply(self) -> str | None:
        """The custom SMTP reply the handler set (lines joined by CRLF), if any."""
        reply = self._recorder.error_reply
        return None if reply is None else reply.decode("utf-8", "replace")

    @property
    def requested_macros(self) -> dict[MacroStage, str]:
        """Macros requested with ``ctx.api.request_macros`` (in on_negotiate)."""
        return {stage: names.decode() for stage, names in self._recorder.requested_macros.items()}
