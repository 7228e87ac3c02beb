"""Every Python block of the README and docs/ is type-checked and run (docs that cannot rot).

Each ```python block of a document becomes a module in one directory per
document, so blocks can import earlier ones. A block whose first line is
``# file: NAME.py`` is saved under that name (``from mymilter import
milter`` then works in a later block). Every block must pass
``mypy --strict``; every block is imported (its milter is built, its
decorators check their handlers); blocks that define ``test_*`` functions
are run by pytest, with the triomilter plugin, as a user would.
Examples of what *not* to write belong in ```text blocks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_FILE = re.compile(r"# file: ([\w]+\.py)\n")


def blocks(document: Path) -> list[tuple[str, str]]:
    """``(file name, source)`` of each Python block of ``document``."""
    result = []
    stem = re.sub(r"\W", "_", document.stem.lower())
    for number, match in enumerate(_BLOCK.finditer(document.read_text()), 1):
        source = match.group(1)
        named = _FILE.match(source)
        name = named.group(1) if named else f"{stem}_block{number}.py"
        result.append((name, source))
    return result


@pytest.fixture(params=DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def document(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, list[str]]:
    """The document's blocks written to ``tmp_path``; their file names."""
    for example in (ROOT / "examples").glob("*.py"):  # blocks may import the examples
        (tmp_path / example.name).write_text(example.read_text())
    names = []
    for name, source in blocks(request.param):
        (tmp_path / name).write_text(source)
        names.append(name)
    if not names:
        pytest.skip("no Python blocks")
    return tmp_path, names


def test_blocks_pass_mypy_strict(document: tuple[Path, list[str]]) -> None:
    from mypy import api

    directory, names = document
    stdout, stderr, status = api.run(
        [
            "--strict",
            "--no-incremental",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            *(str(directory / name) for name in names),
        ]
    )
    assert status == 0, stdout + stderr


def test_blocks_run(document: tuple[Path, list[str]]) -> None:
    directory, names = document
    modules = [name.removesuffix(".py") for name in names]
    imports = "; ".join(f"import {module}" for module in modules)
    result = subprocess.run(
        [sys.executable, "-c", imports],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    tests = [
        name
        for name in names
        if re.search(r"^(async )?def test_", (directory / name).read_text(), re.M)
    ]
    if not tests:
        return
    (directory / "pytest.ini").write_text("[pytest]\ntrio_mode = true\npython_files = *.py\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout and "failed" not in result.stdout
