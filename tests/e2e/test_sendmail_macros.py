"""End-of-message macros a milter asks for, through Sendmail and Postfix.

Sendmail 8.17 reads every macro list a milter sends in its negotiation reply,
but milter.c picks the end-of-message list with the end-of-headers flag
(``MI_LFLAGS_SYM(SMFIM_EOH)``): a milter's own EOM list (SMFIM_EOM = 5) is
used only if it also requested an EOH list (SMFIM_EOH = 6).  Otherwise
Sendmail sends its configured EOM list (none at all if there is none).

The raw milter (tests/e2e/raw_milter.py) shows the exact macro packets; the
triomilter tests show what a handler gets.  The smallest extra request that
makes Sendmail honour the EOM list is an *empty* EOH list: Sendmail then
sends no macro packet at end of headers (it replaces the configured EOH list,
which is empty in Sendmail's default configuration anyway), and Postfix
ignores an empty list (it keeps main.cf's ``milter_end_of_header_macros``),
so the same request is harmless there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from triomilter import (
    Actions,
    Context,
    MacroStage,
    Milter,
    ProtocolOpts,
    Status,
    on_negotiate,
)

from ._milter_runner import Recorder, use_milter, use_sendmail_milter
from .capture import CaptureServer
from .postfix import PrivatePostfix
from .raw_milter import RawMilter
from .scenarios import SENDER, client_port, recording_milter
from .sendmail import PrivateSendmail, sendmail_spec

EOM_LIST = "{client_addr} {client_port}"  # in no configured list of either MTA
# A configured EOH list on Sendmail (its default has none), to see whether a
# milter's empty EOH request replaces it.
SENDMAIL_MACROS = {"EOH": "{mail_addr}"}


def _send(mta: PrivatePostfix | PrivateSendmail) -> int:
    with mta.smtp() as s:
        port = client_port(s)
        s.sendmail(SENDER, ["r@example.test"], b"Subject: eom macros\r\n\r\nbody\r\n")
        s.quit()
    return port


# -- what Sendmail sends (raw packets) -------------------------------------------


def _raw_run(
    sendmail: PrivateSendmail, capture: CaptureServer, request: Mapping[str, str]
) -> RawMilter:
    with RawMilter(macros=request) as raw:
        sendmail.set_milter(sendmail_spec(raw.port), macros=SENDMAIL_MACROS)
        _send(sendmail)
        raw.wait_for(b"E")
        capture.wait_for(1)
    return raw


def test_sendmail_ignores_an_eom_only_request(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    raw = _raw_run(sendmail, capture, {"eom": "{client_addr} i"})
    (eom,) = raw.macros_before(b"E")
    assert set(eom) == {"{msg_id}", "i"}  # the configured list, not the milter's
    assert raw.macros_before(b"N") == [{"{mail_addr}": SENDER}]  # configured EOH list


def test_sendmail_empty_eoh_request_enables_the_eom_list(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    raw = _raw_run(sendmail, capture, {"eom": "{client_addr} i", "eoh": ""})
    (eom,) = raw.macros_before(b"E")
    assert eom["{client_addr}"] == "127.0.0.1"
    assert set(eom) == {"{client_addr}", "i"}  # exactly the milter's list
    # The empty EOH list replaced the configured one: no macro packet at EOH.
    assert raw.macros_before(b"N") == []
    assert raw.commands().count(b"N") == 1


def test_sendmail_other_empty_lists_do_not_help(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    """Only the EOH list switches the EOM list on (an empty DATA list does not)."""
    raw = _raw_run(sendmail, capture, {"eom": "{client_addr} i", "data": "", "connect": ""})
    (eom,) = raw.macros_before(b"E")
    assert "{client_addr}" not in eom and "{msg_id}" in eom
    assert raw.macros_before(b"T") == []  # the empty DATA list was honoured


def test_sendmail_eom_only_request_without_configured_list_gets_nothing(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    with RawMilter(macros={"eom": "{client_addr} i"}) as raw:
        sendmail.set_milter(sendmail_spec(raw.port), macros={"EOM": ""})
        _send(sendmail)
        raw.wait_for(b"E")
    assert raw.macros_before(b"E") == []  # no macro packet at all


def test_postfix_ignores_an_empty_eoh_request(
    postfix: PrivatePostfix, capture: CaptureServer
) -> None:
    for request in ({"eom": "{client_addr} i"}, {"eom": "{client_addr} i", "eoh": ""}):
        capture.clear()
        with RawMilter(macros=request) as raw:
            postfix.set_milters(f"inet:127.0.0.1:{raw.port}")
            _send(postfix)
            raw.wait_for(b"E")
            assert len(capture.wait_for(1)) == 1
        (eom,) = raw.macros_before(b"E")
        assert set(eom) == {"{client_addr}", "i"}, request  # honoured either way
        # main.cf's milter_end_of_header_macros (i) either way.
        assert [set(m) for m in raw.macros_before(b"N")] == [{"i"}], request


# -- what a triomilter handler gets ---------------------------------------------


def eom_macro_milter(rec: Recorder, eoh_list: str | None = None) -> Milter:
    @on_negotiate
    async def negotiate(
        ctx: Context[object], actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        ctx.api.request_macros(MacroStage.EOM, EOM_LIST)
        if eoh_list is not None:
            ctx.api.request_macros(MacroStage.EOH, eoh_list)
        return Status.CONTINUE, Actions.NONE, ProtocolOpts.NONE

    return recording_milter(rec, [negotiate])


@pytest.fixture(params=["postfix", "sendmail"])
def mta(request: pytest.FixtureRequest, capture: CaptureServer) -> Iterator[tuple[str, Any]]:
    """The module's Postfix or Sendmail (by parameter), reset for this test."""
    yield request.param, request.getfixturevalue(request.param)


def _use(mta: tuple[str, Any], milter: Milter) -> Any:
    name, instance = mta
    if name == "postfix":
        return use_milter(instance, milter)
    return use_sendmail_milter(instance, milter)


def _eom_macros(
    mta: tuple[str, Any], capture: CaptureServer, milter: Milter, rec: Recorder
) -> tuple[dict[str, str], int]:
    with _use(mta, milter):
        port = _send(mta[1])
        capture.wait_for(1)
        rec.wait_for("close")
    eom: dict[str, str] = rec.one("eom")
    return eom, port


@pytest.mark.parametrize("mta", ["postfix", "sendmail"], indirect=True)
@pytest.mark.parametrize("how", ["on_negotiate", "Milter(macros=)"])
def test_handler_gets_the_eom_macros_it_requested(
    mta: tuple[str, Any], capture: CaptureServer, how: str
) -> None:
    """An end-of-message list alone: triomilter adds the empty end-of-headers list
    Sendmail 8.17 needs to honour it (Postfix is unaffected)."""
    rec = Recorder()
    if how == "on_negotiate":
        milter = eom_macro_milter(rec)
    else:
        milter = recording_milter(rec, macros={MacroStage.EOM: EOM_LIST})
    eom, port = _eom_macros(mta, capture, milter, rec)
    assert eom["{client_addr}"] == "127.0.0.1"
    assert eom["{client_port}"] == str(port)


@pytest.mark.parametrize("mta", ["postfix", "sendmail"], indirect=True)
def test_handler_gets_the_eom_macros_with_an_empty_eoh_request(
    mta: tuple[str, Any], capture: CaptureServer
) -> None:
    """The workaround done by the milter itself, on both MTAs."""
    rec = Recorder()
    eom, port = _eom_macros(mta, capture, eom_macro_milter(rec, eoh_list=""), rec)
    assert eom["{client_addr}"] == "127.0.0.1"
    assert eom["{client_port}"] == str(port)
