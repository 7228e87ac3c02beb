"""One face for the two MTAs under test, for the tests that run behind either.

A test that takes the ``mta`` fixture runs once behind Postfix and once
behind Sendmail; what differs between the two (how a milter is configured,
what a TEMPFAIL looks like to the SMTP client, what the MTA logs when the
milter is gone) is here, once.
"""

from __future__ import annotations

import smtplib

from ._milter_runner import CliMilter
from .postfix import PrivatePostfix
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
        """Send every new SMTP session through ``milter``."""
        if isinstance(self.instance, PrivatePostfix):
            self.instance.set_milters(milter.spec)
        else:
            self.instance.set_milter(milter.sendmail_spec)

    def saw_milter_gone(self) -> None:
        """Wait until the MTA logged that the milter is unreachable (only Sendmail logs it)."""
        if isinstance(self.instance, PrivateSendmail):
            self.instance.wait_for_log(r"Milter \(myfilter\): error connecting to filter")
            self.instance.wait_for_log(r"Milter \(myfilter\): to error state")

    def wait_queue_empty(self) -> None:
        self.instance.wait_queue_empty()
