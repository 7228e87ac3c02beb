"""One face for the two MTAs under test, for the tests that run behind either.

A test that takes the ``mta`` fixture runs once behind Postfix and once
behind Sendmail; what differs between the two (how a milter is configured,
what a TEMPFAIL looks like to the SMTP client, what the MTA logs when the
milter is gone) is here, once.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
from collections.abc import Iterator

import triomilter

from ._milter_runner import (
    CliMilter,
    ThreadedMilter,
    sendmail_queue_id,
    use_milter,
    use_sendmail_milter,
)
from .capture import CapturedMessage, CaptureServer
from .postfix import PrivatePostfix
from .scenarios import SENDER
from .sendmail import PrivateSendmail


class Mta:
    """Postfix or Sendmail, as the tests behind either need them."""

    def __init__(self, instance: PrivatePostfix | PrivateSendmail) -> None:
        self.instance = instance
        self.name = "postfix" if isinstance(instance, PrivatePostfix) else "sendmail"
        # What the SMTP client gets for a milter's TEMPFAIL, and at MAIL once
        # the milter is gone (Postfix: milter_default_action = tempfail; Sendmail: F=T).
        self.tempfail = (
            (451, b"4.7.1 Service unavailable - try again later")
            if self.name == "postfix"
            else (451, b"4.3.2 Please try again later")
        )

    def smtp(self, timeout: float = 30.0) -> smtplib.SMTP:
        return self.instance.smtp(timeout=timeout)

    def use(self, milter: CliMilter) -> None:
        """Send every new SMTP session through ``milter`` (a process of its own)."""
        if isinstance(self.instance, PrivatePostfix):
            self.instance.set_milters(milter.spec)
        else:
            self.instance.set_milter(milter.sendmail_spec)

    @contextlib.contextmanager
    def serving(self, milter: triomilter.Milter) -> Iterator[ThreadedMilter]:
        """Serve ``milter`` in a thread and send every new SMTP session through it."""
        if isinstance(self.instance, PrivatePostfix):
            with use_milter(self.instance, milter) as served:
                yield served
        else:
            with use_sendmail_milter(self.instance, milter) as served:
                yield served

    def send_one(
        self,
        milter: triomilter.Milter,
        capture: CaptureServer,
        data: bytes,
        rcpts: list[str],
        sender: str = SENDER,
    ) -> CapturedMessage:
        """Send one message through ``milter`` (served meanwhile); the message delivered."""
        with self.serving(milter), self.smtp() as s:
            assert s.sendmail(sender, rcpts, data) == {}
        (msg,) = capture.wait_for(1)
        return msg

    def queue_id_of(self, data: bytes) -> str:
        """The queue id the MTA wrote into its Received: header of a delivered message."""
        if isinstance(self.instance, PrivateSendmail):
            return sendmail_queue_id(data)
        match = re.search(rb"with E?SMTPS? id ([0-9A-Za-z]+)\b", data)
        assert match, data[:400]
        return match.group(1).decode()

    def saw_milter_gone(self) -> None:
        """Wait until the MTA logged that the milter is unreachable (only Sendmail logs it)."""
        if isinstance(self.instance, PrivateSendmail):
            self.instance.wait_for_log(r"Milter \(myfilter\): error connecting to filter")
            self.instance.wait_for_log(r"Milter \(myfilter\): to error state")

    def wait_queue_empty(self) -> None:
        self.instance.wait_queue_empty()
