"""Fixtures for end-to-end tests against a private Postfix.

Every test in this directory is marked ``e2e``.  Postfix is required: without
it the tests are skipped, except under CI (env ``CI`` set), where a missing
Postfix is a setup bug and fails loudly instead of passing as "skipped".

Fixtures:

* ``capture_server`` (session): the SMTP sink Postfix relays to.
* ``capture`` (function): the same sink, emptied for this test.
* ``postfix`` (function): a Postfix instance shared by the tests of a module
  (start-up ~0.3 s), reset to "no milter" with an empty queue before each test;
  call ``postfix.set_milters(...)`` (a ~20 ms reload) to put a milter in front.
* ``postfix_factory`` (function): ``make(milters, **kwargs)`` starts a fresh
  instance (for tests needing a pristine or specially configured Postfix);
  all are stopped after the test.

On a failing test, the maillog of every instance it used is added to the
report, which is usually the only way to see why Postfix did what it did.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from .capture import CaptureServer
from .postfix import PrivatePostfix, postfix_missing_reason

_HERE = Path(__file__).parent.resolve()
_INSTANCES = pytest.StashKey[list[PrivatePostfix]]()
_LOG_TAIL = 20000  # characters of maillog attached to a failure report

PostfixFactory = Callable[..., PrivatePostfix]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: end-to-end test against a real private Postfix (needs root + postfix)"
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


def _track(request: pytest.FixtureRequest, pf: PrivatePostfix) -> None:
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
