"""Wrong handlers: each marked line must get the mypy error code named in its comment."""

from __future__ import annotations

from triomilter import Context, Milter, Result, SocketInfo, Status, on_body, on_connect
from triomilter import on_eom, on_header, on_helo, on_mail


@on_helo  # E: type-var
async def helo_wrong_param(ctx: Context[None], hostname: int) -> Status:
    return Status.CONTINUE


@on_helo  # E: type-var
async def helo_wrong_return(ctx: Context[None], hostname: str) -> int:
    return 1


@on_helo  # E: arg-type
async def helo_no_context(hostname: str) -> Status:
    return Status.CONTINUE


@on_body  # E: arg-type
async def body_as_text(ctx: Context[None], chunk: str) -> Status:
    return Status.CONTINUE


@on_connect  # E: arg-type
async def connect_address_not_optional(
    ctx: Context[None], hostname: str, address: SocketInfo
) -> Status:
    return Status.CONTINUE


@on_eom  # E: type-var
async def eom_returns_none(ctx: Context[None]) -> None:
    pass


@on_mail  # E: type-var
async def mail_list_of_int(ctx: Context[None], args: list[int]) -> Status:
    return Status.CONTINUE


@on_header  # E: arg-type
async def header_missing_value(ctx: Context[None], name: str) -> Result[Status]:
    raise NotImplementedError


@on_eom  # E: type-var
async def eom_returns_result_of_str(ctx: Context[None]) -> Result[str]:
    raise NotImplementedError


Milter("bad", handlers=[print])  # E: list-item


class Client:
    pass


class Other:
    pass


@on_helo
async def client_helo(ctx: Context[Client], hostname: str) -> Status:
    return Status.CONTINUE


@on_helo
async def other_helo(ctx: Context[Other], hostname: str) -> None:
    pass


# A handler typed for another data type than the milter's factory makes.
Milter("mismatch", handlers=[client_helo], connection_data=Other)  # E: arg-type

# Handlers of one milter typed for different data than its factories make.
Milter("mixed", handlers=[client_helo, other_helo], connection_data=Client)  # E: list-item


@on_helo
async def no_message_data(ctx: Context[Client], hostname: str) -> Status:
    ctx.message_data.append(1)  # E: attr-defined
    return Status.CONTINUE


@on_helo
async def optional_data(ctx: Context[Client], hostname: str) -> Status:
    ctx.data.hostname = hostname  # E: union-attr
    return Status.CONTINUE
