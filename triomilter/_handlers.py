"""Typed handler decorators (SPEC §2.1).

A decorator reads the handler's annotations once and builds its converters:
``str`` parameters get UTF-8 text, ``bytes`` parameters the raw bytes; the
return annotation (``Status`` or ``Result[Status]``) decides how failures
become replies. The per-call path does no annotation work: it calls the
prebuilt ``convert`` on the engine's event and then the function.

The decorators are typed so that mypy reports the mistakes the runtime
checks catch: a wrong parameter type, a wrong return type, a missing
context parameter, and, in ``Milter(...)``, a handler written for another
context type than the milter's data factories make.

Typing design: a decorated handler is a `Handler[C, R]` (``C`` its context
type, ``R`` what it returns), refined by one subclass per shape of
parameters so that calling it directly in a test is type-checked too. The
shape's own type variables (``str`` or ``bytes``) are covariant so that a
list of handlers of one milter joins to ``Handler[Context[D, M], object]``,
from which mypy infers (and checks) the milter's data types.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import ipaddress
import types
import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, Union

from ._context import Context, SocketFamily, SocketInfo
from ._stage import NOREPLY_STEP, Stage
from ._status import Err, Ok, Result, Status
from .protocol import (
    Actions,
    AddressFamily,
    Body,
    Connect,
    Header,
    Mail,
    ProtocolOpts,
    Rcpt,
    Unknown,
)

D = TypeVar("D")
M = TypeVar("M")
C = TypeVar("C")
"""A handler's context type, ``Context[D, M]``."""
R_co = TypeVar("R_co", covariant=True)
# str or bytes, per parameter. Covariant although they type parameters of
# __call__: that is what lets handlers taking str and bytes share a list (the
# join of ArgsHandler[C, str, R] and ArgsHandler[C, bytes, R] is a handler, not
# object); a joined type is never called.
S_co = TypeVar("S_co", covariant=True)
S2_co = TypeVar("S2_co", covariant=True)
S1 = TypeVar("S1", str, bytes)
S2 = TypeVar("S2", str, bytes)
F = TypeVar("F", bound=Callable[..., Any])

StatusReturn = Status | Ok[Status] | Err
NegotiateResult = tuple[Status, Actions, ProtocolOpts]
NegotiateReturn = NegotiateResult | Ok[NegotiateResult] | Err
# What a handler may return: a verdict, or None for "no reply" (SPEC §2.1).
R = TypeVar("R", bound=StatusReturn | Awaitable[StatusReturn | None] | None)
# End of message always answers.
RE = TypeVar("RE", bound=StatusReturn | Awaitable[StatusReturn])
RN = TypeVar("RN", bound=NegotiateReturn | Awaitable[NegotiateReturn])


class Returns(enum.Enum):
    """How a handler reports its verdict and failure, read from its return annotation."""

    STATUS = "Status"  # any exception is a panic
    RESULT = "Result"  # Err and raised MilterError are TEMPFAIL
    NONE = "None"  # never answers: NOREPLY negotiated, else CONTINUE; exceptions are panics


class Handler(Generic[C, R_co]):
    """A decorated handler: the function plus its stage and converters.

    Calling it calls the function unchanged, for unit tests.
    """

    __slots__ = ("__dict__", "blocking", "convert", "func", "is_async", "returns", "stage")

    def __init__(
        self,
        func: Callable[..., R_co],
        stage: Stage,
        is_async: bool,
        returns: Returns,
        convert: Callable[[Any], tuple[object, ...]],
        blocking: bool = False,
    ) -> None:
        self.func = func
        self.stage = stage
        self.is_async = is_async
        self.returns = returns
        self.convert = convert
        """Turns the engine's event into the arguments after ``ctx`` (may raise
        UnicodeDecodeError: the stage is then answered TEMPFAIL)."""
        self.blocking = blocking
        """A plain ``def`` marked `blocking`: called in a worker thread."""
        self.__dict__.update(getattr(func, "__dict__", {}))
        self.__wrapped__ = func
        self.__name__ = getattr(func, "__name__", repr(func))
        self.__qualname__ = getattr(func, "__qualname__", self.__name__)
        self.__doc__ = func.__doc__
        self.__module__ = getattr(func, "__module__", __name__)

    if not TYPE_CHECKING:  # each shape below declares its own typed signature

        def __call__(self, *args, **kwargs):
            return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.stage.value} handler {self.__qualname__}>"


class NegotiateHandler(Handler[C, R_co]):
    """``on_negotiate``: ``(ctx, actions, opts)``."""

    __slots__ = ()
    if TYPE_CHECKING:

        def __call__(self, ctx: C, actions: Actions, opts: ProtocolOpts, /) -> R_co: ...


class ConnectHandler(Handler[C, R_co], Generic[C, S_co, R_co]):
    """``on_connect``: ``(ctx, hostname, address)``."""

    __slots__ = ()
    if TYPE_CHECKING:

        def __call__(
            self,
            ctx: C,
            hostname: S_co,  # type: ignore[misc]  # covariant S_co: see above
            address: SocketInfo | None,
            /,
        ) -> R_co: ...


class TextHandler(Handler[C, R_co], Generic[C, S_co, R_co]):
    """``on_helo``, ``on_unknown``: ``(ctx, text)``."""

    __slots__ = ()
    if TYPE_CHECKING:

        def __call__(self, ctx: C, text: S_co, /) -> R_co: ...  # type: ignore[misc]


class ArgsHandler(Handler[C, R_co], Generic[C, S_co, R_co]):
    """``on_mail``, ``on_rcpt``: ``(ctx, args)``."""

    __slots__ = ()
    if TYPE_CHECKING:

        def __call__(self, ctx: C, args: list[S_co], /) -> R_co: ...


class HeaderHandler(Handler[C, R_co], Generic[C, S_co, S2_co, R_co]):
    """``on_header``: ``(ctx, name, value)``."""

    __slots__ = ()
    if TYPE_CHECKING:

        def __call__(self, ctx: C, name: S_co, value: S2_co, /) -> R_co: ...  # type: ignore[misc]


class BodyHandler(Handler[C, R_co]):
    """``on_body``: ``(ctx, chunk)``."""

    __slots__ = ()
    if TYPE_CHECKING:

        def __call__(self, ctx: C, chunk: bytes, /) -> R_co: ...


class StageHandler(Handler[C, R_co]):
    """``on_data``, ``on_eoh``, ``on_eom``, ``on_abort``, ``on_close``: ``(ctx)``."""

    __slots__ = ()
    if TYPE_CHECKING:

        def __call__(self, ctx: C, /) -> R_co: ...


AnyHandler = Handler[Any, object]
"""Any decorated handler (for ``Milter(handlers=[...])``)."""

_SHAPE: dict[Stage, type[Handler[Any, Any]]] = {
    Stage.NEGOTIATE: NegotiateHandler,
    Stage.CONNECT: ConnectHandler,
    Stage.HELO: TextHandler,
    Stage.MAIL: ArgsHandler,
    Stage.RCPT: ArgsHandler,
    Stage.DATA: StageHandler,
    Stage.HEADER: HeaderHandler,
    Stage.EOH: StageHandler,
    Stage.BODY: BodyHandler,
    Stage.EOM: StageHandler,
    Stage.ABORT: StageHandler,
    Stage.CLOSE: StageHandler,
    Stage.UNKNOWN: TextHandler,
}


def blocking(func: F) -> F:
    """Run this plain ``def`` handler in a worker thread instead of on the event loop.

    For code ported from pymilter that calls blocking libraries (DNS, LDAP,
    SQL clients without async support). Decorate under the stage decorator::

        @on_rcpt
        @blocking
        def rcpt(ctx: Context[None], args: list[str]) -> Status: ...

    Threads are bounded by the server's ``thread_limit``; the handler
    deadline still applies (on expiry the command is answered TEMPFAIL and
    the thread's result is ignored when it comes). In the thread, use only
    ``ctx.api`` calls that are not ``async`` (macros, ``set_error_reply``)
    and your own data.
    """
    if isinstance(func, Handler):
        if func.is_async:
            raise TypeError(f"@blocking: {func.__qualname__} is async; only a plain def can block")
        marked = type(func)(func.func, func.stage, False, func.returns, func.convert, True)
        return typing.cast(F, marked)
    if inspect.iscoroutinefunction(func):
        raise TypeError(f"@blocking: {_name(func)} is async; only a plain def can block")
    try:
        func.__triomilter_blocking__ = True  # type: ignore[attr-defined]
    except AttributeError:
        raise TypeError(f"@blocking needs a function, got {func!r}") from None
    return func


# --- annotation reading -------------------------------------------------------


def _name(func: Callable[..., object]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


def _fail(func: Callable[..., object], stage: Stage, message: str) -> TypeError:
    return TypeError(f"@on_{stage.value} handler {_name(func)}(): {message}")


def _describe(annotation: object) -> str:
    if annotation is inspect.Parameter.empty:
        return "no annotation"
    if isinstance(annotation, type):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")


def _is_union(annotation: object) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _is_result_of(annotation: object, inner: object) -> bool:
    """``Result[inner]`` or its spelled-out form ``Ok[inner] | Err``."""
    origin = typing.get_origin(annotation)
    if origin is Result:
        return typing.get_args(annotation) == (inner,)
    if _is_union(annotation):
        args = set(typing.get_args(annotation))
        return args == {Ok[inner], Err}  # type: ignore[valid-type]
    return False


_STR_OR_BYTES = "str or bytes"


def _text_converter(annotation: object) -> Callable[[bytes], object] | None:
    if annotation is str:
        return _decode
    if annotation is bytes:
        return _identity
    return None


def _decode(data: bytes) -> str:
    return data.decode("utf-8")


def _identity(data: bytes) -> bytes:
    return data


def _list_converter(annotation: object) -> Callable[[tuple[bytes, ...]], object] | None:
    if typing.get_origin(annotation) is list:
        items = typing.get_args(annotation)
        item = items[0] if len(items) == 1 else None  # list[str, bytes] is not a list type
        if item is str:
            return lambda args: [arg.decode("utf-8") for arg in args]
        if item is bytes:
            return list
    return None


def _is_optional_socket_info(annotation: object) -> bool:
    return _is_union(annotation) and set(typing.get_args(annotation)) == {
        SocketInfo,
        type(None),
    }


def socket_info(event: Connect) -> SocketInfo | None:
    """The connect command's address as a `SocketInfo` (None for an unknown family)."""
    family = event.family
    if family == AddressFamily.UNIX:
        return SocketInfo(SocketFamily.UNIX, event.address.decode("utf-8", "surrogateescape"))
    if family == AddressFamily.UNKNOWN:
        return None
    text = event.address.decode("ascii", "replace")
    if family == AddressFamily.INET6:
        # Sendmail sends "IPv6:addr"; some MTAs bracket it (protocol.md §2.1).
        if text[:5].lower() == "ipv6:":
            text = text[5:]
        text = text.strip("[]")
        with contextlib.suppress(ValueError):
            text = str(ipaddress.IPv6Address(text))
        return SocketInfo(SocketFamily.INET6, text, event.port)
    return SocketInfo(SocketFamily.INET, text, event.port)


# Per stage: the parameter names after ctx (for messages), and a function that
# checks the annotations and returns the converter from event to arguments.
_Checker = Callable[
    [Callable[..., object], list[inspect.Parameter]], Callable[[Any], tuple[object, ...]]
]


def _no_args(
    func: Callable[..., object], params: list[inspect.Parameter]
) -> Callable[[Any], tuple[object, ...]]:
    return _NO_ARGS


def _NO_ARGS(event: object) -> tuple[object, ...]:
    return ()


def _text_params(
    stage: Stage,
    func: Callable[..., object],
    params: list[inspect.Parameter],
    names: tuple[str, ...],
) -> list[Callable[[bytes], object]]:
    converters = []
    for param, name in zip(params, names, strict=True):
        converter = _text_converter(param.annotation)
        if converter is None:
            raise _fail(
                func,
                stage,
                f"parameter {param.name!r} ({name}) is annotated {_describe(param.annotation)}; "
                f"allowed: {_STR_OR_BYTES}",
            )
        converters.append(converter)
    return converters


def _check_negotiate(
    func: Callable[..., object], params: list[inspect.Parameter]
) -> Callable[[Any], tuple[object, ...]]:
    for param, allowed in zip(params, (Actions, ProtocolOpts), strict=True):
        if param.annotation is not allowed:
            raise _fail(
                func,
                Stage.NEGOTIATE,
                f"parameter {param.name!r} is annotated {_describe(param.annotation)}; "
                f"allowed: {allowed.__name__}",
            )
    return _negotiate_args


def _negotiate_args(event: tuple[Actions, ProtocolOpts]) -> tuple[object, ...]:
    return event


def _check_connect(
    func: Callable[..., object], params: list[inspect.Parameter]
) -> Callable[[Any], tuple[object, ...]]:
    (convert,) = _text_params(Stage.CONNECT, func, params[:1], ("hostname",))
    address = params[1]
    if not _is_optional_socket_info(address.annotation):
        raise _fail(
            func,
            Stage.CONNECT,
            f"parameter {address.name!r} (address) is annotated "
            f"{_describe(address.annotation)}; allowed: SocketInfo | None",
        )

    def args(event: Connect) -> tuple[object, ...]:
        return convert(event.hostname), socket_info(event)

    return args


def _check_helo(
    func: Callable[..., object], params: list[inspect.Parameter]
) -> Callable[[Any], tuple[object, ...]]:
    (convert,) = _text_params(Stage.HELO, func, params, ("hostname",))
    if convert is _identity:
        return lambda event: (event.hostname,)
    return lambda event: (event.hostname.decode("utf-8"),)


def _check_args(stage: Stage) -> _Checker:
    def check(
        func: Callable[..., object], params: list[inspect.Parameter]
    ) -> Callable[[Any], tuple[object, ...]]:
        (param,) = params
        convert = _list_converter(param.annotation)
        if convert is None:
            raise _fail(
                func,
                stage,
                f"parameter {param.name!r} (args) is annotated {_describe(param.annotation)}; "
                "allowed: list[str] or list[bytes]",
            )

        def args(event: Mail | Rcpt) -> tuple[object, ...]:
            return (convert(event.args),)

        return args

    return check


def _check_header(
    func: Callable[..., object], params: list[inspect.Parameter]
) -> Callable[[Any], tuple[object, ...]]:
    name, value = _text_params(Stage.HEADER, func, params, ("name", "value"))
    if name is _decode and value is _decode:
        return lambda event: (event.name.decode("utf-8"), event.value.decode("utf-8"))

    def args(event: Header) -> tuple[object, ...]:
        return name(event.name), value(event.value)

    return args


def _check_body(
    func: Callable[..., object], params: list[inspect.Parameter]
) -> Callable[[Any], tuple[object, ...]]:
    (param,) = params
    if param.annotation is not bytes:
        raise _fail(
            func,
            Stage.BODY,
            f"parameter {param.name!r} (chunk) is annotated {_describe(param.annotation)}; "
            "allowed: bytes (body chunks are always bytes)",
        )

    def args(event: Body) -> tuple[object, ...]:
        return (event.chunk,)

    return args


def _check_unknown(
    func: Callable[..., object], params: list[inspect.Parameter]
) -> Callable[[Any], tuple[object, ...]]:
    (convert,) = _text_params(Stage.UNKNOWN, func, params, ("command",))

    def args(event: Unknown) -> tuple[object, ...]:
        return (convert(event.command),)

    return args


_PARAMS: dict[Stage, tuple[tuple[str, ...], _Checker]] = {
    Stage.NEGOTIATE: (("actions: Actions", "opts: ProtocolOpts"), _check_negotiate),
    Stage.CONNECT: (("hostname: str", "address: SocketInfo | None"), _check_connect),
    Stage.HELO: (("hostname: str",), _check_helo),
    Stage.MAIL: (("args: list[str]",), _check_args(Stage.MAIL)),
    Stage.RCPT: (("args: list[str]",), _check_args(Stage.RCPT)),
    Stage.DATA: ((), _no_args),
    Stage.HEADER: (("name: str", "value: str"), _check_header),
    Stage.EOH: ((), _no_args),
    Stage.BODY: (("chunk: bytes",), _check_body),
    Stage.EOM: ((), _no_args),
    Stage.ABORT: ((), _no_args),
    Stage.CLOSE: ((), _no_args),
    Stage.UNKNOWN: (("command: str",), _check_unknown),
}


_NO_REPLY_STAGES = frozenset(NOREPLY_STEP) | {Stage.ABORT, Stage.CLOSE}
"""Stages whose handler may be annotated ``-> None``: the ones that need not answer."""


def _returns(func: Callable[..., object], stage: Stage, annotation: object) -> Returns:
    if stage is Stage.NEGOTIATE:
        if annotation == NegotiateResult:
            return Returns.STATUS
        if _is_result_of(annotation, NegotiateResult):
            return Returns.RESULT
        allowed = (
            "tuple[Status, Actions, ProtocolOpts] or Result[tuple[Status, Actions, ProtocolOpts]]"
        )
    else:
        if annotation is Status:
            return Returns.STATUS
        if _is_result_of(annotation, Status):
            return Returns.RESULT
        if annotation is None and stage in _NO_REPLY_STAGES:
            return Returns.NONE
        allowed = "Status or Result[Status]"
        if stage in _NO_REPLY_STAGES:
            allowed += " or None (never answers)"
        elif annotation is None:
            allowed += " (end of message always answers: None is not allowed here)"
    raise _fail(func, stage, f"return annotation is {_describe(annotation)}; allowed: {allowed}")


def build_handler(func: Callable[..., R_co], stage: Stage) -> Handler[Any, R_co]:
    """Check ``func``'s signature for ``stage`` and build its converters."""
    if isinstance(func, Handler):
        raise _fail(func.func, stage, f"is already an @on_{func.stage.value} handler")
    if not callable(func):
        raise TypeError(f"@on_{stage.value} needs a function, got {func!r}")
    try:
        signature = inspect.signature(func, eval_str=True)
    except NameError as exc:
        raise _fail(func, stage, f"cannot resolve an annotation: {exc}") from None
    expected, check = _PARAMS[stage]
    params = list(signature.parameters.values())
    wanted = "(ctx: Context[...]" + "".join(f", {p}" for p in expected) + ")"
    for param in params:
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            raise _fail(
                func, stage, f"parameter {param.name!r} must be positional; expected {wanted}"
            )
    if len(params) != len(expected) + 1:
        raise _fail(
            func, stage, f"takes {len(params)} parameter(s), expected {len(expected) + 1}: {wanted}"
        )
    ctx = params[0]
    if not (ctx.annotation is Context or typing.get_origin(ctx.annotation) is Context):
        raise _fail(
            func,
            stage,
            f"first parameter {ctx.name!r} is annotated {_describe(ctx.annotation)}; "
            "allowed: Context[...] (the context comes first)",
        )
    for param in params[1:]:
        if param.annotation is inspect.Parameter.empty:
            raise _fail(
                func, stage, f"parameter {param.name!r} has no annotation; expected {wanted}"
            )
    convert = check(func, params[1:])
    returns = _returns(func, stage, signature.return_annotation)
    is_async = inspect.iscoroutinefunction(func)
    in_thread = bool(getattr(func, "__triomilter_blocking__", False))
    return _SHAPE[stage](func, stage, is_async, returns, convert, in_thread)


# --- the decorators ---------------------------------------------------------------
# One per stage. Each signature states what mypy must accept: S1/S2 are str or
# bytes per parameter; R is a Status or Result[Status] (or None where a stage
# may go unanswered), or an awaitable of one.


def on_negotiate(
    func: Callable[[Context[D, M], Actions, ProtocolOpts], RN],
) -> NegotiateHandler[Context[D, M], RN]:
    """Option negotiation: gets what the MTA offers, returns (status, actions, opts)."""
    return build_handler(func, Stage.NEGOTIATE)  # type: ignore[return-value]


def on_connect(
    func: Callable[[Context[D, M], S1, SocketInfo | None], R],
) -> ConnectHandler[Context[D, M], S1, R]:
    """SMTP connection: client host name and address (None for an unknown family)."""
    return build_handler(func, Stage.CONNECT)  # type: ignore[return-value]


def on_helo(func: Callable[[Context[D, M], S1], R]) -> TextHandler[Context[D, M], S1, R]:
    """HELO/EHLO: the name the client gave."""
    return build_handler(func, Stage.HELO)  # type: ignore[return-value]


def on_mail(func: Callable[[Context[D, M], list[S1]], R]) -> ArgsHandler[Context[D, M], S1, R]:
    """MAIL FROM: ``args[0]`` is the sender (``<a@b>``, ``<>``), the rest ESMTP parameters."""
    return build_handler(func, Stage.MAIL)  # type: ignore[return-value]


def on_rcpt(func: Callable[[Context[D, M], list[S1]], R]) -> ArgsHandler[Context[D, M], S1, R]:
    """RCPT TO, once per recipient: ``args[0]`` is the recipient, the rest ESMTP parameters."""
    return build_handler(func, Stage.RCPT)  # type: ignore[return-value]


def on_data(func: Callable[[Context[D, M]], R]) -> StageHandler[Context[D, M], R]:
    """DATA: the content follows."""
    return build_handler(func, Stage.DATA)  # type: ignore[return-value]


def on_header(
    func: Callable[[Context[D, M], S1, S2], R],
) -> HeaderHandler[Context[D, M], S1, S2, R]:
    """One header field (folded values keep their bare LF line breaks)."""
    return build_handler(func, Stage.HEADER)  # type: ignore[return-value]


def on_eoh(func: Callable[[Context[D, M]], R]) -> StageHandler[Context[D, M], R]:
    """End of the headers."""
    return build_handler(func, Stage.EOH)  # type: ignore[return-value]


def on_body(func: Callable[[Context[D, M], bytes], R]) -> BodyHandler[Context[D, M], R]:
    """One body chunk (bytes, CRLF line endings, at most 64 KiB)."""
    return build_handler(func, Stage.BODY)  # type: ignore[return-value]


def on_eom(func: Callable[[Context[D, M]], RE]) -> StageHandler[Context[D, M], RE]:
    """End of message: the only stage where the message may be changed."""
    return build_handler(func, Stage.EOM)  # type: ignore[return-value]


def on_abort(func: Callable[[Context[D, M]], R]) -> StageHandler[Context[D, M], R]:
    """The MTA abandoned the current message; the result is ignored."""
    return build_handler(func, Stage.ABORT)  # type: ignore[return-value]


def on_close(func: Callable[[Context[D, M]], R]) -> StageHandler[Context[D, M], R]:
    """The MTA connection ends (once per connection); the result is ignored."""
    return build_handler(func, Stage.CLOSE)  # type: ignore[return-value]


def on_unknown(func: Callable[[Context[D, M], S1], R]) -> TextHandler[Context[D, M], S1, R]:
    """An SMTP command the MTA does not know (it is rejected anyway)."""
    return build_handler(func, Stage.UNKNOWN)  # type: ignore[return-value]
