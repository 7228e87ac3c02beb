"""Memory stays bounded whatever a peer sends (hardening finding 4)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from ._support import TIMEOUT, Spawner, free_port

CONNECTIONS = 100_000
AT_ONCE = 20


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")  # pragma: no cover


async def negotiate_randomly(port: int, count: int, seed: int) -> None:
    """``count`` connections, each one OPTNEG with random actions and protocol words.

    Mostly words of defined bits only (the combinations enum would cache),
    some with undefined bits too.
    """
    rng = random.Random(seed)

    async def one() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            if rng.random() < 0.9:
                actions, opts = rng.getrandbits(9), rng.getrandbits(21) | rng.getrandbits(2) << 28
            else:
                actions, opts = rng.getrandbits(32), rng.getrandbits(32)
            words = struct.pack(">III", 6, actions, opts)
            await stream.send_all(struct.pack(">I", 13) + b"O" + words)
            await stream.receive_some(4096)  # the reply, or EOF when refused
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    async def worker(n: int) -> None:
        for _ in range(n):
            with trio.fail_after(TIMEOUT):
                await one()

    async with trio.open_nursery() as nursery:
        for _ in range(AT_ONCE):
            nursery.start_soon(worker, count // AT_ONCE)


@pytest.mark.slow
async def test_random_negotiation_words_do_not_grow_memory(spawn: Spawner) -> None:
    """100,000 negotiations with random words: the enum caches stay bounded.

    Every new combination of actions/protocol bits used to become a cached
    IntFlag member for the life of the process.
    """
    port = free_port()
    proc = spawn(
        "-m",
        "triomilter",
        "serve",
        "tests/server/sample_milters.py",
        "--socket",
        f"inet:{port}@127.0.0.1",
        "--log-level",
        "CRITICAL",
    )
    await proc.wait_for_output("", 0)
    await trio.lowlevel.checkpoint()  # started: wait for the port below
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                break
            except OSError:
                await trio.sleep(0.05)
    await negotiate_randomly(port, 5_000, seed=1)  # warm up: allocator, caches, code
    before = rss_kib(proc.pid)
    with trio.fail_after(600):
        await negotiate_randomly(port, CONNECTIONS, seed=2)
    growth = rss_kib(proc.pid) - before
    assert growth < 4 * 1024, f"RSS grew {growth} KiB over {CONNECTIONS} negotiations"
