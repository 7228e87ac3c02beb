"""Milter verdicts as the SMTP client sees them through a real Sendmail: the
Sendmail counterpart of test_postfix_replies.py, with the same policy milter
(tests/e2e/scenarios.py: ``helo-OUTCOME``, ``mail-OUTCOME@``,
``rcpt-OUTCOME@``, ``X-Eom: OUTCOME``).

Where Sendmail differs from Postfix (shared/reference/sendmail-notes.md):
a rejected HELO puts the session in "nullserver" mode (EHLO advertises only
ENHANCEDSTATUSCODES, every later MAIL is refused, even after RSET and a new
EHLO); its default texts differ; plain REJECT and a multi-line custom reply
at MAIL/RCPT get the address inserted in the first line; REJECT at end of
message is 554.
"""

from __future__ import annotations

import smtplib

import pytest

from triomilter import Status

from ._milter_runner import Recorder, use_sendmail_milter
from .capture import CaptureServer
from .scenarios import MULTILINE, VERDICTS, policy_message, policy_milter, send_envelope, text_reply
from .sendmail import HOSTNAME, PrivateSendmail

TEMPFAIL = (451, "4.3.2 Please try again later")
NULLSERVER_REJECT = (550, "5.0.0 Command rejected")
CUSTOM = (554, "5.7.0 Custom refusal from the milter")
CUSTOM_TEMP = (452, "4.3.1 Custom temporary failure\n4.3.1 try again in a while")


def _multiline(address: str | None = None) -> tuple[int, str]:
    lines = [f"5.7.2 {line}" for line in MULTILINE]
    if address:
        # Sendmail puts "<address>... " in front of the first line's text.
        lines[0] = f"5.7.2 <{address}>... {MULTILINE[0]}"
    return 550, "\n".join(lines)


def expected_at(stage: str, outcome: str, address: str) -> tuple[int, str]:
    """What the client sees for ``outcome`` at MAIL/RCPT (for ``address``) or EOM."""
    if outcome == "reject":
        if stage == "eom":
            return 554, "5.7.1 Command rejected"
        return 550, f"5.7.1 <{address}>... Command rejected"
    return {
        "tempfail": TEMPFAIL,
        "custom": CUSTOM,  # a one-line custom reply is sent as it is
        "multiline": _multiline(address if stage != "eom" else None),
        "customtemp": CUSTOM_TEMP,
    }[outcome]


def ok_mail(sender: str) -> tuple[int, str]:
    return 250, f"2.1.0 <{sender}>... Sender ok"


def ok_rcpt(rcpt: str) -> tuple[int, str]:
    return 250, f"2.1.5 <{rcpt}>... Recipient ok"


def accepted(reply: tuple[int, str] | None) -> str:
    """The queue id of a ``250 2.0.0 QID Message accepted for delivery``."""
    assert reply is not None and reply[0] == 250, reply
    text = reply[1]
    assert text.startswith("2.0.0 ") and text.endswith(" Message accepted for delivery"), text
    return text.split()[1]


OUTCOMES = sorted(VERDICTS)  # custom, customtemp, multiline, reject, tempfail
FULL_EHLO = ["ENHANCEDSTATUSCODES", "PIPELINING", "8BITMIME", "SIZE", "DSN", "ETRN", "DELIVERBY"]


def _keywords(ehlo: tuple[int, bytes]) -> list[str]:
    return [line.split()[0] for line in ehlo[1].decode().splitlines()[1:] if line != "HELP"]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_helo_verdict_holds_for_the_session(
    sendmail: PrivateSendmail, capture: CaptureServer, outcome: str
) -> None:
    rec = Recorder()
    expected = {
        "reject": NULLSERVER_REJECT,
        "tempfail": TEMPFAIL,
        "custom": CUSTOM,
        "multiline": _multiline(),
        "customtemp": CUSTOM_TEMP,
    }[outcome]
    with use_sendmail_milter(sendmail, policy_milter(rec)), sendmail.smtp() as s:
        ehlo = s.ehlo(f"helo-{outcome}.test.invalid")
        assert ehlo[0] == 250
        # Any refusal but a plain TEMPFAIL turns the session into a
        # "nullserver": no ESMTP extension but enhanced status codes.
        if outcome == "tempfail":
            assert _keywords(ehlo) == FULL_EHLO
        else:
            assert _keywords(ehlo) == ["ENHANCEDSTATUSCODES"]
        sent = send_envelope(s, "a@example.test", ["r@example.test"], policy_message())
        assert sent == (expected, [], None)
        # It holds for the whole session, even after RSET and a good EHLO.
        s.rset()
        assert s.ehlo("good.test.invalid")[0] == 250
        assert text_reply(s.mail("b@example.test")) == expected
    assert rec.stages() == ["connect", "helo"]  # the milter is not asked again
    if outcome == "reject":
        sendmail.wait_for_log(r"Milter: helo=helo-reject\.test\.invalid, reject=Command rejected")
    assert capture.wait_quiet(0.2) == []


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_mail_verdict(sendmail: PrivateSendmail, capture: CaptureServer, outcome: str) -> None:
    rec = Recorder()
    sender = f"mail-{outcome}@example.test"
    with use_sendmail_milter(sendmail, policy_milter(rec)), sendmail.smtp() as s:
        s.ehlo()
        sent = send_envelope(s, sender, ["r@example.test"], policy_message())
        assert sent == (expected_at("mail", outcome, sender), [], None)
        # The verdict was for that message only: the next one goes through.
        fine = send_envelope(s, "fine@example.test", ["r@example.test"], policy_message())
        assert fine[:2] == (ok_mail("fine@example.test"), [ok_rcpt("r@example.test")])
        accepted(fine[2])
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == "fine@example.test"
    assert rec.values("mail") == [f"<{sender}>", "<fine@example.test>"]
    assert capture.wait_quiet(0.2) == [msg]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_rcpt_verdict_refuses_one_recipient(
    sendmail: PrivateSendmail, capture: CaptureServer, outcome: str
) -> None:
    rec = Recorder()
    refused = f"rcpt-{outcome}@example.test"
    rcpts = ["first@example.test", refused, "last@example.test"]
    with use_sendmail_milter(sendmail, policy_milter(rec)), sendmail.smtp() as s:
        s.ehlo()
        mail, rcpt_replies, data = send_envelope(s, "a@example.test", rcpts, policy_message())
    assert mail == ok_mail("a@example.test")
    assert rcpt_replies == [
        ok_rcpt(rcpts[0]),
        expected_at("rcpt", outcome, refused),
        ok_rcpt(rcpts[2]),
    ]
    accepted(data)
    (msg,) = capture.wait_for(1)
    assert sorted(msg.rcpt_tos) == ["first@example.test", "last@example.test"]
    assert rec.values("rcpt") == [f"<{r}>" for r in rcpts]
    assert "eom" in rec.stages()


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_eom_verdict(sendmail: PrivateSendmail, capture: CaptureServer, outcome: str) -> None:
    rec = Recorder()
    with use_sendmail_milter(sendmail, policy_milter(rec)), sendmail.smtp() as s:
        s.ehlo()
        sent = send_envelope(s, "a@example.test", ["r@example.test"], policy_message(outcome))
        assert sent == (
            ok_mail("a@example.test"),
            [ok_rcpt("r@example.test")],
            expected_at("eom", outcome, ""),
        )
        accepted(send_envelope(s, "b@example.test", ["r@example.test"], policy_message())[2])
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == "b@example.test"
    assert rec.stages().count("eom") == 2
    assert capture.wait_quiet(0.2) == [msg]


def test_all_recipients_refused(sendmail: PrivateSendmail, capture: CaptureServer) -> None:
    rec = Recorder()
    rcpts = ["rcpt-reject@example.test", "rcpt-multiline@example.test"]
    with use_sendmail_milter(sendmail, policy_milter(rec)), sendmail.smtp() as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            s.sendmail("a@example.test", rcpts, policy_message())
        # DATA without a valid recipient: Sendmail's own answer.
        s.ehlo()
        assert s.mail("a@example.test")[0] == 250
        assert text_reply(s.docmd("DATA")) == (503, "5.0.0 Need RCPT (recipient)")
    assert {rcpt: text_reply(reply) for rcpt, reply in refused.value.recipients.items()} == {
        rcpts[0]: expected_at("rcpt", "reject", rcpts[0]),
        rcpts[1]: expected_at("rcpt", "multiline", rcpts[1]),
    }
    assert "header" not in rec.stages()
    assert capture.wait_quiet(0.2) == []


@pytest.mark.parametrize("stage", ["mail", "rcpt", "eom"])
def test_discard_answers_250_and_delivers_nothing(
    sendmail: PrivateSendmail, capture: CaptureServer, stage: str
) -> None:
    rec = Recorder()
    sender, rcpts, eom = "a@example.test", ["r1@example.test", "r2@example.test"], None
    if stage == "mail":
        sender = "mail-discard@example.test"
    elif stage == "rcpt":
        rcpts = ["r1@example.test", "rcpt-discard@example.test", "r2@example.test"]
    else:
        eom = "discard"
    with use_sendmail_milter(sendmail, policy_milter(rec)), sendmail.smtp() as s:
        s.ehlo()
        mail, rcpt_replies, data = send_envelope(s, sender, rcpts, policy_message(eom))
        assert mail == ok_mail(sender)
        assert rcpt_replies == [ok_rcpt(r) for r in rcpts]
        queue_id = accepted(data)  # 250 with a queue id, like a real acceptance
        # The next message of the session is filtered and delivered as usual.
        accepted(send_envelope(s, "next@example.test", ["r@example.test"], policy_message())[2])
    sendmail.wait_for_log(rf"{queue_id}: .*stat=discarded")
    what = {"mail": f"from=<{sender}>", "rcpt": "to=<rcpt-discard@example.test>", "eom": "data"}
    sendmail.wait_for_log(rf"{queue_id}: Milter: {what[stage]}, discard")
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == "next@example.test"
    sendmail.wait_queue_empty()
    assert capture.wait_quiet(0.2) == [msg]
    # After a discard at MAIL or RCPT, Sendmail asks the milter nothing more
    # about that message.
    stages = rec.stages()
    first = stages[: stages.index("mail", stages.index("mail") + 1)]
    if stage != "eom":
        assert "header" not in first and "eom" not in first
        assert first.count("rcpt") == (0 if stage == "mail" else 2)


@pytest.mark.parametrize("status", [Status.REJECT, Status.TEMPFAIL])
def test_connect_verdict_holds_for_the_session(
    sendmail: PrivateSendmail, capture: CaptureServer, status: Status
) -> None:
    """REJECT at connect: banner 554 "not accepting messages" and nullserver
    mode; TEMPFAIL: a normal banner, then 451 at every MAIL.  The milter is
    not asked again either way."""
    rec = Recorder()
    if status is Status.REJECT:
        banner = (554, f"{HOSTNAME} ESMTP not accepting messages")
        expected = NULLSERVER_REJECT
        logged = "rejecting commands"
    else:
        banner = (220, f"{HOSTNAME} ESMTP {sendmail.base_dir.rsplit('/', 1)[1]}")
        expected = TEMPFAIL
        logged = "temp failing commands"
    with use_sendmail_milter(sendmail, policy_milter(rec, connect=status)):
        s = smtplib.SMTP(local_hostname="client.test.invalid", timeout=30)
        try:
            assert text_reply(s.connect("127.0.0.1", sendmail.smtp_port)) == banner
            assert s.ehlo()[0] == 250
            assert text_reply(s.mail("a@example.test")) == expected
            s.rset()
            assert text_reply(s.mail("b@example.test")) == expected
            s.quit()
        finally:
            s.close()
    sendmail.wait_for_log(rf"Milter: connect: host=localhost, addr=127\.0\.0\.1, {logged}")
    assert rec.stages() == ["connect"]
    assert capture.wait_quiet(0.2) == []
