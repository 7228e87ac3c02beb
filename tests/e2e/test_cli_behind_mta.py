"""The milter process under real traffic: a handler panic and a graceful
shutdown (SIGTERM), with ``python -m triomilter serve`` behind Postfix and
behind Sendmail (each set to tempfail when the milter is unreachable:
``milter_default_action = tempfail`` and ``F=T``, the fixtures' defaults).

The promise to check: every message is either delivered *with* the milter's
changes or refused with a 4xx; none is lost, none accepted unfiltered.
"""

from __future__ import annotations

import signal
import tempfile
import threading
from pathlib import Path

from ._milter_runner import CliMilter
from .capture import CaptureServer
from .cli_milters import GATE_ENV
from .mta import Mta
from .scenarios import SENDER, Outcome, send_data, send_message
from .scenarios import filtered as _filtered
from .scenarios import subject_of as _subject
from .scenarios import wait_until as _wait_until

CLI_MILTERS = "tests/e2e/cli_milters.py"


def test_panic_tempfails_and_exits_70(mta: Mta, capture: CaptureServer) -> None:
    """A handler panic: that message gets 4xx; while the panic grace lasts
    (kept open by a handler still running in another session) every other
    answer is TEMPFAIL too, even a handler's REJECT; then the process exits 70
    and the MTA's tempfail-when-unreachable takes over.  Only the message
    filtered before the panic is ever delivered."""
    with tempfile.TemporaryDirectory(prefix="triomilter-gate-") as gate_dir:
        gate = Path(gate_dir)
        milter = CliMilter(
            f"{CLI_MILTERS}:panicky", "--panic-grace", "20", env={GATE_ENV: gate_dir}
        )
        blocked: list[Outcome] = []

        def blocker() -> None:
            with mta.smtp(timeout=60) as s:
                s.ehlo()
                blocked.append(send_message(s, "hold-blocker"))

        with milter:
            mta.use(milter)
            with mta.smtp() as s:
                s.ehlo()
                assert send_message(s, "before").code == 250
            (before,) = capture.wait_for(1)
            assert _filtered(before)

            thread = threading.Thread(target=blocker)
            thread.start()
            try:
                _wait_until(lambda: list(gate.glob("held-*")), 20, "the blocker's body")
                with mta.smtp() as other, mta.smtp() as s:
                    other.ehlo()
                    assert other.mail(SENDER)[0] == 250
                    assert other.rcpt("other@example.test")[0] == 250
                    s.ehlo()
                    panic = send_message(s, "panic")
                    assert (panic.stage, panic.code, panic.text) == ("data", *mta.tempfail)
                    # The milter still runs (the blocker's handler is busy), but
                    # answers nothing but TEMPFAIL: not the REJECT of on_eoh.
                    assert milter.proc is not None and milter.proc.poll() is None
                    refused = send_data(other, "refuse")
                    assert (refused.stage, refused.code, refused.text) == ("data", *mta.tempfail)
                    (gate / "release").touch()
                    thread.join(30)
                    assert [(o.code, o.text) for o in blocked] == [mta.tempfail]
                    assert milter.wait(15) == 70  # EX_SOFTWARE
                    assert send_message(s, "after the panic").code // 100 == 4
            finally:
                (gate / "release").touch()
                thread.join(30)
            with mta.smtp() as s:
                s.ehlo()
                assert s.mail(SENDER) == mta.tempfail  # the milter is gone
            mta.saw_milter_gone()
            log = milter.log_text()
    assert not thread.is_alive()
    assert "panicked" in log and "RuntimeError('a bug in the handler')" in log
    assert capture.wait_quiet(0.3) == [before]


def test_graceful_shutdown_during_traffic(mta: Mta, capture: CaptureServer) -> None:
    """SIGTERM while some sessions are mid-DATA (their body handler waits for
    a gate) and others keep sending: the held messages finish with the
    milter's header, new messages get 4xx, the process exits 0."""
    held_count = 5
    traffic_threads = 4
    with tempfile.TemporaryDirectory(prefix="triomilter-gate-") as gate_dir:
        gate = Path(gate_dir)
        milter = CliMilter(
            f"{CLI_MILTERS}:gated", "--shutdown-grace", "20", env={GATE_ENV: gate_dir}
        )
        outcomes: list[Outcome] = []
        errors: list[BaseException] = []
        lock = threading.Lock()
        exited = threading.Event()

        def record(outcome: Outcome) -> None:
            with lock:
                outcomes.append(outcome)

        def held(i: int) -> None:
            try:
                with mta.smtp(timeout=60) as s:
                    s.ehlo()
                    record(send_message(s, f"hold-{i}"))
            except BaseException as exc:
                errors.append(exc)

        def traffic(t: int) -> None:
            n = 0
            after_exit = 0
            try:
                while after_exit < 2 and n < 2000:
                    with mta.smtp(timeout=60) as s:
                        s.ehlo()
                        for _ in range(3):
                            late = exited.is_set()
                            n += 1
                            record(send_message(s, f"traffic-{t}-{n}"))
                            after_exit += late
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=held, args=(i,)) for i in range(held_count)]
        threads += [threading.Thread(target=traffic, args=(t,)) for t in range(traffic_threads)]
        with milter:
            mta.use(milter)
            try:
                for thread in threads:
                    thread.start()
                _wait_until(
                    lambda: len(list(gate.glob("held-*"))) == held_count, 20, "held messages"
                )
                _wait_until(
                    lambda: any(o.code == 250 for o in list(outcomes)), 20, "traffic delivered"
                )
                milter.signal(signal.SIGTERM)
                # Keep the traffic going until the draining milter refused some.
                _wait_until(
                    lambda: "new message answered TEMPFAIL" in milter.log_text(),
                    10,
                    "a message refused while draining",
                )
                (gate / "release").touch()
                assert milter.wait(30) == 0
                exited.set()
            finally:
                (gate / "release").touch()
                exited.set()
                for thread in threads:
                    thread.join(60)
            log = milter.log_text()
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []

    accepted = [o for o in outcomes if o.code == 250]
    refused = [o for o in outcomes if o.code != 250]
    msgs = capture.wait_for(len(accepted), timeout=30)
    # None lost: every 250 was delivered; none unfiltered; nothing else.
    assert sorted(_subject(m) for m in msgs) == sorted(o.subject for o in accepted)
    assert [m for m in msgs if not _filtered(m)] == []
    assert all(o.code // 100 == 4 for o in refused), refused
    # Every held message was finished, the traffic saw both outcomes.
    assert {o.subject for o in accepted} >= {f"hold-{i}" for i in range(held_count)}
    assert any(o.subject.startswith("traffic-") for o in accepted)
    assert len(refused) >= 2 * traffic_threads
    assert "SIGTERM received" in log and "shutting down:" in log
    mta.wait_queue_empty()
    assert capture.wait_quiet(0.2) == msgs
