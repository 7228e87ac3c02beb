"""Scale-out through HAProxy, with faults: real Postfix -> real HAProxy
(``mode tcp``, the configuration of docs/deploying.md) -> two
``triomilter serve`` processes, ``milter_default_action = tempfail``.

Several SMTP clients send a few hundred messages, one SMTP session per
attempt.  During the run one backend is killed with SIGKILL while it holds a
message in flight, and later restarted on the same port.  Every message must
end up delivered exactly once, with the header of the backend that filtered
it: either at once, or after a 4xx that the client answered with a retry.
Nothing may get through unfiltered, nothing may be lost or duplicated.

Each backend names itself in ``X-Backend`` (name and generation: ``m1-1``
is the first m1 process, ``m1-2`` its replacement), so the delivered mail
shows which process filtered what.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import signal
import smtplib
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest

from ._milter_runner import CliMilter, header_values
from .capture import CapturedMessage, CaptureServer
from .conftest import PostfixFactory
from .haproxy import PrivateHAProxy, ServerStat, haproxy_missing_reason
from .postfix import PrivatePostfix

SENDER = "sender@example.test"
MILTER_TARGET = "tests/e2e/backend_milter.py"

CLIENTS = 8  # concurrent SMTP clients
# Messages the clients may send in each phase: the controller hands out
# these budgets, so the load is bounded and its shape does not depend on
# the machine's speed.
BEFORE_KILL = 100  # both backends up
AFTER_KILL = 50  # m1 dead, before and while HAProxy's checks notice
WHILE_DOWN = 50  # m1 marked DOWN
AFTER_RESTART = 100  # m1 back
MAX_ATTEMPTS = 6  # per message: 1 + 5 retries
RETRY_PAUSE = 0.2  # seconds before a retry (a real client waits minutes)
SMTP_TIMEOUT = 30.0  # per SMTP command: above Postfix's milter timeouts (10 s/30 s)
PHASE_TIMEOUT = 60.0  # bound of every wait for the load to reach a phase


def _header(data: bytes, name: bytes) -> list[str]:
    return [v.decode("ascii", "replace") for v in header_values(data, name)]


@pytest.fixture(scope="module")
def haproxy_required() -> None:
    """Skip (or, under CI, fail) when HAProxy is not installed."""
    reason = haproxy_missing_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the HAProxy e2e test: {reason}", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------
# the SMTP side: one message, retried on 4xx


@dataclasses.dataclass
class Attempt:
    number: int
    started: float  # time.monotonic() before connecting
    # Where it ended: "ehlo", "mail", "rcpt", "data" (the command),
    # "end-of-data", or "error at STAGE" for an exception (code 0).
    stage: str
    code: int
    text: str


@dataclasses.dataclass
class Outcome:
    """What the client saw for one message, over all its attempts."""

    index: int
    subject: str
    attempts: list[Attempt] = dataclasses.field(default_factory=list)

    @property
    def accepted(self) -> Attempt | None:
        """The attempt that got 250 at end of data (None if none did)."""
        done = [a for a in self.attempts if a.stage == "end-of-data" and a.code == 250]
        return done[-1] if done else None

    @property
    def tempfails(self) -> list[Attempt]:
        return [a for a in self.attempts if 400 <= a.code < 500]

    @property
    def unexpected(self) -> list[Attempt]:
        """Replies that are neither success nor a 4xx, and client errors."""
        return [a for a in self.attempts if a not in self.tempfails and a is not self.accepted]


def message_bytes(index: int, subject: str, attempt: int) -> bytes:
    return (
        f"Subject: {subject}\r\n"
        f"Message-ID: <load-{index}.{attempt}@client.test.invalid>\r\n"
        f"X-Load-Id: {index}\r\n"
        f"X-Attempt: {attempt}\r\n"
        f"\r\n"
        f"body of message {index}\r\n"
    ).encode("ascii")


class Load:
    """The SMTP clients: ``CLIENTS`` threads, each sending one message per
    SMTP session and retrying a message after a 4xx reply (at most
    ``MAX_ATTEMPTS`` times).  They send only as many messages as `allow`
    granted, and end once `stop` is called."""

    def __init__(self, connect: Callable[[], smtplib.SMTP]) -> None:
        self._connect = connect
        self._indexes = itertools.count()
        self._lock = threading.Condition()
        self._budget = 0  # messages the clients may start
        self._sent_by_clients = 0
        self._started = 0  # all messages, the held ones too
        self._finished = 0
        self._stopped = False
        self.outcomes: dict[int, Outcome] = {}

    def allow(self, count: int) -> None:
        """Let the clients send ``count`` more messages."""
        with self._lock:
            self._budget += count
            self._lock.notify_all()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()

    def wait_finished(self, timeout: float = PHASE_TIMEOUT) -> None:
        """Wait until every message started so far is accepted or given up."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._finished < self._started or self._sent_by_clients < self._budget:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"load: {self._finished} of {self._started} messages finished "
                        f"(budget {self._budget}) after {timeout}s"
                    )
                self._lock.wait(remaining)

    def accepted_count(self) -> int:
        with self._lock:
            return sum(1 for o in self.outcomes.values() if o.accepted is not None)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return [
                dataclasses.replace(o, attempts=list(o.attempts)) for o in self.outcomes.values()
            ]

    def new_message(self, kind: str) -> Outcome:
        """A message outside the budget (the held ones)."""
        with self._lock:
            self._started += 1
            return self._new_locked(kind)

    def _new_locked(self, kind: str) -> Outcome:
        index = next(self._indexes)
        outcome = self.outcomes[index] = Outcome(index, f"{kind} {index}")
        return outcome

    def run_client(self) -> None:
        while True:
            with self._lock:
                # Bounded: stop() is always called (the test's finally).
                while self._sent_by_clients >= self._budget and not self._stopped:
                    self._lock.wait()
                if self._stopped:
                    return
                self._sent_by_clients += 1
                self._started += 1
                outcome = self._new_locked("load")
            self.send(outcome)

    def send(self, outcome: Outcome) -> None:
        """Send one message until accepted, a non-4xx answer, or MAX_ATTEMPTS."""
        for number in range(1, MAX_ATTEMPTS + 1):
            attempt = self._attempt(outcome, number)
            with self._lock:
                outcome.attempts.append(attempt)
            if not 400 <= attempt.code < 500:
                break  # accepted, or something the test reports as a failure
            time.sleep(RETRY_PAUSE)
        with self._lock:
            self._finished += 1
            self._lock.notify_all()

    def _attempt(self, outcome: Outcome, number: int) -> Attempt:
        started = time.monotonic()
        stage = "connect"
        reply: bytes | str
        try:
            with self._connect() as smtp:
                stage = "ehlo"
                code, reply = smtp.ehlo()
                if code == 250:
                    stage = "mail"
                    code, reply = smtp.mail(SENDER)
                if code == 250:
                    stage = "rcpt"
                    code, reply = smtp.rcpt(f"r{outcome.index}@example.test")
                if code == 250:
                    stage = "data"
                    try:
                        msg = message_bytes(outcome.index, outcome.subject, number)
                        code, reply = smtp.data(msg)
                        stage = "end-of-data"
                    except smtplib.SMTPDataError as exc:  # DATA itself refused
                        code, reply = exc.smtp_code, exc.smtp_error
        except (OSError, smtplib.SMTPException) as exc:
            return Attempt(number, started, f"error at {stage}", 0, repr(exc))
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
        return Attempt(number, started, stage, code, text)


# --------------------------------------------------------------------------
# the scenario


class Backends:
    """The milter processes, by generation name (m1-1, m2-1, m1-2...)."""

    def __init__(self, gate: Path) -> None:
        self.gate = gate
        self.procs: dict[str, CliMilter] = {}

    def start(self, name: str, port: int = 0) -> CliMilter:
        milter = CliMilter(
            MILTER_TARGET,
            "--log-level",
            "INFO",
            env={"TRIOMILTER_E2E_BACKEND": name, "TRIOMILTER_E2E_GATE": str(self.gate)},
            port=port,
        )
        self.procs[name] = milter
        return milter.start()

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM every process still running; exit statuses by name."""
        return {name: milter.stop() for name, milter in self.procs.items()}

    def remove_logs(self) -> None:
        for milter in self.procs.values():
            with contextlib.suppress(OSError):
                os.unlink(milter.log_path)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{m.log_text()}" for name, m in self.procs.items())

    def held(self) -> list[str]:
        """Names of the held-BACKEND-N files: messages that reached on_body."""
        return sorted(p.name for p in self.gate.glob("held-*"))

    def wait_held(self, count: int) -> None:
        wait_until(f"{count} held message(s) in on_body", lambda: len(self.held()) >= count)


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = PHASE_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        time.sleep(0.02)


def delivered_backends(capture: CaptureServer) -> Counter[str]:
    """How many delivered messages each backend filtered, so far."""
    return Counter(b for m in capture.messages for b in _header(m.data, b"X-Backend"))


@dataclasses.dataclass
class Run:
    """What happened during the load, for the accounting."""

    outcomes: list[Outcome]
    victim: int  # index of the message held in m1-1 when it was killed
    killed_at: float
    restarted_at: float
    before_kill: Counter[str]
    m1_down: ServerStat
    m1_up: ServerStat
    load_seconds: float


def run_load_with_faults(
    postfix: PrivatePostfix, capture: CaptureServer, haproxy: PrivateHAProxy, backends: Backends
) -> Run:
    """Run the clients; kill m1-1 while it holds a message; restart m1."""
    t0 = time.monotonic()
    m1_port = backends.procs["m1-1"].port
    load = Load(lambda: postfix.smtp(timeout=SMTP_TIMEOUT))

    def delivered_so_far() -> Counter[str]:
        """Backends of the mail delivered once everything accepted is."""
        capture.wait_for(load.accepted_count(), timeout=PHASE_TIMEOUT)
        return delivered_backends(capture)

    with concurrent.futures.ThreadPoolExecutor(max_workers=CLIENTS + 10) as pool:
        futures = [pool.submit(load.run_client) for _ in range(CLIENTS)]
        try:
            # 1. Both backends serve.
            load.allow(BEFORE_KILL)
            load.wait_finished()
            before_kill = delivered_so_far()

            # 2. Get a message held inside m1-1 (HAProxy picks the backend:
            # send held messages until one lands there; those landing on
            # m2-1 wait for the release), then SIGKILL m1-1 while the
            # clients are busy.
            victim = None
            for count in range(1, 11):
                outcome = load.new_message("hold")
                futures.append(pool.submit(load.send, outcome))
                backends.wait_held(count)
                if any(name.startswith("held-m1-1-") for name in backends.held()):
                    victim = outcome.index
                    break
            assert victim is not None, f"no held message landed on m1-1: {backends.held()}"
            load.allow(AFTER_KILL)
            wait_until("the clients are sending", lambda: load.accepted_count() > BEFORE_KILL)
            backends.procs["m1-1"].signal(signal.SIGKILL)
            backends.procs["m1-1"].wait()
            killed_at = time.monotonic()
            (backends.gate / "release").touch()

            # 3. m1 is dead: health checks take it out; the load goes on.
            m1_down = haproxy.wait_status("m1", "DOWN")
            load.allow(WHILE_DOWN)
            load.wait_finished()

            # 4. m1 comes back on the same port and serves again.
            restarted_at = time.monotonic()
            backends.start("m1-2", port=m1_port)
            m1_up = haproxy.wait_status("m1", "UP", "L7OK")
            load.allow(AFTER_RESTART)
            load.wait_finished()
        finally:
            load.stop()
            (backends.gate / "release").touch()  # never leave a sender held
        for future in futures:
            future.result(timeout=MAX_ATTEMPTS * (SMTP_TIMEOUT + RETRY_PAUSE))
    return Run(
        outcomes=load.snapshot(),
        victim=victim,
        killed_at=killed_at,
        restarted_at=restarted_at,
        before_kill=before_kill,
        m1_down=m1_down,
        m1_up=m1_up,
        load_seconds=time.monotonic() - t0,
    )


@dataclasses.dataclass
class Accounting:
    messages: int
    delivered_first_try: int
    tempfailed_then_delivered: int
    retries: int
    tempfail_replies: Counter[str]
    by_backend: Counter[str]


def account(run: Run, delivered: list[CapturedMessage]) -> Accounting:
    """Match every message the clients sent against the delivered mail;
    fail on anything lost, duplicated, unfiltered or refused for good."""
    copies: dict[int, list[CapturedMessage]] = {}
    unknown = []
    for msg in delivered:
        ids = _header(msg.data, b"X-Load-Id")
        if len(ids) != 1 or not ids[0].isdigit():
            unknown.append(msg.data[:300])
            continue
        copies.setdefault(int(ids[0]), []).append(msg)
    assert unknown == [], f"delivered mail the clients did not send: {unknown!r}"

    problems = []
    counts = Accounting(len(run.outcomes), 0, 0, 0, Counter(), Counter())
    for outcome in sorted(run.outcomes, key=lambda o: o.index):
        for attempt in outcome.tempfails:
            counts.tempfail_replies[f"{attempt.stage}: {attempt.code} {attempt.text}"] += 1
        got = copies.pop(outcome.index, [])
        accepted = outcome.accepted
        if outcome.unexpected:
            problems.append(f"message {outcome.index}: unexpected replies {outcome.unexpected}")
        if accepted is None:
            problems.append(f"message {outcome.index}: never accepted: {outcome.attempts}")
            if got:
                problems.append(f"message {outcome.index}: {len(got)} copies delivered anyway")
            continue
        if len(got) != 1:
            problems.append(f"message {outcome.index}: {len(got)} copies delivered, not 1")
            continue
        (msg,) = got
        # The delivered copy is the one the client saw accepted, not a
        # tempfailed attempt that got through after all.
        if _header(msg.data, b"X-Attempt") != [str(accepted.number)]:
            problems.append(
                f"message {outcome.index}: delivered attempt {_header(msg.data, b'X-Attempt')}, "
                f"accepted attempt {accepted.number}"
            )
        names = _header(msg.data, b"X-Backend")
        if len(names) != 1:
            problems.append(f"message {outcome.index}: X-Backend {names} (unfiltered?)")
            continue
        (name,) = names
        counts.by_backend[name] += 1
        # Causal order, not timing: a session opened after the kill cannot
        # reach the dead process; one opened before the replacement was
        # started cannot reach the replacement.
        if accepted.started > run.killed_at and name == "m1-1":
            problems.append(f"message {outcome.index}: opened after the kill, filtered by m1-1")
        if accepted.started < run.restarted_at and name == "m1-2":
            problems.append(f"message {outcome.index}: filtered by m1-2 before it existed")
        if accepted.number == 1:
            counts.delivered_first_try += 1
        else:
            counts.tempfailed_then_delivered += 1
            counts.retries += accepted.number - 1
    if copies:
        problems.append(f"delivered mail for messages never sent: {sorted(copies)}")
    assert problems == [], "\n".join(problems[:50])
    return counts


def _stat_summary(stat: ServerStat) -> str:
    return (
        f"{stat.status} sessions={stat.sessions_total} retries={stat.retries} "
        f"redispatches={stat.redispatches} connect_errors={stat.connect_errors} "
        f"response_errors={stat.response_errors}"
    )


def _milter_warnings(maillog: str) -> Counter[str]:
    """Postfix's warnings about milters, digits blanked, counted."""
    counts: Counter[str] = Counter()
    for line in maillog.splitlines():
        if "warning:" in line and "milter" in line:
            counts[re.sub(r"\d+", "N", line.split("warning:", 1)[1].strip())] += 1
    return counts


def _problem_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or " CRITICAL " in line]


@pytest.fixture
def gate_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="triomilter-gate-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_scale_out_with_backend_killed_and_restarted(
    request: pytest.FixtureRequest,
    haproxy_required: None,
    postfix_factory: PostfixFactory,
    capture: CaptureServer,
    gate_dir: Path,
) -> None:
    t0 = time.monotonic()
    backends = Backends(gate_dir)
    with contextlib.ExitStack() as stack:
        # Exit callbacks run last-in first-out: each log is attached to a
        # failure report while its process still runs, then it is stopped.
        stack.callback(backends.remove_logs)
        stack.callback(backends.stop_all)
        stack.push(attach_on_failure(request, "milter logs", backends.logs))
        m1 = backends.start("m1-1")
        m2 = backends.start("m2-1")
        haproxy = stack.enter_context(PrivateHAProxy({"m1": m1.port, "m2": m2.port}))
        stack.push(attach_on_failure(request, "haproxy log", haproxy.log_text))
        # Servers start as UP in HAProxy; wait for a real check instead.
        haproxy.wait_status("m1", "UP", "L7OK")
        haproxy.wait_status("m2", "UP", "L7OK")
        postfix = postfix_factory(haproxy.spec, milter_default_action="tempfail")

        run = run_load_with_faults(postfix, capture, haproxy, backends)

        accepted = sum(1 for o in run.outcomes if o.accepted is not None)
        capture.wait_for(accepted, timeout=PHASE_TIMEOUT)
        postfix.wait_queue_empty(timeout=PHASE_TIMEOUT)
        # Anything arriving late would be a duplicate or a lost 4xx.
        delivered = capture.wait_quiet(quiet=1.0, timeout=PHASE_TIMEOUT)
        stats = haproxy.servers()
        exits = backends.stop_all()
        counts = account(run, delivered)
        report_counts(run, counts, stats, exits, postfix, time.monotonic() - t0)

        # Both backends served before the kill; the replacement after.
        assert run.before_kill["m1-1"] > 0 and run.before_kill["m2-1"] > 0, run.before_kill
        assert counts.by_backend["m1-2"] > 0, counts.by_backend
        # The message inside m1-1 at the kill: 4xx at end of data, then
        # delivered on a retry.
        (victim,) = [o for o in run.outcomes if o.index == run.victim]
        assert victim.tempfails and victim.tempfails[0].stage == "end-of-data", victim
        assert victim.accepted is not None and victim.accepted.number > 1, victim
        # Every 4xx is Postfix's milter_default_action = tempfail.
        assert all(
            k.endswith("451 4.7.1 Service unavailable - try again later")
            for k in counts.tempfail_replies
        ), counts.tempfail_replies
        # SIGTERM stops the live processes cleanly; none logged an error.
        assert exits["m2-1"] == 0 and exits["m1-2"] == 0, exits
        assert exits["m1-1"] == -signal.SIGKILL, exits
        for name in ("m2-1", "m1-2"):
            assert _problem_lines(backends.procs[name].log_text()) == [], name
        assert capture.errors == []


def attach_on_failure(
    request: pytest.FixtureRequest, title: str, read: Callable[[], str]
) -> Callable[[type[BaseException] | None, BaseException | None, TracebackType | None], bool]:
    """An ExitStack exit callback adding ``read()`` (its tail) to the report
    of a failing test."""

    def attach(
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc_type is not None:
            try:
                text = read()[-20000:]
            except (OSError, RuntimeError) as error:
                text = f"(unavailable: {error!r})"
            request.node.add_report_section("call", title, text or "(empty)")
        return False  # never swallow the failure

    return attach


def report_counts(
    run: Run,
    counts: Accounting,
    stats: dict[str, ServerStat],
    exits: dict[str, int | None],
    postfix: PrivatePostfix,
    seconds: float,
) -> None:
    """Print the numbers the documentation quotes (pytest -s shows them)."""
    lines = [
        f"messages: {counts.messages} (clients: {CLIENTS})",
        f"delivered first try: {counts.delivered_first_try}",
        f"tempfailed then delivered: {counts.tempfailed_then_delivered}",
        f"retries: {counts.retries}",
        f"4xx replies: {dict(counts.tempfail_replies)}",
        f"delivered by backend: {dict(sorted(counts.by_backend.items()))}",
        f"by backend before the kill: {dict(sorted(run.before_kill.items()))}",
        f"m1 after the kill: {run.m1_down.status} ({run.m1_down.check_status}); "
        f"after the restart: {run.m1_up.status} ({run.m1_up.check_status})",
        *(f"haproxy {name}: {_stat_summary(stat)}" for name, stat in sorted(stats.items())),
        f"postfix milter warnings: {dict(_milter_warnings(postfix.log_text()))}",
        f"milter exit statuses: {exits}",
        f"load: {run.load_seconds:.1f} s; test: {seconds:.1f} s",
    ]
    print("\nHAProxy scale-out run:\n  " + "\n  ".join(lines))
