"""What `triomilter tap` costs: milterload straight to a milter, then through the tap.

For each milter (the C no-op responder, the limit of the machine, and
triomilter's benchmark milter) and each concurrency, one tap process runs in
front of the milter for the whole run, and so does a bare Trio forwarder
(both directions, no decoding: the least any Python hop costs); the three
paths alternate (direct, bare, tap, direct...) so that all see the same
machine. The proxies' own CPU time per message (user + system, from /proc)
is the figure least disturbed by other load on the machine. The table
gives the median over the rounds: msg/s, p50 and p99 per message, and the
difference in p50 divided by the round trips of a message (the latency the
tap adds to each command that waits for a reply).

    .venv/bin/python benchmarks/tap_overhead.py             # noop and triomilter, c=1 and 10
    .venv/bin/python benchmarks/tap_overhead.py --milters noop --concurrency 1 --rounds 5

Run it with the project's Python (the tap and triomilter's milter run with
``sys.executable``: it needs triomilter's dependencies).

Needs benchmarks/.build (``benchmarks/setup.sh``): milterload and the no-op
responder. The tap writes its lines (text, or ``--tap-json``) to /dev/null
unless ``--tap-output FILE``: decoding and formatting are measured, the
terminal is not. Loopback only; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = Path(os.environ.get("BENCH_BUILD", HERE / ".build"))
MILTERLOAD = BUILD / "milterload" / "release" / "milterload"
NOOP = BUILD / "noop_responder"

# The least a Python (Trio) hop costs: forward both ways, decode nothing.
BARE_FORWARDER = """
import sys, trio
async def pump(a, b):
    try:
        while data := await a.receive_some(65536):
            await b.send_all(data)
        await b.send_eof()
    except trio.BrokenResourceError:
        pass
async def handle(mta):
    milter = await trio.open_tcp_stream("127.0.0.1", int(sys.argv[2]))
    async with mta, milter, trio.open_nursery() as nursery:
        nursery.start_soon(pump, mta, milter)
        nursery.start_soon(pump, milter, mta)
trio.run(trio.serve_tcp, handle, int(sys.argv[1]))
"""

# Round trips per message of the workload (every stage handled): MAIL, 2 RCPT,
# DATA, 10 headers, end of headers, 1 body chunk (10,000 bytes), end of message.
ROUND_TRIPS = 1 + 2 + 1 + 10 + 1 + 1 + 1


def free_ports(count: int) -> list[int]:
    """``count`` different ports that were free a moment ago (held together while chosen)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nothing listening on {port} (exit {proc.poll()})")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def running(
    argv: list[str], port: int, stdout: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=stdout or subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def milter_argv(name: str, port: int) -> list[str]:
    if name == "noop":
        return [str(NOOP), "--port", str(port)]
    script = str(HERE / "milters" / "triomilter_bench.py")
    return [sys.executable, script, "--port", str(port)]


def load(
    port: int, concurrency: int, duration: float, proc: subprocess.Popen[bytes] | None = None
) -> dict[str, float]:
    """One milterload run; with ``proc``, also its CPU time per message (µs)."""
    before = cpu_seconds(proc.pid) if proc is not None else 0.0
    argv = [
        str(MILTERLOAD),
        "-c",
        str(concurrency),
        "-d",
        str(duration),
        "--protocol-flags",
        "0x1fffff",
        "--expect-header",
        "X-Bench",
        f"127.0.0.1:{port}",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if done.returncode != 0 or result.get("errors"):
        raise RuntimeError(f"milterload failed: {done.stdout} {done.stderr}")
    figures = {key: float(result[key]) for key in ("msgs_per_sec", "p50_ms", "p99_ms")}
    if proc is not None:
        figures["cpu_us_per_msg"] = (cpu_seconds(proc.pid) - before) / result["messages"] * 1e6
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--milters", default="noop,triomilter")
    parser.add_argument("--concurrency", default="1,10")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tap-json", action="store_true", help="the tap writes JSON lines")
    parser.add_argument("--tap-output", default=os.devnull, help="where the tap writes")
    args = parser.parse_args()
    for tool in (MILTERLOAD, NOOP):
        if not tool.exists():
            sys.exit(f"{tool} is missing: run benchmarks/setup.sh")
    rows = []
    for milter in args.milters.split(","):
        milter_port, tap_port, bare_port = free_ports(3)
        tap = [sys.executable, "-m", "triomilter", "tap", "--listen", f"inet:{tap_port}@127.0.0.1"]
        tap += ["--milter", f"inet:{milter_port}@127.0.0.1", "--log-level", "WARNING"]
        tap += ["--json"] if args.tap_json else []
        bare = [sys.executable, "-c", BARE_FORWARDER, str(bare_port), str(milter_port)]
        ports = {"direct": milter_port, "bare": bare_port, "tap": tap_port}
        with (
            open(args.tap_output, "wb") as out,
            running(milter_argv(milter, milter_port), milter_port),
            running(bare, bare_port) as bare_proc,
            running(tap, tap_port, out.fileno()) as tap_proc,
        ):
            procs = {"direct": None, "bare": bare_proc, "tap": tap_proc}
            for concurrency in map(int, args.concurrency.split(",")):
                for port in ports.values():
                    load(port, concurrency, 1.0)  # warm-up
                results: dict[str, list[dict[str, float]]] = {path: [] for path in ports}
                for _ in range(args.rounds):
                    for path, port in ports.items():
                        results[path].append(load(port, concurrency, args.duration, procs[path]))
                medians = {
                    path: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                    for path, runs in results.items()
                }
                rows.append((milter, concurrency, medians, results))
    print(
        "| milter | conc. | path | msg/s | p50 ms | p99 ms | p50 added per round trip "
        "| proxy CPU per msg |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for milter, concurrency, medians, _ in rows:
        for path in ports:
            m = medians[path]
            added = (m["p50_ms"] - medians["direct"]["p50_ms"]) / ROUND_TRIPS * 1000
            extra = f"{added:.0f} µs" if path != "direct" else ""
            cpu = f"{m['cpu_us_per_msg']:.0f} µs" if "cpu_us_per_msg" in m else ""
            print(
                f"| {milter} | {concurrency} | {path} | {m['msgs_per_sec']:.0f} | "
                f"{m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {extra} | {cpu} |"
            )
    print()
    print(json.dumps([r[3] for r in rows]))


if __name__ == "__main__":
    main()
