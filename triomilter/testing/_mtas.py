"""What Postfix and Sendmail offer, and the macros they send at each stage by default.

The offers are what both MTAs send in their negotiation (protocol.md §4.1):
version 6, every action, every protocol step. The macro lists are their
stock configurations: Postfix's ``milter_*_macros`` parameters (§10.1) and
the ``confMILTER_MACROS_*`` defaults of Sendmail's ``cf/README`` (§11). An
MTA sends, at each stage, the macros of that stage's list that have a value;
a milter's own request (in its negotiation reply) replaces a list, with each
MTA's quirks (`triomilter check` imitates them).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ..protocol import ALL_ACTIONS, ALL_PROTOCOL_OPTS, MacroStage

POSTFIX_MACROS: Mapping[MacroStage, tuple[str, ...]] = MappingProxyType(
    {
        MacroStage.CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
        MacroStage.HELO: (
            "{tls_version}",
            "{cipher}",
            "{cipher_bits}",
            "{cert_subject}",
            "{cert_issuer}",
        ),
        MacroStage.MAIL: (
            "i",
            "{auth_type}",
            "{auth_authen}",
            "{auth_author}",
            "{mail_addr}",
            "{mail_host}",
            "{mail_mailer}",
        ),
        MacroStage.RCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
        MacroStage.DATA: ("i",),
        MacroStage.EOH: ("i",),
        MacroStage.EOM: ("i",),
    }
)
"""Postfix 3.x's default macro list per stage (``milter_connect_macros`` ...)."""

SENDMAIL_VERSION = 6
"""The milter protocol version Sendmail 8.14+ speaks."""
SENDMAIL_ACTIONS = ALL_ACTIONS
"""What Sendmail 8.14+ offers: every action."""
SENDMAIL_OPTS = ALL_PROTOCOL_OPTS
"""What Sendmail 8.14+ offers: every protocol step of version 6 (no max-data-size bits)."""

SENDMAIL_MACROS: Mapping[MacroStage, tuple[str, ...]] = MappingProxyType(
    {
        MacroStage.CONNECT: ("j", "_", "{daemon_name}", "{if_name}", "{if_addr}"),
        MacroStage.HELO: (
            "{tls_version}",
            "{cipher}",
            "{cipher_bits}",
            "{cert_subject}",
            "{cert_issuer}",
        ),
        MacroStage.MAIL: (
            "i",
            "{auth_type}",
            "{auth_authen}",
            "{auth_ssf}",
            "{auth_author}",
            "{mail_mailer}",
            "{mail_host}",
            "{mail_addr}",
        ),
        MacroStage.RCPT: ("{rcpt_mailer}", "{rcpt_host}", "{rcpt_addr}"),
        MacroStage.DATA: (),
        MacroStage.EOH: (),
        MacroStage.EOM: ("{msg_id}",),
    }
)
"""Sendmail 8.14+'s default macro list per stage (``confMILTER_MACROS_*``, cf/README)."""
