"""Decoration-time checks (SPEC §2.1): TypeError naming the function, the parameter
and what is allowed; accepted signatures stay directly callable."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, Optional, Union

import pytest

from triomilter import (
    Actions,
    Context,
    Err,
    Handler,
    Ok,
    ProtocolOpts,
    Result,
    SocketInfo,
    Stage,
    Status,
    on_abort,
    on_body,
    on_close,
    on_connect,
    on_data,
    on_eoh,
    on_eom,
    on_header,
    on_helo,
    on_mail,
    on_negotiate,
    on_rcpt,
    on_unknown,
)
from triomilter._handlers import Returns

DECORATORS: dict[str, Callable[[Any], Any]] = {
    "negotiate": on_negotiate,
    "connect": on_connect,
    "helo": on_helo,
    "mail": on_mail,
    "rcpt": on_rcpt,
    "data": on_data,
    "header": on_header,
    "eoh": on_eoh,
    "body": on_body,
    "eom": on_eom,
    "abort": on_abort,
    "close": on_close,
    "unknown": on_unknown,
}


def rejects(stage: str, func: Callable[..., Any], *fragments: str) -> None:
    """Decorating ``func`` for ``stage`` raises a TypeError mentioning every fragment."""
    with pytest.raises(TypeError) as info:
        DECORATORS[stage](func)
    message = str(info.value)
    assert f"@on_{stage}" in message
    assert func.__qualname__ in message  # the function
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --- parameters ------------------------------------------------------------------------------


def test_missing_parameter_annotation() -> None:
    async def helo(ctx: Context[None], hostname) -> Status:  # type: ignore[no-untyped-def]
        return Status.CONTINUE

    rejects("helo", helo, "'hostname'", "no annotation", "hostname: str")


def test_missing_ctx_annotation() -> None:
    async def helo(ctx, hostname: str) -> Status:  # type: ignore[no-untyped-def]
        return Status.CONTINUE

    rejects("helo", helo, "'ctx'", "no annotation", "allowed: Context[...]")


def test_wrong_ctx_annotation() -> None:
    async def eom(ctx: int) -> Status:
        return Status.CONTINUE

    rejects("eom", eom, "'ctx'", "annotated int", "allowed: Context[...]")


@pytest.mark.parametrize(
    ("stage", "make", "fragments"),
    [
        (
            "helo",
            lambda: _f2("hostname", int),
            ["'hostname'", "(hostname)", "annotated int", "allowed: str or bytes"],
        ),
        (
            "helo",
            lambda: _f2("hostname", Optional[str]),  # noqa: UP045
            ["'hostname'", "allowed: str or bytes"],
        ),
        (
            "unknown",
            lambda: _f2("command", bytearray),
            ["'command'", "annotated bytearray", "allowed: str or bytes"],
        ),
        (
            "mail",
            lambda: _f2("args", str),
            ["'args'", "annotated str", "allowed: list[str] or list[bytes]"],
        ),
        (
            "rcpt",
            lambda: _f2("args", list[int]),
            ["'args'", "list[int]", "allowed: list[str] or list[bytes]"],
        ),
        ("rcpt", lambda: _f2("args", list), ["'args'", "allowed: list[str] or list[bytes]"]),
        (
            "rcpt",
            lambda: _f2("args", tuple[str, ...]),
            ["'args'", "allowed: list[str] or list[bytes]"],
        ),
        (
            "mail",
            lambda: _f2("args", list[str, bytes]),  # type: ignore[misc]
            ["'args'", "allowed: list[str] or list[bytes]"],
        ),
        (
            "body",
            lambda: _f2("chunk", str),
            ["'chunk'", "annotated str", "allowed: bytes (body chunks are always bytes)"],
        ),
        (
            "body",
            lambda: _f2("chunk", memoryview),
            ["'chunk'", "annotated memoryview", "allowed: bytes"],
        ),
        (
            "negotiate",
            lambda: _f3("actions", int, "opts", ProtocolOpts, tuple[Status, Actions, ProtocolOpts]),
            ["'actions'", "annotated int", "allowed: Actions"],
        ),
        (
            "negotiate",
            lambda: _f3("actions", Actions, "opts", Actions, tuple[Status, Actions, ProtocolOpts]),
            ["'opts'", "annotated Actions", "allowed: ProtocolOpts"],
        ),
        (
            "connect",
            lambda: _f3("hostname", str, "address", SocketInfo, Status),
            ["'address'", "(address)", "annotated SocketInfo", "allowed: SocketInfo | None"],
        ),
        (
            "connect",
            lambda: _f3("hostname", str, "address", str, Status),
            ["'address'", "allowed: SocketInfo | None"],
        ),
        (
            "connect",
            lambda: _f3("hostname", str, "address", SocketInfo | str, Status),
            ["'address'", "allowed: SocketInfo | None"],
        ),
        (
            "connect",
            lambda: _f3("hostname", list[str], "address", SocketInfo | None, Status),
            ["'hostname'", "allowed: str or bytes"],
        ),
        (
            "header",
            lambda: _f3("name", str, "value", int, Status),
            ["'value'", "(value)", "annotated int", "allowed: str or bytes"],
        ),
        (
            "header",
            lambda: _f3("name", None, "value", str, Status),
            ["'name'", "allowed: str or bytes"],
        ),
    ],
)
def test_wrong_parameter_types(
    stage: str, make: Callable[[], Callable[..., Any]], fragments: list[str]
) -> None:
    rejects(stage, make(), *fragments)


def _f2(name: str, annotation: object, returns: object = Status) -> Callable[..., Any]:
    """A handler ``(ctx: Context[None], <name>: <annotation>) -> returns``."""

    def handler(ctx: Any, arg: Any) -> Any:
        return Status.CONTINUE

    handler.__signature__ = _signature(("ctx", Context[None]), (name, annotation), returns=returns)  # type: ignore[attr-defined]
    handler.__qualname__ = f"handler_{name}"
    return handler


def _f3(
    name1: str, annotation1: object, name2: str, annotation2: object, returns: object
) -> Callable[..., Any]:
    def handler(ctx: Any, arg1: Any, arg2: Any) -> Any:
        return Status.CONTINUE

    handler.__signature__ = _signature(  # type: ignore[attr-defined]
        ("ctx", Context[None]), (name1, annotation1), (name2, annotation2), returns=returns
    )
    handler.__qualname__ = f"handler_{name1}_{name2}"
    return handler


def _signature(*params: tuple[str, object], returns: object) -> Any:
    import inspect

    return inspect.Signature(
        [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
            for name, annotation in params
        ],
        return_annotation=returns,
    )


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("negotiate", "expected 3: (ctx: Context[...], actions: Actions, opts: ProtocolOpts)"),
        ("connect", "expected 3: (ctx: Context[...], hostname: str, address: SocketInfo | None)"),
        ("helo", "expected 2: (ctx: Context[...], hostname: str)"),
        ("mail", "expected 2: (ctx: Context[...], args: list[str])"),
        ("header", "expected 3: (ctx: Context[...], name: str, value: str)"),
        ("body", "expected 2: (ctx: Context[...], chunk: bytes)"),
        ("unknown", "expected 2: (ctx: Context[...], command: str)"),
    ],
)
def test_too_few_parameters(stage: str, expected: str) -> None:
    async def handler(ctx: Context[None]) -> Status:
        return Status.CONTINUE

    rejects(stage, handler, "takes 1 parameter(s)", expected)


@pytest.mark.parametrize("stage", ["data", "eoh", "eom", "abort", "close"])
def test_too_many_parameters(stage: str) -> None:
    async def handler(ctx: Context[None], extra: str) -> Status:
        return Status.CONTINUE

    rejects(stage, handler, "takes 2 parameter(s), expected 1: (ctx: Context[...])")


def test_no_parameters_at_all() -> None:
    async def eom() -> Status:
        return Status.CONTINUE

    rejects("eom", eom, "takes 0 parameter(s)")


def test_keyword_only_and_var_args() -> None:
    async def kw(ctx: Context[None], *, hostname: str) -> Status:
        return Status.CONTINUE

    async def star(ctx: Context[None], *hostname: str) -> Status:
        return Status.CONTINUE

    async def stars(ctx: Context[None], **hostname: str) -> Status:
        return Status.CONTINUE

    async def eom_kwargs(ctx: Context[None], **extra: object) -> Status:
        return Status.CONTINUE

    for func in (kw, star, stars):
        rejects("helo", func, "'hostname'", "must be positional", "hostname: str")
    rejects("eom", eom_kwargs, "'extra'", "must be positional")


def test_defaults_do_not_hide_a_wrong_count() -> None:
    async def helo(ctx: Context[None], hostname: str, extra: str = "x") -> Status:
        return Status.CONTINUE

    rejects("helo", helo, "takes 3 parameter(s), expected 2")


# --- return annotations -------------------------------------------------------------------


@pytest.mark.parametrize(
    "returns",
    [bool, int, "Status", Ok[Status], Result[bool], Ok[Status] | None, Status | None],
    ids=["bool", "int", "string", "Ok", "Result-bool", "Ok-or-None", "optional"],
)
def test_wrong_return_annotation(returns: object) -> None:
    rejects(
        "helo",
        _f2("hostname", str, returns),
        "return annotation",
        "allowed: Status or Result[Status]",
    )


def test_missing_return_annotation() -> None:
    async def helo(ctx: Context[None], hostname: str):  # type: ignore[no-untyped-def]
        return Status.CONTINUE

    rejects("helo", helo, "return annotation is no annotation", "Status or Result[Status]")


def test_negotiate_return_annotation() -> None:
    async def negotiate(ctx: Context[None], actions: Actions, opts: ProtocolOpts) -> Status:
        return Status.CONTINUE

    rejects(
        "negotiate",
        negotiate,
        "return annotation is Status",
        "allowed: tuple[Status, Actions, ProtocolOpts] or "
        "Result[tuple[Status, Actions, ProtocolOpts]]",
    )


def test_none_only_where_a_stage_may_go_unanswered() -> None:
    async def close(ctx: Context[None]) -> None:
        pass

    assert on_close(close).stage is Stage.CLOSE
    assert on_abort(close).stage is Stage.ABORT
    assert on_data(close).returns is Returns.NONE
    rejects("eom", close, "return annotation is None", "end of message always answers")

    async def negotiate(ctx: Context[None], actions: Actions, opts: ProtocolOpts) -> None:
        pass

    rejects("negotiate", negotiate, "return annotation is None")


def test_unresolvable_annotation() -> None:
    async def helo(ctx: Context[None], hostname: NoSuchType) -> Status:  # type: ignore[name-defined]  # noqa: F821
        return Status.CONTINUE

    rejects("helo", helo, "cannot resolve an annotation", "NoSuchType")


# --- other misuse ------------------------------------------------------------------------------


def test_decorating_twice() -> None:
    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        return Status.CONTINUE

    with pytest.raises(TypeError, match=r"@on_helo handler .*helo\(\): is already an @on_helo"):
        on_helo(helo)
    with pytest.raises(TypeError, match=r"@on_unknown handler .*helo\(\): is already an @on_helo"):
        on_unknown(helo)


@pytest.mark.parametrize("value", [None, 42, "helo", Status.CONTINUE])
def test_not_a_function(value: object) -> None:
    with pytest.raises(TypeError, match="@on_helo needs a function"):
        on_helo(value)  # type: ignore[arg-type]


# --- accepted signatures ---------------------------------------------------------------------


def test_accepted_spellings() -> None:
    def connect1(ctx: Context[None], hostname: bytes, address: Optional[SocketInfo]) -> Status:  # noqa: UP045
        return Status.CONTINUE

    def connect2(
        ctx: Context[int],
        hostname: str,
        address: Union[SocketInfo, None],  # noqa: UP007
    ) -> Ok[Status] | Err:
        return Ok(Status.CONTINUE)

    def connect3(ctx: Context, hostname: str, address: SocketInfo | None) -> Result[Status]:
        return Ok(Status.CONTINUE)

    def negotiate(
        ctx: Context[None], a: Actions, o: ProtocolOpts, /
    ) -> Result[tuple[Status, Actions, ProtocolOpts]]:
        return Ok((Status.ALL_OPTS, a, o))

    assert on_connect(connect1).stage is Stage.CONNECT
    assert on_connect(connect2).stage is Stage.CONNECT
    assert on_connect(connect3).stage is Stage.CONNECT
    assert on_negotiate(negotiate).stage is Stage.NEGOTIATE


async def test_handlers_stay_directly_callable() -> None:
    @on_helo
    async def helo(ctx: Context[list[str]], hostname: str) -> Status:
        """Say hello."""
        assert ctx.data is not None
        ctx.data.append(hostname)
        return Status.REJECT if hostname == "spam" else Status.CONTINUE

    @on_mail
    def mail(ctx: Context[None], args: list[bytes]) -> Result[Status]:
        return Ok(Status.CONTINUE) if args else Err("no args")

    class FakeContext:
        def __init__(self) -> None:
            self.data: list[str] = []

    ctx: Any = FakeContext()
    assert isinstance(helo, Handler)
    assert await helo(ctx, "x") is Status.CONTINUE
    assert await helo(ctx, "spam") is Status.REJECT
    assert ctx.data == ["x", "spam"]
    assert mail(ctx, [b"<a@b>"]) == Ok(Status.CONTINUE)
    assert mail(ctx, []) == Err("no args")
    # The decorated object keeps the function's identity.
    assert helo.__name__ == "helo"
    assert helo.__doc__ == "Say hello."
    assert helo.__wrapped__ is helo.func
    assert helo.stage is Stage.HELO and helo.is_async and not mail.is_async
    assert "helo handler" in repr(helo)
    assert typing.get_type_hints(helo.func)["hostname"] is str
