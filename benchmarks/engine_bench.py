"""Micro-benchmark of the sans-IO protocol engine in the milter role.

Measures the microseconds `MilterConnection` needs to decode every command of
one mail transaction as Postfix sends it and to encode the milter's replies:

- commands: CONNECT, HELO, MAIL, 2 x RCPT, DATA, 10 headers, EOH, one 10 kB
  body chunk, EOM, ABORT, each preceded by Postfix's macro packet (``D``,
  with Postfix's default macro lists; empty where Postfix has no value);
- replies: CONTINUE to each, AddHeader + CONTINUE at end of message;
- bytes are pre-encoded and fed as the MTA would send them: one
  ``receive_data`` per round trip (the ``D`` and its command together), then
  ``next_event`` until ``NEED_DATA``.

Two modes:

- ``fresh``: a new connection per transaction, negotiated (``O``) each time,
  then CONNECT, HELO and the message;
- ``reuse``: one negotiated, connected connection carrying message after
  message (MAIL ... EOM, ABORT per iteration), as Postfix does within one SMTP
  session.

usage: python benchmarks/engine_bench.py [--runs N] [--iterations M]
                                          [--clock wall|cpu] [--profile]

Prints the median and the best of N runs (each the mean over M transactions),
in microseconds per transaction. ``--profile`` runs both modes under cProfile
and prints the top functions by own time instead.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable

from triomilter.protocol import (
    ABORT,
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    CONTINUE,
    DATA,
    END_OF_HEADERS,
    Actions,
    AddHeader,
    AddressFamily,
    Body,
    Connect,
    DefineMacros,
    EndOfMessage,
    Header,
    Helo,
    Mail,
    MilterConnection,
    NeedData,
    OptionNegotiation,
    ProtocolOpts,
    Rcpt,
    negotiate,
)

OFFER = OptionNegotiation(6, ALL_ACTIONS, ALL_PROTOCOL_OPTS).encode()
QID = b"4ABC123DEF"
ADD_HEADER = AddHeader(b"X-Bench", b"1")


def D(stage: str, *pairs: tuple[bytes, bytes]) -> bytes:
    return DefineMacros(ord(stage), pairs).encode()


def connection_rounds() -> list[bytes]:
    """CONNECT and HELO rounds, each with Postfix's macro packet."""
    return [
        D(
            "C",
            (b"j", b"mx.example.org"),
            (b"{daemon_name}", b"mx.example.org"),
            (b"{daemon_addr}", b"192.0.2.25"),
            (b"v", b"Postfix 3.12.0"),
            (b"_", b"client.example [192.0.2.1]"),
        )
        + Connect(b"client.example", AddressFamily.INET, 49152, b"192.0.2.1").encode(),
        D("H") + Helo(b"client.example").encode(),
    ]


def message_rounds() -> list[bytes]:
    """One message's rounds: MAIL ... EOM (each with its D packet), then ABORT."""
    rcpt = ((b"{rcpt_host}", b"example.org"), (b"{rcpt_mailer}", b"smtp"))
    rounds = [
        D(
            "M",
            (b"{mail_addr}", b"sender@example.net"),
            (b"{mail_host}", b"example.net"),
            (b"{mail_mailer}", b"smtp"),
        )
        + Mail((b"<sender@example.net>", b"SIZE=10240", b"BODY=8BITMIME")).encode(),
        D("R", (b"{rcpt_addr}", b"alice@example.org"), *rcpt)
        + Rcpt((b"<alice@example.org>",)).encode(),
        D("R", (b"i", QID), (b"{rcpt_addr}", b"bob@example.org"), *rcpt)
        + Rcpt((b"<bob@example.org>",)).encode(),
        D("T", (b"i", QID)) + DATA.encode(),
    ]
    headers = [
        (b"Received", b"from client.example (client.example [192.0.2.1])\n\tby mx"),
        (b"From", b"Sender <sender@example.net>"),
        (b"To", b"alice@example.org, bob@example.org"),
        (b"Subject", b"benchmark message"),
        (b"Date", b"Thu, 26 Nov 2026 14:00:00 +0000"),
        (b"Message-ID", b"<bench.1@example.net>"),
        (b"MIME-Version", b"1.0"),
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Transfer-Encoding", b"8bit"),
        (b"X-Mailer", b"engine_bench"),
    ]
    rounds += [D("L", (b"i", QID)) + Header(n, v).encode() for n, v in headers]
    body = (b"The quick brown fox jumps over the lazy dog. 0123456789\r\n" * 180)[:10240]
    rounds += [
        D("N", (b"i", QID)) + END_OF_HEADERS.encode(),
        D("B", (b"i", QID)) + Body(body).encode(),
        D("E", (b"i", QID)) + EndOfMessage().encode(),
        ABORT.encode(),  # Postfix sends A after every message
    ]
    return rounds


CONNECTION_ROUNDS = connection_rounds()
MESSAGE_ROUNDS = message_rounds()
EOM = ord("E")
OPTNEG = ord("O")


def serve(conn: MilterConnection, rounds: list[bytes], out: list[bytes]) -> int:
    """Feed ``rounds`` one at a time, answering like a milter; return the event count."""
    count = 0
    receive = conn.receive_data
    next_event = conn.next_event
    send = conn.send
    for data in rounds:
        receive(data)
        while not isinstance(event := next_event(), NeedData):
            count += 1
            owed = conn.owed
            if owed is None:
                continue
            if owed == EOM:
                out.append(send(ADD_HEADER))
                out.append(send(CONTINUE))
            elif owed == OPTNEG:
                assert isinstance(event, OptionNegotiation)
                out.append(
                    conn.accept_negotiation(negotiate(event, Actions.ADD_HEADER, ProtocolOpts.NONE))
                )
            else:
                out.append(send(CONTINUE))
    return count


FRESH_ROUNDS = [OFFER, *CONNECTION_ROUNDS, *MESSAGE_ROUNDS]


def fresh(iterations: int) -> None:
    out: list[bytes] = []
    for _ in range(iterations):
        serve(MilterConnection(), FRESH_ROUNDS, out)
        out.clear()


def reuse_factory() -> Callable[[int], None]:
    conn = MilterConnection()
    serve(conn, [OFFER, *CONNECTION_ROUNDS], [])

    def reuse(iterations: int) -> None:
        out: list[bytes] = []
        for _ in range(iterations):
            serve(conn, MESSAGE_ROUNDS, out)
            out.clear()

    return reuse


def check() -> None:
    """Make sure the benchmark does what it says before timing it."""
    out: list[bytes] = []
    conn = MilterConnection()
    events = serve(conn, FRESH_ROUNDS, out)
    # O C H M R R T L*10 N B E; the A after EOM ends nothing (no event).
    assert events == 3 + 4 + 10 + 3, events
    assert conn.owed is None and not conn.in_message
    assert conn.macros.get(b"j") == b"mx.example.org"
    continues = out[1:]
    assert continues.count(CONTINUE.encode()) == 2 + 4 + 10 + 2 + 1
    assert ADD_HEADER.encode() in continues
    reuse = reuse_factory()
    reuse(3)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(
    fn: Callable[[int], None], iterations: int, runs: int, clock: Callable[[], float]
) -> list[float]:
    """Microseconds per transaction of each run."""
    fn(max(1, iterations // 10))  # warm up
    results = []
    for _ in range(runs):
        start = clock()
        fn(iterations)
        results.append((clock() - start) / iterations * 1e6)
    return results


def profile(iterations: int, top: int) -> None:
    reuse = reuse_factory()
    for name, fn in (("fresh", fresh), ("reuse", reuse)):
        profiler = cProfile.Profile()
        profiler.enable()
        fn(iterations)
        profiler.disable()
        print(f"\n=== {name}: {iterations} transactions, top {top} by own time ===")
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="timed runs per mode (default 9)")
    parser.add_argument(
        "--iterations", type=int, default=2000, help="transactions per run (default 2000)"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall (perf_counter) or cpu (process_time: steadier on a loaded machine)",
    )
    parser.add_argument("--profile", action="store_true", help="print a cProfile summary")
    parser.add_argument("--top", type=int, default=20, help="functions shown by --profile")
    args = parser.parse_args()

    check()
    total = sum(map(len, FRESH_ROUNDS))
    print(
        f"transaction: {len(FRESH_ROUNDS)} rounds, {total} bytes (fresh, with O, C, H); "
        f"{len(MESSAGE_ROUNDS)} rounds, {sum(map(len, MESSAGE_ROUNDS))} bytes (reuse)"
    )
    print(f"python {sys.version.split()[0]}")
    if args.profile:
        profile(args.iterations, args.top)
        return
    for name, fn in (("fresh", fresh), ("reuse", reuse_factory())):
        results = measure(fn, args.iterations, args.runs, CLOCKS[args.clock])
        print(
            f"{name:>5}: median {statistics.median(results):7.1f} us/transaction, "
            f"best {min(results):7.1f} us  ({args.runs} runs x {args.iterations}, "
            f"{args.clock} clock)"
        )


if __name__ == "__main__":
    main()
