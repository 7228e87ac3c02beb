"""The tools against the real Postfix: ``triomilter tap`` between Postfix and a milter
changes nothing Postfix delivers and lists every command it sends, and
``triomilter check`` predicts what Postfix delivers.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from tools._support import pymilter_modifier, require_pymilter, tap, triomilter

from ._milter_runner import CliMilter, split_first_header, strip_received
from .capture import CapturedMessage, CaptureServer
from .postfix import PrivatePostfix
from .raw_milter import Packet, RawMilter, packet
from .scenarios import INSERT_MESSAGE, inserting

MODIFIER = "tests/tools/modifier_milter.py"
SENDER = "alice@example.org"
RCPTS = ["bob@example.net", "removed@example.net", "refused@example.net"]


def message(subject: bytes) -> bytes:
    return (
        b"From: Alice <alice@example.org>\r\n"
        b"To: bob@example.net, removed@example.net\r\n"
        b"Cc: refused@example.net\r\n"
        b"Subject: " + subject + b"\r\n"
        b"X-Remove: going away\r\n"
        b"X-8bit: Gr\xc3\xbc\xc3\x9fe\r\n"
        b"\r\n"
        b"the original body\r\n"
        b".a dot line\r\n"
    )


MESSAGES = [message(b"every change"), message(b"every change and the body")]


def postfix_spec(libmilter_spec: str) -> str:
    port, _, host = libmilter_spec.removeprefix("inet:").partition("@")
    return f"inet:{host}:{port}"


@contextlib.contextmanager
def milter(kind: str) -> Iterator[str]:
    """The modifier milter, served by triomilter or by libmilter (pymilter); its spec."""
    if kind == "triomilter":
        with CliMilter(MODIFIER) as served:
            yield f"inet:{served.port}@127.0.0.1"
    else:
        require_pymilter()
        with pymilter_modifier() as spec:
            yield spec


def deliver(
    postfix: PrivatePostfix,
    capture: CaptureServer,
    spec: str,
    refused: frozenset[str] = frozenset({"refused@example.net"}),
) -> list[CapturedMessage]:
    """Both messages in one SMTP session through ``spec``; what the capture server got."""
    capture.clear()
    postfix.set_milters(postfix_spec(spec))
    with postfix.smtp() as s:
        for data in MESSAGES:
            assert set(s.sendmail(SENDER, RCPTS, data)) == refused
    return sorted(capture.wait_for(2), key=lambda m: m.data.count(b"replaced"))


@pytest.mark.parametrize("kind", ["triomilter", "libmilter"])
def test_the_tap_changes_nothing_postfix_delivers(
    postfix: PrivatePostfix, capture: CaptureServer, kind: str
) -> None:
    with milter(kind) as spec:
        direct = deliver(postfix, capture, spec)
        with tap(spec) as tapped:
            tapped_messages = deliver(postfix, capture, tapped.spec)
            tapped.wait_for("close")
            events = tapped.events()
        assert tapped.stop() == 0
    for without, with_tap in zip(direct, tapped_messages, strict=True):
        assert strip_received(with_tap.data) == strip_received(without.data)
        assert (with_tap.mail_from, sorted(with_tap.rcpt_tos)) == (
            without.mail_from,
            sorted(without.rcpt_tos),
        )
    # The changes were made: the tap forwarded them.
    assert direct[0].mail_from == "new-sender@example.org"
    assert sorted(direct[0].rcpt_tos) == [
        "added@example.net",
        "bob@example.net",
        "never@example.net",
    ]
    assert b"\r\nThe body was replaced.\r\n" in direct[1].data
    assert [e for e in events if e["type"] == "violation"] == []
    names = [e["name"] for e in events if e["type"] == "command"]
    assert names.count("EOM") == 2 and names.count("RCPT") == 6 and names[-1] == "QUIT"


def _changing(conn: socket.socket, pkt: Packet) -> bytes | None:
    if pkt.code == b"E":
        return packet(b"h", b"X-Raw\0seen\0") + packet(b"c")
    return None


def expand(events: list[dict[str, object]]) -> list[bytes]:
    """The packet codes a tap's command lines stand for (a macro packet before a command)."""
    codes: list[bytes] = []
    for event in events:
        if event["type"] != "command":
            continue
        if event["name"] == "MACRO":
            codes.append(b"D")
            continue
        if event.get("macros") is not None:
            codes.append(b"D")
        codes.append(str(event["code"]).encode())
    return codes


def test_the_tap_lists_every_command_postfix_sends(
    postfix: PrivatePostfix, capture: CaptureServer
) -> None:
    """A raw milter (every stage, every reply) records each packet; the tap lists the same."""
    with RawMilter(hook=_changing) as raw, tap(f"inet:{raw.port}@127.0.0.1") as tapped:
        messages = deliver(postfix, capture, tapped.spec, refused=frozenset())
        raw.wait_for(b"Q")
        tapped.wait_for("close")
        events = tapped.events()
    sent = [p.code for p in raw.snapshot()]
    assert expand(events) == sent
    assert {b"O", b"C", b"H", b"M", b"R", b"T", b"L", b"N", b"B", b"E", b"A", b"Q"} <= set(sent)
    replies = [e for e in events if e["type"] == "reply"]
    answered = [e["answers"] for e in replies]
    # One reply per command that owes one: OPTNEG, CONNECT, HELO, then per message.
    assert answered.count("HEADER") == sent.count(b"L") == 2 * 6
    assert answered.count("EOM") == 2 * 2  # X-Raw and CONTINUE
    for captured in messages:
        assert b"\r\nX-Raw: seen\r\n" in captured.data
    connect = next(e for e in events if e.get("name") == "CONNECT")
    assert connect["macros"]["j"] == "mta.test.invalid"
    assert [e for e in events if e["type"] == "violation"] == []


@pytest.mark.parametrize("kind", ["triomilter", "libmilter"])
def test_check_predicts_what_postfix_delivers(
    postfix: PrivatePostfix, capture: CaptureServer, kind: str, tmp_path: Path
) -> None:
    with milter(kind) as spec:
        delivered = deliver(postfix, capture, spec)
        for number, (data, captured) in enumerate(zip(MESSAGES, delivered, strict=True)):
            path = tmp_path / f"{number}.eml"
            path.write_bytes(data)
            output = tmp_path / f"{number}.out"
            run = triomilter(
                "check",
                "--connect",
                spec,
                str(path),
                "--from",
                SENDER,
                *[arg for rcpt in RCPTS for arg in ("--rcpt", rcpt)],
                "--output",
                str(output),
                "--json",
            )
            assert run.code == 0, run.stderr
            assert output.read_bytes() == strip_received(captured.data)
            (checked,) = json.loads(run.stdout)["messages"]
            envelope = checked["delivered"]
            assert envelope["sender"] == f"<{captured.mail_from}>"
            assert sorted(r["rcpt"] for r in envelope["recipients"]) == sorted(
                f"<{rcpt}>" for rcpt in captured.rcpt_tos
            )


def test_check_predicts_postfix_insert_indexes(
    postfix: PrivatePostfix, capture: CaptureServer, tmp_path: Path
) -> None:
    """Postfix counts its own Received: header for an insert index (0: above it)."""
    path = tmp_path / "m.eml"
    path.write_bytes(INSERT_MESSAGE)
    with RawMilter(hook=inserting) as raw:
        spec = f"inet:{raw.port}@127.0.0.1"
        postfix.set_milters(postfix_spec(spec))
        with postfix.smtp() as s:
            s.sendmail(SENDER, ["r@example.test"], INSERT_MESSAGE)
        (captured,) = capture.wait_for(1)
        run = triomilter("check", "--connect", spec, str(path), "-o", "-")
    assert run.code == 0, run.stderr
    data = captured.data
    start = data.index(b"Received: from client.test.invalid")
    received, rest = split_first_header(data[start:])
    assert b"by mta.test.invalid (Postfix)" in received
    assert run.stdout == data[:start] + rest
    assert data[:start] == b"X-At-0: v\r\n"  # above Postfix's, as check places it
