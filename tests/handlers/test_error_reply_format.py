"""Custom replies must pass Postfix's check of a ``y`` packet (protocol.md §9).

Postfix (milter8.c) refuses a reply unless it starts with ``[45]dd`` followed
by a space or ``-``, and a digit right after that must be the reply class:
otherwise "malformed reply" and a configuration error for the session.
libmilter's ``smfi_setreply`` always writes ``code SP``.
"""

from __future__ import annotations

import re

import pytest

from triomilter import Context, InvalidArgument, Milter, Status, on_helo
from triomilter._context import build_error_reply
from triomilter.testing import open_in_memory


def postfix_accepts(reply: bytes) -> bool:
    """Postfix 3.x's test of a REPLYCODE packet's text."""
    if not re.match(rb"[45][0-9][0-9][ -]", reply):
        return False
    fifth = reply[4:5]
    return not (fifth.isdigit() and fifth != reply[:1])


@pytest.mark.parametrize("code", ["451", "550", 421])
def test_empty_text_without_extended_code_keeps_the_space(code: str | int) -> None:
    reply = build_error_reply(code, None, "")
    assert postfix_accepts(reply), reply
    assert reply == f"{code} ".encode()  # what libmilter's smfi_setreply writes


def test_text_that_would_be_read_as_a_wrong_extended_code_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        build_error_reply("550", None, "4 recipients at most")
    with pytest.raises(InvalidArgument):
        build_error_reply("451", None, "5 minutes, then retry")


@pytest.mark.parametrize("text", ["5.7.1 embedded code", "5 recipients at most", "Go away", " x"])
def test_acceptable_texts_without_extended_code_still_work(text: str) -> None:
    reply = build_error_reply("550", None, text)
    assert postfix_accepts(reply)
    assert reply == b"550 " + text.encode()


async def test_empty_reply_on_the_wire() -> None:
    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        ctx.api.set_error_reply("451", None, "")
        return Status.TEMPFAIL

    async with open_in_memory(Milter("reply", handlers=[helo])) as client:
        await client.connect("mx", None)
        reply = await client.helo("mx")
        assert reply.status is Status.TEMPFAIL
        assert reply.smtp_code == 451
