"""Numbers the messages of each connection (``X-Message-Number: N``) and names the client.

With several messages, ``triomilter check`` must run them all on one
connection: 1, 2, 3... (a new connection would start again at 1).
"""

from __future__ import annotations

import attrs

from triomilter import Actions, Context, Milter, SocketInfo, Status, on_connect, on_eom


@attrs.define
class Connection:
    messages: int = 0
    client: str = ""


@on_connect
async def connect(ctx: Context[Connection], hostname: str, address: SocketInfo | None) -> Status:
    where = "unknown" if address is None else f"{address.address}:{address.port}"
    ctx.connection_data.client = f"{hostname} {where}"
    return Status.CONTINUE


@on_eom
async def eom(ctx: Context[Connection]) -> Status:
    connection = ctx.connection_data
    connection.messages += 1
    await ctx.api.add_header("X-Message-Number", str(connection.messages))
    await ctx.api.add_header("X-Client", connection.client)
    return Status.CONTINUE


milter = Milter(
    "counting", handlers=[connect, eom], actions=Actions.ADD_HEADER, connection_data=Connection
)
