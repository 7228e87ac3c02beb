"""Micro-benchmark of the framework's per-command path, without sockets.

One milter connection (the benchmark milter of ``milters/triomilter_bench.py``:
a handler for every stage, end of message adds a header) is served over a
stream that replays the rounds of ``engine_bench.py`` (Postfix's traffic for
one message: MAIL, 2 RCPT, DATA, 10 headers, EOH, a 10 kB body, EOM, ABORT,
each with its macro packet) as fast as the session asks for them, and
swallows the replies. What is measured is everything triomilter does per
message above the socket: engine, dispatch, handler calls, replies.

usage: python benchmarks/session_bench.py [--runs N] [--messages M] [--profile]

Prints the median and best of N runs, in microseconds of CPU per message.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "milters")]

import engine_bench  # noqa: E402
import triomilter_bench  # noqa: E402

from triomilter import Milter  # noqa: E402


class Replay(trio.abc.Stream):
    """Serves pre-encoded rounds as fast as they are read; counts what is written."""

    def __init__(self, rounds: list[bytes]) -> None:
        self.rounds = rounds
        self.next = 0
        self.written = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.next == len(self.rounds):
            return b""
        data = self.rounds[self.next]
        self.next += 1
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _serve_connection() -> object:
    try:
        from triomilter._session import serve_connection

        return serve_connection
    except ImportError:  # before the redesign: compare with the old tree
        from triomilter._dispatch import handle_connection

        return handle_connection


def build_milter() -> Milter:  # type: ignore[type-arg]
    return triomilter_bench.every_stage_milter


async def one_run(milter: Milter, messages: int, metrics: bool = False) -> float:  # type: ignore[type-arg]
    rounds = [
        engine_bench.OFFER,
        *engine_bench.CONNECTION_ROUNDS,
        *engine_bench.MESSAGE_ROUNDS * messages,
    ]
    stream = Replay(rounds)
    serve = _serve_connection()
    start = time.process_time()
    if metrics:
        from triomilter import Metrics
        from triomilter._session import ServerState

        await serve(milter, stream, ServerState(metrics=Metrics()))  # type: ignore[operator]
    else:
        await serve(milter, stream)  # type: ignore[operator]
    elapsed = time.process_time() - start
    assert stream.next == len(rounds), "the session stopped early"
    return elapsed / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--metrics", action="store_true", help="count in a triomilter.Metrics")
    args = parser.parse_args()
    milter = build_milter()
    trio.run(one_run, milter, 200)  # warm up
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        trio.run(one_run, milter, args.messages, args.metrics)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
        return
    results = [trio.run(one_run, milter, args.messages, args.metrics) for _ in range(args.runs)]
    print(
        f"per message: median {statistics.median(results):6.1f} us CPU, "
        f"best {min(results):6.1f} us ({args.runs} runs x {args.messages} messages)"
    )


if __name__ == "__main__":
    main()
