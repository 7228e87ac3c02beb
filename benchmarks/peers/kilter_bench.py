"""kilter-service peer: a minimal add-header filter on its public API, on trio.

kilter.service runs one coroutine per connection (per message after an
abort) that awaits the stages it wants; the Runner answers each stage with
CONTINUE while the filter keeps running, and the filter's return value is the
final verdict.  The W1 filter asks to examine, and to be able to respond at,
every stage (connect, HELO, MAIL, RCPT, DATA, headers, end of headers, body),
consumes all of them, then adds ``X-Bench: 1`` at end of message and returns
``Accept()``.  With ``--eom-only`` the filter examines nothing, so the Runner
negotiates NO_*/NR_* for every optional stage (W2).

usage: kilter_bench.py [--host 127.0.0.1] --port PORT [--eom-only]
       kilter_bench.py --unix PATH [--eom-only]

The Runner serves any anyio byte stream, so ``--unix`` serves it on
``anyio.create_unix_listener(PATH)``, which removes a stale socket file first.
"""

from __future__ import annotations

import argparse
import logging
from functools import partial

import anyio
from kilter.protocol import Accept, ActionFlags, Header
from kilter.service import END, Runner, Session
from kilter.service.options import (
    examine_body,
    examine_headers,
    examine_helo,
    examine_recipients,
    examine_sender,
    modify_flags,
    responds_to_connect,
)


@responds_to_connect()
@examine_helo(can_respond=True)
@examine_sender(can_respond=True)
@examine_recipients(can_respond=True)
@examine_headers(can_respond=True, can_add=True)
@examine_body(can_respond=True)
async def every_stage(session: Session) -> Accept:
    await session.helo()
    await session.envelope_from()
    async for _ in session.envelope_recipients():
        pass
    async with session.headers as headers:
        async for _ in headers:
            pass
    async with session.body as body:
        async for _ in body:
            pass
    await session.headers.insert(Header("X-Bench", b"1"), END)
    return Accept()


@modify_flags(set_actions=ActionFlags.ADD_HEADERS)
async def eom_only(session: Session) -> Accept:
    await session.headers.insert(Header("X-Bench", b"1"), END)
    return Accept()


async def serve(host: str, port: int | None, unix: str | None, eom: bool) -> None:
    if unix:
        listener = await anyio.create_unix_listener(unix)
    else:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    await listener.serve(Runner(eom_only if eom else every_stage))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="listen on TCP HOST:PORT")
    where.add_argument("--unix", metavar="PATH", help="listen on a UNIX-domain socket at PATH")
    p.add_argument("--eom-only", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    anyio.run(partial(serve, a.host, a.port, a.unix, a.eom_only), backend="trio")


if __name__ == "__main__":
    main()
