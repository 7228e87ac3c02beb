"""What triomilter handlers see, stage by stage, when a real Sendmail talks
to them: the Sendmail counterpart of test_postfix_stages.py, with the same
recording milter (tests/e2e/scenarios.py).

Sendmail's macro lists are its defaults plus ``i`` at end of message (see
tests/e2e/sendmail.py); the client is named from the instance's /etc/hosts.
"""

from __future__ import annotations

import hashlib

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

from ._milter_runner import (
    Recorder,
    sendmail_queue_id,
    strip_sendmail_received,
    use_sendmail_milter,
)
from .capture import CaptureServer
from .scenarios import (
    SENDER,
    STAGE_HEADERS,
    client_port,
    recording_milter,
    varied_body,
)
from .sendmail import CLIENT_HELO, HOSTNAME, PrivateSendmail

# Every message of Sendmail carries these connection macros (default list).
CONNECT_MACROS = {
    "j": HOSTNAME,
    "_": "localhost [127.0.0.1]",
    "{daemon_name}": "MTA",  # the DAEMON_OPTIONS Name=
    "{if_name}": "localhost",
}


def test_every_stage_sees_its_arguments(sendmail: PrivateSendmail, capture: CaptureServer) -> None:
    rec = Recorder()
    body = varied_body(150 * 1024)  # above 64 KiB: sent in several chunks
    original = STAGE_HEADERS + b"\r\n" + body
    rcpts = ["a@example.test", "b@example.test"]
    with use_sendmail_milter(sendmail, recording_milter(rec)), sendmail.smtp() as s:
        port = client_port(s)
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
    assert strip_sendmail_received(msg.data) == original  # the recorder changes nothing
    queue_id = sendmail_queue_id(msg.data)

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
    # Sendmail names the client by a reverse lookup (files only: localhost).
    assert hostname == "localhost"
    assert address == SocketInfo(SocketFamily.INET, "127.0.0.1", port)
    assert connect_macros == CONNECT_MACROS

    helo, helo_macros = rec.one("helo")
    assert helo == CLIENT_HELO
    assert helo_macros == CONNECT_MACROS  # connection macros stay visible

    mail_args, mail_macros = rec.one("mail")
    assert mail_args == [
        f"<{SENDER}>",
        f"size={len(original)}",  # smtplib's spelling, passed on verbatim
        "BODY=8BITMIME",
        "ENVID=env-1",
    ]
    # Sendmail knows its queue id from MAIL on (Postfix: after the first RCPT).
    assert mail_macros == {
        **CONNECT_MACROS,
        "i": queue_id,
        "{mail_addr}": SENDER,
        "{mail_host}": "[127.0.0.1]",  # the smart host
        "{mail_mailer}": "relay",
    }

    (rcpt_a, macros_a), (rcpt_b, macros_b) = rec.values("rcpt")
    assert rcpt_a == [
        "<a@example.test>",
        "NOTIFY=SUCCESS,FAILURE",
        "ORCPT=rfc822;orig-a@example.test",
    ]
    assert rcpt_b[1:] == rcpt_a[1:] and rcpt_b[0] == "<b@example.test>"
    rcpt_macros = {"{rcpt_host}": "[127.0.0.1]", "{rcpt_mailer}": "relay"}
    assert macros_a == {**mail_macros, **rcpt_macros, "{rcpt_addr}": "a@example.test"}
    assert macros_b == {**mail_macros, **rcpt_macros, "{rcpt_addr}": "b@example.test"}

    # No DATA/EOH lists by default: the handler sees the earlier stages' values.
    assert rec.one("data") == macros_b
    assert rec.values("header") == [
        ("From", "Sender <sender@example.test>"),
        ("To", "a@example.test, b@example.test"),
        ("Subject", "stages"),
        ("X-Folded", "first line\n\tsecond line\n  third line"),  # bare LF folds
        ("X-Empty", ""),
        ("X-Spaces", "   three leading spaces"),  # only the first space is stripped
    ]
    assert rec.one("eoh") == macros_b

    chunks = rec.values("body")
    assert len(chunks) >= 3
    assert all(len(chunk) <= 65535 for chunk in chunks)
    assert hashlib.sha256(b"".join(chunks)).digest() == hashlib.sha256(body).digest()

    eom_macros = rec.one("eom")
    assert eom_macros["i"] == queue_id
    assert eom_macros["{msg_id}"] == f"<{eom_macros['{msg_id}'][1:-1]}>"
    assert eom_macros["{msg_id}"].endswith(f".{queue_id}@{HOSTNAME}>")
    assert eom_macros["j"] == HOSTNAME


def test_macros_requested_in_on_negotiate(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    """ctx.api.request_macros(): Sendmail sends the requested list at that
    stage instead of its configured one (here MAIL; EOM: see the next tests)."""
    rec = Recorder()

    @on_negotiate
    async def negotiate(
        ctx: Context[object], actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        rec.add("negotiate", (actions, opts))
        ctx.api.request_macros(MacroStage.MAIL, "{client_addr} {client_port} {mail_addr}")
        ctx.api.request_macros(MacroStage.RCPT, "{rcpt_addr} {client_name}")
        return Status.CONTINUE, Actions.NONE, ProtocolOpts.NONE

    milter = recording_milter(rec, [negotiate])
    with use_sendmail_milter(sendmail, milter), sendmail.smtp() as s:
        port = client_port(s)
        s.sendmail(SENDER, ["r@example.test"], b"Subject: macros\r\n\r\nbody\r\n")
        s.quit()
        capture.wait_for(1)
        rec.wait_for("close")

    actions, _ = rec.one("negotiate")
    assert actions & Actions.REQUEST_MACROS  # Sendmail offers macro lists
    assert actions & Actions.ADD_HEADER and actions & Actions.QUARANTINE
    _, mail_macros = rec.one("mail")
    # The requested list replaced the configured one ({mail_host}, i...).
    assert mail_macros == {
        **CONNECT_MACROS,
        "{client_addr}": "127.0.0.1",
        "{client_port}": str(port),
        "{mail_addr}": SENDER,
    }
    _, rcpt_macros = rec.one("rcpt")
    assert rcpt_macros == {
        **mail_macros,
        "{rcpt_addr}": "r@example.test",
        "{client_name}": "localhost",
    }
