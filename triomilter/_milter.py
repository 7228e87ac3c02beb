"""`Milter`: the immutable configuration of one milter (SPEC §2.4), and its negotiation policy.

What a milter asks of an MTA is decided here, as pure functions of the
milter and the MTA's offer (no I/O, no Trio): the dispatcher only sends the
result.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, Literal

import attrs
from typing_extensions import TypeVar

from ._context import Context
from ._handlers import AnyHandler, Handler, Returns
from ._stage import NO_STEP, NOREPLY_STEP, Stage, steps
from ._status import Status
from .protocol import (
    Actions,
    MacroStage,
    Negotiated,
    OptionNegotiation,
    ProtocolOpts,
    negotiate,
    negotiate_all,
    offered,
)

D = TypeVar("D", default=Any)
M = TypeVar("M", default=Any)

OnException = Literal["panic", "tempfail"]

DEFAULT_HANDLER_TIMEOUT = 8.0
"""Below Sendmail's shortest default reply timeout (``T=R:10s``) and Postfix's
``milter_command_timeout`` (30 s): the milter, not the MTA's default action,
decides what happens to a command whose handler hangs."""
DEFAULT_EOM_TIMEOUT = 240.0
"""Below Sendmail's ``T=E:5m`` (the whole end of message, progress or not)
and Postfix's ``milter_content_timeout`` (300 s; progress restarts it)."""


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


def _macros(value: Mapping[MacroStage, str] | None) -> Mapping[MacroStage, str]:
    """Check macro requests like ``request_macros`` does; names space-separated."""
    lists: dict[MacroStage, str] = {}
    for stage, names in (value or {}).items():
        if not isinstance(stage, MacroStage):
            raise TypeError(f"macro stages must be MacroStage values, got {stage!r}")
        if not isinstance(names, str):
            raise TypeError(f"macro names for {stage.name} must be a str, got {names!r}")
        if any(bad in names for bad in ("\0", "\r", "\n")):
            raise ValueError(f"macro names for {stage.name} contain NUL, CR or LF: {names!r}")
        lists[stage] = " ".join(names.split())
    return types.MappingProxyType(lists)


def _seconds(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{attribute.name} must be a number of seconds, got {value!r}")
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive number of seconds, got {value}")


def _factory(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not callable(value):
        raise TypeError(
            f"{attribute.name} must be a factory (a class or a function), not {value!r}"
        )


_NEGOTIATIONS_KEPT = 64
"""Offers whose default negotiation a milter remembers (an MTA sends the same
offer every time; a hostile peer must not grow the cache)."""


@attrs.frozen(init=False)
class Milter(Generic[D, M]):
    """A milter: its name, handlers and what it asks of the MTA.

    - ``actions``: the end-of-message actions it needs (the MTA must offer them).
    - ``protocol_opts``: extra protocol steps (``SKIP``, ``HEADER_LEADING_SPACE``,
      ``REJECTED_RCPT``...). Without an ``on_negotiate`` handler, ``NO_*``
      steps are added for every stage without a handler (when the MTA offers
      them), and ``NOREPLY_*`` for every handler annotated ``-> None``.
    - ``macros``: macro names to request per stage (space-separated); an
      ``on_negotiate`` handler's ``request_macros`` replaces a stage's list.
    - ``connection_data`` / ``message_data``: factories of per-connection
      and per-message data (``ctx.connection_data``, ``ctx.message_data``);
      what they make is exited (``__exit__``) when dropped, if it is a
      context manager.
    - ``on_exception``: what an unexpected exception in a handler does:
      ``"panic"`` (shut the milter down, SPEC §2.1) or ``"tempfail"``
      (log it with its traceback, answer that command TEMPFAIL, go on).
    - ``handler_timeout`` / ``eom_timeout``: how long a handler (an
      end-of-message handler) may run before it is cancelled and the
      command answered TEMPFAIL; the server's options can override them.
    """

    name: str
    handlers: Mapping[Stage, AnyHandler]
    actions: Actions
    protocol_opts: ProtocolOpts
    macros: Mapping[MacroStage, str]
    connection_data: Callable[[], D] | None = attrs.field(validator=_factory)
    message_data: Callable[[], M] | None = attrs.field(validator=_factory)
    on_exception: OnException = attrs.field(validator=attrs.validators.in_(("panic", "tempfail")))
    handler_timeout: float = attrs.field(validator=_seconds)
    eom_timeout: float = attrs.field(validator=_seconds)
    _negotiations: dict[tuple[int, int, int], Negotiated] = attrs.field(
        init=False, repr=False, eq=False, factory=dict
    )

    def __init__(
        self,
        name: str,
        handlers: Iterable[Handler[Context[D, M], object]] | Mapping[Stage, AnyHandler] = (),
        actions: Actions = Actions.NONE,
        protocol_opts: ProtocolOpts = ProtocolOpts.NONE,
        macros: Mapping[MacroStage, str] | None = None,
        *,
        connection_data: Callable[[], D] | None = None,
        message_data: Callable[[], M] | None = None,
        on_exception: OnException = "panic",
        handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
        eom_timeout: float = DEFAULT_EOM_TIMEOUT,
    ) -> None:
        self.__attrs_init__(
            name,
            _handlers_by_stage(handlers),
            Actions(actions),
            ProtocolOpts(protocol_opts),
            _macros(macros),
            connection_data,
            message_data,
            on_exception,
            handler_timeout,
            eom_timeout,
        )

    @classmethod
    def from_module(
        cls,
        module: types.ModuleType,
        *,
        name: str | None = None,
        actions: Actions | None = None,
        protocol_opts: ProtocolOpts | None = None,
        macros: Mapping[MacroStage, str] | None = None,
    ) -> Milter[Any, Any]:
        """Collect a module's decorated handlers ("typed handler modules").

        Settings not given come from module attributes ``MILTER_NAME``,
        ``ACTIONS``, ``PROTOCOL_OPTS``, ``MACROS``, ``CONNECTION_DATA``,
        ``MESSAGE_DATA`` and ``ON_EXCEPTION`` if present.
        """
        handlers = [value for value in vars(module).values() if isinstance(value, Handler)]
        return cls(
            name or str(getattr(module, "MILTER_NAME", module.__name__)),
            handlers,
            actions if actions is not None else getattr(module, "ACTIONS", Actions.NONE),
            (
                protocol_opts
                if protocol_opts is not None
                else getattr(module, "PROTOCOL_OPTS", ProtocolOpts.NONE)
            ),
            macros if macros is not None else getattr(module, "MACROS", {}),
            connection_data=getattr(module, "CONNECTION_DATA", None),
            message_data=getattr(module, "MESSAGE_DATA", None),
            on_exception=getattr(module, "ON_EXCEPTION", "panic"),
        )

    # --- negotiation policy (pure) -----------------------------------------------

    @property
    def unhandled_steps(self) -> ProtocolOpts:
        """The ``NO_*`` steps of the stages this milter has no handler for."""
        return steps((stage for stage in NO_STEP if stage not in self.handlers), NO_STEP)

    @property
    def noreply_steps(self) -> ProtocolOpts:
        """The ``NOREPLY_*`` steps of the handlers annotated ``-> None``."""
        silent = (stage for stage, h in self.handlers.items() if h.returns is Returns.NONE)
        return steps(silent, NOREPLY_STEP)

    def negotiate(self, offer: OptionNegotiation) -> Negotiated:
        """What this milter agrees to with an MTA offering ``offer`` (no ``on_negotiate``).

        libmilter's rules (`triomilter.protocol.negotiate`), with two
        additions: ``NO_*`` steps for unhandled stages are asked only if
        offered (an MTA that does not offer one sends the stage, answered
        CONTINUE, instead of failing the negotiation), and ``NOREPLY_*``
        steps of ``-> None`` handlers that are not offered are faked.
        """
        key = (int(offer.version), int(offer.actions), int(offer.opts))
        negotiated = self._negotiations.get(key)
        if negotiated is None:
            _, mta_opts = offered(offer)
            macros = self._macro_lists()
            negotiated = negotiate(
                offer,
                _with_macro_action(offer, self.actions, macros),
                self.protocol_opts | (self.unhandled_steps & mta_opts) | self.noreply_steps,
                macros,
            )
            if len(self._negotiations) < _NEGOTIATIONS_KEPT:
                self._negotiations[key] = negotiated
        return negotiated

    def negotiate_choice(
        self,
        offer: OptionNegotiation,
        status: Status,
        actions: Actions,
        opts: ProtocolOpts,
        requested_macros: Mapping[MacroStage, bytes],
    ) -> Negotiated:
        """What this milter agrees to when ``on_negotiate`` returned ``(status, actions, opts)``.

        ``ALL_OPTS`` takes everything offered (libmilter's rules), ``CONTINUE``
        the returned flags; either way with the ``NOREPLY_*`` steps of
        ``-> None`` handlers. Raises `NegotiationError` if they cannot be met,
        `ValueError` for any other status.
        """
        macros = self._macro_lists(requested_macros)
        if status is Status.ALL_OPTS:
            everything = negotiate_all(offer, self.unhandled_steps, macros)
            if not self.noreply_steps:
                return everything
            actions, opts = everything.actions, everything.opts
        elif status is not Status.CONTINUE:
            raise ValueError(f"on_negotiate answered {status.name}")
        return negotiate(
            offer,
            _with_macro_action(offer, Actions(actions), macros),
            ProtocolOpts(opts) | self.noreply_steps,
            macros,
        )

    def _macro_lists(
        self, requested: Mapping[MacroStage, bytes] | None = None
    ) -> dict[MacroStage, bytes]:
        lists = {stage: names.encode() for stage, names in self.macros.items()}
        if requested:
            lists.update(requested)
        if MacroStage.EOM in lists and MacroStage.EOH not in lists:
            # Sendmail 8.17 uses a milter's end-of-message list only if the
            # milter also sent an end-of-headers list (milter.c, milter_data()
            # tests MI_LFLAGS_SYM(SMFIM_EOH)); alone, it is ignored. An empty
            # EOH list is the smallest that works (measured: Sendmail then sends
            # exactly our EOM list, and no EOH macros, like its default); Postfix
            # ignores empty lists and keeps main.cf's.
            lists[MacroStage.EOH] = b""
        return lists


def _with_macro_action(
    offer: OptionNegotiation, actions: Actions, macros: Mapping[MacroStage, bytes]
) -> Actions:
    # libmilter's API rule: macro lists need SETSYMLIST (MTAs do not check it).
    if macros and offered(offer)[0] & Actions.REQUEST_MACROS:
        return actions | Actions.REQUEST_MACROS
    return actions
