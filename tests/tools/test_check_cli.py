"""``triomilter check`` through its real command line (subprocesses, loopback only).

The modifier milter makes every kind of change; it runs in memory, served
by ``triomilter serve`` over TCP, and as its libmilter twin (pymilter): the
same command must print the same changes, the same delivered message and
the same diff for all three.
"""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pytest
from e2e.raw_milter import Packet, RawMilter, packet

from ._support import served, triomilter

MESSAGE = (
    b"From: Alice <alice@example.org>\n"
    b"To: bob@example.net, removed@example.net\n"
    b"Cc: refused@example.net\n"
    b"Subject: every change, body and quarantine\n"
    b"X-Remove: going away\n"
    b"\n"
    b"the original body\n"
)
DELIVERED = (
    b"X-Inserted: at index 1\n"  # index 1: right below the MTA's Received: (at the top)
    b"From: Alice <alice@example.org>\n"
    b"To: bob@example.net, removed@example.net\n"
    b"Cc: refused@example.net\n"
    b"Subject: [checked] every change, body and quarantine\n"
    b"X-Added: added value\n"
    b"X-Folded: first line\n\tsecond line\n"
    b"X-Utf8: Gr\xc3\xbc\xc3\x9fe \xe2\x9c\x93\n"
    b"\n"
    b"The body was replaced.\nSecond line.\n"
)
CHANGES = [
    {"action": "add_header", "name": "X-Added", "value": "added value"},
    {"action": "add_header", "name": "X-Folded", "value": "first line\n\tsecond line"},
    {"action": "add_header", "name": "X-Utf8", "value": "Grüße ✓"},
    {"action": "insert_header", "index": 1, "name": "X-Inserted", "value": "at index 1"},
    {
        "action": "replace_header",
        "name": "Subject",
        "index": 1,
        "value": "[checked] every change, body and quarantine",
    },
    {"action": "replace_header", "name": "X-Remove", "index": 1, "value": None},
    {"action": "add_recipient", "rcpt": "<added@example.net>", "esmtp_args": None},
    {"action": "add_recipient", "rcpt": "<never@example.net>", "esmtp_args": "NOTIFY=NEVER"},
    {"action": "remove_recipient", "rcpt": "<removed@example.net>"},
    {"action": "replace_sender", "sender": "<new-sender@example.org>", "esmtp_args": "RET=HDRS"},
    {"action": "replace_body", "size": 38, "chunks": 1},
    {"action": "quarantine", "reason": "held by the test milter"},
]
DIFF = (  # the empty line of context is " " (one space)
    """\
@@ -1,7 +1,12 @@
+X-Inserted: at index 1
 From: Alice <alice@example.org>
 To: bob@example.net, removed@example.net
 Cc: refused@example.net
-Subject: every change, body and quarantine
-X-Remove: going away
+Subject: [checked] every change, body and quarantine
+X-Added: added value
+X-Folded: first line
+\tsecond line
+X-Utf8: Grüße ✓
"""
    + " \n"
    + """\
-the original body
+The body was replaced.
+Second line.
"""
)


@pytest.fixture
def message(tmp_path: Path) -> Path:
    path = tmp_path / "every-change.eml"
    path.write_bytes(MESSAGE)
    return path


# --- the README's demonstration ------------------------------------------------------------


def test_the_readme_demonstration() -> None:
    run = triomilter("check", "examples/header_tagger.py", "examples/mail/plain.eml")
    assert run.code == 0, run.stderr
    text = run.text
    assert "milter 'header-tagger' (in memory), as Postfix" in text
    # The client comes from the message's Received: header.
    assert "connect   mail.example.org 192.0.2.10:49152" in text
    assert "changes   + header     X-Triomilter-Tagged: mail.example.org [192.0.2.10]" in text
    assert "+ X-Triomilter-Tagged: mail.example.org [192.0.2.10]" in text
    assert "verdict: accepted (exit status 0)" in text


def test_without_messages_only_the_session_runs() -> None:
    run = triomilter("check", "examples/header_tagger.py")
    assert run.code == 0, run.stderr
    assert "reply: version 6, actions ADD_HEADER, protocol NO_HELO|" in run.text
    assert "connect   localhost 127.0.0.1:49152" in run.text
    assert "message" not in run.text


# --- every change, three milters -----------------------------------------------------------


def test_every_change_in_the_report(modifier: list[str], message: Path) -> None:
    run = triomilter("check", *modifier, str(message))
    assert run.code == 0, run.stderr + run.text
    lines = [line.strip() for line in run.text.splitlines()]
    for expected in [
        "changes   + header     X-Added: added value",
        "+ header     X-Folded: first line\\n\tsecond line",
        "+ header     X-Utf8: Grüße ✓",
        "+ header     X-Inserted: at index 1  (inserted at 1)",
        "~ header     Subject #1: [checked] every change, body and quarantine",
        "- header     X-Remove #1",
        "+ recipient  <added@example.net>",
        "+ recipient  <never@example.net> NOTIFY=NEVER",
        "- recipient  <removed@example.net>",
        "~ sender     <new-sender@example.org> RET=HDRS",
        "~ body       replaced: 38 bytes in 1 chunk(s)",
        "! quarantine held by the test milter",
        "(1 progress packet(s))",
        "verdict   accepted, quarantined: held by the test milter",
        "recipient <refused@example.net> refused: 550 5.1.1 No such user here",
        "delivered MAIL FROM:<new-sender@example.org> RET=HDRS",
        "RCPT TO:<bob@example.net>",
        "RCPT TO:<added@example.net>",
        "RCPT TO:<never@example.net> NOTIFY=NEVER",
        "- Subject: every change, body and quarantine",
        "~ Subject: [checked] every change, body and quarantine",
        "- X-Remove: going away",
        "+ X-Inserted: at index 1",
        "(body replaced: 36 bytes)",  # the LF message gets LF line ends
    ]:
        assert expected in lines or any(line.startswith(expected) for line in lines), expected
    assert "RCPT TO:<removed@example.net>" not in run.text
    assert "RCPT TO:<refused@example.net>" not in run.text


def test_every_change_in_json_and_the_delivered_message(
    modifier: list[str], message: Path, tmp_path: Path
) -> None:
    output = tmp_path / "delivered.eml"
    run = triomilter("check", *modifier, str(message), "--json", "--output", str(output))
    assert run.code == 0, run.stderr
    document = run.json()
    assert document["verdict"] == "accepted" and document["exit_status"] == 0
    (checked,) = document["messages"]
    assert checked["changes"] == CHANGES
    assert checked["progress"] == 1
    assert checked["envelope"]["refused"] == [
        {"rcpt": "<refused@example.net>", "reply": "550 5.1.1 No such user here"}
    ]
    delivered = checked["delivered"]
    assert delivered["sender"] == "<new-sender@example.org>"
    assert delivered["sender_args"] == ["RET=HDRS"]
    assert delivered["recipients"] == [
        {"rcpt": "<bob@example.net>", "args": []},
        {"rcpt": "<added@example.net>", "args": []},
        {"rcpt": "<never@example.net>", "args": ["NOTIFY=NEVER"]},
    ]
    assert delivered["quarantine"] == "held by the test milter"
    assert delivered["deleted"] == ["X-Remove: going away\n"]
    assert delivered["body_changed"] is True
    assert output.read_bytes() == DELIVERED


def test_every_change_in_the_diff(modifier: list[str], message: Path) -> None:
    run = triomilter("check", *modifier, str(message), "--diff")
    assert run.code == 0, run.stderr
    diff = run.text[run.text.index("--- ") :]
    header, rest = diff.split("\n@@", 1)
    assert header == f"--- {message}\n+++ {message}\t(as Postfix delivers it)"
    assert "@@" + rest == DIFF


def test_sendmail_semantics(message: Path, tmp_path: Path) -> None:
    """Sendmail keeps a changed field's spelling and adds before the first field of a name."""
    message.write_bytes(MESSAGE.replace(b"Subject:", b"SUBJECT:").replace(b"X-Remove", b"X-Added"))
    output = tmp_path / "out.eml"
    sendmail = triomilter(
        "check",
        "tests/tools/modifier_milter.py",
        str(message),
        "--mta",
        "sendmail",
        "-o",
        str(output),
    )
    assert sendmail.code == 0, sendmail.stderr
    delivered = output.read_bytes()
    assert b"SUBJECT: [checked]" in delivered
    assert delivered.index(b"X-Added: added value") < delivered.index(b"X-Added: going away")
    postfix = triomilter("check", "tests/tools/modifier_milter.py", str(message), "-o", "-")
    assert b"Subject: [checked]" in postfix.stdout
    assert postfix.stdout.index(b"X-Added: going away") < postfix.stdout.index(b"X-Added: added")
    assert "as Postfix" in postfix.stderr  # the report moved to stderr


# --- verdicts and exit statuses --------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "code", "verdict", "reply"),
    [
        ("please reject", 1, "rejected", "550 5.7.1 Rejected by the test milter"),
        ("please tempfail", 3, "tempfailed", "451 4.7.1 Service unavailable - try again later"),
        ("please discard", 4, "discarded", None),
        ("anything else", 0, "accepted", None),
    ],
)
def test_exit_status_of_each_verdict(
    tmp_path: Path, subject: str, code: int, verdict: str, reply: str | None
) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(
        b"From: a@example.org\nTo: b@example.net\nSubject: %s\n\nx\n" % subject.encode()
    )
    run = triomilter("check", "tests/tools/modifier_milter.py", str(path), "--json")
    assert run.code == code, run.stderr
    (checked,) = run.json()["messages"]
    assert (checked["verdict"], checked["reply"]) == (verdict, reply)
    assert (checked["delivered"] is not None) == (verdict == "accepted")


def test_every_recipient_refused_is_a_rejection(message: Path) -> None:
    run = triomilter(
        "check", "tests/tools/modifier_milter.py", str(message), "--rcpt", "refused@example.net"
    )
    assert run.code == 1, run.stderr
    assert "verdict   rejected at RCPT" in run.text
    assert "recipient <refused@example.net> refused: 550 5.1.1 No such user here" in run.text


def test_the_most_severe_verdict_wins(tmp_path: Path) -> None:
    for name, subject in [("1.eml", "please discard"), ("2.eml", "please reject"), ("3.eml", "ok")]:
        (tmp_path / name).write_bytes(b"To: b@example.net\nSubject: %s\n\n" % subject.encode())
    run = triomilter("check", "tests/tools/modifier_milter.py", str(tmp_path), "--quiet")
    assert run.code == 1, run.stderr
    assert run.text.splitlines() == [
        f"{tmp_path}/1.eml: discarded",
        f"{tmp_path}/2.eml: rejected: 550 5.7.1 Rejected by the test milter",
        f"{tmp_path}/3.eml: accepted, 10 changes",
    ]


def _violating(conn: socket.socket, pkt: Packet) -> bytes | None:
    if pkt.code == b"M":
        return packet(b"h", b"X-Early\0not at MAIL\0")  # a change outside end of message
    return None


def _accepting(conn: socket.socket, pkt: Packet) -> bytes | None:
    return packet(b"a") if pkt.code == b"M" else None


def _silent(conn: socket.socket, pkt: Packet) -> bytes | None:
    if pkt.code == b"M":
        time.sleep(2)  # longer than --timeout
    return None


def test_a_protocol_violation_exits_5_and_the_next_message_gets_a_new_connection(
    tmp_path: Path,
) -> None:
    for name in ("1.eml", "2.eml"):
        (tmp_path / name).write_bytes(b"To: b@example.net\nSubject: s\n\nx\n")
    with RawMilter(hook=_violating) as raw:
        run = triomilter("check", "--connect", f"inet:{raw.port}@127.0.0.1", str(tmp_path))
        document = triomilter(
            "check", "--connect", f"inet:{raw.port}@127.0.0.1", str(tmp_path), "--json"
        ).json()
    assert run.code == 5, run.stderr
    assert "ADDHEADER ('h') is not a valid reply to MAIL ('M')" in run.text
    assert [m["verdict"] for m in document["messages"]] == ["error", "error"]
    assert [m["session"] for m in document["messages"]] == [0, 1]
    assert len(document["sessions"]) == 2


def test_accept_at_mail_delivers_the_message_unchanged(message: Path) -> None:
    with RawMilter(hook=_accepting) as raw:
        run = triomilter(
            "check", "--connect", f"inet:{raw.port}@127.0.0.1", str(message), "-o", "-"
        )
    assert run.code == 0, run.stderr
    assert run.stdout == MESSAGE
    assert "verdict   accepted at MAIL" in run.stderr
    assert raw.commands()[-3:] == [b"M", b"A", b"Q"]  # nothing more of it; Postfix's ABORT


def test_timeout_and_unreachable_exit_5(message: Path) -> None:
    with RawMilter(hook=_silent) as raw:
        run = triomilter(
            "check", "--connect", f"inet:{raw.port}@127.0.0.1", str(message), "--timeout", "0.5"
        )
    assert run.code == 5, run.stderr
    assert "timeout: no reply from the milter to MAIL ('M') within 0.5 s" in run.text
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = sock.getsockname()[1]
        run = triomilter("check", "--connect", f"inet:{port}@127.0.0.1", str(message))
    assert run.code == 5, run.stderr
    assert "error     cannot reach the milter: " in run.text
    assert "Connection refused" in run.text


def test_a_panic_exits_5(message: Path) -> None:
    run = triomilter("check", "tests/tools/panicking_milter.py", str(message))
    assert run.code == 5, run.stderr
    assert "a handler panicked" in run.text
    assert "KeyError('a bug in the handler')" in run.text + run.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give the milter: MODULE[:ATTR], or --connect SPEC"),
        (["no/such/milter.py"], "no such file: no/such/milter.py"),
        (["examples/header_tagger.py", "no/such.eml"], "no such file: no/such.eml"),
        (["--connect", "inet:127.0.0.1:8894"], "not Postfix's inet:HOST:PORT"),
        (["examples/header_tagger.py", "--client-address", "nonsense"], "client address"),
        (["examples/header_tagger.py", "--macro", "novalue"], "expected NAME=VALUE"),
        (["examples/header_tagger.py", "--timeout", "0"], "--timeout must be positive"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    run = triomilter("check", *args)
    assert run.code == 2, run.stderr
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_help_documents_the_exit_statuses() -> None:
    run = triomilter("check", "--help")
    assert run.code == 0
    for line in ["0  accepted", "1  rejected", "2  usage error", "3  tempfailed", "4  discarded"]:
        assert line in run.text
    assert "5  milter error" in run.text


# --- several messages, one connection -----------------------------------------------------------


def test_several_messages_run_on_one_connection(tmp_path: Path) -> None:
    box = tmp_path / "box.mbox"
    box.write_bytes(
        b"From a@example.org Thu Dec  4 10:00:00 2025\nSubject: one\n\n>From quoted\n\n"
        b"From b@example.org Thu Dec  4 10:00:01 2025\nSubject: two\n\nbody\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    with served("tests/tools/counting_milter.py") as spec:
        run = triomilter(
            "check",
            "--connect",
            spec,
            str(box),
            "examples/mail/plain.eml",
            "-",
            "--rcpt",
            "<r@example.net>",
            "-o",
            str(out),
            stdin=b"Subject: three\r\n\r\nfrom stdin\r\n",
        )
    assert run.code == 0, run.stderr
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [
        "001-box.mbox-1",
        "002-box.mbox-2",
        "003-plain.eml",
        "004-stdin",
    ]
    delivered = [f.read_bytes() for f in files]
    assert [d.count(b"X-Message-Number: %d" % n) for n, d in enumerate(delivered, 1)] == [1] * 4
    assert delivered[0] == (
        b"Subject: one\nX-Message-Number: 1\nX-Client: localhost 127.0.0.1:49152\n\nFrom quoted\n"
    )
    assert delivered[3].startswith(b"Subject: three\r\nX-Message-Number: 4\r\n")
    assert delivered[3].endswith(b"\r\n\r\nfrom stdin\r\n")


def test_several_messages_to_one_mbox(tmp_path: Path) -> None:
    out = tmp_path / "out.mbox"
    run = triomilter("check", "examples/header_tagger.py", "examples/mail", "-o", str(out), "-q")
    assert run.code == 0, run.stderr
    assert run.text.count(": accepted, 1 change") == 3
    data = out.read_bytes()
    assert data.count(b"\nFrom ") + data.startswith(b"From ") == 3
    assert data.count(b"X-Triomilter-Tagged: smtp.beispiel.de [198.51.100.7]") == 3


def test_options_set_the_envelope_and_macros(message: Path) -> None:
    run = triomilter(
        "check",
        "tests/tools/counting_milter.py",
        str(message),
        "--from",
        "<sender@example.com> SIZE=100 BODY=8BITMIME",
        "--rcpt",
        "rcpt@example.com NOTIFY=NEVER",
        "--client-name",
        "client.example.com",
        "--client-address",
        "[2001:db8::25]:2525",
        "--helo",
        "helo.example.com",
        "--macro",
        "{auth_authen}=alice",
        "--macro",
        "v=",
        "--macro",
        "custom=yes",
        "--mta",
        "sendmail",
        "--json",
    )
    assert run.code == 0, run.stderr
    document = run.json()
    connect, helo = document["sessions"][0]["steps"]
    assert connect["args"] == ["client.example.com", "[2001:db8::25]:2525"]
    # Sendmail's connect list, and a macro in no list comes at CONNECT.
    assert connect["macros"] == {
        "j": "mx.example.net",
        "_": "client.example.com [2001:db8::25]",
        "{daemon_name}": "MTA",
        "{if_name}": "mx.example.net",
        "{if_addr}": "198.51.100.25",
        "{custom}": "yes",
    }
    assert helo["args"] == ["helo.example.com"]
    (checked,) = document["messages"]
    mail = checked["steps"][0]
    assert mail["args"] == ["<sender@example.com>", "SIZE=100", "BODY=8BITMIME"]
    assert mail["macros"]["{auth_authen}"] == "alice"
    assert mail["macros"]["i"] == "5B4CqLfx000001"  # Sendmail knows its queue id at MAIL
    rcpt = checked["steps"][1]
    assert rcpt["args"] == ["<rcpt@example.com>", "NOTIFY=NEVER"]
    added = {c["name"]: c["value"] for c in checked["changes"]}
    assert added["X-Client"] == "client.example.com 2001:db8::25:2525"


# --- 8-bit headers and a large body ----------------------------------------------------------


def test_8bit_headers(modifier: list[str], tmp_path: Path) -> None:
    source = Path("examples/mail/8bit-headers.eml").read_bytes()
    latin1 = tmp_path / "latin1.eml"
    latin1.write_bytes(source.replace(b"Subject:", b"X-Latin1: caf\xe9\nSubject:", 1))
    output = tmp_path / "out.eml"
    run = triomilter("check", *modifier, str(latin1), "--output", str(output), "--json")
    assert run.code == 0, run.stderr
    (checked,) = run.json()["messages"]
    headers = {s["args"][0]: s["args"][1] for s in checked["steps"] if s["stage"] == "header"}
    assert headers["From"] == "Jürgen Müller <jürgen@beispiel.de>"
    assert headers["X-Latin1"] == "caf\\xe9"  # not UTF-8: escaped in JSON
    assert checked["envelope"]["sender"] == "<jürgen@beispiel.de>"
    subject = "[checked] Grüße aus Köln \u2013 Straßenfest am Samstag"
    assert {"action": "replace_header", "name": "Subject", "index": 1, "value": subject} in (
        checked["changes"]
    )
    delivered = output.read_bytes()
    assert b"X-Latin1: caf\xe9\n" in delivered  # the raw bytes, untouched
    assert ("Subject: " + subject + "\n").encode() in delivered
    assert "From: Jürgen Müller <jürgen@beispiel.de>\n".encode() in delivered


@pytest.fixture(scope="module")
def big_message(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A 5 MB message in LF line ends, and its body as the MTA sends it (CRLF)."""
    line = b"a line of body text, 8-bit too: \xc3\xa9\xc3\xa8, with some padding ...............\n"
    body = line * (5 * 1024 * 1024 // len(line))
    path = tmp_path_factory.mktemp("big") / "big.eml"
    path.write_bytes(b"From: a@example.org\nTo: b@example.net\nSubject: big\n\n" + body)
    return path, body.replace(b"\n", b"\r\n")


@pytest.mark.parametrize("where", ["in-memory", "tcp"])
def test_a_5mb_body_is_streamed_in_chunks(big_message: tuple[Path, bytes], where: str) -> None:
    path, wire = big_message
    if where == "in-memory":
        run = triomilter("check", "examples/body_policy.py", str(path), "--json")
    else:
        with served("examples/body_policy.py") as spec:
            run = triomilter("check", "--connect", spec, str(path), "--json")
    assert run.code == 0, run.stderr
    (checked,) = run.json()["messages"]
    added = {c["name"]: c["value"] for c in checked["changes"]}
    assert added == {
        "X-Body-Size": str(len(wire)),
        "X-Body-SHA256": hashlib.sha256(wire).hexdigest(),
    }
    (body,) = [s for s in checked["steps"] if s["stage"] == "body"]
    chunks = -(-len(wire) // 65535)
    assert body["note"] == f"{len(wire)} bytes in {chunks} chunks"
    assert checked["delivered"]["body_size"] == len(wire)


def test_a_5mb_body_diff_shows_only_the_headers(big_message: tuple[Path, bytes]) -> None:
    path, _ = big_message
    run = triomilter("check", "examples/body_policy.py", str(path), "--diff")
    assert run.code == 0, run.stderr
    diff = run.text[run.text.index("--- ") :]
    assert diff.count("\n+X-Body-") == 2
    assert len(diff.splitlines()) < 20  # the unchanged body is not compared


def test_skip_stops_the_body(tmp_path: Path) -> None:
    eicar = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\n"
    path = tmp_path / "eicar.eml"
    path.write_bytes(b"Subject: x\nTo: b@example.net\n\n" + eicar + b"filler line\n" * 20000)
    run = triomilter("check", "examples/body_policy.py", str(path), "--json")
    assert run.code == 1, run.stderr
    (checked,) = run.json()["messages"]
    (body,) = [s for s in checked["steps"] if s["stage"] == "body"]
    assert body["status"] == "SKIP"
    assert body["note"] == "65535 bytes in 1 chunk, then SKIP: the rest was not sent"
    assert checked["reply"] == "554 5.7.1 Message refused: forbidden content"
