"""An async lookup: start a (slow) reputation lookup at connect, use it at end of message.

The lookup runs in the connection's nursery while the SMTP conversation goes
on; end of message waits for its result (with a deadline) and adds it as a
header. If the connection ends first, the lookup is cancelled with it.

The "reputation service" here is a local table with a delay, so the example
runs anywhere; replace ``lookup_reputation`` with a DNS or HTTP query.

Run it:   triomilter serve examples/async_lookup.py --socket inet:8897@127.0.0.1
"""

from __future__ import annotations

import attrs
import trio

from triomilter import (
    Actions,
    Context,
    Milter,
    SocketInfo,
    Status,
    on_connect,
    on_eom,
)

REPUTATION = {"127.0.0.1": "trusted (loopback)", "192.0.2.1": "listed: example blocklist"}
LOOKUP_DELAY = 0.05  # seconds: stands in for network latency
LOOKUP_DEADLINE = 5.0


@attrs.define
class Lookup:
    """A lookup in progress; ``done`` is set when ``result`` is known."""

    address: str
    result: str | None = None
    done: trio.Event = attrs.field(factory=trio.Event)


async def lookup_reputation(lookup: Lookup) -> None:
    await trio.sleep(LOOKUP_DELAY)
    lookup.result = REPUTATION.get(lookup.address, "unknown")
    lookup.done.set()


@on_connect
async def connect(ctx: Context[Lookup], hostname: str, address: SocketInfo | None) -> Status:
    ctx.data = Lookup(address.address if address else "unknown")
    ctx.connection_nursery.start_soon(lookup_reputation, ctx.data)
    return Status.CONTINUE


@on_eom
async def eom(ctx: Context[Lookup]) -> Status:
    lookup = ctx.data
    result = "not looked up"
    if lookup is not None:
        with trio.move_on_after(LOOKUP_DEADLINE):
            await lookup.done.wait()
        result = lookup.result or "timed out"
        # A blocklisted client could be rejected here instead.
    await ctx.api.add_header("X-Client-Reputation", result)
    return Status.CONTINUE


milter = Milter("async-lookup", handlers=[connect, eom], actions=Actions.ADD_HEADER)
