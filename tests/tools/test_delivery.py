"""End-of-message changes applied as Postfix and Sendmail apply them (see _delivery.py).

The expected header sections are the ones the end-to-end suites saw the real
MTAs deliver (tests/e2e/test_postfix_actions.py, test_sendmail_actions.py),
without the MTA's own Received: header.
"""

from __future__ import annotations

import pytest

from triomilter._delivery import (
    Delivery,
    Envelope,
    Mta,
    Origin,
    deliver,
    split_lines,
    unified_diff,
)
from triomilter._mail import Field, HeaderField, LineSplitter, MessageParser
from triomilter.testing import (
    AddHeader,
    AddRecipient,
    InsertHeader,
    Modification,
    Quarantine,
    RemoveRecipient,
    ReplaceBody,
    ReplaceHeader,
    ReplaceSender,
)

ORIGINAL_HEADERS = (
    b"From: Sender <sender@example.test>\r\n"
    b"Subject: header changes\r\n"
    b"X-B: first b\r\n"
    b"X-Delete-Me: going away\r\n"
    b"X-B: second b\r\n"
    b"X-Folded: old\r\n\tfolded value\r\n"
)


def fields_of(headers: bytes) -> list[HeaderField]:
    parser, splitter, events = MessageParser(), LineSplitter(), []
    for line in splitter.feed(headers) + splitter.end():
        events += parser.line(line)
    events += parser.end()
    return [event.field for event in events if isinstance(event, Field)]


def apply(
    changes: list[Modification],
    mta: Mta,
    *,
    headers: bytes = ORIGINAL_HEADERS,
    leading_space: bool = False,
    envelope: Envelope | None = None,
) -> Delivery:
    envelope = envelope or Envelope(b"<sender@example.test>", (), [(b"<r@example.test>", ())])
    return deliver(
        fields_of(headers), envelope, changes, mta, leading_space=leading_space, newline=b"\r\n"
    )


HEADER_CHANGES: list[Modification] = [
    AddHeader("X-Added", "appended\n\tand folded"),
    InsertHeader(0, "X-Top", "above Received"),
    InsertHeader(3, "X-Third", "after From"),
    ReplaceHeader("X-B", 2, "new second b"),
    ReplaceHeader("X-Delete-Me", 1, None),
    ReplaceHeader("x-folded", 1, "new\n folded"),
    AddHeader("X-Raw", "bytes \u2713 value"),
]


def test_header_changes_as_postfix_delivers_them() -> None:
    delivery = apply(HEADER_CHANGES, Mta.POSTFIX)
    # Insert indices count the headers as delivered: X-Top, Received, From, ...
    assert delivery.header_bytes() == (
        b"X-Top: above Received\r\n"
        b"From: Sender <sender@example.test>\r\n"
        b"X-Third: after From\r\n"
        b"Subject: header changes\r\n"
        b"X-B: first b\r\n"
        b"X-B: new second b\r\n"
        b"x-folded: new\r\n folded\r\n"  # the milter's spelling
        b"X-Added: appended\r\n\tand folded\r\n"
        b"X-Raw: bytes \xe2\x9c\x93 value\r\n"
    )
    deleted = [e for e in delivery.entries if e.origin is Origin.DELETED]
    assert [e.before for e in deleted] == [b"X-Delete-Me: going away\r\n"]


def test_header_changes_as_sendmail_delivers_them() -> None:
    delivery = apply(HEADER_CHANGES, Mta.SENDMAIL)
    # Sendmail's list holds Return-Path, Received, ... before the message's own.
    assert delivery.header_bytes() == (
        b"X-Top: above Received\r\n"
        b"X-Third: after From\r\n"
        b"From: Sender <sender@example.test>\r\n"
        b"Subject: header changes\r\n"
        b"X-B: first b\r\n"
        b"X-B: new second b\r\n"
        b"X-Folded: new\r\n folded\r\n"  # the field's own spelling
        b"X-Added: appended\r\n\tand folded\r\n"
        b"X-Raw: bytes \xe2\x9c\x93 value\r\n"
    )


def test_changing_a_missing_occurrence_adds_it() -> None:
    changes: list[Modification] = [
        ReplaceHeader("X-B", 5, "fifth b"),
        ReplaceHeader("X-Missing", 1, None),
    ]
    postfix = apply(changes, Mta.POSTFIX).header_bytes()
    assert postfix == ORIGINAL_HEADERS + b"X-B: fifth b\r\n"  # at the end
    sendmail = apply(changes, Mta.SENDMAIL).header_bytes()
    first_b = ORIGINAL_HEADERS.index(b"X-B: first b")  # before the first X-B
    assert sendmail == ORIGINAL_HEADERS[:first_b] + b"X-B: fifth b\r\n" + ORIGINAL_HEADERS[first_b:]


def test_sendmail_adds_a_header_before_the_first_of_its_name() -> None:
    changes: list[Modification] = [AddHeader("X-B", "added b"), AddHeader("X-New", "new")]
    delivered = apply(changes, Mta.SENDMAIL).header_bytes()
    assert delivered.index(b"X-B: added b") < delivered.index(b"X-B: first b")
    assert delivered.endswith(b"X-New: new\r\n")
    assert apply(changes, Mta.POSTFIX).header_bytes().endswith(b"X-B: added b\r\nX-New: new\r\n")


def test_index_zero_changes_the_first_and_deletions_count_differently() -> None:
    changes: list[Modification] = [
        ReplaceHeader("X-B", 1, None),
        ReplaceHeader("X-B", 0, "which one?"),  # 0 counts as 1
    ]
    # Postfix: the deleted field is out of its list, the second X-B is now the first.
    postfix = apply(changes, Mta.POSTFIX).header_bytes()
    assert b"X-B: first b" not in postfix and b"X-B: which one?\r\n" in postfix
    assert b"second b" not in postfix
    # Sendmail: the deleted field stays in its list (unwritten) and gets the value.
    sendmail = apply(changes, Mta.SENDMAIL).header_bytes()
    assert sendmail.index(b"X-B: which one?") < sendmail.index(b"X-B: second b")


def test_insert_beyond_the_end_appends_and_leading_space() -> None:
    changes: list[Modification] = [
        InsertHeader(99, "X-Last", "v"),
        AddHeader("X-Raw", " as sent"),
    ]
    plain = apply(changes, Mta.POSTFIX).header_bytes()
    assert plain.endswith(b"X-Last: v\r\nX-Raw:  as sent\r\n")
    spaced = apply(changes, Mta.POSTFIX, leading_space=True).header_bytes()
    assert spaced.endswith(b"X-Last:v\r\nX-Raw: as sent\r\n")  # HEADER_LEADING_SPACE


def test_envelope_body_and_quarantine() -> None:
    envelope = Envelope(
        b"<sender@example.test>",
        (b"SIZE=10",),
        [(b"<kept@example.test>", ()), (b"<Removed@Example.test>", (b"NOTIFY=NEVER",))],
    )
    changes: list[Modification] = [
        AddRecipient("<added@example.test>"),
        AddRecipient("<never@example.test>", "NOTIFY=NEVER ORCPT=rfc822;x@y"),
        RemoveRecipient("removed@example.test"),  # brackets and case do not matter
        RemoveRecipient("<nobody@example.test>"),
        ReplaceSender("<new@example.test>", "RET=HDRS"),
        ReplaceBody(b"new\r\nbody\r\n", (b"new\r\n", b"body\r\n")),
        Quarantine("held"),
    ]
    delivery = apply(changes, Mta.POSTFIX, envelope=envelope)
    assert delivery.envelope == Envelope(
        b"<new@example.test>",
        (b"RET=HDRS",),
        [
            (b"<kept@example.test>", ()),
            (b"<added@example.test>", ()),
            (b"<never@example.test>", (b"NOTIFY=NEVER", b"ORCPT=rfc822;x@y")),
        ],
    )
    assert delivery.body == b"new\r\nbody\r\n"
    assert delivery.quarantine == "held"
    assert delivery.notes == ["remove recipient <nobody@example.test>: no such recipient"]
    assert envelope.recipients[1][0] == b"<Removed@Example.test>"  # the input is left alone


def test_lf_messages_get_lf_changes() -> None:
    changes: list[Modification] = [
        AddHeader("X-Folded", "a\n\tb"),
        ReplaceBody(b"x\r\ny\r\n", (b"x\r\ny\r\n",)),
    ]
    delivery = deliver(
        fields_of(b"Subject: s\n"),
        Envelope(b"<>"),
        changes,
        Mta.POSTFIX,
        leading_space=False,
        newline=b"\n",
    )
    assert delivery.header_bytes() == b"Subject: s\nX-Folded: a\n\tb\n"
    assert delivery.body == b"x\ny\n"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ([b"a", b"b", b"c"], [b"a", b"b", b"c"], b""),
        (
            [b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h"],
            [b"a", b"b", b"c", b"d", b"X", b"f", b"g", b"h"],
            b"--- old\n+++ new\n@@ -2,7 +2,7 @@\n b\n c\n d\n-e\n+X\n f\n g\n h\n",
        ),
        ([b"a"], [], b"--- old\n+++ new\n@@ -1 +0,0 @@\n-a\n"),
        ([], [b"a"], b"--- old\n+++ new\n@@ -0,0 +1 @@\n+a\n"),
    ],
)
def test_unified_diff(old: list[bytes], new: list[bytes], expected: bytes) -> None:
    assert b"".join(unified_diff(old, new, b"old", b"new")) == expected


def test_unified_diff_of_huge_inputs_is_one_hunk() -> None:
    old = [b"%d" % i for i in range(30000)]
    new = [b"%d!" % i for i in range(30001)]
    diff = unified_diff(old, new, b"a", b"b")
    assert diff[2] == b"@@ -1,30000 +1,30001 @@\n"
    assert len(diff) == 3 + 30000 + 30001


def test_split_lines() -> None:
    assert split_lines(b"a\r\nb\nc") == [b"a", b"b", b"c"]
    assert split_lines(b"a\r\n") == [b"a"]
    assert split_lines(b"") == []
