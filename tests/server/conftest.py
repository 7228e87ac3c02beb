"""Fixtures for the server tests (issue 4): real loopback sockets only."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._support import Spawner


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short temporary directory for UNIX sockets (paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tm-") as path:
        yield Path(path)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every ``triomilter`` log record, down to DEBUG."""
    caplog.set_level(logging.DEBUG, logger="triomilter")
    return caplog


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    """``spawn(*args)`` starts ``python *args`` in its own process group; killed after."""
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.kill_all()
