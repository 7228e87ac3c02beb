"""How triomilter is installed: what a user's tools see of it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import triomilter

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_the_installed_package_from_elsewhere(tmp_path: Path) -> None:
    """``pip install -e .`` (what .ci/run does) must be visible to mypy outside the checkout.

    setuptools' editable install of this layout is an import hook mypy cannot
    see ("Cannot find implementation or library stub"); hatchling's is a
    path entry it follows.
    """
    if Path(triomilter.__file__).resolve().parent.parent != ROOT:
        pytest.skip("triomilter is not installed from this checkout")
    module = tmp_path / "mymilter.py"
    module.write_text(
        "from triomilter import Context, Milter, Status, on_helo\n\n\n"
        "@on_helo\n"
        "async def helo(ctx: Context[None], hostname: str) -> Status:\n"
        "    return Status.CONTINUE\n\n\n"
        'milter = Milter("mine", handlers=[helo])\n'
    )
    (tmp_path / "mypy.ini").write_text("[mypy]\nstrict = True\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "mymilter.py"],
        cwd=tmp_path,  # far from the checkout: only the installation can be found
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
