"""The README's milter and its test, run as written (docs that cannot rot)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


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
