"""Milter verdicts as the SMTP client sees them through a real Postfix.

One policy milter decides by what the client sends: the HELO name
``helo-OUTCOME.test.invalid``, the sender ``mail-OUTCOME@...``, a recipient
``rcpt-OUTCOME@...`` (that recipient only) or the header ``X-Eom: OUTCOME``
(end of message).  Every stage handler records that it ran, so the tests can
also tell which stages Postfix skipped after an ACCEPT or DISCARD.
"""

from __future__ import annotations

import smtplib

import pytest

from triomilter import (
    Status,
)

from ._milter_runner import Recorder, use_milter
from .capture import CaptureServer
from .postfix import PrivatePostfix
from .scenarios import MULTILINE, VERDICTS, Reply, policy_milter
from .scenarios import policy_message as _message
from .scenarios import send_envelope as _send
from .scenarios import text_reply as _reply

DEFAULT_REJECT = (550, "5.7.1 Command rejected")
DEFAULT_TEMPFAIL = (451, "4.7.1 Service unavailable - try again later")
# outcome (scenarios.VERDICTS): (status, custom reply or None, what the client sees)
_SEEN: dict[str, tuple[int, str]] = {
    "reject": DEFAULT_REJECT,
    "tempfail": DEFAULT_TEMPFAIL,
    "custom": (554, "5.7.0 Custom refusal from the milter"),
    "multiline": (550, "\n".join(f"5.7.2 {line}" for line in MULTILINE)),
    "customtemp": (452, "4.3.1 Custom temporary failure\n4.3.1 try again in a while"),
}
OUTCOMES: dict[str, tuple[Status, Reply | None, tuple[int, str]]] = {
    outcome: (*VERDICTS[outcome], seen) for outcome, seen in _SEEN.items()
}


OK_MAIL = (250, "2.1.0 Ok")
OK_RCPT = (250, "2.1.5 Ok")


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
def test_helo_verdict_is_reported_at_mail(
    postfix: PrivatePostfix, capture: CaptureServer, outcome: str
) -> None:
    rec = Recorder()
    expected = OUTCOMES[outcome][2]
    with use_milter(postfix, policy_milter(rec)), postfix.smtp() as s:
        code, _ = s.ehlo(f"helo-{outcome}.test.invalid")
        assert code == 250  # Postfix keeps the verdict for the next command
        assert _send(s, "a@example.test", ["r@example.test"], _message()) == (expected, [], None)
        # It holds for the whole session, and the milter is not asked again.
        assert _reply(s.mail("b@example.test")) == expected
    assert rec.stages() == ["connect", "helo"]
    assert capture.wait_quiet(0.2) == []


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
def test_mail_verdict(postfix: PrivatePostfix, capture: CaptureServer, outcome: str) -> None:
    rec = Recorder()
    expected = OUTCOMES[outcome][2]
    with use_milter(postfix, policy_milter(rec)), postfix.smtp() as s:
        s.ehlo()
        sent = _send(s, f"mail-{outcome}@example.test", ["r@example.test"], _message())
        assert sent == (expected, [], None)
        # The verdict was for that message only: the next one goes through.
        assert _send(s, "fine@example.test", ["r@example.test"], _message())[0] == OK_MAIL
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == "fine@example.test"
    assert rec.values("mail") == [f"<mail-{outcome}@example.test>", "<fine@example.test>"]
    assert capture.wait_quiet(0.2) == [msg]


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
def test_rcpt_verdict_refuses_one_recipient(
    postfix: PrivatePostfix, capture: CaptureServer, outcome: str
) -> None:
    rec = Recorder()
    expected = OUTCOMES[outcome][2]
    rcpts = ["first@example.test", f"rcpt-{outcome}@example.test", "last@example.test"]
    with use_milter(postfix, policy_milter(rec)), postfix.smtp() as s:
        s.ehlo()
        mail, rcpt_replies, data = _send(s, "a@example.test", rcpts, _message())
    assert mail == OK_MAIL
    assert rcpt_replies == [OK_RCPT, expected, OK_RCPT]
    assert data is not None and data[0] == 250
    (msg,) = capture.wait_for(1)
    assert sorted(msg.rcpt_tos) == ["first@example.test", "last@example.test"]
    assert rec.values("rcpt") == [f"<{r}>" for r in rcpts]
    assert "eom" in rec.stages()


@pytest.mark.parametrize("outcome", sorted(OUTCOMES))
def test_eom_verdict(postfix: PrivatePostfix, capture: CaptureServer, outcome: str) -> None:
    rec = Recorder()
    expected = OUTCOMES[outcome][2]
    with use_milter(postfix, policy_milter(rec)), postfix.smtp() as s:
        s.ehlo()
        sent = _send(s, "a@example.test", ["r@example.test"], _message(outcome))
        assert sent == (OK_MAIL, [OK_RCPT], expected)
        assert _send(s, "b@example.test", ["r@example.test"], _message())[2] is not None
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == "b@example.test"
    assert rec.stages().count("eom") == 2
    assert capture.wait_quiet(0.2) == [msg]


def test_all_recipients_refused(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    rec = Recorder()
    rcpts = ["rcpt-reject@example.test", "rcpt-multiline@example.test"]
    with (
        use_milter(postfix, policy_milter(rec)),
        postfix.smtp() as s,
        pytest.raises(smtplib.SMTPRecipientsRefused) as refused,
    ):
        s.sendmail("a@example.test", rcpts, _message())
    assert {rcpt: _reply(reply) for rcpt, reply in refused.value.recipients.items()} == {
        rcpts[0]: DEFAULT_REJECT,
        rcpts[1]: OUTCOMES["multiline"][2],
    }
    assert "header" not in rec.stages()
    assert capture.wait_quiet(0.2) == []


@pytest.mark.parametrize("stage", ["mail", "rcpt", "eom"])
def test_discard_answers_250_and_delivers_nothing(
    postfix: PrivatePostfix, capture: CaptureServer, stage: str
) -> None:
    rec = Recorder()
    sender, rcpts, eom = "a@example.test", ["r1@example.test", "r2@example.test"], None
    if stage == "mail":
        sender = "mail-discard@example.test"
    elif stage == "rcpt":
        rcpts = ["r1@example.test", "rcpt-discard@example.test", "r2@example.test"]
    else:
        eom = "discard"
    with use_milter(postfix, policy_milter(rec)), postfix.smtp() as s:
        s.ehlo()
        mail, rcpt_replies, data = _send(s, sender, rcpts, _message(eom))
        assert mail == OK_MAIL
        assert rcpt_replies == [OK_RCPT] * len(rcpts)
        assert data is not None and data[0] == 250
        # The next message of the session is filtered and delivered as usual.
        assert _send(s, "next@example.test", ["r@example.test"], _message())[2] is not None
    postfix.wait_for_log(r"milter-discard: .*milter triggers DISCARD action")
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == "next@example.test"
    postfix.wait_queue_empty()
    assert capture.wait_quiet(0.2) == [msg]
    # After a discard at MAIL or RCPT, Postfix asks the milter nothing more
    # about that message.
    stages = rec.stages()
    first = stages[: stages.index("mail", stages.index("mail") + 1)]
    if stage != "eom":
        assert "header" not in first and "eom" not in first
        assert first.count("rcpt") == (0 if stage == "mail" else 2)


@pytest.mark.parametrize("status", [Status.REJECT, Status.TEMPFAIL])
def test_connect_verdict_holds_for_the_session(
    postfix: PrivatePostfix, capture: CaptureServer, status: Status
) -> None:
    """A 5xx at connect turns Postfix's banner into 554 "not accepting
    connections"; with 4xx the banner is normal.  Either way every MAIL of
    the session gets the verdict and the milter is not asked again."""
    rec = Recorder()
    expected = DEFAULT_REJECT if status is Status.REJECT else DEFAULT_TEMPFAIL
    banner = (554, "mta.test.invalid ESMTP not accepting connections")
    if status is Status.TEMPFAIL:
        banner = (220, "mta.test.invalid ESMTP")
    with use_milter(postfix, policy_milter(rec, connect=status)):
        s = smtplib.SMTP(local_hostname="client.test.invalid", timeout=30)
        try:
            assert _reply(s.connect("127.0.0.1", postfix.smtp_port)) == banner
            assert s.ehlo()[0] == 250
            assert _reply(s.mail("a@example.test")) == expected
            s.rset()
            assert _reply(s.mail("b@example.test")) == expected
            s.quit()
        finally:
            s.close()
    assert rec.stages() == ["connect"]
    assert capture.wait_quiet(0.2) == []
