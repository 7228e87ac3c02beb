"""Fixtures for end-to-end tests against a private Postfix or Sendmail.

Every test in this directory is marked ``e2e``.  Postfix (and Sendmail for
the ``test_sendmail_*`` modules) is required: without it the tests are
skipped, except under CI (env ``CI`` set), where a missing MTA is a setup
bug and fails loudly instead of passing as "skipped".

Fixtures:

* ``capture_server`` (session): the SMTP sink Postfix relays to.
* ``capture`` (function): the same sink, emptied for this test.
* ``postfix`` (function): a Postfix instance shared by the tests of a module
  (start-up ~0.3 s), reset to "no milter" with an empty queue before each test;
  call ``postfix.set_milters(...)`` (a ~20 ms reload) to put a milter in front.
* ``postfix_factory`` (function): ``make(milters, **kwargs)`` starts a fresh
  instance (for tests needing a pristine or specially configured Postfix);
  all are stopped after the test.
* ``sendmail`` (function): a private Sendmail shared by the tests of a module
  (start-up ~0.1 s), reset to "no milter" with an empty queue before each
  test; ``sendmail.set_milter(spec, flags=..., timeouts=...)`` restarts its
  daemon (~0.1 s) with that milter in front.
* ``sendmail_factory`` (function): ``make(milter=None, **kwargs)``, a fresh
  PrivateSendmail, stopped after the test.

On a failing test, the maillog of every instance it used (Postfix's maillog,
Sendmail's syslog) is added to the report, which is usually the only way to
see why the MTA did what it did.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import pytest

from .capture import CaptureServer
from .mta import Mta
from .postfix import PrivatePostfix, postfix_missing_reason
from .sendmail import PrivateSendmail, SendmailError, sendmail_missing_reason


class _Instance(Protocol):
    @property
    def running(self) -> bool: ...
    @property
    def base_dir(self) -> str: ...
    def log_text(self, since: int | None = None) -> str: ...


_HERE = Path(__file__).parent.resolve()
_INSTANCES = pytest.StashKey[list[_Instance]]()
_LOG_TAIL = 20000  # characters of maillog attached to a failure report

PostfixFactory = Callable[..., PrivatePostfix]
SendmailFactory = Callable[..., PrivateSendmail]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: end-to-end test against a real private Postfix or Sendmail (needs root + the MTA)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        for pf in item.stash.get(_INSTANCES, []):
            if pf.running:
                tail = pf.log_text()[-_LOG_TAIL:]
                report.sections.append((f"maillog {pf.base_dir}", tail or "(empty)"))
    return report


def _track(request: pytest.FixtureRequest, pf: _Instance) -> None:
    """Remember which instances a test used, for the failure report."""
    request.node.stash.setdefault(_INSTANCES, []).append(pf)


@pytest.fixture(scope="session")
def postfix_required() -> None:
    """Skip (or, under CI, fail) when Postfix cannot run here."""
    reason = postfix_missing_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Postfix e2e tests: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def capture_server() -> Iterator[CaptureServer]:
    """The SMTP sink on 127.0.0.1 that every private Postfix relays to."""
    with CaptureServer() as server:
        yield server


@pytest.fixture
def capture(capture_server: CaptureServer) -> CaptureServer:
    """The capture server with no messages from earlier tests."""
    capture_server.clear()
    return capture_server


@pytest.fixture(scope="module")
def _shared_postfix(
    postfix_required: None, capture_server: CaptureServer
) -> Iterator[PrivatePostfix]:
    with PrivatePostfix(capture_server.port) as pf:
        yield pf


@pytest.fixture
def postfix(
    request: pytest.FixtureRequest, _shared_postfix: PrivatePostfix, capture: CaptureServer
) -> Iterator[PrivatePostfix]:
    """The module's Postfix, reset to its initial config with an empty queue."""
    pf = _shared_postfix
    pf.reset_config()
    if not pf.queue_is_empty():
        pf.delete_queue()
    capture.clear()
    pf.mark_log()
    _track(request, pf)
    yield pf
    if not pf.queue_is_empty():
        pf.delete_queue()  # e.g. held or deferred mail: keep it from the next test


@pytest.fixture
def postfix_factory(
    request: pytest.FixtureRequest, postfix_required: None, capture: CaptureServer
) -> Iterator[PostfixFactory]:
    """``make(milters=(), **kwargs)``: start a fresh PrivatePostfix relaying to
    the capture server; kwargs go to PrivatePostfix.  Stopped after the test."""
    started: list[PrivatePostfix] = []

    def make(milters: str | Sequence[str] = (), **kwargs: Any) -> PrivatePostfix:
        pf = PrivatePostfix(capture.port, milters, **kwargs)
        pf.start()
        started.append(pf)
        _track(request, pf)
        return pf

    yield make
    for pf in reversed(started):
        pf.stop()


# -- Sendmail -----------------------------------------------------------------


@pytest.fixture(scope="session")
def sendmail_required() -> None:
    """Skip (or, under CI, fail) when a private Sendmail cannot run here."""
    reason = sendmail_missing_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Sendmail e2e tests: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def _shared_sendmail(
    sendmail_required: None, capture_server: CaptureServer
) -> Iterator[PrivateSendmail]:
    with PrivateSendmail(capture_server.port) as sm:
        yield sm


@pytest.fixture
def sendmail(
    request: pytest.FixtureRequest, _shared_sendmail: PrivateSendmail, capture: CaptureServer
) -> Iterator[PrivateSendmail]:
    """The module's Sendmail, with no milter and an empty queue."""
    sm = _shared_sendmail
    sm.reset_config()  # (re)starts it if a test killed it or broke its config
    if not sm.queue_is_empty():
        sm.delete_queue()
    capture.clear()
    sm.mark_log()
    _track(request, sm)
    yield sm
    if sm.running and not sm.queue_is_empty():
        # A delivery still under way finishes (bounded); quarantined or
        # deferred mail is kept from the next test: a restart first (it ends
        # every process of the instance), then the files go.
        with contextlib.suppress(SendmailError):
            sm.wait_queue_empty(2.0)
        if not sm.queue_is_empty():
            sm.restart()
            sm.delete_queue()


@pytest.fixture(params=["postfix", "sendmail"])
def mta(request: pytest.FixtureRequest) -> Mta:
    """Postfix, then Sendmail (each the module's instance, reset): for tests behind either."""
    return Mta(request.getfixturevalue(request.param))


@pytest.fixture
def sendmail_factory(
    request: pytest.FixtureRequest, sendmail_required: None, capture: CaptureServer
) -> Iterator[SendmailFactory]:
    """``make(milter=None, **kwargs)``: a fresh PrivateSendmail relaying to the
    capture server; kwargs go to PrivateSendmail.  Stopped after the test."""
    started: list[PrivateSendmail] = []

    def make(milter: str | None = None, **kwargs: Any) -> PrivateSendmail:
        sm = PrivateSendmail(capture.port, milter, **kwargs)
        sm.start()
        started.append(sm)
        _track(request, sm)
        return sm

    yield make
    for sm in reversed(started):
        sm.stop()
