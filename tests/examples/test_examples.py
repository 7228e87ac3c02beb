"""The four small examples, tested in memory with triomilter.testing as the README teaches
(the attachment filter has a file of its own: test_attachment_filter.py).

Each example module defines ``milter``; a ``milter`` fixture hands it to the
toolkit's ``milter_client`` fixture (a negotiated in-memory session), and
``open_in_memory`` opens sessions with other MTA offers.
"""

from __future__ import annotations

import hashlib
import re

import pytest
import trio

from triomilter import Actions, Milter, ProtocolOpts, Status
from triomilter.testing import (
    AddHeader,
    AddRecipient,
    MilterClient,
    MilterClosed,
    StepReply,
    open_in_memory,
)

from ._load import load_example

header_tagger = load_example("header_tagger")
recipient_policy = load_example("recipient_policy")
body_policy = load_example("body_policy")
async_lookup = load_example("async_lookup")


# --- header_tagger ----------------------------------------------------------------------------


class TestHeaderTagger:
    @pytest.fixture
    def milter(self) -> Milter:
        return header_tagger.milter  # type: ignore[no-any-return]

    async def test_tags_every_message_with_the_client(self, milter_client: MilterClient) -> None:
        reply = await milter_client.connect("mx.example", ("192.0.2.1", 25))
        assert reply.status is Status.NOREPLY  # on_connect -> None: NOREPLY_CONNECT
        await milter_client.helo("mx.example")  # not sent: no on_helo
        for _ in range(2):  # the client is remembered for every message of the connection
            result = await milter_client.send_message(
                "<a@example.org>", "<b@example.net>", {"Subject": "hi"}, b"Hello\r\n"
            )
            assert result.status is Status.CONTINUE
            assert result.modifications == [
                AddHeader("X-Triomilter-Tagged", "mx.example [192.0.2.1]")
            ]
            await milter_client.abort()

    async def test_negotiates_only_what_it_uses(self, milter_client: MilterClient) -> None:
        assert milter_client.negotiated_actions == Actions.ADD_HEADER
        opts = milter_client.negotiated_opts
        assert not opts & ProtocolOpts.NO_CONNECT
        assert opts & ProtocolOpts.NOREPLY_CONNECT
        assert opts & ProtocolOpts.NO_HELO and opts & ProtocolOpts.NO_BODY

    @pytest.mark.parametrize(
        ("hostname", "tag"),
        [
            (b"evil\r\nX-Injected: yes", "evil  X-Injected: yes [192.0.2.1]"),
            (b"j\xf6rg.example", "j\ufffdrg.example [192.0.2.1]"),
            (b"nul\x01byte", "nul byte [192.0.2.1]"),
        ],
        ids=["cr-lf", "not-utf8", "control"],
    )
    async def test_survives_any_host_name(
        self, milter_client: MilterClient, hostname: bytes, tag: str
    ) -> None:
        """Reverse DNS is the client's to choose: nothing it says stops the milter."""
        await milter_client.connect(hostname, ("192.0.2.1", 25))
        result = await milter_client.send_message("<a@b>", "<c@d>")
        assert result.status is Status.CONTINUE
        assert result.modifications == [AddHeader("X-Triomilter-Tagged", tag)]

    @pytest.mark.parametrize(
        ("hostname", "address", "tag"),
        [
            ("[2001:db8::5]", ("IPv6:2001:db8::5", 25), "[2001:db8::5] [2001:db8::5]"),
            ("localhost", "/run/smtpd.sock", "localhost [/run/smtpd.sock]"),
            ("mystery", None, "mystery [unknown]"),
        ],
    )
    async def test_other_address_families(
        self, milter_client: MilterClient, hostname: str, address: object, tag: str
    ) -> None:
        await milter_client.connect(hostname, address)  # type: ignore[arg-type]
        result = await milter_client.send_message("<a@b>", "<c@d>")
        assert result.has_added_header("X-Triomilter-Tagged", tag)

    async def test_a_new_connection_forgets_the_client(self, milter_client: MilterClient) -> None:
        await milter_client.connect("one.example", ("192.0.2.1", 25))
        await milter_client.quit_new_connection()
        await milter_client.connect("two.example", ("192.0.2.2", 25))
        result = await milter_client.send_message("<a@b>", "<c@d>")
        assert result.has_added_header("X-Triomilter-Tagged", "two.example [192.0.2.2]")

    async def test_refused_by_an_mta_without_add_header(self, milter: Milter) -> None:
        with pytest.raises(MilterClosed):
            async with open_in_memory(milter, actions=Actions.QUARANTINE):
                pass  # pragma: no cover


# --- recipient_policy -------------------------------------------------------------------------


class TestRecipientPolicy:
    @pytest.fixture
    def milter(self) -> Milter:
        return recipient_policy.milter  # type: ignore[no-any-return]

    async def test_blocked_recipient_is_rejected_alone(self, milter_client: MilterClient) -> None:
        await milter_client.mail("<a@example.org>")
        reply = await milter_client.rcpt("<Spamtrap@Example.test>")
        assert reply.status is Status.REJECT
        assert reply.text == (
            "550-5.7.1 Mail to <spamtrap@example.test> is not accepted here.\r\n"
            "550 5.7.1 Contact postmaster@example.test."
        )
        assert (reply.smtp_code, reply.extended_code) == (550, "5.7.1")
        assert reply.lines == [
            "Mail to <spamtrap@example.test> is not accepted here.",
            "Contact postmaster@example.test.",
        ]
        # The message goes on for the other recipients.
        assert await milter_client.rcpt("<bob@example.test>") == StepReply(Status.CONTINUE)
        result = await milter_client.eom()
        assert (result.status, result.modifications) == (Status.CONTINUE, [])

    async def test_every_blocked_recipient(self, milter_client: MilterClient) -> None:
        result = await milter_client.send_message(
            "<a@example.org>", sorted(recipient_policy.BLOCKED)
        )
        # No valid recipient: the client aborts like an MTA would.
        assert (result.status, result.sent) == (Status.REJECT, False)
        assert result.text is not None and result.text.startswith("550-5.7.1 Mail to <")

    @pytest.mark.parametrize("archived", ["<ceo@example.test>", " <LEGAL@example.test> "])
    async def test_archived_recipient_gets_a_blind_copy(
        self, milter_client: MilterClient, archived: str
    ) -> None:
        result = await milter_client.send_message(
            "<a@example.org>", ["<bob@example.test>", archived], {"Subject": "Q3"}, b"x\r\n"
        )
        assert result.status is Status.CONTINUE
        assert result.modifications == [AddRecipient("<archive@example.test>", "NOTIFY=NEVER")]
        assert result.has_added_recipient(recipient_policy.ARCHIVE, "NOTIFY=NEVER")

    async def test_archiving_is_per_message(self, milter_client: MilterClient) -> None:
        first = await milter_client.send_message("<a@b>", "<ceo@example.test>")
        assert first.has_added_recipient("<archive@example.test>")
        await milter_client.abort()
        second = await milter_client.send_message("<a@b>", "<bob@example.test>")
        assert second.modifications == []

    async def test_an_aborted_message_is_forgotten(self, milter_client: MilterClient) -> None:
        await milter_client.mail("<a@b>")
        await milter_client.rcpt("<ceo@example.test>")
        await milter_client.abort()  # on_abort drops the message's state
        await milter_client.mail("<a@b>")
        await milter_client.rcpt("<bob@example.test>")
        assert (await milter_client.eom()).modifications == []

    async def test_needs_add_recipient_ext(self, milter: Milter) -> None:
        assert milter.actions == Actions.ADD_RECIPIENT_EXT
        with pytest.raises(MilterClosed):
            async with open_in_memory(milter, actions=Actions.ADD_RECIPIENT):
                pass  # pragma: no cover


# --- body_policy ---------------------------------------------------------------------------


class TestBodyPolicy:
    @pytest.fixture
    def milter(self) -> Milter:
        return body_policy.milter  # type: ignore[no-any-return]

    async def test_clean_message_gets_size_and_digest(self, milter_client: MilterClient) -> None:
        body = b"Hello,\r\n" + bytes(range(256)) * 500 + b"\r\nBye\r\n"  # several chunks
        result = await milter_client.send_message(
            "<a@example.org>",
            "<b@example.net>",
            [("Subject", b"caf\xe9 8-bit, not UTF-8"), ("From", "a@example.org")],
            body,
        )
        assert result.status is Status.CONTINUE
        assert result.modifications == [
            AddHeader("X-Body-Size", str(len(body))),
            AddHeader("X-Body-SHA256", hashlib.sha256(body).hexdigest()),
        ]

    async def test_skip_is_negotiated(self, milter_client: MilterClient) -> None:
        assert milter_client.negotiated_opts & ProtocolOpts.SKIP

    async def test_forbidden_subject_rejected_at_end_of_headers(
        self, milter_client: MilterClient
    ) -> None:
        await milter_client.mail("<a@example.org>")
        await milter_client.rcpt("<b@example.net>")
        assert (await milter_client.header("subject", b"\xff BUY NOW \xff")).status is (
            Status.CONTINUE
        )
        reply = await milter_client.eoh()
        assert reply == StepReply(
            Status.REJECT, "550 5.7.1 Message refused: its subject looks like spam"
        )
        # The message is decided: an MTA sends no body and no end of message.
        assert await milter_client.body(b"x") == StepReply(Status.REJECT, sent=False)

    @pytest.mark.parametrize("offset", [0, 65535 - 10, 100_000])
    async def test_forbidden_body_skips_and_rejects(
        self, milter_client: MilterClient, offset: int
    ) -> None:
        # Also when the pattern straddles two 65535-byte chunks (offset 65525).
        body = b"a" * offset + body_policy.FORBIDDEN_BODY + b"b" * 200_000
        await milter_client.mail("<a@example.org>")
        await milter_client.rcpt("<b@example.net>")
        reply = await milter_client.body(body)
        assert reply == StepReply(Status.SKIP)
        result = await milter_client.eom()
        assert (result.status, result.text) == (
            Status.REJECT,
            "554 5.7.1 Message refused: forbidden content",
        )
        assert result.modifications == []

    async def test_oversized_body(
        self, milter_client: MilterClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(body_policy, "MAX_BODY", 100_000)
        result = await milter_client.send_message("<a@b>", "<c@d>", body=b"z" * 200_000)
        assert (result.status, result.text) == (
            Status.REJECT,
            "552 5.3.4 Message body exceeds 100000 bytes",
        )

    async def test_state_is_per_message(self, milter_client: MilterClient) -> None:
        bad = await milter_client.send_message(
            "<a@b>", "<c@d>", {"Subject": "BUY NOW"}, b"body\r\n"
        )
        assert bad.status is Status.REJECT and not bad.sent
        await milter_client.abort()
        good = await milter_client.send_message("<a@b>", "<c@d>", {"Subject": "hi"}, b"ok\r\n")
        assert good.has_added_header("X-Body-Size", "4")


# --- async_lookup -----------------------------------------------------------------------------


class TestAsyncLookup:
    @pytest.fixture
    def milter(self) -> Milter:
        return async_lookup.milter  # type: ignore[no-any-return]

    @pytest.mark.parametrize(
        ("address", "reputation"),
        [
            (("127.0.0.1", 25), "trusted (loopback)"),
            (("192.0.2.1", 25), "listed: example blocklist"),
            (("198.51.100.9", 25), "unknown"),
            (None, "unknown"),
        ],
    )
    async def test_reputation_header(
        self, milter_client: MilterClient, address: object, reputation: str
    ) -> None:
        await milter_client.connect("client.example", address)  # type: ignore[arg-type]
        result = await milter_client.send_message("<a@b>", "<c@d>", {"Subject": "hi"}, b"x\r\n")
        assert result.status is Status.CONTINUE
        assert result.modifications == [AddHeader("X-Client-Reputation", reputation)]

    async def test_one_lookup_serves_every_message(self, milter_client: MilterClient) -> None:
        await milter_client.connect("client.example", ("192.0.2.1", 25))
        for _ in range(3):
            result = await milter_client.send_message("<a@b>", "<c@d>")
            assert result.has_added_header("X-Client-Reputation", re.compile("^listed"))
            await milter_client.abort()

    async def test_slow_lookup_times_out(
        self, milter: Milter, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
    ) -> None:
        monkeypatch.setattr(async_lookup, "LOOKUP_DELAY", 3600.0)
        monkeypatch.setattr(async_lookup, "LOOKUP_DEADLINE", 2.0)
        async with open_in_memory(milter) as client:
            await client.connect("slow.example", ("192.0.2.1", 25))
            result = await client.send_message("<a@b>", "<c@d>")
        assert result.modifications == [AddHeader("X-Client-Reputation", "timed out")]

    async def test_the_lookup_ends_with_the_connection(
        self, milter: Milter, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
    ) -> None:
        # A lookup still running when the connection ends is cancelled with it.
        original = async_lookup.lookup_reputation
        outcomes: list[str] = []

        async def recording(lookup: object) -> None:
            try:
                await original(lookup)
            except trio.Cancelled:
                outcomes.append("cancelled")
                raise
            outcomes.append("finished")

        monkeypatch.setattr(async_lookup, "LOOKUP_DELAY", 3600.0)
        monkeypatch.setattr(async_lookup, "lookup_reputation", recording)
        async with open_in_memory(milter) as client:
            await client.connect("gone.example", ("192.0.2.1", 25))
            assert outcomes == []
        assert outcomes == ["cancelled"]
