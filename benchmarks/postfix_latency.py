#!/usr/bin/env python3
"""Measure what each milter adds to mail passing through a real Postfix.

One command (root: it runs a private Postfix; stdlib only, Python >= 3.11):

    python3 benchmarks/postfix_latency.py             # 9 configurations x 3 runs, about 6 minutes
    python3 benchmarks/postfix_latency.py --quick     # 1 repeat, 100 messages, 500 for throughput
    python3 benchmarks/postfix_latency.py --configs none,triomilter,triomilter-eom --repeat 1

It starts the capture SMTP server (tests/e2e/capture.py) and a private,
loopback-only Postfix (tests/e2e/postfix.py) relaying to it.  Then, for each
configuration -- no milter (Postfix alone), the C no-op responder,
triomilter (a handler for every stage), triomilter with only end of message,
pymilter, purepythonmilter, kilter-service, ... (--configs) -- it starts a fresh milter pinned to CPU 1 on a free port,
points Postfix's ``smtpd_milters`` at it (a reload), and measures:

1. **latency**: one SMTP session (smtplib, in a child process pinned to
   CPU 0) sends --warmup then --messages messages one after the other
   (10 headers, a ~10 kB body, 1 recipient); per message it times MAIL FROM
   -> end-of-DATA reply, and each step (MAIL, RCPT, DATA -> 354, content +
   dot -> final reply);
2. **throughput**: ``smtp-source -s 20 -m 2000 -l 10000`` (pinned to CPU 0),
   messages per second accepted by Postfix;

and checks that the capture server received every message, each with the
milter's ``X-Bench`` header.  With --repeat N each configuration is run N
times (round robin, a fresh milter each time) and the tables show medians.
The result goes to ``benchmarks/results/postfix-<timestamp>.md`` (and
``.json``) and is printed.  See benchmarks/README.md.

Everything is bounded: each SMTP reply has a timeout, every subprocess a hard
timeout, delivery waits a deadline, and the run a time budget (--max-minutes)
after which the remaining runs are skipped.  Traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shlex
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HOST = "127.0.0.1"
SMTP_SOURCE = "/usr/sbin/smtp-source"
MAIL_FROM = "from@x.test.invalid"
RCPT_TO = "to@y.test.invalid"
CLIENT_HELO = "client.test.invalid"
HOLD_ALL = "check_client_access static:HOLD"  # main.cf restriction for --hold
STALL_MS = 30.0  # a message slower than this has (almost certainly) met a 40 ms delayed ACK

DEFAULT_CONFIGS = [
    "none",
    # The C no-op responder (TCP_NODELAY, one write per reply, no TCP_QUICKACK):
    # what the protocol round trips through Postfix cost at the least, and,
    # with -eom, the MTA -> milter stall in its pure form.
    "noop",
    "noop-eom",
    "triomilter",
    "triomilter-eom",
    "pymilter",
    "purepythonmilter",
    "kilter-service",
    # A peer in the shape that meets the MTA -> milter stall (NO_* stages, see
    # shared/reference/latency-through-mtas.md).  kilter-service-eom crashes on
    # the second message of a session, pymilter-eom pays both stalls (~90 ms).
    "purepythonmilter-eom",
]


# ---------------------------------------------------------------- the latency client
#
# Runs as a child process (``--client``) pinned to CPU 0, so that the capture
# server's threads in the parent (which receive the relayed mail meanwhile)
# do not compete with the timing loop for the GIL.


def build_message(i: int, body_bytes: int, stamp: str) -> bytes:
    """10 header fields and a body of about ``body_bytes`` bytes, CRLF, no leading dots."""
    headers = [
        f"From: Bench Sender <{MAIL_FROM}>",
        f"To: Bench Recipient <{RCPT_TO}>",
        f"Subject: postfix latency benchmark, message {i}",
        "Date: Thu, 01 Jan 2026 00:00:00 +0000",
        f"Message-ID: <{stamp}.{i}@x.test.invalid>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
        "X-Filler-1: the quick brown fox jumps over the lazy dog",
        "X-Filler-2: pack my box with five dozen liquor jugs",
    ]
    line = ("0123456789abcdefghijklmnopqrstuvwxyz" * 3)[:76]
    n_lines = max(1, round(body_bytes / (len(line) + 2)))
    body = (line + "\r\n") * n_lines
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode("ascii")


def client_main(port: int, count: int, warmup: int, body_bytes: int, timeout: float) -> int:
    """One sequential SMTP session; prints one JSON line with per-message timings (ms)."""
    stamp = f"{os.getpid()}.{int(time.time())}"
    out: dict[str, Any] = {"samples": [], "errors": [], "warmup": warmup, "accepted": 0}
    max_errors = 10
    t_start = time.perf_counter()
    try:
        s = smtplib.SMTP(HOST, port, CLIENT_HELO, timeout=timeout)
    except (OSError, smtplib.SMTPException) as exc:
        out["errors"].append(f"connect: {exc!r}")
        print(json.dumps(out), flush=True)
        return 1
    try:
        # smtplib writes each command whole and waits for its reply, so Nagle
        # never holds a client write back; NODELAY makes that explicit.
        assert s.sock is not None
        s.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code, _ = s.ehlo(CLIENT_HELO)
        if code != 250:
            raise smtplib.SMTPResponseException(code, b"EHLO refused")
        for i in range(warmup + count):
            payload = build_message(i, body_bytes, stamp) + b".\r\n"
            pc = time.perf_counter
            t0 = pc()
            c_mail, m_mail = s.docmd("MAIL", f"FROM:<{MAIL_FROM}>")
            t1 = pc()
            c_rcpt, m_rcpt = s.docmd("RCPT", f"TO:<{RCPT_TO}>") if c_mail == 250 else (0, b"")
            t2 = pc()
            c_data, m_data = s.docmd("DATA") if c_rcpt == 250 else (0, b"")
            t3 = pc()
            c_eod, m_eod = (0, b"")
            if c_data == 354:
                s.send(payload)  # one sendall: content and the final dot
                c_eod, m_eod = s.getreply()
            t4 = pc()
            if c_eod != 250:
                bad = next(
                    (c, m)
                    for c, m in (
                        (c_mail, m_mail),
                        (c_rcpt, m_rcpt),
                        (c_data, m_data),
                        (c_eod, m_eod),
                    )
                    if c not in (250, 354)
                )
                out["errors"].append(f"message {i}: {bad[0]} {bad[1].decode(errors='replace')}")
                s.rset()
                if len(out["errors"]) >= max_errors:
                    break
                continue
            out["accepted"] += 1
            if i >= warmup:
                ms = 1000.0
                out["samples"].append(
                    [
                        (t4 - t0) * ms,  # MAIL FROM -> end-of-DATA reply
                        (t1 - t0) * ms,  # MAIL
                        (t2 - t1) * ms,  # RCPT
                        (t3 - t2) * ms,  # DATA -> 354
                        (t4 - t3) * ms,  # content + dot -> final reply
                    ]
                )
        with contextlib.suppress(OSError, smtplib.SMTPException):
            s.quit()
    except (OSError, smtplib.SMTPException) as exc:
        out["errors"].append(f"session: {exc!r}")
    finally:
        with contextlib.suppress(OSError):
            s.close()
    out["wall_s"] = time.perf_counter() - t_start
    print(json.dumps(out), flush=True)
    return 0 if not out["errors"] else 1


# ---------------------------------------------------------------- the driver

# Imports for the driver only (the client above needs none of them).


def _driver_imports() -> None:
    for p in (str(REPO),):
        if p not in sys.path:
            sys.path.insert(0, p)


@dataclasses.dataclass(frozen=True)
class Config:
    key: str
    milter: str | None  # a name in benchmarks/run.py's MILTERS; None: no milter
    eom_only: bool
    title: str


def make_config(key: str, milters: dict[str, Any]) -> Config:
    if key == "none":
        return Config("none", None, False, "no milter (Postfix alone)")
    base, eom = (key[:-4], True) if key.endswith("-eom") else (key, False)
    if base not in milters:
        raise ValueError(key)
    what = "end of message only" if eom else "every stage handled"
    return Config(key, base, eom, f"{base} ({what})")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


@dataclasses.dataclass
class Run:
    """One configuration, one repeat."""

    config: str
    repeat: int
    status: str = "ok"  # ok | failed | not runnable | skipped
    reasons: list[str] = dataclasses.field(default_factory=list)
    # latency (ms)
    lat_n: int = 0
    lat_p50: float | None = None
    lat_p99: float | None = None
    lat_max: float | None = None
    lat_stalls: int | None = None  # messages >= STALL_MS
    step_p50: dict[str, float] = dataclasses.field(default_factory=dict)
    step_p99: dict[str, float] = dataclasses.field(default_factory=dict)
    lat_delivered: int | None = None
    lat_with_header: int | None = None
    lat_samples: list[float] = dataclasses.field(default_factory=list)
    # throughput
    tp_messages: int | None = None
    tp_seconds: float | None = None
    tp_msgs_per_sec: float | None = None
    tp_delivered: int | None = None
    tp_with_header: int | None = None
    tp_milter_cpu_ms_per_msg: float | None = None
    # Noise gauge: share of one core used meanwhile by everything except this
    # benchmark (its own processes, the milter and the Postfix instance).
    lat_other_cpu: float | None = None
    tp_other_cpu: float | None = None
    lat_postfix_cpu_ms_per_msg: float | None = None
    tp_postfix_cpu_ms_per_msg: float | None = None
    waited_s: float = 0.0
    milter_warnings: int = 0
    milter_warning_sample: str = ""

    def fail(self, why: str) -> None:
        self.status = "failed"
        self.reasons.append(why)

    def noisy(self, limit: float) -> list[str]:
        return [
            f"{name}: other processes used {100 * v:.0f}% of a core"
            for name, v in (("latency", self.lat_other_cpu), ("throughput", self.tp_other_cpu))
            if v is not None and v > limit
        ]


def _stat_times(pid: int, children: bool) -> float:
    """utime+stime (and cutime+cstime of reaped children) of pid, in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class CpuSnap:
    t: float
    busy: float  # whole machine
    mine: float  # this process (capture server threads) + its reaped children (clients)
    milter: float
    postfix: float  # master + reaped daemons + live daemons of our instance


STEPS = ["total", "mail", "rcpt", "data", "content"]


def latency_client(h: Any, o: argparse.Namespace, port: int) -> dict[str, Any] | str:
    """Run the latency client (``--client``, a child pinned to the load CPU)
    against the MTA's SMTP ``port``: its result, or why there is none."""
    total = o.warmup_messages + o.messages
    argv = [
        *h.NICE,
        "taskset",
        "-c",
        h.LOAD_CPU,
        sys.executable,
        str(Path(__file__).resolve()),
        "--client",
        str(port),
        "--messages",
        str(o.messages),
        "--warmup-messages",
        str(o.warmup_messages),
        "--body-bytes",
        str(o.body_bytes),
        "--reply-timeout",
        f"{o.reply_timeout:g}",
    ]
    try:
        p = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=60 + total * 2.0,
        )
    except subprocess.TimeoutExpired:
        return "latency client did not finish in time (killed)"
    res: dict[str, Any] | None = None
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                res = json.loads(line)
    if res is None:
        return f"latency client gave no result: {p.stderr.strip()[-300:]}"
    return res


def step_percentiles(
    samples: list[list[float]],
) -> tuple[dict[str, float], dict[str, float], list[float]]:
    """p50 and p99 of each of `STEPS` over the client's samples, and the totals."""
    cols = list(zip(*samples, strict=True))
    p50 = {name: percentile(list(col), 50) for name, col in zip(STEPS, cols, strict=True)}
    p99 = {name: percentile(list(col), 99) for name, col in zip(STEPS, cols, strict=True)}
    return p50, p99, list(cols[0])


class Bench:
    def __init__(self, o: argparse.Namespace, logdir: Path) -> None:
        import benchmarks.run as harness
        from tests.e2e.capture import CaptureServer
        from tests.e2e.postfix import PrivatePostfix

        self.h = harness
        self.o = o
        self.logdir = logdir
        self.deadline = time.monotonic() + o.max_minutes * 60
        self.capture = CaptureServer(max_connections=200, idle_timeout=60.0)
        self.pf_cls = PrivatePostfix
        self.pf: Any = None
        self.unrunnable: dict[str, str] = {}

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # -- lifecycle

    def start(self) -> None:
        self.capture.start()
        self.pf = self.pf_cls(
            self.capture.port,
            milters=(),
            # A milter that stalls or dies should show as errors, quickly.
            milter_connect_timeout="5s",
            milter_command_timeout="10s",
            milter_content_timeout="20s",
        )
        self.pf.start()
        self.log(
            f"postfix_latency: Postfix on 127.0.0.1:{self.pf.smtp_port} "
            f"({self.pf.base_dir}), capture on 127.0.0.1:{self.capture.port}"
        )

    def stop(self) -> None:
        if self.pf is not None:
            with contextlib.suppress(Exception):
                self.pf.stop()
        self.capture.stop()

    # -- helpers

    def snap(self, milter_pid: int | None) -> CpuSnap:
        from tests.e2e.postfix import _pids_in_dir

        master = self.pf.master_pid
        pf = _stat_times(master, True) if master else 0.0
        pf += sum(_stat_times(p, False) for p in _pids_in_dir(self.pf.queue_dir) if p != master)
        t = os.times()
        return CpuSnap(
            t=time.monotonic(),
            busy=self.h.machine_busy_s(),
            mine=t.user + t.system + t.children_user + t.children_system,
            milter=_stat_times(milter_pid, False) if milter_pid else 0.0,
            postfix=pf,
        )

    @staticmethod
    def other_share(a: CpuSnap, b: CpuSnap) -> float | None:
        wall = b.t - a.t
        if wall <= 0:
            return None
        ours = (b.mine - a.mine) + (b.milter - a.milter) + (b.postfix - a.postfix)
        return max(0.0, (b.busy - a.busy) - ours) / wall

    def drain(self, timeout: float) -> str | None:
        """Wait until Postfix's queue is empty and the capture server is quiet."""
        try:
            self.pf.wait_queue_empty(timeout=timeout)
        except Exception as exc:  # PostfixError
            return f"queue did not drain in {timeout:g} s: {str(exc).splitlines()[0]}"
        self.capture.wait_quiet(quiet=0.2, timeout=5.0)
        return None

    def collect(
        self, expected: int, timeout: float, want_header: bool
    ) -> tuple[int, int, str | None]:
        """(delivered, delivered with X-Bench, problem) for the current phase."""
        problem = None
        try:
            msgs = self.capture.wait_for(expected, timeout=timeout)
        except TimeoutError:
            msgs = self.capture.messages
            problem = f"only {len(msgs)} of {expected} messages delivered within {timeout:g} s"
        msgs = self.capture.wait_quiet(quiet=0.2, timeout=2.0)
        with_header = sum(1 for m in msgs if b"\nx-bench:" in b"\n" + m.headers.lower())
        if len(msgs) > expected and problem is None:
            problem = f"{len(msgs)} messages delivered, {expected} expected"
        if want_header and with_header < len(msgs) and problem is None:
            problem = f"{len(msgs) - with_header} of {len(msgs)} delivered messages lack X-Bench"
        return len(msgs), with_header, problem

    def milter_warnings(self, mark: int) -> tuple[int, str]:
        lines = [
            ln
            for ln in self.pf.log_text(mark).splitlines()
            if "milter" in ln and ("warning" in ln or "reject" in ln or "4.7.1" in ln)
        ]
        return len(lines), (lines[0][-300:] if lines else "")

    # -- one run

    def run(self, cfg: Config, rep: int) -> Run:
        r = Run(cfg.key, rep)
        if cfg.key in self.unrunnable:
            r.status = "not runnable"
            r.reasons.append(self.unrunnable[cfg.key])
            return r
        if time.monotonic() > self.deadline:
            r.status = "skipped"
            r.reasons.append(f"time budget (--max-minutes {self.o.max_minutes:g}) used up")
            return r
        m = None
        try:
            if cfg.milter is not None:
                spec = self.h.MILTERS[cfg.milter]
                m = self.h.MilterProcess(spec, cfg.eom_only, self.logdir / f"{cfg.key}.{rep}.log")
                why = m.wait_listening(self.o.start_timeout)
                if why is not None:
                    r.status = "not runnable"
                    r.reasons.append(why)
                    self.unrunnable[cfg.key] = why
                    return r
                self.pf.set_milters(f"inet:{HOST}:{m.port}")
            else:
                self.pf.set_milters([])
            why = self.drain(60)
            if why:
                r.fail(why)
                return r
            if self.o.wait_quiet > 0:
                r.waited_s = self.h.wait_quiet(
                    min(self.o.wait_quiet, max(0.0, self.deadline - time.monotonic()))
                )
            mark = self.pf.log_position()
            a = self.snap(m.pid if m else None)
            self._latency(r, cfg)
            b = self.snap(m.pid if m else None)
            r.lat_other_cpu = self.other_share(a, b)
            if r.lat_n:
                r.lat_postfix_cpu_ms_per_msg = (
                    (b.postfix - a.postfix) / (self.o.messages + self.o.warmup_messages) * 1000
                )
            if m is not None and not m.alive():
                r.fail(f"milter died (exit {m.proc.returncode}): {self.h.last_line(m.log)}")
                return r
            why = self.drain(120)
            if why:
                r.fail(why)
                return r
            self._throughput(r, cfg, m)
            if m is not None and not m.alive():
                r.fail(f"milter died (exit {m.proc.returncode}): {self.h.last_line(m.log)}")
            r.milter_warnings, r.milter_warning_sample = self.milter_warnings(mark)
            if r.milter_warnings:
                r.reasons.append(
                    f"{r.milter_warnings} milter warning(s) in the Postfix log, e.g. {r.milter_warning_sample!r}"
                )
        except Exception as exc:  # e.g. PostfixError from a reload: report, go on
            r.fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        finally:
            if m is not None:
                m.stop()
        return r

    def _latency(self, r: Run, cfg: Config) -> None:
        self.capture.clear()
        res = latency_client(self.h, self.o, self.pf.smtp_port)
        if isinstance(res, str):
            r.fail(res)
            return
        if res["errors"]:
            r.fail(f"latency: {len(res['errors'])} error(s), first: {res['errors'][0]}")
        samples = res["samples"]
        r.lat_n = len(samples)
        if samples:
            r.step_p50, r.step_p99, tot = step_percentiles(samples)
            r.lat_samples = [round(x, 3) for x in tot]
            r.lat_p50, r.lat_p99, r.lat_max = r.step_p50["total"], r.step_p99["total"], max(tot)
            r.lat_stalls = sum(1 for x in tot if x >= STALL_MS)
        sent = int(res.get("accepted", 0))
        delivered, with_header, problem = self.collect(
            sent, timeout=30 + sent * 0.05, want_header=cfg.milter is not None
        )
        r.lat_delivered, r.lat_with_header = delivered, with_header
        if problem:
            r.fail(f"latency phase: {problem}")

    def _throughput(self, r: Run, cfg: Config, m: Any) -> None:
        o = self.o
        self.capture.clear()
        argv = [
            *self.h.NICE,
            "taskset",
            "-c",
            self.h.LOAD_CPU,
            SMTP_SOURCE,
            "-s",
            str(o.sessions),
            "-m",
            str(o.tp_messages),
            "-l",
            str(o.body_bytes),
            "-f",
            MAIL_FROM,
            "-t",
            RCPT_TO,
            "-M",
            CLIENT_HELO,
            f"{HOST}:{self.pf.smtp_port}",
        ]
        r.tp_messages = o.tp_messages
        if o.hold:
            # Accepted mail waits in the hold queue: delivery to the capture
            # server does not compete for the CPUs while smtp-source is timed.
            self.pf.configure({"smtpd_client_restrictions": HOLD_ALL})
        try:
            cpu0 = self.h.proc_cpu_s(m.pid) if m is not None else None
            a = self.snap(m.pid if m else None)
            t0 = time.monotonic()
            try:
                p = subprocess.run(
                    argv,
                    capture_output=True,
                    text=True,
                    stdin=subprocess.DEVNULL,
                    timeout=o.tp_timeout,
                )
            except subprocess.TimeoutExpired:
                r.fail(f"smtp-source did not finish in {o.tp_timeout:g} s (killed)")
                return
            elapsed = time.monotonic() - t0
            b = self.snap(m.pid if m else None)
            cpu1 = self.h.proc_cpu_s(m.pid) if m is not None else None
        finally:
            if o.hold:
                self.pf.configure({"smtpd_client_restrictions": None})
                self.pf.release_hold()
        r.tp_seconds = elapsed
        r.tp_other_cpu = self.other_share(a, b)
        r.tp_postfix_cpu_ms_per_msg = (b.postfix - a.postfix) / o.tp_messages * 1000
        if p.returncode != 0:
            r.fail(f"smtp-source exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}")
        else:
            r.tp_msgs_per_sec = o.tp_messages / elapsed
        if cpu0 is not None and cpu1 is not None:
            r.tp_milter_cpu_ms_per_msg = (cpu1 - cpu0) / o.tp_messages * 1000
        delivered, with_header, problem = self.collect(
            o.tp_messages, timeout=60 + o.tp_messages * 0.05, want_header=cfg.milter is not None
        )
        r.tp_delivered, r.tp_with_header = delivered, with_header
        if problem:
            r.fail(f"throughput phase: {problem}")


# ---------------------------------------------------------------- report


def med(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def signed(v: float | None, fmt: str = "{:+.1f}") -> str:
    return "–" if v is None else fmt.format(v)


@dataclasses.dataclass
class Summary:
    config: Config
    runs: list[Run]

    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.status == "ok"]

    def m(self, attr: str) -> float | None:
        return med([getattr(r, attr) for r in self.ok_runs()])

    def step(self, name: str, q: str = "p50") -> float | None:
        return med([getattr(r, f"step_{q}").get(name) for r in self.ok_runs()])

    def status(self, noisy: float) -> str:
        parts = []
        for r in self.runs:
            notes = r.reasons + r.noisy(noisy)
            if r.status != "ok" or notes:
                parts.append(
                    f"run {r.repeat + 1}: {r.status}" + (f": {' / '.join(notes)}" if notes else "")
                )
        return "; ".join(parts).replace("|", "/").replace("\n", " ") or "ok"


def render(sums: list[Summary], meta: dict[str, Any]) -> str:
    o = meta["opts"]
    v = meta["versions"]
    out: list[str] = []
    out.append(f"# Latency through Postfix, {meta['started']}")
    out.append("")
    out.append(
        f"{v.get('cpu', '?')}, {v.get('cpus', '?')} CPUs, Linux {v.get('kernel', '?')}, Python {v.get('python', '?')}, "
        f"Postfix {meta['postfix']}. Milter pinned to CPU 1, the SMTP clients (latency client, smtp-source) to CPU 0, "
        f"both at nice {meta['nice']}; Postfix and the capture server unpinned; loopback only."
    )
    out.append("")
    out.append(
        f"Latency: one SMTP session, {o['warmup_messages']} warm-up then {o['messages']} messages sent one after the "
        f"other (10 headers, {o['body_bytes']:,}-byte body, 1 recipient), timed from MAIL FROM to the end-of-DATA reply. "
        f"Throughput: `smtp-source -s {o['sessions']} -m {o['tp_messages']} -l {o['body_bytes']}` (a new SMTP session "
        f"per message){'; accepted mail is held during the run and delivered afterwards' if o['hold'] else ', delivered meanwhile'}. "
        "Every message must reach the capture server, with `X-Bench` when a milter is in front. "
        f"{o['repeat']} run(s) per configuration, round robin, a fresh milter each run; figures are medians over the runs."
    )
    out.append("")
    out.append(
        f"Versions: pymilter {v.get('pymilter', '?')} (libmilter {v.get('libmilter', '?')}), "
        f"purepythonmilter {v.get('purepythonmilter', '?')}, kilter-service {v.get('kilter.service', '?')} "
        f"(trio {v.get('trio', '?')}), triomilter {v.get('triomilter_git', '?')}."
    )
    out.append("")
    out.append(f"Command: `{meta['command']}`")
    out.append("")

    base = next((s for s in sums if s.config.key == "none"), None)
    b50 = base.m("lat_p50") if base else None
    b99 = base.m("lat_p99") if base else None
    bc50 = base.step("content") if base else None
    btp = base.m("tp_msgs_per_sec") if base else None

    out.append("## What each milter adds (against Postfix alone, same run)")
    out.append("")
    out.append(
        "| milter | adds p50 ms | adds p99 ms | adds to end-of-DATA p50 ms | msg/s, % of Postfix alone | messages ≥ 30 ms | target: adds ≤ 2 ms p50 |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---|")
    for s in sums:
        if s.config.key == "none":
            continue
        p50, p99, c50, tp = (
            s.m("lat_p50"),
            s.m("lat_p99"),
            s.step("content"),
            s.m("tp_msgs_per_sec"),
        )
        d50 = None if p50 is None or b50 is None else p50 - b50
        d99 = None if p99 is None or b99 is None else p99 - b99
        dc = None if c50 is None or bc50 is None else c50 - bc50
        pct = None if tp is None or not btp else 100 * tp / btp
        stalls = med([r.lat_stalls for r in s.ok_runs()])
        n = med([r.lat_n for r in s.ok_runs()])
        target = (
            ("**met**" if d50 <= 2.0 else "**missed**")
            if d50 is not None and s.config.milter == "triomilter"
            else ""
        )
        out.append(
            f"| {s.config.title} | {signed(d50)} | {signed(d99)} | {signed(dc)} | {f(pct, '{:.0f}%')} "
            f"| {f(stalls, '{:.0f}')} / {f(n, '{:.0f}')} | {target} |"
        )
    out.append("")

    out.append("## Figures")
    out.append("")
    out.append(
        f"| configuration | p50 ms | p99 ms | max ms | p50 of each run | accepted msg/s ({o['sessions']} sessions) | msg/s of each run "
        "| milter CPU ms / msg | other CPU | delivered | status |"
    )
    out.append("|---|---:|---:|---:|---|---:|---|---:|---:|---|---|")
    for s in sums:
        ok = s.ok_runs()
        runs_p50 = " / ".join(f(r.lat_p50, "{:.1f}") for r in s.runs)
        runs_tp = " / ".join(f(r.tp_msgs_per_sec, "{:,.0f}") for r in s.runs)
        # Counted over the runs that passed (a failed run says why in *status*).
        deliv = sum((r.lat_delivered or 0) + (r.tp_delivered or 0) for r in ok)
        hdr = sum((r.lat_with_header or 0) + (r.tp_with_header or 0) for r in ok)
        sent = sum(o["warmup_messages"] + o["messages"] + (r.tp_messages or 0) for r in ok)
        others = [x for r in s.runs for x in (r.lat_other_cpu, r.tp_other_cpu) if x is not None]
        other = 100 * max(others) if others else None
        dcol = f"{deliv:,} of {sent:,}" + (
            f", {hdr:,} with X-Bench" if s.config.milter else " (no milter)"
        )
        out.append(
            f"| {s.config.title} | {f(s.m('lat_p50'), '{:.2f}')} | {f(s.m('lat_p99'), '{:.2f}')} | {f(s.m('lat_max'), '{:.1f}')} "
            f"| {runs_p50} | {f(s.m('tp_msgs_per_sec'), '{:,.0f}')} | {runs_tp} "
            f"| {f(s.m('tp_milter_cpu_ms_per_msg'), '{:.2f}')} | {f(other, '{:.0f}%')} | {dcol if ok else '–'} "
            f"| {s.status(meta['noisy'])} |"
        )
    out.append("")

    out.append("## Where the time goes (p50 / p99 ms of each SMTP step, medians over runs)")
    out.append("")
    out.append("| configuration | MAIL FROM | RCPT TO | DATA → 354 | content + dot → 250 |")
    out.append("|---|---:|---:|---:|---:|")
    for s in sums:
        cells = [
            f"{f(s.step(n), '{:.2f}')} / {f(s.step(n, 'p99'), '{:.2f}')}"
            for n in ("mail", "rcpt", "data", "content")
        ]
        out.append(f"| {s.config.title} | " + " | ".join(cells) + " |")
    out.append("")
    out.append(
        "Columns: *adds* = the milter's median minus Postfix alone's median (the cost of the milter); "
        "*end-of-DATA* = from sending the message content and the final dot to Postfix's reply, the step that "
        "contains the header, body and end-of-message exchanges with the milter; "
        f"*messages ≥ 30 ms* counts latency samples of at least {STALL_MS:.0f} ms (the signature of a 40 ms "
        "Nagle / delayed-ACK stall); *milter CPU* = the milter process's CPU time during the smtp-source run per "
        "message; *other CPU* = the highest share of one core that processes other than this benchmark (its "
        "clients, the milter, the Postfix instance, the capture server) used during a latency or throughput phase: "
        f"above {100 * meta['noisy']:.0f}% the run is flagged noisy in *status*; *status* lists failed runs, noisy "
        "runs and milter warnings from the Postfix log. See benchmarks/README.md."
    )
    return "\n".join(out) + "\n"


def postfix_version() -> str:
    try:
        p = subprocess.run(
            ["postconf", "-dh", "mail_version"],
            capture_output=True,
            text=True,
            timeout=10,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        return p.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


# ---------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help="comma list: none, a milter of benchmarks/run.py (noop, triomilter, pymilter, "
        "purepythonmilter, kilter-service), or one of them with -eom (end of message only)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 repeat, 100 messages, 500 for throughput"
    )
    ap.add_argument(
        "--repeat", type=int, default=None, help="runs per configuration (default 3, --quick 1)"
    )
    ap.add_argument(
        "--messages", type=int, default=None, help="measured messages (default 200, --quick 100)"
    )
    ap.add_argument("--warmup-messages", type=int, default=20)
    ap.add_argument("--body-bytes", type=int, default=10000)
    ap.add_argument("--sessions", type=int, default=20, help="smtp-source parallel sessions")
    ap.add_argument(
        "--tp-messages",
        type=int,
        default=None,
        help="smtp-source messages (default 2000, --quick 500)",
    )
    ap.add_argument(
        "--hold",
        action="store_true",
        help="during the smtp-source run, put accepted mail on hold and deliver it afterwards "
        "(msg/s then excludes delivery to the capture server)",
    )
    ap.add_argument("--tp-timeout", type=float, default=120.0, help="hard timeout for smtp-source")
    ap.add_argument(
        "--reply-timeout", type=float, default=30.0, help="latency client per-reply timeout"
    )
    ap.add_argument(
        "--start-timeout", type=float, default=20.0, help="seconds a milter may take to listen"
    )
    ap.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="nice value for milter and clients (as run.py; 0: leave alone)",
    )
    ap.add_argument(
        "--max-minutes", type=float, default=30.0, help="time budget; later runs are skipped"
    )
    ap.add_argument(
        "--noisy",
        type=float,
        default=0.15,
        help="flag a run when other processes used more than this share of a core",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for the machine to be idle (shared machines)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results")
    # internal: the latency client
    ap.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    o = ap.parse_args()

    o.repeat = o.repeat if o.repeat is not None else (1 if o.quick else 3)
    o.messages = o.messages if o.messages is not None else (100 if o.quick else 200)
    o.tp_messages = o.tp_messages if o.tp_messages is not None else (500 if o.quick else 2000)
    if o.client is not None:
        return client_main(o.client, o.messages, o.warmup_messages, o.body_bytes, o.reply_timeout)
    if o.repeat < 1 or o.messages < 1 or o.tp_messages < 1 or o.sessions < 1:
        ap.error("--repeat, --messages, --tp-messages and --sessions must be at least 1")

    _driver_imports()
    import benchmarks.run as harness
    from tests.e2e.postfix import postfix_missing_reason

    try:
        configs = [
            make_config(k.strip(), harness.MILTERS) for k in o.configs.split(",") if k.strip()
        ]
    except ValueError as exc:
        ap.error(f"unknown configuration {exc}; see --help")
    why = postfix_missing_reason()
    if why:
        print(f"postfix_latency: {why}", file=sys.stderr)
        return 1
    if not Path(SMTP_SOURCE).exists():
        print(
            f"postfix_latency: {SMTP_SOURCE} missing (it comes with the postfix package)",
            file=sys.stderr,
        )
        return 1
    if any(c.milter for c in configs) and not harness.VENV_PY.exists():
        print(
            f"postfix_latency: {harness.VENV_PY} missing: run benchmarks/setup.sh", file=sys.stderr
        )
        return 1
    if (os.cpu_count() or 1) < 2:
        print("postfix_latency: needs 2 CPUs (milter on CPU 1, clients on CPU 0)", file=sys.stderr)
        return 1
    if o.nice and (os.geteuid() == 0 or o.nice > 0):
        harness.NICE[:] = ["nice", "-n", str(o.nice)]
    harness.raise_nofile()

    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    o.out.mkdir(parents=True, exist_ok=True)
    logdir = harness.BUILD / "logs" / f"postfix-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)
    print(
        f"postfix_latency: {len(configs)} configurations x {o.repeat} run(s), "
        f"{o.warmup_messages}+{o.messages} sequential messages and smtp-source -s {o.sessions} -m {o.tp_messages} "
        f"each (budget {o.max_minutes:g} min); milter logs in {logdir}",
        file=sys.stderr,
        flush=True,
    )

    # SIGTERM/SIGHUP unwind like Ctrl-C, so that the finally below cleans up.
    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    bench = Bench(o, logdir)
    runs: list[Run] = []
    try:
        bench.start()
        for rep in range(o.repeat):
            for cfg in configs:
                t0 = time.monotonic()
                r = bench.run(cfg, rep)
                runs.append(r)
                bench.log(
                    f"  run {rep + 1} {cfg.key:17} {r.status:12} "
                    f"p50 {f(r.lat_p50, '{:.2f}')} p99 {f(r.lat_p99, '{:.2f}')} ms, "
                    f"stalls {r.lat_stalls}, {f(r.tp_msgs_per_sec, '{:,.0f}')} msg/s "
                    f"{' / '.join(r.reasons)[:200]} ({time.monotonic() - t0:.1f} s)"
                )
    finally:
        bench.stop()

    sums = [Summary(c, [r for r in runs if r.config == c.key]) for c in configs]
    meta: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python3 "
        + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd()), *sys.argv[1:]]),
        "versions": harness.versions(),
        "postfix": postfix_version(),
        "nice": harness.NICE[-1] if harness.NICE else "0",
        "opts": {
            k: getattr(o, k)
            for k in (
                "repeat",
                "messages",
                "warmup_messages",
                "body_bytes",
                "sessions",
                "tp_messages",
                "configs",
                "hold",
            )
        },
        "stall_ms": STALL_MS,
        "noisy": o.noisy,
    }
    md = render(sums, meta)
    (o.out / f"postfix-{stamp}.md").write_text(md)
    (o.out / f"postfix-{stamp}.json").write_text(
        json.dumps({"meta": meta, "runs": [dataclasses.asdict(r) for r in runs]}, indent=1) + "\n"
    )
    print(md)
    print(
        f"postfix_latency: wrote {o.out / ('postfix-' + stamp + '.md')} and .json", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
