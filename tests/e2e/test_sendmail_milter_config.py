"""How Sendmail 8.17 treats the milter definition (``S=``, ``F=``, ``T=``),
checked against the real Sendmail with the raw milter (tests/e2e/raw_milter.py)
as the independent witness, and with triomilter where it is the subject.

Findings (each test shows the log lines or replies that prove it):

* ``S=inet:PORT`` without ``@HOST`` is a configuration error: the daemon does
  not start ("bad address PORT (expected port@host)").
* ``S=inet:PORT@[127.0.0.1]`` parses, but every connection fails with
  "open [127.0.0.1] failed: Invalid argument" (the bracketed-address branch
  of milter_open() leaves the address length unset); ``@127.0.0.1`` and
  ``@localhost`` work.
* ``S=local:`` (or ``unix:``) needs a socket whose path has no world- or
  group-writable directory (sticky /tmp counts): otherwise the daemon does
  not start ("local socket name ... unsafe: World writable directory",
  "... Group writable directory").
* ``F=4`` with the milter down: ``421 4.7.0 ... closing connection`` as the
  banner; ``F=R``: 554 banner, then 550 for everything; no ``F``: mail goes
  through unfiltered.
* Progress packets restart ``T=R`` (the per-reply read timeout) but not
  ``T=E`` (the whole end of message).  Sendmail measures them in whole
  seconds, so send progress well within ``R`` minus one second.
"""

from __future__ import annotations

import os
import smtplib
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from triomilter import Actions, Context, Milter, Status, on_eom

from ._milter_runner import ThreadedMilter
from .capture import CaptureServer
from .raw_milter import Packet, RawMilter, packet
from .scenarios import SENDER
from .sendmail import PrivateSendmail, SendmailError, listen_port

TEMPFAIL = (451, b"4.3.2 Please try again later")


def _deliver(sendmail: PrivateSendmail) -> tuple[int, bytes]:
    """One message; the end-of-DATA reply (or the first refusal)."""
    with sendmail.smtp() as s:
        s.ehlo()
        code, text = s.mail(SENDER)
        if code != 250:
            return code, text
        assert s.rcpt("r@example.test")[0] == 250
        return s.data(b"Subject: config\r\n\r\nbody\r\n")


# -- S= ------------------------------------------------------------------------


def test_inet_socket_needs_at_host(sendmail: PrivateSendmail) -> None:
    port = listen_port()
    with pytest.raises(SendmailError, match="during start-up"):
        sendmail.set_milter(f"inet:{port}")
    assert f"Xmyfilter: bad address {port} (expected port@host)" in sendmail.log_text()
    assert not sendmail.running


def test_bracketed_host_fails_to_connect(sendmail: PrivateSendmail, capture: CaptureServer) -> None:
    with RawMilter() as raw:
        sendmail.set_milter(f"inet:{raw.port}@[127.0.0.1]")
        with sendmail.smtp() as s:
            s.ehlo()
            assert s.mail(SENDER) == TEMPFAIL  # F=T
        assert raw.snapshot() == []  # Sendmail never connected
    log = sendmail.log_text()
    assert "Milter (myfilter): open [127.0.0.1] failed: Invalid argument" in log
    assert "Milter (myfilter): to error state" in log


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_host_name_or_address_works(
    sendmail: PrivateSendmail, capture: CaptureServer, host: str
) -> None:
    with RawMilter() as raw:
        sendmail.set_milter(f"inet:{raw.port}@{host}")  # localhost: the instance's hosts file
        assert _deliver(sendmail)[0] == 250
        raw.wait_for(b"E")
    assert capture.wait_for(1)


@pytest.fixture
def safe_dir() -> Iterator[str]:
    """A directory whose whole path is not world-writable (/run is 0755)."""
    path = tempfile.mkdtemp(prefix="triomilter-e2e-", dir="/run")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("0777 dir in /run", "World writable directory"),
        ("0755 dir in /tmp", "World writable directory"),  # /tmp is 1777
        ("0770 dir in /run", "Group writable directory"),
    ],
)
def test_local_socket_in_an_unsafe_path_is_refused(
    sendmail: PrivateSendmail, safe_dir: str, where: str, why: str
) -> None:
    if where.endswith("/tmp"):
        directory = tempfile.mkdtemp(prefix="triomilter-e2e-")
        os.chmod(directory, 0o755)
    else:
        directory = os.path.join(safe_dir, "open")
        os.mkdir(directory)
        os.chmod(directory, int(where.split()[0], 8))
    path = os.path.join(directory, "milter.sock")
    try:
        with RawMilter(unix_path=path), pytest.raises(SendmailError, match="during start-up"):
            sendmail.set_milter(f"local:{path}")
    finally:
        Path(path).unlink(missing_ok=True)
        os.rmdir(directory)
    assert f"Xmyfilter: local socket name {path} unsafe: {why}" in sendmail.log_text()


@pytest.mark.parametrize("kind", ["local", "unix"])
def test_local_socket_in_a_safe_path_serves_triomilter(
    sendmail: PrivateSendmail, capture: CaptureServer, safe_dir: str, kind: str
) -> None:
    @on_eom
    async def eom(ctx: Context[object]) -> Status:
        await ctx.api.add_header("X-Over", "unix socket")
        return Status.CONTINUE

    path = os.path.join(safe_dir, "milter.sock")
    milter = Milter("unix", handlers=[eom], actions=Actions.ADD_HEADER)
    with ThreadedMilter(milter, socket=f"unix:{path}"):
        sendmail.set_milter(f"{kind}:{path}")
        assert _deliver(sendmail)[0] == 250
        (msg,) = capture.wait_for(1)
    assert b"\r\nX-Over: unix socket\r\n" in msg.data


# -- F= ------------------------------------------------------------------------


def test_f4_with_the_milter_down_says_421_at_connect(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    sendmail.set_milter(f"inet:{listen_port()}@127.0.0.1", flags="4")
    with socket.create_connection(("127.0.0.1", sendmail.smtp_port), timeout=10) as sock:
        banner = sock.makefile("rb").readline()
        # Then Sendmail closes the connection.
        assert sock.recv(1024) == b""
    assert banner == b"421 4.7.0 mta.test.invalid closing connection\r\n"
    sendmail.wait_for_log(r"Milter: initialization failed, closing connection")
    assert capture.wait_quiet(0.2) == []


def test_fr_with_the_milter_down_rejects(sendmail: PrivateSendmail, capture: CaptureServer) -> None:
    sendmail.set_milter(f"inet:{listen_port()}@127.0.0.1", flags="R")
    s = smtplib.SMTP(local_hostname="client.test.invalid", timeout=30)
    try:
        assert s.connect("127.0.0.1", sendmail.smtp_port) == (
            554,
            b"mta.test.invalid ESMTP not accepting messages",
        )
        assert s.ehlo()[0] == 250
        assert s.mail(SENDER) == (550, b"5.0.0 Command rejected")
        s.quit()
    finally:
        s.close()
    sendmail.wait_for_log(r"Milter: initialization failed, rejecting commands")


def test_no_f_with_the_milter_down_delivers_unfiltered(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    sendmail.set_milter(f"inet:{listen_port()}@127.0.0.1", flags="")
    assert _deliver(sendmail)[0] == 250
    assert capture.wait_for(1)
    sendmail.wait_for_log(r"Milter \(myfilter\): error connecting to filter")


# -- T=: progress --------------------------------------------------------------


def slow_eom(
    seconds: float, progress_every: float | None
) -> Callable[[socket.socket, Packet], None]:
    """A raw-milter hook: take ``seconds`` at end of message, sending a
    progress packet every ``progress_every`` seconds meanwhile (None: none)."""

    def hook(conn: socket.socket, pkt: Packet) -> None:
        if pkt.code != b"E":
            return
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(progress_every or left, left))
            if progress_every and end - time.monotonic() > 0:
                conn.sendall(packet(b"p"))

    return hook


@pytest.mark.parametrize(
    ("timeouts", "progress_every", "accepted"),
    [
        ("C:5s;S:5s;R:2s;E:30s", None, False),  # 3 s of silence > R
        ("C:5s;S:5s;R:2s;E:30s", 0.5, True),  # progress restarts R
        ("C:5s;S:5s;R:10s;E:2s", 0.5, False),  # but not E
    ],
    ids=["R-no-progress", "R-progress", "E-progress"],
)
def test_progress_restarts_r_but_not_e(
    sendmail: PrivateSendmail,
    capture: CaptureServer,
    timeouts: str,
    progress_every: float | None,
    accepted: bool,
) -> None:
    with RawMilter(hook=slow_eom(3.0, progress_every)) as raw:
        sendmail.set_milter(f"inet:{raw.port}@127.0.0.1", timeouts=timeouts)
        reply = _deliver(sendmail)
    if accepted:
        assert reply[0] == 250
        assert capture.wait_for(1)
    else:
        assert reply == TEMPFAIL
        log = sendmail.wait_for_log(r"Milter: data, reject=451 4\.3\.2").string
        assert "Milter (myfilter): to error state" in log
        if progress_every is None:
            assert "Milter (myfilter): timeout before data read, where=eom" in log
        assert capture.wait_quiet(0.2) == []


def test_triomilter_signal_progress_outlasts_r(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    """A triomilter handler busy for longer than T=R, signalling progress
    from a task of its own, as docs/context.md shows."""

    @on_eom
    async def eom(ctx: Context[object]) -> Status:
        async def keepalive() -> None:
            while True:
                await trio.sleep(0.5)
                await ctx.api.signal_progress()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keepalive)
            await trio.sleep(3.0)  # the long scan
            nursery.cancel_scope.cancel()
        await ctx.api.add_header("X-Scanned", "slowly")
        return Status.CONTINUE

    milter = Milter("slow", handlers=[eom], actions=Actions.ADD_HEADER)
    with ThreadedMilter(milter) as served:
        sendmail.set_milter(served.sendmail_spec, timeouts="C:5s;S:5s;R:2s;E:30s")
        assert _deliver(sendmail)[0] == 250
        (msg,) = capture.wait_for(1)
    assert b"\r\nX-Scanned: slowly\r\n" in msg.data
