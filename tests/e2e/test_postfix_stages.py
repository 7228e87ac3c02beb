"""What triomilter handlers see, stage by stage, when a real Postfix talks to them.

A recording milter (every stage handled) runs in a thread; the test sends real
SMTP through Postfix and compares what each handler got with what the client
sent and what Postfix reports (its Received: header names the queue id).
"""

from __future__ import annotations

import hashlib
import re

from triomilter import (
    Actions,
    Context,
    MacroStage,
    ProtocolOpts,
    SocketFamily,
    SocketInfo,
    Status,
    on_negotiate,
)

from ._milter_runner import Recorder, strip_received, use_milter
from .capture import CaptureServer
from .postfix import CLIENT_HELO, HOSTNAME, PrivatePostfix
from .scenarios import SENDER, recording_milter
from .scenarios import STAGE_HEADERS as HEADERS
from .scenarios import client_port as _client_port
from .scenarios import varied_body as _body


def _queue_id(delivered: bytes) -> str:
    match = re.search(rb"by mta\.test\.invalid \(Postfix\) with ESMTP id ([0-9A-F]+)\b", delivered)
    assert match, delivered[:300]
    return match.group(1).decode()


def test_every_stage_sees_its_arguments(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    rec = Recorder()
    body = _body(150 * 1024)  # above 64 KiB: Postfix sends it in several chunks
    original = HEADERS + b"\r\n" + body
    rcpts = ["a@example.test", "b@example.test"]
    with use_milter(postfix, recording_milter(rec)), postfix.smtp() as s:
        client_port = _client_port(s)
        s.sendmail(
            SENDER,
            rcpts,
            original,
            ["BODY=8BITMIME", "ENVID=env-1"],
            ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;orig-a@example.test"],
        )
        s.quit()
        (msg,) = capture.wait_for(1)
        rec.wait_for("close")
    assert strip_received(msg.data) == original  # the recorder changes nothing
    queue_id = _queue_id(msg.data)

    stages = rec.stages()
    n_headers, n_chunks = stages.count("header"), stages.count("body")
    assert stages == (
        ["connect", "helo", "mail", "rcpt", "rcpt", "data"]
        + ["header"] * n_headers
        + ["eoh"]
        + ["body"] * n_chunks
        + ["eom", "close"]
    )

    hostname, address, connect_macros = rec.one("connect")
    # smtpd_peername_lookup=no: Postfix names the client "[address]", like Sendmail.
    assert hostname == "[127.0.0.1]"
    assert address == SocketInfo(SocketFamily.INET, "127.0.0.1", client_port)
    assert connect_macros["j"] == HOSTNAME
    assert connect_macros["{daemon_name}"] == HOSTNAME
    assert connect_macros["{daemon_addr}"] == "127.0.0.1"
    assert connect_macros["_"] == "unknown [127.0.0.1]"
    assert connect_macros["v"].startswith("Postfix 3.")
    assert "{mail_addr}" not in connect_macros

    helo, helo_macros = rec.one("helo")
    assert helo == CLIENT_HELO
    assert helo_macros["j"] == HOSTNAME  # connection macros stay visible

    mail_args, mail_macros = rec.one("mail")
    assert mail_args == [
        f"<{SENDER}>",
        f"size={len(original)}",  # smtplib's spelling, passed on verbatim
        "BODY=8BITMIME",
        "ENVID=env-1",
    ]
    assert mail_macros["{mail_addr}"] == SENDER
    assert "{client_addr}" not in mail_macros  # not in Postfix's default MAIL list
    assert "{rcpt_addr}" not in mail_macros

    (rcpt_a, macros_a), (rcpt_b, macros_b) = rec.values("rcpt")
    assert rcpt_a == [
        "<a@example.test>",
        "NOTIFY=SUCCESS,FAILURE",
        "ORCPT=rfc822;orig-a@example.test",
    ]
    assert rcpt_b[1:] == rcpt_a[1:] and rcpt_b[0] == "<b@example.test>"
    assert macros_a["{rcpt_addr}"] == "a@example.test"
    assert macros_b["{rcpt_addr}"] == "b@example.test"
    assert macros_a["{mail_addr}"] == SENDER  # MAIL macros last the whole message
    assert macros_a["{rcpt_mailer}"] == "smtp"
    # Postfix picks the queue id once a first recipient is accepted.
    assert macros_b["i"] == queue_id

    assert rec.one("data")["i"] == queue_id
    assert rec.values("header") == [
        ("From", "Sender <sender@example.test>"),
        ("To", "a@example.test, b@example.test"),
        ("Subject", "stages"),
        ("X-Folded", "first line\n\tsecond line\n  third line"),  # bare LF folds
        ("X-Empty", ""),
        ("X-Spaces", "   three leading spaces"),  # only the first space is stripped
    ]
    assert rec.one("eoh")["i"] == queue_id

    chunks = rec.values("body")
    assert len(chunks) >= 3
    assert all(len(chunk) <= 65535 for chunk in chunks)
    assert b"".join(chunks) == body
    assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(body).digest()

    eom_macros = rec.one("eom")
    assert eom_macros["i"] == queue_id
    assert eom_macros["j"] == HOSTNAME


def test_macros_requested_in_on_negotiate(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    """ctx.api.request_macros(): Postfix sends the requested list at that stage
    (instead of its milter_mail_macros default list)."""
    rec = Recorder()

    @on_negotiate
    async def negotiate(
        ctx: Context[object], actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        rec.add("negotiate", (actions, opts))
        ctx.api.request_macros(MacroStage.MAIL, "{client_addr} {client_port}")
        ctx.api.request_macros(MacroStage.EOM, "{client_name} {client_addr} i")
        return Status.CONTINUE, Actions.NONE, ProtocolOpts.NONE

    milter = recording_milter(rec, [negotiate])
    with use_milter(postfix, milter), postfix.smtp() as s:
        client_port = _client_port(s)
        s.sendmail(SENDER, ["r@example.test"], b"Subject: macros\r\n\r\nbody\r\n")
        s.quit()
        (msg,) = capture.wait_for(1)
        rec.wait_for("close")

    actions, _ = rec.one("negotiate")
    assert actions & Actions.REQUEST_MACROS  # Postfix offers macro lists
    assert actions & Actions.ADD_HEADER and actions & Actions.QUARANTINE
    _, mail_macros = rec.one("mail")
    assert mail_macros["{client_addr}"] == "127.0.0.1"
    assert mail_macros["{client_port}"] == str(client_port)
    # A requested list replaces Postfix's default one for that stage.
    assert "{mail_addr}" not in mail_macros
    eom_macros = rec.one("eom")
    assert eom_macros["{client_name}"] == "unknown"
    assert eom_macros["{client_addr}"] == "127.0.0.1"
    assert eom_macros["i"] == _queue_id(msg.data)


def test_macros_requested_by_milter_config(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    """Milter(macros=...) requests macro lists without an on_negotiate handler."""
    rec = Recorder()
    milter = recording_milter(
        rec,
        macros={
            MacroStage.CONNECT: "{client_addr} {daemon_name}",
            MacroStage.RCPT: "{rcpt_addr} {client_port} {mail_addr}",
            MacroStage.DATA: "{client_addr}",
        },
    )
    with use_milter(postfix, milter), postfix.smtp() as s:
        client_port = _client_port(s)
        s.sendmail(SENDER, ["r@example.test"], b"Subject: macros\r\n\r\nbody\r\n")
        s.quit()
        capture.wait_for(1)
        rec.wait_for("close")

    _, _, connect_macros = rec.one("connect")
    assert connect_macros["{client_addr}"] == "127.0.0.1"
    assert connect_macros["{daemon_name}"] == HOSTNAME
    assert "j" not in connect_macros  # replaced Postfix's default connect list
    _, rcpt_macros = rec.one("rcpt")
    assert rcpt_macros["{rcpt_addr}"] == "r@example.test"
    assert rcpt_macros["{client_port}"] == str(client_port)
    assert rcpt_macros["{mail_addr}"] == SENDER
    data_macros = rec.one("data")
    assert data_macros["{client_addr}"] == "127.0.0.1"
    assert "i" not in data_macros  # the DATA list no longer has it
