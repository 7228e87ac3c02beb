"""Smoke tests of the Sendmail e2e infrastructure itself (tests/e2e/sendmail.py).

They prove that a message goes through the private Sendmail to the capture
server unchanged except for Sendmail's own Received: header, that the milter
settings reach Sendmail, that nothing of an instance survives stop() (the
detached queue runners included) and that nothing leaves loopback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._milter_runner import sendmail_queue_id, strip_sendmail_received
from .capture import CaptureServer
from .conftest import SendmailFactory
from .sendmail import (
    BASE_PARENT,
    BASE_PREFIX,
    HOSTNAME,
    PrivateSendmail,
    cleanup_stale_instances,
    listen_port,
    sendmail_spec,
)

SENDER = "sender@example.test"


def test_envelope_and_bytes_pass_unchanged(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    long_line = b"x" * 5000  # kept whole: RELAY_MAILER_LL 0
    original = (
        b"From: Sender <sender@example.test>\r\n"
        b"To: a@example.test, b@example.test\r\n"
        b"Subject: caf\xc3\xa9 \xe9t\xe9 8-bit header\r\n"
        b"X-Folded: one\r\n\ttwo\r\n"
        b"\r\n"
        b"body line\r\n"
        b".a line starting with a dot\r\n"
        b"8-bit body: \xc3\xa4\xc3\xb6\xc3\xbc\r\n" + long_line + b"\r\n"
        b"trailing spaces   \r\n"
    )
    rcpts = ["a@example.test", "b@example.test"]
    with sendmail.smtp() as s:
        code, banner = s.ehlo()
        assert code == 250 and banner.startswith(f"{HOSTNAME} Hello localhost".encode())
        s.sendmail(SENDER, rcpts, original, ["BODY=8BITMIME"])
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == SENDER
    assert msg.mail_params == {"SIZE": msg.mail_params["SIZE"], "BODY": "8BITMIME"}
    assert sorted(msg.rcpt_tos) == rcpts
    # No Date:, From:, Message-Id: or X-Authentication-Warning: added.
    assert strip_sendmail_received(msg.data) == original
    assert msg.helo == HOSTNAME
    queue_id = sendmail_queue_id(msg.data)
    sendmail.wait_for_log(rf"{queue_id}: .*stat=Sent")
    sendmail.wait_queue_empty()
    assert capture.wait_quiet(0.3) == [msg]
    assert capture.errors == []


def test_local_addresses_go_to_the_capture_server_too(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    with sendmail.smtp() as s:
        s.sendmail(SENDER, ["postmaster", f"root@{HOSTNAME}"], b"Subject: local\r\n\r\nx\r\n")
    (msg,) = capture.wait_for(1)
    # MAIL_HUB rewrites local addresses to the hub's name.
    assert sorted(msg.rcpt_tos) == ["postmaster@[127.0.0.1]", "root@[127.0.0.1]"]


def test_three_messages_on_one_connection(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    originals = {
        f"rcpt{i}@example.test": f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode() for i in range(3)
    }
    with sendmail.smtp() as s:
        for rcpt, data in originals.items():
            s.sendmail(SENDER, [rcpt], data)
    msgs = capture.wait_for(3)
    by_rcpt = {m.rcpt_tos[0]: m for m in msgs}
    assert sorted(by_rcpt) == sorted(originals)
    for rcpt, msg in by_rcpt.items():
        assert strip_sendmail_received(msg.data) == originals[rcpt]


def test_dead_milter_tempfails_with_f_t(sendmail: PrivateSendmail, capture: CaptureServer) -> None:
    """A milter on a closed port + F=T: 451 at MAIL (the banner and EHLO do
    not involve the milter); proves the milter settings reach Sendmail."""
    sendmail.set_milter(sendmail_spec(listen_port()), flags="T")
    with sendmail.smtp() as s:
        assert s.ehlo()[0] == 250
        assert s.mail(SENDER) == (451, b"4.3.2 Please try again later")
        s.rset()
    sendmail.wait_for_log(r"Milter \(myfilter\): error connecting to filter: Connection refused")
    assert capture.wait_quiet(0.2) == []


def test_set_milter_restarts_the_daemon(sendmail: PrivateSendmail, capture: CaptureServer) -> None:
    first = sendmail.daemon_pid
    assert sendmail.set_milter(sendmail_spec(listen_port()))
    assert sendmail.daemon_pid != first
    assert "Xmyfilter, S=inet:" in Path(sendmail.cf_path).read_text()
    assert not sendmail.set_milter(sendmail.milter)  # unchanged: no restart
    assert sendmail.reset_config()
    assert "Xmyfilter" not in Path(sendmail.cf_path).read_text()
    with sendmail.smtp() as s:
        s.sendmail(SENDER, ["after@example.test"], b"Subject: after\r\n\r\nok\r\n")
    (msg,) = capture.wait_for(1)
    assert msg.rcpt_tos == ["after@example.test"]


def test_stop_kills_detached_queue_runners(capture: CaptureServer, sendmail_required: None) -> None:
    """``sendmail -q1h`` forks a persistent queue runner and returns; it lives
    in the instance's PID namespace, so stopping the daemon ends it too."""
    with PrivateSendmail(capture.port) as sm:
        proc = sm.command("-q1h")
        assert proc.returncode == 0, proc
        deadline = time.monotonic() + 10
        while len(sm.processes()) < 2:
            assert time.monotonic() < deadline, sm.processes()
            time.sleep(0.01)
        pids = sm.processes()
        base = sm.base_dir
    assert not os.path.exists(base)
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or ") Z " in Path(f"/proc/{pid}/stat").read_text()


def test_stale_instance_is_cleaned_up(capture: CaptureServer, sendmail_required: None) -> None:
    """An instance whose owner died (lock released, never stopped) is killed
    and removed by the next cleanup; live instances are left alone."""
    live = PrivateSendmail(capture.port).start()
    stale = PrivateSendmail(capture.port).start()
    try:
        stale_dir, stale_pid = stale.base_dir, stale.daemon_pid
        assert stale_pid is not None and stale.running
        assert stale._lock_fd is not None
        os.close(stale._lock_fd)  # what the death of the owning process does
        stale._lock_fd = None
        cleanup_stale_instances()  # a concurrent test session may beat us to it
        deadline = time.monotonic() + 10
        while stale.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not os.path.exists(stale_dir)
        assert live.running and os.path.isdir(live.base_dir)
        assert live.base_dir.startswith(os.path.join(BASE_PARENT, BASE_PREFIX))
    finally:
        live.stop()
        stale.stop()


_OWNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.e2e.sendmail import PrivateSendmail
sm = PrivateSendmail(int(sys.argv[2])).start()
print(sm.base_dir, sm.daemon_pid, flush=True)
time.sleep(60)
"""


def test_instance_of_a_killed_test_run_is_cleaned_up(
    capture: CaptureServer, sendmail_required: None
) -> None:
    """The owning process SIGKILLed (no stop(), no atexit): the daemon
    survives it (Sendmail clears the parent-death signal), and the next
    cleanup finds and kills it by its mounts, then removes the directory."""
    repo = str(Path(__file__).resolve().parents[2])
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, repo, str(capture.port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        base, pid = owner.stdout.readline().split()
    finally:
        owner.kill()
        owner.wait(10)
    daemon = int(pid)
    assert os.path.exists(f"/proc/{daemon}")
    assert base in cleanup_stale_instances()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{daemon}") and ") Z " not in _stat(daemon):
        assert time.monotonic() < deadline, "the orphaned daemon is still alive"
        time.sleep(0.01)
    assert not os.path.exists(base)


def _stat(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ") Z "


def test_start_restart_stop(sendmail_factory: SendmailFactory) -> None:
    sm = sendmail_factory()
    port, pid = sm.smtp_port, sm.daemon_pid
    assert pid is not None
    sm.restart()
    assert sm.smtp_port == port and sm.daemon_pid != pid
    os.kill(sm.daemon_pid or 0, signal.SIGKILL)  # a crash: the fixture restarts it
    deadline = time.monotonic() + 10
    while sm.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sm.restart()
    assert sm.running
    print(f"start {sm.start_seconds:.3f}s restart {sm.restart_seconds:.3f}s")


@pytest.mark.parametrize("bad", ["inet:1@127.0.0.1'", "a\nb"])
def test_milter_spec_is_validated(capture: CaptureServer, bad: str) -> None:
    with pytest.raises(ValueError):
        PrivateSendmail(capture.port, bad)
