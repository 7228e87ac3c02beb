"""purepythonmilter peer: a minimal add-header milter on its public API.

purepythonmilter (asyncio) reads each hook's return annotation: a hook
annotated ``-> Continue`` gets a reply, ``-> None`` would be no-reply.  Every
stage is handled and answers ``Continue()``; end of message answers
``Continue`` carrying an ``AppendHeader`` manipulation (``X-Bench: 1``).  With
``--eom-only`` only the end-of-message hook is registered, so the library
negotiates NO_* for every other stage (W2).

usage: purepythonmilter_bench.py [--host 127.0.0.1] --port PORT [--eom-only]
       purepythonmilter_bench.py --unix PATH [--eom-only]

purepythonmilter 0.0.1 has no UNIX-socket API: ``run_server`` takes only
``host``/``port``, and its ``MilterServer.start_server`` unpacks the bound
address as ``(host, port)``.  Its connection handler is transport-neutral
(asyncio streams), so ``--unix`` binds ``asyncio.start_unix_server(PATH)``
itself and hands each connection to the library's own
``MilterServer.handle_connection``, with the milter's factory from the
private ``PurePythonMilter._get_factory()``: the same protocol code as on
TCP, only the listener differs.  asyncio removes a stale socket file at PATH
first; PATH is removed on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal

import purepythonmilter as ppm
from purepythonmilter.server.milterserver import MilterServer


async def on_connect(cmd: ppm.Connect) -> ppm.Continue:
    return ppm.Continue()


async def on_helo(cmd: ppm.Helo) -> ppm.Continue:
    return ppm.Continue()


async def on_mail_from(cmd: ppm.MailFrom) -> ppm.Continue:
    return ppm.Continue()


async def on_rcpt_to(cmd: ppm.RcptTo) -> ppm.Continue:
    return ppm.Continue()


async def on_data(cmd: ppm.Data) -> ppm.Continue:
    return ppm.Continue()


async def on_header(cmd: ppm.Header) -> ppm.Continue:
    return ppm.Continue()


async def on_end_of_headers(cmd: ppm.EndOfHeaders) -> ppm.Continue:
    return ppm.Continue()


async def on_body_chunk(cmd: ppm.BodyChunk) -> ppm.Continue:
    return ppm.Continue()


async def on_end_of_message(cmd: ppm.EndOfMessage) -> ppm.Continue:
    return ppm.Continue(manipulations=[ppm.AppendHeader(headername="X-Bench", headertext="1")])


async def on_abort(cmd: ppm.Abort) -> None:
    return None


async def on_quit(cmd: ppm.Quit) -> None:
    return None


def make_milter(eom_only: bool) -> ppm.PurePythonMilter:
    if eom_only:
        return ppm.PurePythonMilter(
            name="bench",
            hook_on_end_of_message=on_end_of_message,
            can_add_headers=True,
        )
    return ppm.PurePythonMilter(
        name="bench",
        hook_on_connect=on_connect,
        hook_on_helo=on_helo,
        hook_on_mail_from=on_mail_from,
        hook_on_rcpt_to=on_rcpt_to,
        hook_on_data=on_data,
        hook_on_header=on_header,
        hook_on_end_of_headers=on_end_of_headers,
        hook_on_body_chunk=on_body_chunk,
        hook_on_end_of_message=on_end_of_message,
        hook_on_abort=on_abort,
        hook_on_quit=on_quit,
        can_add_headers=True,
    )


async def serve_unix(milter: ppm.PurePythonMilter, path: str) -> None:
    """The library's start_server, with a UNIX listener (see the module docstring)."""
    server = MilterServer(app_factory=milter._get_factory())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    listener = await asyncio.start_unix_server(server.handle_connection, path)
    try:
        await stop.wait()
    finally:
        listener.close()
        await server.shutdown()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="listen on TCP HOST:PORT")
    where.add_argument(
        "--unix",
        metavar="PATH",
        help="listen on a UNIX-domain socket at PATH (through the library's connection "
        "handler: it has no UNIX-socket API)",
    )
    p.add_argument("--eom-only", action="store_true")
    a = p.parse_args()
    # Errors only, like a production deployment.  (purepythonmilter warns on
    # every message after the first on a connection: it never resets its
    # "manipulations sent" state, see the README's caveats.)
    logging.basicConfig(level=logging.ERROR)
    milter = make_milter(a.eom_only)
    if a.unix:
        asyncio.run(serve_unix(milter, a.unix))
    else:
        milter.run_server(host=a.host, port=a.port)


if __name__ == "__main__":
    main()
