"""The ``open_milter`` fixture: every test it serves runs in memory and over TCP."""

from __future__ import annotations

import pytest

from triomilter.testing import open_in_memory

from ._support import OpenMilter, open_served


@pytest.fixture(params=["memory", "tcp"])
def open_milter(request: pytest.FixtureRequest) -> OpenMilter:
    """Open a session with a milter, in memory or through ``serve()`` over TCP."""
    if request.param == "memory":
        return open_in_memory
    return open_served
