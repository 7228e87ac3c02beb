"""The tools against the real Sendmail: ``triomilter check --mta sendmail`` predicts what
Sendmail delivers (its own header placement included), and ``triomilter tap``
changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tools._support import tap, triomilter

from ._milter_runner import strip_sendmail_received
from .capture import CapturedMessage, CaptureServer
from .raw_milter import RawMilter
from .scenarios import inserting
from .sendmail import PrivateSendmail, sendmail_spec
from .test_postfix_tools import MESSAGES, RCPTS, SENDER, milter

# Sendmail's own placement: a header added when one of its name exists goes
# before the first of them, and a change keeps the field's own spelling.
SENDMAIL_MESSAGE = (
    MESSAGES[1]
    .replace(b"Subject:", b"SUBJECT:")
    .replace(b"X-Remove: going away\r\n", b"X-Remove: going away\r\nX-Added: was here first\r\n")
)


def deliver(sendmail: PrivateSendmail, capture: CaptureServer, spec: str) -> list[CapturedMessage]:
    capture.clear()
    sendmail.set_milter(spec)
    with sendmail.smtp() as s:
        for data in [*MESSAGES, SENDMAIL_MESSAGE]:
            assert set(s.sendmail(SENDER, RCPTS, data)) == {"refused@example.net"}
    captured = capture.wait_for(3)
    order = [b"change\r\n", b"and the body\r\n", b"SUBJECT:"]
    return sorted(captured, key=lambda m: [k in m.data for k in order].index(True))


@pytest.mark.parametrize("kind", ["triomilter", "libmilter"])
def test_check_predicts_what_sendmail_delivers(
    sendmail: PrivateSendmail, capture: CaptureServer, kind: str, tmp_path: Path
) -> None:
    with milter(kind) as spec:
        delivered = deliver(sendmail, capture, spec)
        for number, data in enumerate([*MESSAGES, SENDMAIL_MESSAGE]):
            path = tmp_path / f"{number}.eml"
            path.write_bytes(data)
            output = tmp_path / f"{number}.out"
            run = triomilter(
                "check",
                "--mta",
                "sendmail",
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
            captured = delivered[number]
            assert output.read_bytes() == strip_sendmail_received(captured.data)
            (checked,) = json.loads(run.stdout)["messages"]
            envelope = checked["delivered"]
            assert envelope["sender"] == f"<{captured.mail_from}>"
            assert sorted(r["rcpt"] for r in envelope["recipients"]) == sorted(
                f"<{rcpt}>" for rcpt in captured.rcpt_tos
            )
    last = strip_sendmail_received(delivered[2].data)
    assert b"SUBJECT: [checked]" in last
    assert last.index(b"X-Added: added value") < last.index(b"X-Added: was here first")


def test_the_tap_changes_nothing_sendmail_delivers(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    with milter("triomilter") as spec:
        direct = deliver(sendmail, capture, spec)
        with tap(spec) as tapped:
            through = deliver(sendmail, capture, tapped.spec)
            tapped.wait_for("close")
            events = tapped.events()
    for without, with_tap in zip(direct, through, strict=True):
        assert strip_sendmail_received(with_tap.data) == strip_sendmail_received(without.data)
        assert (with_tap.mail_from, sorted(with_tap.rcpt_tos)) == (
            without.mail_from,
            sorted(without.rcpt_tos),
        )
    assert [e for e in events if e["type"] == "violation"] == []
    names = [e["name"] for e in events if e["type"] == "command"]
    assert names.count("EOM") == 3 and names[-1] == "QUIT"


def test_check_predicts_sendmail_insert_indexes(
    sendmail: PrivateSendmail, capture: CaptureServer, tmp_path: Path
) -> None:
    """Sendmail's list holds the headers its configuration prepared before the
    message's own: every insert index counts them (the message has a Date:,
    whose prepared twin stays in the list, unwritten)."""
    data = (
        b"From: a@example.org\r\nDate: Wed, 31 Dec 2025 23:00:00 +0000\r\nSubject: s\r\n\r\nx\r\n"
    )
    path = tmp_path / "m.eml"
    path.write_bytes(data)
    with RawMilter(hook=inserting) as raw:
        sendmail.set_milter(sendmail_spec(raw.port))
        with sendmail.smtp() as s:
            s.sendmail(SENDER, ["r@example.test"], data)
        (captured,) = capture.wait_for(1)
        spec = f"inet:{raw.port}@127.0.0.1"
        run = triomilter("check", "--mta", "sendmail", "--connect", spec, str(path), "-o", "-")
    assert run.code == 0, run.stderr
    assert run.stdout == strip_sendmail_received(captured.data)
