"""mypy --strict accepts correct handlers and reports the mistakes in wrong ones."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api")

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def run_mypy(path: Path) -> tuple[str, int]:
    stdout, stderr, status = mypy_api.run(
        [
            "--strict",
            "--no-error-summary",
            "--show-error-codes",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            str(path),
        ]
    )
    return stdout + stderr, status


def test_correct_handlers_pass_strict() -> None:
    output, status = run_mypy(HERE / "good_handlers.py")
    assert status == 0, output


def test_wrong_handlers_are_reported_where_marked() -> None:
    path = HERE / "bad_handlers.py"
    expected = {
        number: match.group(1)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if (match := re.search(r"# E: ([\w-]+)", line))
    }
    assert len(expected) >= 9
    output, status = run_mypy(path)
    assert status == 1, output
    reported: dict[int, set[str]] = {}
    for match in re.finditer(r"bad_handlers\.py:(\d+): error: .*\[([\w-]+)\]", output):
        reported.setdefault(int(match.group(1)), set()).add(match.group(2))
    for number, code in expected.items():
        assert code in reported.get(number, set()), (number, code, output)
    unexpected = set(reported) - set(expected)
    assert not unexpected, output
