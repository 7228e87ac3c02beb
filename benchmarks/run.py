#!/usr/bin/env python3
"""Run the triomilter benchmarks against its peers and write a Markdown table.

One command (stdlib only, Python >= 3.11):

    python3 benchmarks/run.py            # everything, about 16 minutes
    python3 benchmarks/run.py --quick    # a few seconds per cell, about 5 minutes

For every (workload, milter) cell it starts a fresh milter process pinned to
CPU 1 (on a free port of 127.0.0.1, or for the W*u workloads on a UNIX socket
in a new directory under /tmp), waits until it listens without connecting,
warms it up briefly, then drives it with milterload (or, for W5, the
idle-connection client) pinned to CPU 0.  It samples the milter's CPU time
(/proc/PID/stat utime+stime) around the measured run and its peak RSS
(VmHWM), stops it, and finally writes
``benchmarks/results/<timestamp>.md`` and ``.json``.  See benchmarks/README.md.

Every load loop is bounded: milterload runs for --duration seconds with a
per-reply timeout, each subprocess has a hard timeout, and the whole run has a
time budget (--max-minutes) after which the remaining cells are skipped.
Traffic goes to 127.0.0.1 or to UNIX sockets under /tmp only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = HERE / ".build"
VENV_PY = HERE / ".venv-peers" / "bin" / "python"
MILTERLOAD = BUILD / "milterload" / "release" / "milterload"
NOOP = BUILD / "noop_responder"
HOST = "127.0.0.1"
UNIX_DIR = "/tmp"  # short: a UNIX socket path has at most 107 bytes
MILTER_CPU = "1"
LOAD_CPU = "0"
NICE: list[str] = []  # ["nice", "-n", "-10"] when --nice is given and allowed

# What real MTAs offer (protocol.md §4.1): version 6, all actions, all options.
OFFER = ["--protocol-flags", "0x1fffff", "--actions", "0x1ff"]

# SMFIP_* bits that make the MTA skip, or not wait for, a stage milterload
# sends (C H M R T L N B).  Unknown ('U') is never sent, so NOUNKNOWN and
# NR_UNKN are fine for "every stage handled".
STAGE_OPT_OUT = (
    0x1
    | 0x2
    | 0x4
    | 0x8
    | 0x10
    | 0x20
    | 0x40
    | 0x200  # NO_*
    | 0x80
    | 0x1000
    | 0x2000
    | 0x4000
    | 0x8000
    | 0x10000
    | 0x40000
    | 0x80000  # NR_*
)


# ---------------------------------------------------------------- milters


@dataclasses.dataclass(frozen=True)
class MilterSpec:
    name: str
    argv: tuple[str, ...]
    description: str
    python: bool = True  # needs the peers venv
    triomilter: bool = False  # needs the repository on PYTHONPATH


MILTERS: dict[str, MilterSpec] = {
    m.name: m
    for m in [
        MilterSpec(
            "noop",
            (str(NOOP),),
            "C no-op responder (no parsing): the limit of the machine",
            python=False,
        ),
        MilterSpec(
            "triomilter",
            (str(VENV_PY), str(HERE / "milters" / "triomilter_bench.py")),
            "triomilter (this repository's working tree)",
            triomilter=True,
        ),
        MilterSpec(
            "triomilter-metrics",
            (str(VENV_PY), str(HERE / "milters" / "triomilter_bench.py"), "--metrics"),
            "triomilter counting everything in a triomilter.Metrics (what --metrics costs)",
            triomilter=True,
        ),
        MilterSpec(
            "python-floor",
            (str(VENV_PY), str(HERE / "peers" / "python_floor.py")),
            "the no-op responder's logic in plain Python on epoll: the floor of a Python milter",
        ),
        MilterSpec(
            "python-floor-trio",
            (str(VENV_PY), str(HERE / "peers" / "python_floor.py"), "--trio"),
            "the same loop as Trio tasks: the floor of a milter on Trio",
        ),
        MilterSpec(
            "pymilter",
            (str(VENV_PY), str(HERE / "peers" / "pymilter_bench.py")),
            "pymilter (libmilter, thread per connection)",
        ),
        MilterSpec(
            "purepythonmilter",
            (str(VENV_PY), str(HERE / "peers" / "purepythonmilter_bench.py")),
            "purepythonmilter (asyncio)",
        ),
        MilterSpec(
            "kilter-service",
            (str(VENV_PY), str(HERE / "peers" / "kilter_bench.py")),
            "kilter-service (anyio on trio)",
        ),
    ]
}


# ---------------------------------------------------------------- workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    title: str
    concurrency: int = 10
    eom_only: bool = False
    reconnect: bool = False
    quickack: bool = False
    body_bytes: int = 10000
    idle: bool = False  # W5
    unix: bool = False  # over a UNIX-domain socket instead of loopback TCP

    @property
    def tcp_twin(self) -> str | None:
        """The TCP workload this UNIX one repeats (W1u-10 -> W1-10)."""
        return self.key.replace("u-", "-", 1) if self.unix else None

    def load_args(self) -> list[str]:
        a = ["-c", str(self.concurrency), "--body-bytes", str(self.body_bytes), *OFFER]
        if self.reconnect:
            a.append("--reconnect")
        if self.quickack:
            a.append("--quickack")
        return a


WORKLOADS: dict[str, Workload] = {
    w.key: w
    for w in [
        Workload("W1-10", "W1: every stage, connections reused, 10 connections", 10),
        Workload("W1-100", "W1: every stage, connections reused, 100 connections", 100),
        Workload("W1-1000", "W1: every stage, connections reused, 1000 connections", 1000),
        Workload(
            "W1q-10",
            "W1 --quickack: as W1-10, generator ACKs partial replies at once",
            10,
            quickack=True,
        ),
        Workload(
            "W1q-100",
            "W1 --quickack: as W1-100, generator ACKs partial replies at once",
            100,
            quickack=True,
        ),
        Workload(
            "W1q-1000",
            "W1 --quickack: as W1-1000, generator ACKs partial replies at once",
            1000,
            quickack=True,
        ),
        Workload(
            "W2-10",
            "W2: only end of message handled (NO_* for the rest), 10 connections",
            10,
            eom_only=True,
        ),
        Workload(
            "W3-10",
            "W3: new connection per message (--reconnect), 10 at a time",
            10,
            reconnect=True,
        ),
        Workload("W4-10", "W4: 1 MB bodies, every stage, 10 connections", 10, body_bytes=1_000_000),
        Workload(
            "W1u-10",
            "W1u: as W1-10 over a UNIX socket: every stage, connections reused, 10 connections",
            10,
            unix=True,
        ),
        Workload(
            "W1u-100",
            "W1u: as W1-100 over a UNIX socket: every stage, connections reused, 100 connections",
            100,
            unix=True,
        ),
        Workload(
            "W3u-10",
            "W3u: as W3-10 over a UNIX socket: new connection per message, 10 at a time",
            10,
            reconnect=True,
            unix=True,
        ),
        Workload("W5", "W5: idle connections (negotiate + connect + helo, then hold)", idle=True),
    ]
}
DEFAULT_MILTERS = [m for m in MILTERS if not m.startswith("python-floor")]
"""The floors are references for the question "what bounds a Python milter": on request."""
DEFAULT_WORKLOADS = [
    *("W1-10", "W1-100", "W1-1000", "W1q-10", "W2-10", "W3-10", "W4-10"),
    *("W1u-10", "W1u-100", "W3u-10", "W5"),
]
QUICK_WORKLOADS = DEFAULT_WORKLOADS


# ---------------------------------------------------------------- /proc helpers

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of the whole process (all threads), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def machine_busy_s() -> float:
    """CPU seconds all CPUs have spent busy (not idle/iowait) since boot.

    Includes irq/softirq and steal: loopback TCP work done in softirq shows up
    in the sending/receiving processes' own times here (tick-based
    accounting), so it cancels out when their times are subtracted.
    """
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait (at most max_wait s) for a 1-second window in which the machine uses
    less than `threshold` of a core.  Returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_wait:
        b0 = machine_busy_s()
        time.sleep(1.0)
        if machine_busy_s() - b0 < threshold:
            break
    return time.monotonic() - t0


def listening(port: int) -> bool:
    """True once something listens on 127.0.0.1:port (no connection is made)."""
    want = f"{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and parts[1].rsplit(":", 1)[1] == want:
                return True
    return False


# /proc/net/unix: Num RefCount Protocol Flags Type St Inode [Path]
SO_ACCEPTCON = 0x10000  # Flags bit of a socket that listen() was called on
SOCK_STREAM_TYPE = 0x0001


def unix_listening(path: str) -> bool:
    """True once a stream socket listens at ``path`` (no connection is made).

    The socket file must exist and /proc/net/unix must list a socket bound to
    that path with __SO_ACCEPTCON set: bound but not yet listening does not count.
    """
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        parts = line.split(maxsplit=7)
        if (
            len(parts) == 8
            and parts[7] == path
            and int(parts[3], 16) & SO_ACCEPTCON
            and int(parts[4], 16) == SOCK_STREAM_TYPE
        ):
            return True
    return False


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE for us and every child (milters, generator, idle client)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (65536, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def last_line(path: Path) -> str:
    """The line of a log that says what went wrong: the last exception line if any."""
    lines = [ln.strip().lstrip("|+ ").strip() for ln in tail(path, 80, 200000).splitlines()]
    lines = [ln for ln in lines if ln and set(ln) - set("-+|^~ ")]
    for ln in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Group|Exit|Interrupt)\b", ln):
            return ln[:300]
    return lines[-1][:300] if lines else "(no output)"


def tail(path: Path, lines: int = 6, limit: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    out = "\n".join(text.strip().splitlines()[-lines:])
    return out[-limit:]


# ---------------------------------------------------------------- running


class MilterProcess:
    """One milter process, pinned to MILTER_CPU, in its own process group.

    It listens on a free port of 127.0.0.1 (``port``), or with ``unix=True`` on
    a UNIX socket (``unix_path``) in a directory of its own under /tmp, made
    here and removed by ``stop()``: no stale socket file can be in the way.
    ``target`` is the address for milterload either way.
    """

    def __init__(self, spec: MilterSpec, eom_only: bool, log: Path, *, unix: bool = False) -> None:
        self.spec = spec
        self.log = log
        self.port: int | None = None
        self.unix_path: str | None = None
        if unix:
            self.unix_path = os.path.join(
                tempfile.mkdtemp(prefix="triomilter-bench-", dir=UNIX_DIR), "milter.sock"
            )
            self.target = f"unix:{self.unix_path}"
            where = ["--unix", self.unix_path]
        else:
            self.port = free_port()
            self.target = f"{HOST}:{self.port}"
            where = ["--host", HOST, "--port", str(self.port)]
        argv = [*NICE, "taskset", "-c", MILTER_CPU, *spec.argv, *where]
        if eom_only:
            argv.append("--eom-only")
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if spec.triomilter:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.argv = argv
        self._logf = open(log, "wb")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid  # taskset execs the program: same pid

    def wait_listening(self, timeout: float) -> str | None:
        """None when listening, else why not."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return f"exited with status {self.proc.returncode} before listening: {last_line(self.log)}"
            if self.unix_path is not None:
                if unix_listening(self.unix_path):
                    return None
            elif listening(self.port):
                return None
            time.sleep(0.05)
        return f"not listening after {timeout:.0f} s"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=1.5)
            except subprocess.TimeoutExpired:
                # pymilter/libmilter waits ~5 s on SIGTERM; don't spend it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._logf.close()
        if self.unix_path is not None:
            shutil.rmtree(os.path.dirname(self.unix_path), ignore_errors=True)


def run_milterload(
    target: str, args: list[str], duration: float, timeout_s: float
) -> tuple[dict[str, Any] | None, str, int]:
    argv = [
        *NICE,
        "taskset",
        "-c",
        LOAD_CPU,
        str(MILTERLOAD),
        *args,
        "-d",
        f"{duration:g}",
        "--timeout",
        f"{timeout_s:g}",
        "--expect-header",
        "X-Bench",
        "--max-errors",
        "50",
        target,
    ]
    try:
        p = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=duration + timeout_s + 30,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None, "milterload did not finish in time (killed)", -1
    result = None
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                result = json.loads(line)
    return result, p.stderr.strip(), p.returncode


@dataclasses.dataclass
class Cell:
    workload: str
    milter: str
    status: str = "ok"  # ok | failed | not runnable | skipped
    reason: str = ""
    msgs_per_sec: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    messages: int | None = None
    errors: int | None = None
    seconds: float | None = None
    cpu_s: float | None = None
    cpu_s_per_1k: float | None = None
    cpu_util: float | None = None
    gen_cpu_util: float | None = None
    peak_rss_kib: int | None = None
    negotiated_protocol: str | None = None
    # W5
    idle_requested: int | None = None
    idle_established: int | None = None
    idle_setup_s: float | None = None
    rss_before_kib: int | None = None
    rss_after_kib: int | None = None
    kib_per_idle_conn: float | None = None
    other_cpu_util: float | None = None
    runs_msgs_per_sec: list[float] = dataclasses.field(default_factory=list)
    milterload: dict[str, Any] | None = None
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


class Runner:
    def __init__(self, opts: argparse.Namespace, logdir: Path) -> None:
        self.o = opts
        self.logdir = logdir
        self.unrunnable: dict[str, str] = {}
        self.deadline = time.monotonic() + opts.max_minutes * 60

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def cell(self, w: Workload, spec: MilterSpec) -> Cell:
        c = Cell(w.key, spec.name)
        if spec.name in self.unrunnable:
            c.status, c.reason = "not runnable", self.unrunnable[spec.name]
            return c
        if time.monotonic() > self.deadline:
            c.status, c.reason = (
                "skipped",
                f"time budget (--max-minutes {self.o.max_minutes:g}) used up",
            )
            return c
        if self.o.wait_quiet > 0:
            waited = wait_quiet(min(self.o.wait_quiet, max(0.0, self.deadline - time.monotonic())))
            if waited > 1.5:
                c.notes.append(f"waited {waited:.0f} s for a quiet machine")
        logfile = self.logdir / f"{w.key}.{spec.name}.log"
        m = MilterProcess(spec, w.eom_only, logfile, unix=w.unix)
        try:
            why = m.wait_listening(self.o.start_timeout)
            if why is not None:
                c.status, c.reason = "not runnable", why
                self.unrunnable[spec.name] = why
                return c
            if w.idle:
                self._idle(c, m)
            else:
                self._load(c, w, m)
        finally:
            if m.alive():
                c.peak_rss_kib = c.peak_rss_kib or proc_status_kib(m.pid, "VmHWM")
            m.stop()
        return c

    def _warmup(self, c: Cell, m: MilterProcess, args: list[str]) -> bool:
        _, err, rc = run_milterload(m.target, args, self.o.warmup, 10)
        if rc != 0:
            try:  # a milter that crashed may still be unwinding
                m.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        if not m.alive():
            c.status = "failed"
            c.reason = f"milter died during warm-up (exit {m.proc.returncode}): {last_line(m.log)}"
            return False
        if rc != 0:
            c.notes.append(f"warm-up: {err.splitlines()[-1] if err else f'rc {rc}'}")
        return True

    def _load(self, c: Cell, w: Workload, m: MilterProcess) -> None:
        args = w.load_args()
        warm = [*args]
        warm[1] = str(min(w.concurrency, 10))
        if not self._warmup(c, m, warm):
            return
        runs: list[dict[str, Any]] = []
        err, died = "", False
        for _ in range(self.o.repeat):
            busy0, cpu0 = machine_busy_s(), proc_cpu_s(m.pid)
            res, err, rc = run_milterload(m.target, args, self.o.duration, self.o.reply_timeout)
            cpu1, busy1 = proc_cpu_s(m.pid), machine_busy_s()
            if rc != 0:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(timeout=0.5)
            died = not m.alive()
            if res is None:
                break
            run: dict[str, Any] = {"milterload": res, "stderr": err[-2000:], "rc": rc}
            if cpu0 is not None and cpu1 is not None:
                run["cpu_s"] = cpu1 - cpu0
                # CPU used by anything but the milter and the generator (other
                # processes on the machine, hypervisor steal): a noise gauge.
                run["other_cpu_s"] = max(
                    0.0, (busy1 - busy0) - run["cpu_s"] - float(res["gen_cpu_s"])
                )
            runs.append(run)
            if died or rc != 0:
                break
        c.peak_rss_kib = proc_status_kib(m.pid, "VmHWM")
        if not runs:
            c.status, c.reason = "failed", (err.splitlines() or ["no output from milterload"])[-1]
            if died:
                c.reason = (
                    f"milter died during the run (exit {m.proc.returncode}): {last_line(m.log)}"
                )
            return
        # Best of --repeat by throughput: the run least disturbed by the rest of the machine.
        best = max(runs, key=lambda r: float(r["milterload"]["msgs_per_sec"]))
        c.runs_msgs_per_sec = [float(r["milterload"]["msgs_per_sec"]) for r in runs]
        c.runs = runs
        res = best["milterload"]
        err = best["stderr"]
        c.milterload = res
        c.messages = int(res["messages"])
        c.errors = int(res["errors"])
        c.seconds = float(res["seconds"])
        c.msgs_per_sec = float(res["msgs_per_sec"])
        c.p50_ms = float(res["p50_ms"])
        c.p99_ms = float(res["p99_ms"])
        c.gen_cpu_util = float(res["gen_cpu_util"])
        c.negotiated_protocol = res.get("milter_protocol")
        if "cpu_s" in best:
            # The CPU samples span milterload's whole life (connection setup
            # before its clock starts included), so shares are of its wall time.
            wall = float(res.get("wall_s") or c.seconds or 0)
            c.cpu_s = best["cpu_s"]
            c.other_cpu_util = best["other_cpu_s"] / wall if wall else None
            if wall:
                c.cpu_util = c.cpu_s / wall
            if c.messages:
                c.cpu_s_per_1k = c.cpu_s / c.messages * 1000
        if died:
            c.status = "failed"
            c.reason = f"milter died during the run (exit {m.proc.returncode}): {last_line(m.log)}"
        elif c.messages == 0:
            c.status = "failed"
            c.reason = (err.splitlines() or ["no message completed"])[-1]
        elif c.errors:
            c.status = "failed"
            errs = [ln for ln in err.splitlines() if "error" in ln]
            c.reason = f"{c.errors} errors: {errs[0] if errs else err[-200:]}"
        if c.negotiated_protocol and not w.eom_only:
            pf = int(c.negotiated_protocol, 16)
            if pf & STAGE_OPT_OUT:
                c.notes.append(
                    f"milter opted out of stages/replies (protocol 0x{pf:x}): not every stage was handled"
                )
        if c.other_cpu_util is not None and c.other_cpu_util > self.o.noisy:
            c.notes.append(
                f"noisy: other processes used {100 * c.other_cpu_util:.0f}% of a core meanwhile"
            )

    def _idle(self, c: Cell, m: MilterProcess) -> None:
        n = self.o.idle_conns
        if not self._warmup(c, m, ["-c", "2", "--body-bytes", "10000", *OFFER]):
            return
        time.sleep(0.3)
        c.rss_before_kib = proc_status_kib(m.pid, "VmRSS")
        cpu0 = proc_cpu_s(m.pid)
        argv = [
            *NICE,
            "taskset",
            "-c",
            LOAD_CPU,
            sys.executable,
            str(HERE / "idleconn.py"),
            "-n",
            str(n),
            "--setup-timeout",
            f"{self.o.idle_setup_timeout:g}",
            "--hold",
            f"{self.o.idle_setup_timeout + 60:g}",
            f"{HOST}:{m.port}",
        ]
        p = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert p.stdout is not None
            ready, _, _ = select.select([p.stdout], [], [], self.o.idle_setup_timeout + 30)
            line = p.stdout.readline() if ready else ""
            if not line:
                c.status, c.reason = "failed", "idle client gave no report"
                return
            rep = json.loads(line)
            c.idle_requested, c.idle_established = rep["requested"], rep["established"]
            c.idle_setup_s = rep["setup_s"]
            if rep["errors"]:
                c.notes.append(
                    "idle client errors: "
                    + ", ".join(f"{k} x{v}" for k, v in rep["errors"].items())
                )
            time.sleep(self.o.idle_settle)
            if not m.alive():
                c.status = "failed"
                c.reason = f"milter died holding idle connections (exit {m.proc.returncode}): {last_line(m.log)}"
                return
            c.rss_after_kib = proc_status_kib(m.pid, "VmRSS")
            c.peak_rss_kib = proc_status_kib(m.pid, "VmHWM")
            cpu1 = proc_cpu_s(m.pid)
            if cpu0 is not None and cpu1 is not None:
                c.cpu_s = cpu1 - cpu0
            if c.idle_established and c.rss_after_kib is not None and c.rss_before_kib is not None:
                c.kib_per_idle_conn = (c.rss_after_kib - c.rss_before_kib) / c.idle_established
            if c.idle_established < n:
                c.status = "failed"
                c.reason = f"only {c.idle_established} of {n} connections reached idle"
        finally:
            try:
                if p.stdin:
                    p.stdin.close()  # tells the idle client to close everything
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- report


def fnum(v: float | int | None, fmt: str = "{:,.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or a == 0:
        return "–"
    return f"{a / b:.2f}×"


def versions() -> dict[str, str]:
    v: dict[str, str] = {"python": platform.python_version(), "kernel": platform.release()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                v["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    v["cpus"] = str(os.cpu_count())
    if VENV_PY.exists():
        code = (
            "import importlib.metadata as m, json;"
            "print(json.dumps({n: m.version(n) for n in "
            "['pymilter','purepythonmilter','kilter.service','kilter.protocol','anyio','trio']}))"
        )
        try:
            out = subprocess.run(
                [str(VENV_PY), "-c", code], capture_output=True, text=True, timeout=30
            )
            v.update(json.loads(out.stdout))
        except (subprocess.SubprocessError, json.JSONDecodeError, OSError):
            pass
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libmilter-dev"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        v["libmilter"] = out.stdout.strip()
    except (subprocess.SubprocessError, OSError):
        pass
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "triomilter"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        v["triomilter_git"] = (rev.stdout.strip() or "no commit") + (
            " + uncommitted changes" if dirty.stdout.strip() else ""
        )
    except (subprocess.SubprocessError, OSError):
        pass
    return v


def status_text(c: Cell, short: bool = True, runs: bool = False) -> str:
    if c.status == "not runnable" and short:
        return "not runnable (see Problems)"
    st = c.status
    if runs and len(c.runs_msgs_per_sec) > 1:
        st += " (runs: " + " / ".join(f"{v:,.0f}" for v in c.runs_msgs_per_sec) + " msg/s)"
    if c.reason:
        reason = c.reason if not short or len(c.reason) <= 160 else c.reason[:157] + "..."
        st += ": " + reason
    if c.notes:
        st += " (" + "; ".join(c.notes) + ")"
    return st.replace("|", "/").replace("\n", " ")


def render_unix_vs_tcp(by: dict[tuple[str, str], Cell], wl: list[str], ms: list[str]) -> list[str]:
    """Each milter's UNIX-socket workload against its TCP twin in the same run."""
    pairs = [(w, WORKLOADS[w].tcp_twin) for w in wl if WORKLOADS[w].tcp_twin in wl]
    if not pairs:
        return []
    out = ["## UNIX socket against TCP (same run)", ""]
    out.append(
        "Each milter's UNIX-socket workload next to the same workload over loopback TCP. "
        "*msg/s* UNIX ÷ TCP above 1× and *CPU* UNIX ÷ TCP below 1× mean the UNIX socket is better. "
        "`–`: one side did not produce a figure."
    )
    out.append("")
    out.append(
        "| workload | milter | msg/s TCP | msg/s UNIX | msg/s UNIX ÷ TCP | p50 ms TCP / UNIX "
        "| p99 ms TCP / UNIX | CPU s / 1k msg TCP / UNIX | CPU UNIX ÷ TCP |"
    )
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for uk, tk in pairs:
        for mn in ms:
            u, t = by.get((uk, mn)), by.get((tk, mn))
            if u is None or t is None:
                continue
            u = u if u.status == "ok" else Cell(uk, mn)
            t = t if t.status == "ok" else Cell(tk, mn)
            out.append(
                f"| {uk} vs {tk} | {mn} | {fnum(t.msgs_per_sec)} | {fnum(u.msgs_per_sec)} "
                f"| {ratio(u.msgs_per_sec, t.msgs_per_sec)} "
                f"| {fnum(t.p50_ms, '{:.2f}')} / {fnum(u.p50_ms, '{:.2f}')} "
                f"| {fnum(t.p99_ms, '{:.2f}')} / {fnum(u.p99_ms, '{:.2f}')} "
                f"| {fnum(t.cpu_s_per_1k, '{:.3f}')} / {fnum(u.cpu_s_per_1k, '{:.3f}')} "
                f"| {ratio(u.cpu_s_per_1k, t.cpu_s_per_1k)} |"
            )
    out.append("")
    return out


def render(cells: list[Cell], meta: dict[str, Any], baseline: str) -> str:
    by = {(c.workload, c.milter): c for c in cells}
    wl = [w for w in meta["workloads"]]
    ms = [m for m in meta["milters"]]
    unix = any(WORKLOADS[w].unix for w in wl)
    out: list[str] = []
    out.append(f"# triomilter benchmarks, {meta['started']}")
    out.append("")
    v = meta["versions"]
    out.append(
        f"{v.get('cpu', '?')}, {v.get('cpus', '?')} CPUs, Linux {v.get('kernel', '?')}, "
        f"Python {v.get('python', '?')}. Milter pinned to CPU {MILTER_CPU}, load generator to CPU {LOAD_CPU} (taskset), both at nice {meta['nice']}; "
        + ("loopback TCP and UNIX sockets under /tmp only." if unix else "loopback only.")
    )
    out.append("")
    out.append(
        f"Mode: {'quick' if meta['quick'] else 'full'}; {meta['duration']:g} s per run, best of {meta['repeat']} run(s) per cell, after a "
        f"{meta['warmup']:g} s warm-up; W5 holds {meta['idle_conns']:,} idle connections. "
        "Messages: 10 headers, 2 recipients, 10,000-byte body (W4: 1,000,000), offer = version 6, "
        "actions 0x1ff, protocol 0x1fffff (as Postfix/Sendmail); every end of message must add `X-Bench`."
    )
    out.append("")
    out.append(
        f"Versions: pymilter {v.get('pymilter', '?')} (libmilter {v.get('libmilter', '?')}), "
        f"purepythonmilter {v.get('purepythonmilter', '?')}, kilter-service {v.get('kilter.service', '?')} "
        f"(kilter.protocol {v.get('kilter.protocol', '?')}, anyio {v.get('anyio', '?')}, trio {v.get('trio', '?')}), "
        f"triomilter {v.get('triomilter_git', '?')}."
    )
    out.append("")
    out.append(f"Command: `{meta['command']}`")
    out.append("")

    for wk in wl:
        w = WORKLOADS[wk]
        if w.idle:
            continue
        out.append(f"## {w.title}")
        out.append("")
        out.append(
            "| milter | msg/s | % of limit | p50 ms | p99 ms | CPU s / 1k msg | milter CPU | gen CPU | other CPU | peak RSS MiB | status |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        limit = by.get((wk, "noop"))
        for mn in ms:
            c = by.get((wk, mn))
            if c is None:
                continue
            pct = (
                f"{100 * c.msgs_per_sec / limit.msgs_per_sec:.1f}%"
                if c.msgs_per_sec and limit and limit.msgs_per_sec and mn != "noop"
                else ("100%" if mn == "noop" and c.msgs_per_sec else "–")
            )
            out.append(
                f"| {mn} | {fnum(c.msgs_per_sec)} | {pct} | {fnum(c.p50_ms, '{:.2f}')} | {fnum(c.p99_ms, '{:.2f}')} "
                f"| {fnum(c.cpu_s_per_1k, '{:.3f}')} | {fnum(None if c.cpu_util is None else 100 * c.cpu_util, '{:.0f}%')} "
                f"| {fnum(None if c.gen_cpu_util is None else 100 * c.gen_cpu_util, '{:.0f}%')} "
                f"| {fnum(None if c.other_cpu_util is None else 100 * c.other_cpu_util, '{:.0f}%')} "
                f"| {fnum(None if c.peak_rss_kib is None else c.peak_rss_kib / 1024, '{:.1f}')} | {status_text(c, runs=True)} |"
            )
        out.append("")

    out.extend(render_unix_vs_tcp(by, wl, ms))

    if "W5" in wl:
        out.append(f"## {WORKLOADS['W5'].title}")
        out.append("")
        out.append(
            "| milter | idle conns | setup s | RSS before MiB | RSS after MiB | KiB / idle conn | CPU s for setup | status |"
        )
        out.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for mn in ms:
            c = by.get(("W5", mn))
            if c is None:
                continue
            conns = (
                "–"
                if c.idle_established is None
                else f"{c.idle_established:,} / {c.idle_requested:,}"
            )
            out.append(
                f"| {mn} | {conns} | {fnum(c.idle_setup_s, '{:.2f}')} "
                f"| {fnum(None if c.rss_before_kib is None else c.rss_before_kib / 1024, '{:.1f}')} "
                f"| {fnum(None if c.rss_after_kib is None else c.rss_after_kib / 1024, '{:.1f}')} "
                f"| {fnum(c.kib_per_idle_conn, '{:.2f}')} | {fnum(c.cpu_s, '{:.2f}')} | {status_text(c)} |"
            )
        out.append("")

    out.append(f"## Ratios: {baseline} against each peer (same run)")
    out.append("")
    out.append(
        f'Every ratio reads "{baseline} is N× better": throughput = {baseline} ÷ peer; '
        f"p99, CPU per message, peak RSS and RSS per idle connection = peer ÷ {baseline}. "
        "`–`: one side did not produce a figure."
    )
    out.append("")
    peers = [m for m in ms if m not in (baseline, "noop")]
    out.append("| workload | peer | msg/s | p99 | CPU / msg | peak RSS | RSS / idle conn |")
    out.append("|---|---|---:|---:|---:|---:|---:|")
    for wk in wl:
        b = by.get((wk, baseline))
        for mn in peers:
            p = by.get((wk, mn))
            if p is None:
                continue
            ok_b = b is not None and b.status == "ok"
            ok_p = p.status == "ok"
            bb = b if ok_b else None
            pp = p if ok_p else None
            out.append(
                f"| {wk} | {mn} | {ratio(bb and bb.msgs_per_sec, pp and pp.msgs_per_sec)} "
                f"| {ratio(pp and pp.p99_ms, bb and bb.p99_ms)} | {ratio(pp and pp.cpu_s_per_1k, bb and bb.cpu_s_per_1k)} "
                f"| {ratio(pp and pp.peak_rss_kib, bb and bb.peak_rss_kib)} | {ratio(pp and pp.kib_per_idle_conn, bb and bb.kib_per_idle_conn)} |"
            )
    out.append("")
    problems = [c for c in cells if c.status not in ("ok", "not runnable") or c.notes]
    unrunnable: dict[str, str] = {}
    for c in cells:
        if c.status == "not runnable":
            unrunnable.setdefault(c.milter, c.reason)
    if problems or unrunnable:
        out.append("## Problems and warnings")
        out.append("")
        for mn, why in unrunnable.items():
            out.append(f"- **{mn}**: not runnable, no figures: {why}".replace("\n", " "))
        for c in problems:
            out.append(f"- **{c.milter}**, {c.workload}: {status_text(c, short=False)}")
        out.append("")
    out.append(
        "Columns: *msg/s* messages completed per second; *% of limit* msg/s ÷ the no-op responder's in the same "
        "workload; *p50/p99* latency from a message's first command to its final end-of-message reply (W3: from "
        + ("TCP connect, W3u: from connect()" if unix else "TCP connect")
        + "); *CPU s / 1k msg* milter process CPU (user+system, all threads) per 1000 messages, connection setup included; "
        "*milter CPU* / *gen CPU* share of one core used by the milter / milterload (a generator near 100% "
        "means the row is generator-bound); *other CPU* share of a core used meanwhile by everything else on "
        "the machine (other processes, hypervisor steal): high values mean a disturbed cell; *peak RSS* VmHWM of the milter process over the cell. "
        "See benchmarks/README.md."
    )
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="few seconds per cell, 2,000 idle connections"
    )
    ap.add_argument(
        "--milters",
        default=",".join(DEFAULT_MILTERS),
        help=f"comma list of: {', '.join(MILTERS)} (default: {', '.join(DEFAULT_MILTERS)})",
    )
    ap.add_argument(
        "--workloads",
        default=None,
        help=f"comma list of: {', '.join(WORKLOADS)} (default: {','.join(DEFAULT_WORKLOADS)})",
    )
    ap.add_argument(
        "--duration", type=float, default=None, help="seconds per cell (default 10, --quick 3)"
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up seconds before each cell (default 1, --quick 0.5)",
    )
    ap.add_argument(
        "--idle-conns", type=int, default=None, help="W5 connections (default 10000, --quick 2000)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="milterload runs per cell (same milter process); the table shows the best by msg/s",
    )
    ap.add_argument(
        "--noisy",
        type=float,
        default=0.15,
        help="flag a cell when other processes used more than this share of a core",
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="nice value for milter and generator (negative needs root; 0: leave alone)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each cell, wait up to this many seconds for the machine to be idle (shared machines)",
    )
    ap.add_argument("--idle-setup-timeout", type=float, default=90.0)
    ap.add_argument(
        "--idle-settle",
        type=float,
        default=1.5,
        help="seconds between the last idle handshake and the RSS reading",
    )
    ap.add_argument(
        "--reply-timeout", type=float, default=20.0, help="milterload per-reply timeout"
    )
    ap.add_argument(
        "--start-timeout", type=float, default=20.0, help="seconds a milter may take to listen"
    )
    ap.add_argument(
        "--baseline",
        default="triomilter",
        help="milter the ratio table compares against the others",
    )
    ap.add_argument(
        "--max-minutes", type=float, default=25.0, help="time budget; later cells are skipped"
    )
    ap.add_argument("--no-setup", action="store_true", help="do not run setup.sh first")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    o = ap.parse_args()

    o.duration = o.duration if o.duration is not None else (3.0 if o.quick else 10.0)
    o.warmup = o.warmup if o.warmup is not None else (0.5 if o.quick else 1.0)
    o.idle_conns = o.idle_conns if o.idle_conns is not None else (2000 if o.quick else 10000)
    if o.repeat < 1:
        ap.error("--repeat must be at least 1")
    milters = [m.strip() for m in o.milters.split(",") if m.strip()]
    workloads = [
        w.strip()
        for w in (o.workloads or ",".join(QUICK_WORKLOADS if o.quick else DEFAULT_WORKLOADS)).split(
            ","
        )
        if w.strip()
    ]
    for m in milters:
        if m not in MILTERS:
            ap.error(f"unknown milter {m!r}; choose from {', '.join(MILTERS)}")
    for w in workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")

    if not o.no_setup:
        r = subprocess.run(["bash", str(HERE / "setup.sh")], timeout=1800)
        if r.returncode != 0:
            print("run.py: setup.sh failed", file=sys.stderr)
            return 1
    for need in (MILTERLOAD, NOOP):
        if not need.exists():
            print(f"run.py: {need} missing: run benchmarks/setup.sh", file=sys.stderr)
            return 1
    if not VENV_PY.exists() and any(MILTERS[m].python for m in milters):
        print(f"run.py: {VENV_PY} missing: run benchmarks/setup.sh", file=sys.stderr)
        return 1
    if (os.cpu_count() or 1) < 2:
        print("run.py: needs 2 CPUs (milter on CPU 1, generator on CPU 0)", file=sys.stderr)
        return 1

    if o.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0))  # probe
            if os.geteuid() == 0 or o.nice > 0:
                NICE[:] = ["nice", "-n", str(o.nice)]
        except OSError:
            pass
    nofile = raise_nofile()
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    o.out.mkdir(parents=True, exist_ok=True)
    logdir = BUILD / "logs" / stamp
    logdir.mkdir(parents=True, exist_ok=True)

    n_load = sum(1 for w in workloads if not WORKLOADS[w].idle) * len(milters)
    est = n_load * (o.repeat * o.duration + o.warmup + 2 + o.wait_quiet / 4) + (
        len(milters) * 25 if "W5" in workloads else 0
    )
    print(
        f"run.py: {len(workloads)} workloads x {len(milters)} milters, about {est / 60:.1f} min "
        f"(budget {o.max_minutes:g} min); RLIMIT_NOFILE {nofile}; logs in {logdir}",
        file=sys.stderr,
        flush=True,
    )

    runner = Runner(o, logdir)
    cells: list[Cell] = []
    for wk in workloads:
        for mn in milters:
            t0 = time.monotonic()
            c = runner.cell(WORKLOADS[wk], MILTERS[mn])
            cells.append(c)
            if c.msgs_per_sec is not None:
                summary = f"{c.msgs_per_sec:,.0f} msg/s p50 {c.p50_ms:.2f} p99 {c.p99_ms:.2f} ms"
            elif c.kib_per_idle_conn is not None:
                summary = f"{c.idle_established} idle, {c.kib_per_idle_conn:.2f} KiB/conn"
            else:
                summary = ""
            runner.log(
                f"  {wk:8} {mn:17} {c.status:12} {summary} {c.reason[:160]} ({time.monotonic() - t0:.1f} s)"
            )

    meta: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "quick": o.quick,
        "duration": o.duration,
        "warmup": o.warmup,
        "idle_conns": o.idle_conns,
        "workloads": workloads,
        "milters": milters,
        "command": "python3 "
        + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd()), *sys.argv[1:]]),
        "versions": versions(),
        "rlimit_nofile": nofile,
        "nice": NICE[-1] if NICE else "0",
        "repeat": o.repeat,
    }
    md = render(cells, meta, o.baseline)
    (o.out / f"{stamp}.md").write_text(md)
    (o.out / f"{stamp}.json").write_text(
        json.dumps({"meta": meta, "cells": [dataclasses.asdict(c) for c in cells]}, indent=1) + "\n"
    )
    print(md)
    print(f"run.py: wrote {o.out / (stamp + '.md')} and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
