"""Fixtures for the tools' tests: the modifier milter in memory, served, and on libmilter."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._support import pymilter_modifier, require_pymilter, served

MODIFIER = "tests/tools/modifier_milter.py"


@pytest.fixture(scope="module")
def triomilter_modifier() -> Iterator[str]:
    """``triomilter serve`` running modifier_milter.py; its socket spec."""
    with served(MODIFIER) as spec:
        yield spec


@pytest.fixture(scope="module")
def libmilter_modifier() -> Iterator[str]:
    """pymilter (libmilter) running pymilter_modifier.py; its socket spec."""
    require_pymilter()
    with pymilter_modifier() as spec:
        yield spec


@pytest.fixture(params=["in-memory", "triomilter", "libmilter"])
def modifier(request: pytest.FixtureRequest) -> list[str]:
    """The modifier milter as ``triomilter check`` arguments: loaded, or ``--connect SPEC``."""
    if request.param == "in-memory":
        return [MODIFIER]
    fixture = "triomilter_modifier" if request.param == "triomilter" else "libmilter_modifier"
    return ["--connect", request.getfixturevalue(fixture)]
