"""Import the example milters by path (``examples/`` is not a package)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> types.ModuleType:
    """Import ``examples/<name>.py`` once, as module ``triomilter_example_<name>``."""
    module_name = f"triomilter_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
