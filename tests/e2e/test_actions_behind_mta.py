"""End-of-message actions that come out the same behind Postfix and Sendmail,
run behind both (the rest: test_postfix_actions.py, test_sendmail_actions.py)."""

from __future__ import annotations

import hashlib

import pytest

from triomilter import Actions, Context, Milter, MilterError, Ok, Result, Status, on_body, on_eom

from ._milter_runner import Recorder, split_first_header
from .capture import CaptureServer
from .mta import Mta
from .scenarios import SENDER, eom_milter, replacement_body


@pytest.mark.parametrize("size", [20, 200 * 1024], ids=["small", "200KiB"])
def test_replace_body(mta: Mta, capture: CaptureServer, size: int) -> None:
    replacement = replacement_body(size)
    assert len(replacement) == size

    async def changes(ctx: Context[object]) -> None:
        # Several calls build one body; each may exceed a packet.
        third = len(replacement) // 3
        await ctx.api.append_body_chunk(replacement[:third])
        await ctx.api.append_body_chunk(replacement[third:])

    headers = b"Subject: body replaced\r\n"
    original = headers + b"\r\n" + b"original body line\r\n" * 5000
    msg = mta.send_one(eom_milter(changes), capture, original, ["r@example.test"])
    _, rest = split_first_header(msg.data)
    assert rest == headers + b"\r\n" + replacement
    assert hashlib.sha256(msg.body).hexdigest() == hashlib.sha256(replacement).hexdigest()


def test_actions_not_negotiated_tempfail_the_message(mta: Mta, capture: CaptureServer) -> None:
    """A Result handler calling an action it did not ask for gets a MilterError
    (nothing is sent to the MTA): TEMPFAIL, and the milter keeps serving."""
    rec = Recorder()

    @on_body
    async def body(ctx: Context[object], chunk: bytes) -> Status:
        ctx.data = chunk
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[object]) -> Result[Status]:
        await ctx.api.add_header("X-Allowed", "yes")
        if ctx.data == b"forbidden\r\n":
            try:
                await ctx.api.add_recipient("<extra@example.test>")
            except MilterError as exc:
                rec.add("error", type(exc).__name__)
                raise
        return Ok(Status.CONTINUE)

    milter = Milter("partial", handlers=[body, eom], actions=Actions.ADD_HEADER)
    with mta.serving(milter), mta.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt("r@example.test")[0] == 250
        code, text = s.data(b"Subject: one\r\n\r\nforbidden\r\n")
        assert (code, text) == mta.tempfail
        s.sendmail(SENDER, ["r@example.test"], b"Subject: two\r\n\r\nfine\r\n")
    assert rec.values("error") == ["ActionNotNegotiated"]
    (msg,) = capture.wait_for(1)
    assert msg.data.endswith(b"Subject: two\r\nX-Allowed: yes\r\n\r\nfine\r\n")
    assert capture.wait_quiet(0.2) == [msg]
