"""Replies that come out the same behind Postfix and Sendmail: an ACCEPT at
connect, MAIL or RCPT, run behind both (the rest: test_postfix_replies.py,
test_sendmail_replies.py)."""

from __future__ import annotations

from triomilter import Status

from ._milter_runner import Recorder
from .capture import CaptureServer
from .mta import Mta
from .scenarios import policy_message, policy_milter


def test_accept_at_mail_skips_the_rest_of_the_message(mta: Mta, capture: CaptureServer) -> None:
    rec = Recorder()
    rcpts = ["rcpt-reject@example.test", "r@example.test"]
    with mta.serving(policy_milter(rec)), mta.smtp() as s:
        # rcpt-reject@ would be refused, X-Eom: reject too: neither is asked.
        s.sendmail("mail-accept@example.test", rcpts, policy_message("reject"))
        s.sendmail("a@example.test", ["r@example.test"], policy_message())
    msgs = capture.wait_for(2)
    assert sorted(m.mail_from for m in msgs) == ["a@example.test", "mail-accept@example.test"]
    accepted = next(m for m in msgs if m.mail_from == "mail-accept@example.test")
    assert sorted(accepted.rcpt_tos) == sorted(rcpts)
    stages = rec.stages()
    second = stages.index("mail", stages.index("mail") + 1)
    assert stages[:second] == ["connect", "helo", "mail"]
    assert stages[second:] == ["mail", "rcpt", "header", "eoh", "body", "eom"]


def test_accept_at_rcpt_accepts_the_message(mta: Mta, capture: CaptureServer) -> None:
    rec = Recorder()
    rcpts = ["rcpt-accept@example.test", "rcpt-reject@example.test"]
    with mta.serving(policy_milter(rec)), mta.smtp() as s:
        s.sendmail("a@example.test", rcpts, policy_message("reject"))
    (msg,) = capture.wait_for(1)
    assert sorted(msg.rcpt_tos) == sorted(rcpts)
    assert rec.stages() == ["connect", "helo", "mail", "rcpt"]


def test_accept_at_connect_leaves_the_session_alone(mta: Mta, capture: CaptureServer) -> None:
    rec = Recorder()
    with (
        mta.serving(policy_milter(rec, connect=Status.ACCEPT)),
        mta.smtp() as s,
    ):
        s.ehlo("helo-reject.test.invalid")
        s.sendmail(
            "mail-reject@example.test", ["rcpt-reject@example.test"], policy_message("reject")
        )
        s.sendmail("a@example.test", ["r@example.test"], policy_message("tempfail"))
    assert len(capture.wait_for(2)) == 2
    assert rec.stages() == ["connect"]
