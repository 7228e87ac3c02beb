"""triomilter under benchmark: a minimal add-header milter on the public API.

Written against the public names of SPEC §2 (``triomilter.Milter``,
``serve``, ``Context``, ``Status``, ``Actions``, ``SocketInfo`` and the
``on_*`` decorators), exactly as a user would write it.

Default (W1, W3, W4, W5): a handler for every stage the MTA sends, each
answering CONTINUE; end of message adds ``X-Bench: 1``.  With
``--eom-only`` (W2) only the end-of-message handler is registered, so the
framework negotiates NO_* for every other stage (SPEC §2.2).

usage: triomilter_bench.py [--host 127.0.0.1] --port PORT [--eom-only]
       triomilter_bench.py --unix PATH [--eom-only]

``--unix`` serves ``unix:PATH`` (Postfix ``unix:``, Sendmail ``local:``);
triomilter removes a stale socket file there itself, and PATH on exit.

The benchmark runner puts the repository root on PYTHONPATH, so this imports
the working tree's ``triomilter``.
"""

from __future__ import annotations

import argparse
import functools

import trio

import triomilter
from triomilter import Context, SocketInfo, Status


@triomilter.on_connect
async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
    return Status.CONTINUE


@triomilter.on_helo
async def helo(ctx: Context[None], hostname: str) -> Status:
    return Status.CONTINUE


@triomilter.on_mail
async def mail(ctx: Context[None], args: list[str]) -> Status:
    return Status.CONTINUE


@triomilter.on_rcpt
async def rcpt(ctx: Context[None], args: list[str]) -> Status:
    return Status.CONTINUE


@triomilter.on_data
async def data(ctx: Context[None]) -> Status:
    return Status.CONTINUE


@triomilter.on_header
async def header(ctx: Context[None], name: str, value: str) -> Status:
    return Status.CONTINUE


@triomilter.on_eoh
async def eoh(ctx: Context[None]) -> Status:
    return Status.CONTINUE


@triomilter.on_body
async def body(ctx: Context[None], chunk: bytes) -> Status:
    return Status.CONTINUE


@triomilter.on_eom
async def eom(ctx: Context[None]) -> Status:
    await ctx.api.add_header("X-Bench", "1")
    return Status.CONTINUE


@triomilter.on_abort
async def abort(ctx: Context[None]) -> Status:
    return Status.CONTINUE


@triomilter.on_close
async def close(ctx: Context[None]) -> Status:
    return Status.CONTINUE


EVERY_STAGE = [connect, helo, mail, rcpt, data, header, eoh, body, eom, abort, close]

every_stage_milter = triomilter.Milter(
    "bench", handlers=EVERY_STAGE, actions=triomilter.Actions.ADD_HEADER
)
eom_only_milter = triomilter.Milter(
    "bench-eom", handlers=[eom], actions=triomilter.Actions.ADD_HEADER
)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="listen on TCP HOST:PORT")
    where.add_argument("--unix", metavar="PATH", help="listen on a UNIX-domain socket at PATH")
    p.add_argument("--eom-only", action="store_true")
    p.add_argument(
        "--max-connections",
        type=int,
        default=20000,
        help="serve()'s cap on concurrent connections; the peers have none, and W5 holds 10,000",
    )
    p.add_argument(
        "--metrics", action="store_true", help="count everything in a triomilter.Metrics"
    )
    a = p.parse_args()
    milter = eom_only_milter if a.eom_only else every_stage_milter
    if a.unix:
        spec = f"unix:{a.unix}"
    else:
        spec = f"{'inet6' if ':' in a.host else 'inet'}:{a.port}@{a.host}"
    serve = functools.partial(triomilter.serve, max_connections=a.max_connections)
    if a.metrics:
        serve = functools.partial(serve, metrics=triomilter.Metrics())
    trio.run(serve, milter, spec)


if __name__ == "__main__":
    main()
