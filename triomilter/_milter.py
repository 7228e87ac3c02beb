"""`Milter`: the immutable configuration of one milter (SPEC §2.4)."""

from __future__ import annotations

import types
from collections.abc import Iterable, Mapping

import attrs

from ._context import Stage
from ._handlers import AnyHandler, Handler
from .protocol import Actions, MacroStage, ProtocolOpts

# The NO_* step that spares the MTA a stage nobody handles.
NO_STEP_OF_STAGE: dict[Stage, ProtocolOpts] = {
    Stage.CONNECT: ProtocolOpts.NO_CONNECT,
    Stage.HELO: ProtocolOpts.NO_HELO,
    Stage.MAIL: ProtocolOpts.NO_MAIL,
    Stage.RCPT: ProtocolOpts.NO_RCPT,
    Stage.DATA: ProtocolOpts.NO_DATA,
    Stage.HEADER: ProtocolOpts.NO_HEADER,
    Stage.EOH: ProtocolOpts.NO_EOH,
    Stage.BODY: ProtocolOpts.NO_BODY,
    Stage.UNKNOWN: ProtocolOpts.NO_UNKNOWN,
}


def _handlers_by_stage(
    handlers: Iterable[AnyHandler] | Mapping[Stage, AnyHandler],
) -> Mapping[Stage, AnyHandler]:
    if isinstance(handlers, Mapping):  # another Milter's handlers (attrs.evolve)
        handlers = handlers.values()
    by_stage: dict[Stage, AnyHandler] = {}
    for handler in handlers:
        if not isinstance(handler, Handler):
            raise TypeError(f"{handler!r} is not a decorated handler; decorate it with @on_<stage>")
        if handler.stage in by_stage:
            raise ValueError(
                f"two handlers for stage {handler.stage.value!r}: "
                f"{by_stage[handler.stage].__qualname__} and {handler.__qualname__}"
            )
        by_stage[handler.stage] = handler
    return types.MappingProxyType(by_stage)


def _macros(value: Mapping[MacroStage, str]) -> Mapping[MacroStage, str]:
    """Check macro requests like ``request_macros`` does; names space-separated."""
    lists: dict[MacroStage, str] = {}
    for stage, names in value.items():
        if not isinstance(stage, MacroStage):
            raise TypeError(f"macro stages must be MacroStage values, got {stage!r}")
        if not isinstance(names, str):
            raise TypeError(f"macro names for {stage.name} must be a str, got {names!r}")
        if any(bad in names for bad in ("\0", "\r", "\n")):
            raise ValueError(f"macro names for {stage.name} contain NUL, CR or LF: {names!r}")
        lists[stage] = " ".join(names.split())
    return types.MappingProxyType(lists)


@attrs.frozen
class Milter:
    """A milter: its name, handlers and what it asks of the MTA.

    - ``actions``: the end-of-message actions it needs (the MTA must offer them).
    - ``protocol_opts``: extra protocol steps (``NOREPLY_*``, ``SKIP``,
      ``HEADER_LEADING_SPACE``, ``REJECTED_RCPT``...). Without an
      ``on_negotiate`` handler, ``NO_*`` steps are added for every stage
      without a handler, so the MTA never sends what nobody reads.
    - ``macros``: macro names to request per stage (space-separated).
    """

    name: str
    handlers: Mapping[Stage, AnyHandler] = attrs.field(factory=dict, converter=_handlers_by_stage)
    actions: Actions = Actions.NONE
    protocol_opts: ProtocolOpts = ProtocolOpts.NONE
    macros: Mapping[MacroStage, str] = attrs.field(factory=dict, converter=_macros)

    @classmethod
    def from_module(
        cls,
        module: types.ModuleType,
        *,
        name: str | None = None,
        actions: Actions | None = None,
        protocol_opts: ProtocolOpts | None = None,
        macros: Mapping[MacroStage, str] | None = None,
    ) -> Milter:
        """Collect a module's decorated handlers ("typed handler modules").

        Settings not given come from module attributes ``MILTER_NAME``,
        ``ACTIONS``, ``PROTOCOL_OPTS`` and ``MACROS`` if present.
        """
        handlers = [value for value in vars(module).values() if isinstance(value, Handler)]
        return cls(
            name=name or str(getattr(module, "MILTER_NAME", module.__name__)),
            handlers=handlers,
            actions=actions if actions is not None else getattr(module, "ACTIONS", Actions.NONE),
            protocol_opts=(
                protocol_opts
                if protocol_opts is not None
                else getattr(module, "PROTOCOL_OPTS", ProtocolOpts.NONE)
            ),
            macros=macros if macros is not None else getattr(module, "MACROS", {}),
        )

    _unhandled: ProtocolOpts = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        opts = 0
        for stage, step in NO_STEP_OF_STAGE.items():
            if stage not in self.handlers:
                opts |= step
        # Computed once: negotiation on every connection needs it.
        object.__setattr__(self, "_unhandled", ProtocolOpts(opts))

    @property
    def unhandled_steps(self) -> ProtocolOpts:
        """The ``NO_*`` steps of the stages this milter has no handler for."""
        return self._unhandled
