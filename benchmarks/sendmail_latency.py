#!/usr/bin/env python3
"""Measure what each milter adds to mail passing through a real Sendmail.

One command (root: it runs a private Sendmail, see .ci/install-sendmail.sh;
stdlib only, Python >= 3.11; the peers come from benchmarks/setup.sh):

    python3 benchmarks/sendmail_latency.py            # 9 configurations, 1 run, about 3 minutes
    python3 benchmarks/sendmail_latency.py --quick    # 100 messages per configuration
    python3 benchmarks/sendmail_latency.py --configs none,triomilter,pymilter --repeat 3

The Sendmail counterpart of postfix_latency.py (latency only; its SMTP
client is reused): it starts the capture SMTP server (tests/e2e/capture.py)
and a private, loopback-only Sendmail 8.17 (tests/e2e/sendmail.py) relaying
to it.  For each configuration -- no milter (Sendmail alone), triomilter,
pymilter and the C no-op responder, every stage handled or end of message
only (``-eom``), with Sendmail's macro lists as configured or all emptied
(``-nomacros``) -- it starts a fresh milter pinned to CPU 1, points the
``INPUT_MAIL_FILTER`` at it (a daemon restart), and times, in one SMTP
session (smtplib, a child process pinned to CPU 0), --warmup then
--messages messages sent one after the other (10 headers, a ~10 kB body,
1 recipient) from MAIL FROM to the end-of-DATA reply, and each step.  It
checks that the capture server received every message, each with the
milter's ``X-Bench`` header.

Why ``-nomacros``: Sendmail writes a stage's macro packet and its command
in two small segments, so a milter that does not acknowledge at once meets
Nagle's algorithm on Sendmail's side and the 40 ms delayed ACK on its own
at every stage that carries macros (shared/reference/latency-through-mtas.md).
Emptying every list (``confMILTER_MACROS_* = ''``) removes the macro packets,
which shows whether a milter pays that stall.

The result goes to ``benchmarks/results/sendmail-<timestamp>.md`` (and
``.json``) and is printed.  Every wait is bounded (per-reply timeout, hard
subprocess timeouts, delivery deadlines, a run budget); traffic stays on
127.0.0.1.
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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO),):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchmarks.postfix_latency import (  # noqa: E402  (needs the repo on sys.path)
    STALL_MS,
    _stat_times,
    client_main,
    f,
    latency_client,
    med,
    signed,
    step_percentiles,
)

# Every macro list empty: Sendmail then sends no macro packet at all.
NO_MACROS = {k: "" for k in ("CONNECT", "HELO", "ENVFROM", "ENVRCPT", "DATA", "EOH", "EOM")}

DEFAULT_CONFIGS = [
    "none",
    "triomilter",
    "pymilter",
    "noop",
    "triomilter-eom",
    "pymilter-eom",
    "triomilter-nomacros",
    "pymilter-nomacros",
    "noop-nomacros",
]


@dataclasses.dataclass(frozen=True)
class Config:
    key: str
    milter: str | None
    eom_only: bool
    no_macros: bool
    title: str


def make_config(key: str, milters: dict[str, Any]) -> Config:
    if key == "none":
        return Config(key, None, False, False, "no milter (Sendmail alone)")
    base, eom, nomac = key, False, False
    if base.endswith("-nomacros"):
        base, nomac = base.removesuffix("-nomacros"), True
    if base.endswith("-eom"):
        base, eom = base.removesuffix("-eom"), True
    if base not in milters:
        raise ValueError(key)
    what = "end of message only" if eom else "every stage handled"
    lists = ", no macro lists" if nomac else ""
    return Config(key, base, eom, nomac, f"{base} ({what}{lists})")


@dataclasses.dataclass
class Run:
    config: str
    repeat: int
    status: str = "ok"  # ok | failed | not runnable | skipped
    reasons: list[str] = dataclasses.field(default_factory=list)
    lat_n: int = 0
    lat_p50: float | None = None
    lat_p99: float | None = None
    lat_max: float | None = None
    lat_stalls: int | None = None
    step_p50: dict[str, float] = dataclasses.field(default_factory=dict)
    step_p99: dict[str, float] = dataclasses.field(default_factory=dict)
    delivered: int | None = None
    with_header: int | None = None
    other_cpu: float | None = None
    samples: list[float] = dataclasses.field(default_factory=list)

    def fail(self, why: str) -> None:
        self.status = "failed"
        self.reasons.append(why)


class Bench:
    def __init__(self, o: argparse.Namespace, logdir: Path) -> None:
        import benchmarks.run as harness
        from tests.e2e.capture import CaptureServer
        from tests.e2e.sendmail import PrivateSendmail

        self.h = harness
        self.o = o
        self.logdir = logdir
        self.deadline = time.monotonic() + o.max_minutes * 60
        self.capture = CaptureServer(max_connections=50, idle_timeout=60.0)
        self.sm_cls = PrivateSendmail
        self.sm: Any = None
        self.unrunnable: dict[str, str] = {}

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def start(self) -> None:
        self.capture.start()
        # A milter that stalls or dies should show as errors, quickly.
        self.sm = self.sm_cls(self.capture.port, milter_timeouts="C:5s;S:10s;R:10s;E:20s")
        self.sm.start()
        self.log(
            f"sendmail_latency: Sendmail on 127.0.0.1:{self.sm.smtp_port} ({self.sm.base_dir}), "
            f"capture on 127.0.0.1:{self.capture.port}"
        )

    def stop(self) -> None:
        if self.sm is not None:
            with contextlib.suppress(Exception):
                self.sm.stop()
        self.capture.stop()

    def busy(self) -> tuple[float, float, float]:
        """(monotonic, machine busy s, CPU s of this benchmark and its Sendmail).

        Sendmail forks per session and per delivery; every such process ends
        up reaped by the daemon (PID 1 of its namespace), so the daemon's
        own and children's times plus the live processes' times cover it."""
        t = os.times()
        mine = t.user + t.system + t.children_user + t.children_system
        daemon = self.sm.daemon_pid if self.sm is not None else None
        sm_cpu = _stat_times(daemon, True) if daemon else 0.0
        if daemon:
            sm_cpu += sum(_stat_times(p, False) for p in self.sm.processes() if p != daemon)
        return time.monotonic(), self.h.machine_busy_s(), mine + sm_cpu

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
        from tests.e2e.sendmail import sendmail_spec

        m = None
        try:
            macros = NO_MACROS if cfg.no_macros else None
            if cfg.milter is not None:
                spec = self.h.MILTERS[cfg.milter]
                m = self.h.MilterProcess(spec, cfg.eom_only, self.logdir / f"{cfg.key}.{rep}.log")
                why = m.wait_listening(self.o.start_timeout)
                if why is not None:
                    r.status = "not runnable"
                    r.reasons.append(why)
                    self.unrunnable[cfg.key] = why
                    return r
                self.sm.set_milter(sendmail_spec(m.port), macros=macros)
            else:
                self.sm.set_milter(None)
            self.sm.wait_queue_empty(60)
            if self.o.wait_quiet > 0:
                self.h.wait_quiet(
                    min(self.o.wait_quiet, max(0.0, self.deadline - time.monotonic()))
                )
            a = self.busy()
            mc0 = self.h.proc_cpu_s(m.pid) if m else 0.0
            self._latency(r, cfg)
            b = self.busy()
            mc1 = self.h.proc_cpu_s(m.pid) if m else 0.0
            wall = b[0] - a[0]
            if wall > 0:
                ours = (b[2] - a[2]) + ((mc1 or 0.0) - (mc0 or 0.0))
                r.other_cpu = max(0.0, (b[1] - a[1]) - ours) / wall
            if m is not None and not m.alive():
                r.fail(f"milter died (exit {m.proc.returncode}): {self.h.last_line(m.log)}")
        except Exception as exc:  # e.g. SendmailError from a restart: report, go on
            r.fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        finally:
            if m is not None:
                m.stop()
        return r

    def _latency(self, r: Run, cfg: Config) -> None:
        self.capture.clear()
        res = latency_client(self.h, self.o, self.sm.smtp_port)
        if isinstance(res, str):
            r.fail(res)
            return
        if res["errors"]:
            r.fail(f"latency: {len(res['errors'])} error(s), first: {res['errors'][0]}")
        samples = res["samples"]
        r.lat_n = len(samples)
        if samples:
            r.step_p50, r.step_p99, tot = step_percentiles(samples)
            r.samples = [round(x, 3) for x in tot]
            r.lat_p50, r.lat_p99, r.lat_max = r.step_p50["total"], r.step_p99["total"], max(tot)
            r.lat_stalls = sum(1 for x in tot if x >= STALL_MS)
        sent = int(res.get("accepted", 0))
        try:
            msgs = self.capture.wait_for(sent, timeout=30 + sent * 0.05)
        except TimeoutError:
            msgs = self.capture.messages
            r.fail(f"only {len(msgs)} of {sent} messages delivered")
        msgs = self.capture.wait_quiet(quiet=0.2, timeout=2.0)
        r.delivered = len(msgs)
        r.with_header = sum(1 for x in msgs if b"\nx-bench:" in b"\n" + x.headers.lower())
        if cfg.milter is not None and r.with_header < r.delivered and r.status == "ok":
            r.fail(
                f"{r.delivered - r.with_header} of {r.delivered} delivered messages lack X-Bench"
            )


# ---------------------------------------------------------------- report


def render(cfgs: list[Config], runs: list[Run], meta: dict[str, Any]) -> str:
    o, v = meta["opts"], meta["versions"]

    def ok(key: str) -> list[Run]:
        return [r for r in runs if r.config == key and r.status == "ok"]

    def m(key: str, attr: str) -> float | None:
        return med([getattr(r, attr) for r in ok(key)])

    def step(key: str, name: str, q: str = "p50") -> float | None:
        return med([getattr(r, f"step_{q}").get(name) for r in ok(key)])

    out = [f"# Latency through Sendmail, {meta['started']}", ""]
    out.append(
        f"{v.get('cpu', '?')}, {v.get('cpus', '?')} CPUs, Linux {v.get('kernel', '?')}, "
        f"Python {v.get('python', '?')}, Sendmail {meta['sendmail']} (private, loopback only). "
        f"Milter pinned to CPU 1, the latency client to CPU 0, both at nice {meta['nice']}; "
        "Sendmail and the capture server unpinned."
    )
    out.append("")
    out.append(
        f"Latency: one SMTP session, {o['warmup_messages']} warm-up then {o['messages']} messages sent one "
        f"after the other (10 headers, {o['body_bytes']:,}-byte body, 1 recipient), timed from MAIL FROM to "
        "the end-of-DATA reply. Every message must reach the capture server, with `X-Bench` when a milter is "
        f"in front. {o['repeat']} run(s) per configuration, round robin, a fresh milter each run; figures are "
        "medians over the runs. Sendmail's macro lists: its defaults with `i` at end of message "
        "(tests/e2e/sendmail.py), or all empty for *no macro lists*."
    )
    out.append("")
    out.append(
        f"Versions: pymilter {v.get('pymilter', '?')} (libmilter {v.get('libmilter', '?')}), "
        f"triomilter {v.get('triomilter_git', '?')}."
    )
    out.append("")
    out.append(f"Command: `{meta['command']}`")
    out.append("")
    out.append("## What each milter adds (against Sendmail alone, same run)")
    out.append("")
    out.append(
        "| milter | p50 ms | p99 ms | adds p50 ms | adds p99 ms | messages ≥ 30 ms | "
        "MAIL p50 | RCPT p50 | DATA→354 p50 | content+dot p50 | delivered | status |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    b50, b99 = m("none", "lat_p50"), m("none", "lat_p99")
    for c in cfgs:
        p50, p99 = m(c.key, "lat_p50"), m(c.key, "lat_p99")
        d50 = None if p50 is None or b50 is None or c.key == "none" else p50 - b50
        d99 = None if p99 is None or b99 is None or c.key == "none" else p99 - b99
        rs = [r for r in runs if r.config == c.key]
        stalls = med([r.lat_stalls for r in ok(c.key)])
        n = med([r.lat_n for r in ok(c.key)])
        deliv = sum(r.delivered or 0 for r in ok(c.key))
        hdr = sum(r.with_header or 0 for r in ok(c.key))
        dcol = f"{deliv:,}" + (f", {hdr:,} with X-Bench" if c.milter else "")
        status = "; ".join(
            f"run {r.repeat + 1}: {r.status}: {' / '.join(r.reasons)}"
            for r in rs
            if r.status != "ok" or r.reasons
        )
        noisy = [r for r in rs if r.other_cpu is not None and r.other_cpu > meta["noisy"]]
        if noisy:
            worst = max(r.other_cpu or 0.0 for r in noisy)
            status = (
                status + "; " if status else ""
            ) + f"noisy: other processes used {100 * worst:.0f}% of a core"
        steps = " | ".join(f(step(c.key, s), "{:.2f}") for s in ("mail", "rcpt", "data", "content"))
        out.append(
            f"| {c.title} | {f(p50, '{:.2f}')} | {f(p99, '{:.2f}')} | {signed(d50)} | {signed(d99)} "
            f"| {f(stalls, '{:.0f}')} / {f(n, '{:.0f}')} | {steps} | {dcol} | {status or 'ok'} |"
        )
    out.append("")
    out.append(
        "Columns: *adds* = the configuration's median minus Sendmail alone's; *messages ≥ 30 ms* counts "
        f"latency samples of at least {STALL_MS:.0f} ms (the signature of a 40 ms Nagle / delayed-ACK stall); "
        "the step columns split the total: MAIL and RCPT carry the envfrom/envrcpt macro packets, "
        "*content+dot* the header, body and end-of-message exchanges (EOM carries `{msg_id}` and `i`). "
        f"A run is flagged *noisy* when processes other than this benchmark, its milter and its Sendmail "
        f"used more than {100 * meta['noisy']:.0f}% of a core meanwhile. See benchmarks/README.md."
    )
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help="comma list: none, or a milter of benchmarks/run.py (noop, triomilter, pymilter, ...) "
        "with optional -eom (end of message only) and -nomacros (every Sendmail macro list empty)",
    )
    ap.add_argument("--quick", action="store_true", help="100 messages per configuration")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (default 1)")
    ap.add_argument("--messages", type=int, default=None, help="measured messages (default 200)")
    ap.add_argument("--warmup-messages", type=int, default=20)
    ap.add_argument("--body-bytes", type=int, default=10000)
    ap.add_argument("--reply-timeout", type=float, default=30.0)
    ap.add_argument("--start-timeout", type=float, default=20.0)
    ap.add_argument("--nice", type=int, default=-10, help="nice value for milter and client")
    ap.add_argument("--max-minutes", type=float, default=20.0)
    ap.add_argument("--noisy", type=float, default=0.25)
    ap.add_argument("--wait-quiet", type=float, default=0.0)
    ap.add_argument("--no-setup", action="store_true", help="do not run benchmarks/setup.sh first")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    o = ap.parse_args()
    o.messages = o.messages if o.messages is not None else (100 if o.quick else 200)
    if o.client is not None:
        return client_main(o.client, o.messages, o.warmup_messages, o.body_bytes, o.reply_timeout)
    if o.repeat < 1 or o.messages < 1:
        ap.error("--repeat and --messages must be at least 1")

    import benchmarks.run as harness
    from tests.e2e.sendmail import sendmail_missing_reason, sendmail_version

    try:
        cfgs = [make_config(k.strip(), harness.MILTERS) for k in o.configs.split(",") if k.strip()]
    except ValueError as exc:
        ap.error(f"unknown configuration {exc}; see --help")
    why = sendmail_missing_reason()
    if why:
        print(f"sendmail_latency: {why}", file=sys.stderr)
        return 1
    if any(c.milter for c in cfgs) and not o.no_setup:
        subprocess.run(["bash", str(HERE / "setup.sh")], check=True, timeout=1800)
    if (os.cpu_count() or 1) < 2:
        print("sendmail_latency: needs 2 CPUs (milter on CPU 1, client on CPU 0)", file=sys.stderr)
        return 1
    if o.nice and (os.geteuid() == 0 or o.nice > 0):
        harness.NICE[:] = ["nice", "-n", str(o.nice)]
    harness.raise_nofile()

    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    o.out.mkdir(parents=True, exist_ok=True)
    logdir = harness.BUILD / "logs" / f"sendmail-{stamp}"
    logdir.mkdir(parents=True, exist_ok=True)

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)

    bench = Bench(o, logdir)
    runs: list[Run] = []
    try:
        bench.start()
        for rep in range(o.repeat):
            for cfg in cfgs:
                t0 = time.monotonic()
                r = bench.run(cfg, rep)
                runs.append(r)
                bench.log(
                    f"  run {rep + 1} {cfg.key:20} {r.status:12} p50 {f(r.lat_p50, '{:.2f}')} "
                    f"p99 {f(r.lat_p99, '{:.2f}')} ms, stalls {r.lat_stalls} "
                    f"{' / '.join(r.reasons)[:200]} ({time.monotonic() - t0:.1f} s)"
                )
    finally:
        bench.stop()

    meta: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python3 "
        + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd()), *sys.argv[1:]]),
        "versions": harness.versions(),
        "sendmail": sendmail_version(),
        "nice": harness.NICE[-1] if harness.NICE else "0",
        "opts": {
            k: getattr(o, k)
            for k in ("repeat", "messages", "warmup_messages", "body_bytes", "configs")
        },
        "stall_ms": STALL_MS,
        "noisy": o.noisy,
    }
    md = render(cfgs, runs, meta)
    (o.out / f"sendmail-{stamp}.md").write_text(md)
    (o.out / f"sendmail-{stamp}.json").write_text(
        json.dumps({"meta": meta, "runs": [dataclasses.asdict(r) for r in runs]}, indent=1) + "\n"
    )
    print(md)
    print(
        f"sendmail_latency: wrote {o.out / ('sendmail-' + stamp + '.md')} and .json",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
