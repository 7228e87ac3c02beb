"""``triomilter tap`` through its real command line, between MTA-side clients and milters.

The MTA side is ``triomilter check`` (and raw sockets, and `triomilter.testing`
for many sessions at once); the milters are triomilter, libmilter (pymilter)
and a raw milter that breaks the protocol on purpose. The real Postfix in
front of the tap is in tests/e2e/test_postfix_tap.py.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e.postfix import free_port
from e2e.raw_milter import Packet, RawMilter, packet

from triomilter.testing import AddHeader, open_tcp

from ._support import REPO, TIMEOUT, cli_env, served, tap, triomilter, wait_listening
from .test_check_cli import DELIVERED, MESSAGE


@pytest.fixture
def message(tmp_path: Path) -> Path:
    path = tmp_path / "every-change.eml"
    path.write_bytes(MESSAGE)
    return path


def protocol(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["type"], e["name"]) for e in events if e["type"] in ("command", "reply")]


@pytest.mark.parametrize("milter", ["triomilter_modifier", "libmilter_modifier"])
def test_check_through_the_tap_is_check_without_it(
    milter: str, message: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    spec = request.getfixturevalue(milter)
    direct = triomilter("check", "--connect", spec, str(message), "-o", str(tmp_path / "direct"))
    assert direct.code == 0, direct.stderr
    with tap(spec, "--slow", "100000") as tapped:
        run = triomilter("check", "--connect", tapped.spec, str(message), "-o", str(tmp_path / "t"))
        assert run.code == 0, run.stderr
        tapped.wait_for("close")
        events = tapped.events()
    assert (tmp_path / "t").read_bytes() == (tmp_path / "direct").read_bytes() == DELIVERED
    assert [e for e in events if e["type"] == "violation"] == []
    assert {e["conn"] for e in events} == {1}
    steps = protocol(events)
    commands = [name for kind, name in steps if kind == "command"]
    # Every command check sent, in order (pymilter handles MAIL and the rest).
    assert commands[:4] == ["OPTNEG", "MACRO", "MACRO", "MAIL" if "lib" in milter else "MACRO"]
    assert commands.count("RCPT") == 3 and commands.count("HEADER") == 5
    assert commands[-3:] == ["EOM", "ABORT", "QUIT"]
    replies = [e for e in events if e["type"] == "reply"]
    assert all(isinstance(e["ms"], float) and e["slow"] is False for e in replies)
    rcpts = [e for e in events if e["type"] == "command" and e["name"] == "RCPT"]
    assert rcpts[0]["args"] == {"args": ["<bob@example.net>"]}
    assert rcpts[0]["macros"]["{rcpt_addr}"] == "bob@example.net"
    refusal = next(e for e in replies if e["name"] == "REPLYCODE")
    assert (refusal["args"], refusal["answers"]) == (
        {"text": "550 5.1.1 No such user here"},
        "RCPT",
    )
    eom = [e["name"] for e in replies if e.get("answers") == "EOM"]
    assert eom == [
        "PROGRESS",
        "ADDHEADER",
        "ADDHEADER",
        "ADDHEADER",
        "INSHEADER",
        "CHGHEADER",
        "CHGHEADER",
        "ADDRCPT",
        "ADDRCPT_PAR",
        "DELRCPT",
        "CHGFROM",
        "REPLBODY",
        "QUARANTINE",
        "CONTINUE",
    ]
    assert tapped.stop() == 0


def _violating(conn: socket.socket, pkt: Packet) -> bytes | None:
    sender = pkt.payload.split(b"\0")[0] if pkt.code == b"M" else b""
    if sender == b"<change@example.org>":
        return packet(b"h", b"X-Early\0at MAIL\0")  # a change outside end of message
    if sender == b"<unknown@example.org>":
        return packet(b"Z")  # no such reply
    if sender == b"<twice@example.org>":
        return packet(b"c") + packet(b"c")  # one reply too many
    if sender == b"<hangup@example.org>":
        conn.shutdown(socket.SHUT_RDWR)  # goes away with the reply due
        return b""
    return None


def test_violations_are_flagged_and_the_bytes_forwarded(message: Path) -> None:
    with RawMilter(hook=_violating) as raw, tap(f"inet:{raw.port}@127.0.0.1") as tapped:
        senders = ["change", "unknown", "twice", "hangup"]
        for sender in senders:
            run = triomilter(
                "check", "--connect", tapped.spec, str(message), "--from", f"{sender}@example.org"
            )
            assert run.code == 5, run.text  # check saw the same violation: nothing was altered
        tapped.wait_for("close", len(senders))
        violations = [e["message"] for e in tapped.wait_for("violation", 4)]
        after = triomilter("check", "--connect", tapped.spec, str(message), "-q")
        assert after.code == 0, after.text  # the tap goes on
    assert "ADDHEADER is not a valid reply to MAIL" in violations
    assert "unknown reply 'Z' is not a valid reply to MAIL" in violations
    assert "CONTINUE where no reply is owed" in violations
    assert "closed with the reply to MAIL still due" in violations


class _Recorder:
    """A TCP server that records everything it gets and answers with garbage."""

    ANSWER = b"\x00\x00\x00\x00" + b"\xff" * 1000 + b"HTTP/1.0 400 what?\r\n"

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for _ in range(2):
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                conn.sendall(self.ANSWER)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                self.received.append(data)

    def close(self) -> None:
        self.thread.join(TIMEOUT)
        self.sock.close()


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    server = _Recorder()
    yield server
    server.close()


def _exchange(spec: str, data: bytes) -> bytes:
    """Send ``data`` through the tap, half-close, read everything that comes back."""
    port = int(spec.split(":")[1].split("@")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_garbage_both_ways_is_forwarded_unchanged(recorder: _Recorder) -> None:
    garbage = [
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
        b"\x00\x00\x00\x00\x00\x00\x00\x02Zq" + bytes(range(256)) * 300,
    ]
    with tap(f"inet:{recorder.port}@127.0.0.1") as tapped:
        echoes = [_exchange(tapped.spec, data) for data in garbage]
        closes = tapped.wait_for("close", 2)
        events = tapped.events()
    recorder.close()
    assert recorder.received == garbage
    assert echoes == [_Recorder.ANSWER, _Recorder.ANSWER]
    assert [c["conn"] for c in closes] == [1, 2]
    messages = [e["message"] for e in events if e["type"] == "violation"]
    assert "a packet of length 0 (no command code)" in messages
    assert "a packet of length 0 (no reply code)" in messages
    assert "closed in the middle of a packet" in messages
    commands = [e for e in events if e["type"] == "command"]
    assert commands[0]["name"] == "unknown command 'Z'"


async def test_many_connections_at_once() -> None:
    with served("examples/header_tagger.py") as spec, tap(spec) as tapped:
        port = int(tapped.spec.split(":")[1].split("@")[0])
        tags: list[str] = []

        async def one(number: int) -> None:
            async with open_tcp("127.0.0.1", port, timeout=TIMEOUT) as client:
                await client.connect(f"client{number}.example", ("192.0.2.1", 1000 + number))
                for _ in range(3):
                    result = await client.send_message("<a@example.org>", "<b@example.net>")
                    tags.extend(c.value for c in result.modifications if isinstance(c, AddHeader))
                    await client.abort()

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for number in range(40):
                    nursery.start_soon(one, number)
        closes = tapped.wait_for("close", 40)
        events = tapped.events()
    assert sorted(tags) == sorted(
        f"client{n}.example [192.0.2.1]" for n in range(40) for _ in range(3)
    )
    assert sorted(c["conn"] for c in closes) == list(range(1, 41))
    assert [e for e in events if e["type"] == "violation"] == []
    eoms = [e for e in events if e["type"] == "command" and e["name"] == "EOM"]
    assert len(eoms) == 120


def test_either_side_closing(message: Path) -> None:
    with served("examples/header_tagger.py") as spec, tap(spec) as tapped:
        port = int(tapped.spec.split(":")[1].split("@")[0])
        # The MTA goes away in the middle of a packet, right after negotiating.
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff")
            assert len(sock.recv(1024)) >= 17  # the milter's negotiation reply
            sock.sendall(b"\x00\x00\x00\x20C")
        tapped.wait_for("close", 1)
        after = triomilter("check", "--connect", tapped.spec, str(message), "-q")
        assert after.code == 0, after.text
        tapped.wait_for("close", 2)
        events = tapped.events()
    first = [e for e in events if e["conn"] == 1]
    kinds = [(e["type"], e.get("name") or e.get("message")) for e in first]
    assert kinds[:3] == [
        ("open", "connection from " + first[0]["message"].split()[-1]),
        ("command", "OPTNEG"),
        ("reply", "OPTNEG"),
    ]
    assert ("eof", "the MTA closed its side") in kinds
    assert ("violation", "closed in the middle of a packet") in kinds
    assert ("eof", "the milter closed its side") in kinds
    assert kinds[-1][0] == "close"


class _Slow:
    """MAIL answered after 0.3 s; RCPT only once the test saw the tap report it missing."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, conn: socket.socket, pkt: Packet) -> bytes | None:
        if pkt.code == b"M":
            time.sleep(0.3)
        if pkt.code == b"R":
            self.release.wait(TIMEOUT)
        return None


def test_slow_and_missing_replies(message: Path) -> None:
    hook = _Slow()
    with (
        RawMilter(hook=hook) as raw,
        tap(f"inet:{raw.port}@127.0.0.1", "--slow", "100", "--timeout", "0.5") as tapped,
    ):
        argv = ["check", "--connect", tapped.spec, str(message), "--rcpt", "b@x.example"]
        check = subprocess.Popen(
            [sys.executable, "-m", "triomilter", *argv],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            (missing,) = tapped.wait_for("violation")  # while the milter holds the reply
            hook.release.set()
            assert check.wait(TIMEOUT) == 0
        finally:
            hook.release.set()
            if check.poll() is None:
                check.kill()
                check.wait()
        tapped.wait_for("close")
        events = tapped.events()
    assert missing["message"] == "no reply to RCPT after 0.5 s"
    mail = next(e for e in events if e["type"] == "reply" and e["answers"] == "MAIL")
    assert mail["slow"] is True and mail["ms"] >= 300  # the milter slept 0.3 s
    assert [e["message"] for e in events if e["type"] == "violation"] == [missing["message"]]
    rcpt = next(e for e in events if e["type"] == "reply" and e["answers"] == "RCPT")
    assert rcpt["name"] == "CONTINUE" and rcpt["slow"] is True  # it came, later


def test_an_unreachable_milter(message: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: refused
        port = sock.getsockname()[1]
        with tap(f"inet:{port}@127.0.0.1") as tapped:
            run = triomilter("check", "--connect", tapped.spec, str(message))
            (error,) = tapped.wait_for("error")
            tapped.wait_for("close")
    assert run.code == 5
    assert "the milter closed the connection" in run.text
    assert error["message"].startswith(f"cannot connect to the milter inet:{port}@127.0.0.1: ")


def test_a_text_tap(triomilter_modifier: str, message: Path, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "tap.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "triomilter",
                "tap",
                "--listen",
                f"inet:{port}@127.0.0.1",
                "--milter",
                triomilter_modifier,
            ],
            cwd=REPO,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(port, proc, log)
        run = triomilter("check", "--connect", f"inet:{port}@127.0.0.1", str(message), "-q")
        assert run.code == 0, run.text
        deadline = time.monotonic() + TIMEOUT
        while "-- closed;" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    text = log.read_text()
    assert f"tap listening on inet:{port}@127.0.0.1, forwarding to {triomilter_modifier}" in text
    assert " #1 MTA>  OPTNEG version=6 actions='ALL (0x1ff)' protocol='ALL (0x1fffff)'" in text
    assert " #1 MTA>  HEADER name='Subject' value='every change, body and quarantine'" in text
    assert " #1 <MIL  QUARANTINE reason='held by the test milter'" in text
    assert "#1 -- closed; 12 command(s), 23 reply(ies)" in text


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--listen", "bogus:1", "--milter", "inet:1@127.0.0.1"], 2, "unknown protocol"),
        (["--listen", "inet:0@127.0.0.1", "--milter", "inet:x@127.0.0.1"], 2, "neither a number"),
        (["--listen", "inet:0@127.0.0.1", "--milter", "inet:1@h", "--timeout", "0"], 2, "positive"),
    ],
)
def test_usage_errors(args: list[str], code: int, message: str) -> None:
    run = triomilter("tap", *args)
    assert run.code == code, run.stderr
    assert message in run.stderr


def test_an_address_in_use_exits_1() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        run = triomilter(
            "tap", "--listen", f"inet:{port}@127.0.0.1", "--milter", "inet:1@127.0.0.1"
        )
    assert run.code == 1, run.stderr
    assert "cannot listen on" in run.stderr


def test_unix_sockets_both_sides(message: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="tm-", dir="/tmp"))  # short: 107 bytes at most
    listen, milter = directory / "tap.sock", directory / "milter.sock"
    serve = [sys.executable, "-m", "triomilter", "serve", "examples/header_tagger.py"]
    tap_argv = [sys.executable, "-m", "triomilter", "tap", "--json"]
    with open(directory / "log", "wb") as log:
        procs = [
            subprocess.Popen(
                [*serve, "--socket", f"unix:{milter}"], cwd=REPO, env=cli_env(), stderr=log
            ),
            subprocess.Popen(
                [*tap_argv, "--listen", f"unix:{listen}", "--milter", f"unix:{milter}"],
                cwd=REPO,
                env=cli_env(),
                stdout=log,
                stderr=log,
            ),
        ]
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (listen.exists() and milter.exists()) and time.monotonic() < deadline:
            time.sleep(0.02)
        run = triomilter("check", "--connect", f"unix:{listen}", str(message), "-q")
        assert run.code == 0, run.text + (directory / "log").read_text()
        assert "accepted, 1 change" in run.text
    finally:
        for proc in procs:
            proc.terminate()
        codes = [proc.wait(10) for proc in procs]
    assert codes == [0, 0]
    assert not listen.exists()  # the tap removed its socket file
    assert '"message": "connection from a UNIX socket"' in (directory / "log").read_text()
    shutil.rmtree(directory)
