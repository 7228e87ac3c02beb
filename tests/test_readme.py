"""The README's milter and its test, run as written (docs that cannot rot)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def first_command() -> str:
    """The README's first shell command (install, then the check demonstration)."""
    blocks: list[str] = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return blocks[0].strip()


def test_readme_first_command_shows_the_milter_at_work() -> None:
    """The ``triomilter check`` part of the first command, run as written (the
    install part is the packaging tests' business)."""
    install, _, check = first_command().rpartition(" && ")
    assert install == "python3 -m venv .venv && .venv/bin/pip install ."
    program, *args = shlex.split(check)
    assert program == ".venv/bin/triomilter" and args[0] == "check"
    result = subprocess.run(
        [sys.executable, "-m", "triomilter", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The milter at work: the client of the message's Received: header, tagged.
    assert "+ X-Triomilter-Tagged: mail.example.org [192.0.2.10]" in result.stdout
    assert result.stdout.endswith("verdict: accepted (exit status 0)\n")


def test_readme_milter_and_its_test_pass(tmp_path: Path) -> None:
    milter, test = python_blocks()[:2]
    (tmp_path / "mymilter.py").write_text(milter)
    (tmp_path / "test_mymilter.py").write_text(test)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_readme_milter_passes_mypy_strict(tmp_path: Path) -> None:
    from mypy import api

    (tmp_path / "mymilter.py").write_text(python_blocks()[0])
    stdout, stderr, status = api.run(
        [
            "--strict",
            "--no-incremental",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            str(tmp_path / "mymilter.py"),
        ]
    )
    assert status == 0, stdout + stderr
