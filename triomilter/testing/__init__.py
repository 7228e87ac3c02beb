"""An MTA simulator for testing milters: in memory, or over TCP and UNIX sockets.

Open a session, drive it step by step like an MTA would, and look at what
the milter answered::

    from triomilter import Status
    from triomilter.testing import open_in_memory

    async def test_tags_spam():
        async with open_in_memory(my_milter) as client:
            assert (await client.connect("mx.example", ("192.0.2.1", 25))).status is Status.CONTINUE
            await client.helo("mx.example")
            result = await client.send_message(
                "<a@example.org>", ["<b@example.net>"], {"Subject": "buy now"}, b"...\\r\\n"
            )
            assert result.status is Status.CONTINUE
            assert result.has_added_header("X-Spam", "yes")

Each step returns a `StepReply` (``status``, custom SMTP reply ``text`` and
its parts, ``sent``); `MilterClient.eom` returns an `EomReply` with the
ordered ``modifications`` and matchers (``has_added_header`` ...) taking
exact values, `ANY`, compiled regexes or predicates. The client negotiates
like Postfix 3.x by default and honours ``NO_*``, ``NOREPLY_*`` and SKIP like
a real MTA; `POSTFIX_MACROS`, `SENDMAIL_MACROS` and the ``SENDMAIL_*`` offer
describe the two MTAs (``triomilter check`` imitates them with this client).
With pytest (and pytest-trio), the fixtures of
`triomilter.testing.pytest_plugin` open sessions for you.
"""

from ._client import (
    DEFAULT_TIMEOUT,
    POSTFIX_ACTIONS,
    POSTFIX_OPTS,
    POSTFIX_VERSION,
    Address,
    Macros,
    MilterClient,
    Text,
)
from ._errors import MilterClosed, MilterTimeout
from ._matchers import ANY, AnyValue, BodyMatcher, IndexMatcher, Matcher
from ._mtas import (
    POSTFIX_MACROS,
    SENDMAIL_ACTIONS,
    SENDMAIL_MACROS,
    SENDMAIL_OPTS,
    SENDMAIL_VERSION,
)
from ._open import open_client, open_in_memory, open_stream, open_tcp, open_unix
from ._results import (
    AddHeader,
    AddRecipient,
    EomReply,
    InsertHeader,
    Modification,
    Quarantine,
    RemoveRecipient,
    ReplaceBody,
    ReplaceHeader,
    ReplaceSender,
    StepReply,
)
from ._standalone import HandlerContext

__all__ = [
    "ANY",
    "HandlerContext",
    "DEFAULT_TIMEOUT",
    "POSTFIX_ACTIONS",
    "POSTFIX_MACROS",
    "POSTFIX_OPTS",
    "POSTFIX_VERSION",
    "SENDMAIL_ACTIONS",
    "SENDMAIL_MACROS",
    "SENDMAIL_OPTS",
    "SENDMAIL_VERSION",
    "AddHeader",
    "AddRecipient",
    "Address",
    "AnyValue",
    "BodyMatcher",
    "EomReply",
    "IndexMatcher",
    "InsertHeader",
    "Macros",
    "Matcher",
    "MilterClient",
    "MilterClosed",
    "MilterTimeout",
    "Modification",
    "Quarantine",
    "RemoveRecipient",
    "ReplaceBody",
    "ReplaceHeader",
    "ReplaceSender",
    "StepReply",
    "Text",
    "open_client",
    "open_in_memory",
    "open_stream",
    "open_tcp",
    "open_unix",
]
