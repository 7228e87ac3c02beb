"""Smoke tests of the e2e infrastructure itself, without any milter.

They prove that a message goes through the private Postfix to the capture
server unchanged except for Postfix's own Received: header, so later milter
tests can attribute every other difference to the milter.
"""

from __future__ import annotations

import concurrent.futures
import os
import smtplib
import time

import pytest

from .capture import CapturedMessage, CaptureServer
from .conftest import PostfixFactory
from .postfix import BASE_PARENT, BASE_PREFIX, PrivatePostfix, cleanup_stale_instances, free_port

SENDER = "sender@example.test"


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """Split off the first header field (with its folded lines)."""
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


def assert_relayed_unchanged(msg: CapturedMessage, original: bytes) -> None:
    received, rest = split_received(msg.data)
    assert received.startswith(b"Received: from "), received
    assert b"by mta.test.invalid (Postfix)" in received, received
    assert rest == original


def test_capture_server_direct(capture: CaptureServer) -> None:
    """The sink alone: envelope params, dot-unstuffing and exact bytes."""
    body = b"Subject: direct\r\n\r\n.leading dot\r\n..two dots\r\nlast\r\n"
    with smtplib.SMTP("127.0.0.1", capture.port, "c.test.invalid", timeout=10) as s:
        s.sendmail("a@x.test", ["b@y.test"], body, ["BODY=8BITMIME"], ["NOTIFY=NEVER"])
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == "a@x.test"
    assert msg.mail_params == {"SIZE": str(len(body)), "BODY": "8BITMIME"}
    assert msg.recipients == [("b@y.test", {"NOTIFY": "NEVER"})]
    assert msg.data == body
    assert msg.helo == "c.test.invalid"
    assert capture.errors == []


def test_envelope_and_bytes_pass_unchanged(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    long_line = b"x" * 5000
    original = (
        b"From: Sender <sender@example.test>\r\n"
        b"To: a@example.test, b@example.test\r\n"
        b"Subject: caf\xc3\xa9 \xe9t\xe9 8-bit header\r\n"
        b"X-Folded: one\r\n\ttwo\r\n"
        b"\r\n"
        b"body line\r\n"
        b".a line starting with a dot\r\n"
        b"8-bit body: \xc3\xa4\xc3\xb6\xc3\xbc\r\n" + long_line + b"\r\n"
        b"trailing spaces   \r\n"
    )
    rcpts = ["a@example.test", "b@example.test"]
    with postfix.smtp() as s:
        s.sendmail(SENDER, rcpts, original, ["BODY=8BITMIME", "SMTPUTF8"])
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == SENDER
    assert list(msg.mail_params) == ["SIZE", "BODY", "SMTPUTF8"]
    assert msg.mail_params["BODY"] == "8BITMIME" and msg.mail_params["SMTPUTF8"] is None
    assert msg.rcpt_tos == rcpts
    assert msg.rcpt_params == [{}, {}]
    assert_relayed_unchanged(msg, original)
    assert msg.helo == "mta.test.invalid"
    postfix.wait_queue_empty()
    assert capture.wait_quiet(0.3) == [msg]
    assert capture.errors == []


def test_three_messages_on_one_connection(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    originals = {
        f"rcpt{i}@example.test": f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode() for i in range(3)
    }
    with postfix.smtp() as s:
        for rcpt, data in originals.items():
            s.sendmail(SENDER, [rcpt], data)
    msgs = capture.wait_for(3)
    assert len(msgs) == 3
    by_rcpt = {m.rcpt_tos[0]: m for m in msgs}
    assert sorted(by_rcpt) == sorted(originals)
    for rcpt, msg in by_rcpt.items():
        assert msg.rcpt_tos == [rcpt]
        assert_relayed_unchanged(msg, originals[rcpt])


def test_multi_megabyte_body(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    line = bytes(range(0x21, 0x7F)) + b"\xc3\xa9\r\n"  # 96 bytes incl. 8-bit
    body = line * (6 * 1024 * 1024 // len(line)) + b"." * 3000 + b"\r\n"
    original = b"Subject: big\r\n\r\n" + body
    with postfix.smtp(timeout=60) as s:
        s.sendmail(SENDER, ["big@example.test"], original, ["BODY=8BITMIME"])
    (msg,) = capture.wait_for(1, timeout=30)
    assert len(msg.data) > 6_000_000
    assert_relayed_unchanged(msg, original)


def test_concurrent_sessions(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    count = 20

    def send(i: int) -> None:
        with postfix.smtp(timeout=30) as s:
            s.sendmail(SENDER, [f"c{i}@example.test"], f"Subject: c{i}\r\n\r\n{i}\r\n".encode())

    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        for future in [pool.submit(send, i) for i in range(count)]:
            future.result(timeout=60)
    msgs = capture.wait_for(count, timeout=30)
    assert sorted(m.rcpt_tos[0] for m in msgs) == sorted(f"c{i}@example.test" for i in range(count))
    for m in msgs:
        i = m.rcpt_tos[0][1:].split("@")[0]
        assert_relayed_unchanged(m, f"Subject: c{i}\r\n\r\n{i}\r\n".encode())
    assert capture.errors == []


def _assert_dead_milter_tempfails(pf: PrivatePostfix, capture: CaptureServer) -> None:
    with pf.smtp() as s:
        code, _ = s.ehlo()
        assert code == 250  # the banner and EHLO are not milter-visible
        code, text = s.mail(SENDER)
        assert (code, text[:5]) == (451, b"4.7.1"), (code, text)
        s.rset()
    pf.wait_for_log(r"connect to Milter service inet:127\.0\.0\.1:\d+: Connection refused")
    assert capture.wait_quiet(0.2) == []


def test_dead_milter_tempfails(postfix_factory: PostfixFactory, capture: CaptureServer) -> None:
    """A milter on a closed port + milter_default_action=tempfail gives 451:
    proves the milter settings reach smtpd."""
    pf = postfix_factory(f"inet:127.0.0.1:{free_port()}", milter_default_action="tempfail")
    _assert_dead_milter_tempfails(pf, capture)


def test_set_milters_reloads_without_restart(
    postfix: PrivatePostfix, capture: CaptureServer
) -> None:
    master = postfix.master_pid
    postfix.set_milters(f"inet:127.0.0.1:{free_port()}", default_action="tempfail")
    _assert_dead_milter_tempfails(postfix, capture)
    postfix.set_milters([])
    assert postfix.master_pid == master
    with postfix.smtp() as s:
        s.sendmail(SENDER, ["after@example.test"], b"Subject: after\r\n\r\nok\r\n")
    (msg,) = capture.wait_for(1)
    assert msg.rcpt_tos == ["after@example.test"]


def test_hold_queue_and_release(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    postfix.configure(
        {"smtpd_sender_restrictions": "check_sender_access inline:{hold@example.test=HOLD}"}
    )
    with postfix.smtp() as s:
        s.sendmail("hold@example.test", ["r1@example.test", "r2@example.test"], b"\r\nheld\r\n")
    postfix.wait_for_log(r": hold: ")
    (entry,) = postfix.hold_queue()
    assert entry.sender == "hold@example.test"
    assert sorted(entry.recipients) == ["r1@example.test", "r2@example.test"]
    assert not postfix.queue_is_empty()
    assert capture.wait_quiet(0.3) == []
    postfix.release_hold()
    (msg,) = capture.wait_for(1)
    assert msg.rcpt_tos == ["r1@example.test", "r2@example.test"]
    postfix.wait_queue_empty()
    assert postfix.hold_queue() == []


def test_stale_instance_is_cleaned_up(capture: CaptureServer, postfix_required: None) -> None:
    """An instance whose owner died (lock released, never stopped) is killed
    and removed by the next cleanup; live instances are left alone."""
    live = PrivatePostfix(capture.port).start()
    stale = PrivatePostfix(capture.port).start()
    try:
        stale_dir, stale_pid = stale.base_dir, stale.master_pid
        assert stale_pid is not None and stale.running
        assert stale._lock_fd is not None
        os.close(stale._lock_fd)  # what the death of the owning process does
        stale._lock_fd = None
        cleanup_stale_instances()  # a concurrent test session may beat us to it
        assert not os.path.exists(stale_dir)
        assert not stale.running
        assert live.running and os.path.isdir(live.base_dir)
        assert live.base_dir.startswith(os.path.join(BASE_PARENT, BASE_PREFIX))
    finally:
        live.stop()
        stale.stop()


def test_start_stop_is_fast(capture: CaptureServer, postfix_required: None) -> None:
    t0 = time.monotonic()
    with PrivatePostfix(capture.port) as pf:
        base, pid = pf.base_dir, pf.master_pid
        assert pid is not None
    total = time.monotonic() - t0
    assert not os.path.exists(base)
    assert pf.start_seconds < 5 and pf.stop_seconds < 5, (pf.start_seconds, pf.stop_seconds)
    print(f"start {pf.start_seconds:.3f}s stop {pf.stop_seconds:.3f}s total {total:.3f}s")


@pytest.mark.parametrize("bad", ["a\nb"])
def test_config_values_are_validated(capture: CaptureServer, bad: str) -> None:
    pf = PrivatePostfix(capture.port, main_cf={"myhostname": bad})
    pf._base = "/nonexistent"  # main_cf_settings needs paths only
    with pytest.raises(ValueError):
        pf.main_cf_settings()
