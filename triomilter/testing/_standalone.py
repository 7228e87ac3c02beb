"""A context for calling one handler directly, without any MTA session.

Decorated handlers stay plain callables; to unit-test one in isolation it
needs a `Context`. `HandlerContext` makes one whose API records what the
handler asks for instead of sending it::

    harness = HandlerContext(data=Scan(), macros={"i": "4ABC"}, stage=Stage.EOM)
    assert await eom(harness.ctx) is Status.CONTINUE
    assert harness.modifications == [AddHeader("X-Scanned", "yes")]

The same validation runs as in a real session (stage, negotiated actions,
NUL/CR/LF, indices...), so a handler that passes here behaves the same
behind an MTA. For whole conversations, use `open_in_memory`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Generic, TypeVar

import trio

from .. import protocol
from .._context import Context, Stage
from ..protocol import Actions, CommandCode, MacroStage, MacroStore
from ..protocol._constants import ALL_ACTIONS
from ._results import Modification, modifications_of

D = TypeVar("D")

_SLOT_CODE = {
    MacroStage.CONNECT: CommandCode.CONNECT,
    MacroStage.HELO: CommandCode.HELO,
    MacroStage.MAIL: CommandCode.MAIL,
    MacroStage.RCPT: CommandCode.RCPT,
    MacroStage.DATA: CommandCode.DATA,
    MacroStage.EOH: CommandCode.EOH,
    MacroStage.EOM: CommandCode.EOM,
}


class _Recorder:
    """Stands in for the dispatcher's session behind `ContextApi`."""

    def __init__(
        self,
        stage: Stage,
        actions: Actions,
        macros: Mapping[MacroStage, Mapping[str, str | bytes]],
        nursery: trio.Nursery | None,
    ) -> None:
        self.stage = stage
        self.actions = actions
        self.nursery = nursery
        self.connection_id = "handler-test"
        self.error_reply: bytes | None = None
        self.requested_macros: dict[MacroStage, bytes] = {}
        self.sent: list[protocol.Modification] = []
        self.progress = 0
        self.panicked = False
        self.conn = _Conn()
        for stage_, values in macros.items():
            payload = bytes((_SLOT_CODE[stage_],))
            for name, value in values.items():
                raw = value.encode() if isinstance(value, str) else value
                payload += name.encode() + b"\0" + raw + b"\0"
            self.conn.macros.define(payload)

    async def queue(self, reply: Any, flush: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        if isinstance(reply, protocol.Progress):
            self.progress += 1
        else:
            self.sent.append(reply)


class _Conn:
    def __init__(self) -> None:
        self.macros = MacroStore()


class HandlerContext(Generic[D]):
    """A `Context` for calling a handler directly, and what the handler did with it.

    ``macros`` maps a `MacroStage` to ``{name: value}`` (visible with
    libmilter's scoping); ``stage`` is the stage the handler pretends to run
    in (end-of-message actions need `Stage.EOM`); ``actions`` what the MTA
    granted (all by default); ``nursery`` backs ``ctx.connection_nursery``.
    """

    def __init__(
        self,
        data: D | None = None,
        *,
        macros: Mapping[MacroStage, Mapping[str, str | bytes]] | None = None,
        stage: Stage = Stage.EOM,
        actions: Actions = ALL_ACTIONS,
        nursery: trio.Nursery | None = None,
    ) -> None:
        self._recorder = _Recorder(stage, actions, macros or {}, nursery)
        self.ctx: Context[D] = Context(self._recorder)  # type: ignore[arg-type]
        self.ctx.data = data

    @property
    def stage(self) -> Stage:
        return self._recorder.stage

    @stage.setter
    def stage(self, stage: Stage) -> None:
        self._recorder.stage = stage

    @property
    def modifications(self) -> list[Modification]:
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
