"""Slow end of message through the real Postfix: progress keeps its content timeout away.

Postfix gives a milter ``milter_content_timeout`` per reply at end of message
and restarts it on every progress packet. Here it is 2 s and the end-of-message
handler works 5 s (a virus scan, say): triomilter sends progress on its own
every 0.5 s, so the message is delivered with the handler's header. Without
progress the same milter makes Postfix apply its default action (tempfail).
"""

from __future__ import annotations

import smtplib

import pytest
import trio

from triomilter import Actions, Context, Milter, Status, on_eom

from ._milter_runner import header_values, use_milter
from .capture import CaptureServer
from .postfix import PrivatePostfix
from .scenarios import SENDER

SCAN_SECONDS = 5.0


@on_eom
async def slow_scan(ctx: Context[None]) -> Status:
    await trio.sleep(SCAN_SECONDS)
    await ctx.api.add_header("X-Scanned", "clean")
    return Status.CONTINUE


SCANNER = Milter("scanner", handlers=[slow_scan], actions=Actions.ADD_HEADER)
MESSAGE = b"Subject: scan me\r\n\r\nHello\r\n"


def test_a_slow_end_of_message_is_delivered_with_its_header(
    postfix: PrivatePostfix, capture: CaptureServer
) -> None:
    with use_milter(postfix, SCANNER, progress_interval=0.5) as served:
        postfix.set_milters(served.spec, content_timeout="2s", default_action="tempfail")
        with postfix.smtp(timeout=60) as s:
            s.sendmail(SENDER, ["r@example.test"], MESSAGE)
    (msg,) = capture.wait_for(1, timeout=30)
    assert header_values(msg.data, b"X-Scanned") == [b"clean"]


def test_without_progress_postfix_gives_up(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    """The control: progress less often than the content timeout, and Postfix tempfails."""
    with use_milter(postfix, SCANNER, progress_interval=30.0) as served:
        postfix.set_milters(served.spec, content_timeout="2s", default_action="tempfail")
        with postfix.smtp(timeout=60) as s, pytest.raises(smtplib.SMTPDataError) as info:
            s.sendmail(SENDER, ["r@example.test"], MESSAGE)
    assert info.value.smtp_code == 451
    assert capture.messages == []
