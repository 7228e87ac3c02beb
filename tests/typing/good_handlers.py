"""Correct handlers: ``mypy --strict`` must accept every one (tests/typing/test_typing.py)."""

from __future__ import annotations

from typing import assert_type

from triomilter import (
    Actions,
    Context,
    Err,
    MacroStage,
    Milter,
    Ok,
    ProtocolOpts,
    Result,
    SocketInfo,
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


@on_negotiate
async def negotiate(
    ctx: Context[list[str]], actions: Actions, opts: ProtocolOpts
) -> tuple[Status, Actions, ProtocolOpts]:
    ctx.api.request_macros(MacroStage.MAIL, "{auth_authen}")
    return Status.CONTINUE, Actions.ADD_HEADER, ProtocolOpts.NONE


@on_connect
async def connect(ctx: Context[list[str]], hostname: str, address: SocketInfo | None) -> Status:
    ctx.data = [hostname, address.address if address else ""]
    return Status.CONTINUE


@on_helo
def helo(ctx: Context[list[str]], hostname: bytes) -> Status:  # plain def, raw bytes
    return Status.CONTINUE


@on_mail
async def mail(ctx: Context[list[str]], args: list[str]) -> Result[Status]:
    if not args:
        return Err("no sender")
    return Ok(Status.CONTINUE)


@on_rcpt
async def rcpt(ctx: Context[list[str]], args: list[bytes]) -> Status:
    return Status.CONTINUE


@on_data
async def data(ctx: Context[list[str]]) -> Status:
    return Status.CONTINUE


@on_header
async def header(ctx: Context[list[str]], name: str, value: bytes) -> Status:
    return Status.CONTINUE


@on_eoh
async def eoh(ctx: Context[list[str]]) -> Status:
    return Status.CONTINUE


@on_body
async def body(ctx: Context[list[str]], chunk: bytes) -> Status:
    return Status.SKIP


@on_eom
async def eom(ctx: Context[list[str]]) -> Result[Status]:
    await ctx.api.add_header("X-Seen", "yes")
    return Ok(Status.CONTINUE)


@on_abort
async def abort(ctx: Context[list[str]]) -> None:
    pass


@on_close
def close(ctx: Context[list[str]]) -> Status:
    return Status.CONTINUE


@on_unknown
async def unknown(ctx: Context[list[str]], command: str) -> Status:
    return Status.REJECT


milter = Milter(
    "good",
    handlers=[
        negotiate,
        connect,
        helo,
        mail,
        rcpt,
        data,
        header,
        eoh,
        body,
        eom,
        abort,
        close,
        unknown,
    ],
    actions=Actions.ADD_HEADER,
)


async def call_directly(ctx: Context[list[str]]) -> Status:
    """Decorated handlers stay callable, with their types."""
    status: Status = await connect(ctx, "mx.example", None)
    return status


# --- typed per-connection and per-message data (factories) ------------------------------


class Client:
    def __init__(self) -> None:
        self.hostname = ""


class Message:
    def __init__(self) -> None:
        self.recipients: list[str] = []


@on_connect
async def data_connect(
    ctx: Context[Client, Message], hostname: str, address: SocketInfo | None
) -> None:  # -> None: never answers (NOREPLY)
    ctx.connection_data.hostname = hostname  # Client, not Client | None


@on_rcpt
async def data_rcpt(ctx: Context[Client, Message], args: list[bytes]) -> Status:
    ctx.message_data.recipients.append(args[0].decode())  # Message, not Message | None
    return Status.CONTINUE


@on_header
async def data_header(ctx: Context[Client, Message], name: str, value: bytes) -> None:
    pass


@on_eom
async def data_eom(ctx: Context[Client, Message]) -> Result[Status]:
    count = len(ctx.message_data.recipients)
    await ctx.api.add_header("X-Recipients", f"{count} from {ctx.connection_data.hostname}")
    return Ok(Status.CONTINUE)


typed = Milter(
    "typed",
    handlers=[data_connect, data_rcpt, data_header, data_eom],
    actions=Actions.ADD_HEADER,
    connection_data=Client,
    message_data=Message,
)
assert_type(typed, Milter[Client, Message])

untyped_data = Milter("no-factories", handlers=[connect, eom])  # data set by hand, as before
assert_type(untyped_data, Milter[list[str], None])
