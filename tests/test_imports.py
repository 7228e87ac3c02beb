"""Layering: the protocol engine (and the handler API) import without Trio."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_protocol_engine_imports_no_trio() -> None:
    modules = _modules_after("import triomilter.protocol")
    assert "triomilter.protocol" in modules
    assert "trio" not in modules


def test_serve_loads_trio_on_first_use() -> None:
    modules = _modules_after("import triomilter; triomilter.serve")
    assert "trio" in modules and "triomilter._server" in modules


def test_public_names_are_importable() -> None:
    import triomilter

    for name in triomilter.__all__:
        assert getattr(triomilter, name) is not None, name
