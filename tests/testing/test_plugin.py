"""The pytest plugin as a user meets it: in a project of their own, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USER_TEST = """
from triomilter import Status
from triomilter.testing import MilterClient


async def test_helo(milter_client: MilterClient) -> None:
    assert (await milter_client.helo("mx.example")).status is Status.CONTINUE
"""

USER_FIXTURE = """
import pytest

from triomilter import Context, Milter, Status, on_helo


@on_helo
async def helo(ctx: Context[None], hostname: str) -> Status:
    return Status.CONTINUE


@pytest.fixture
def milter() -> Milter:
    return Milter("mine", handlers=[helo])
"""


def run_pytest(directory: Path) -> subprocess.CompletedProcess[str]:
    (directory / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(directory)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_milter_client_without_a_milter_fixture_says_what_to_write(tmp_path: Path) -> None:
    (tmp_path / "test_mine.py").write_text(USER_TEST)
    result = run_pytest(tmp_path)
    assert result.returncode == 1, result.stdout
    assert "needs a `milter` fixture returning your Milter" in result.stdout
    assert "def milter() -> triomilter.Milter:" in result.stdout
    assert "fixture 'milter' not found" not in result.stdout


def test_a_milter_fixture_of_the_users_wins(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(USER_FIXTURE)
    (tmp_path / "test_mine.py").write_text(USER_TEST)
    result = run_pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
