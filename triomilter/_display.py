"""Showing protocol data to people and scripts: printable text, flag names, JSON-safe text.

Bytes are shown as UTF-8; bytes that are not UTF-8 appear as ``\\xNN``, line
ends as ``\\n`` and ``\\r``, other control characters but tab as ``\\x00``, so
one line of output is one line on the terminal.
"""

from __future__ import annotations

import enum
import re

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ESCAPES = {"\n": "\\n", "\r": "\\r"}


def show(data: bytes | str, limit: int | None = None) -> str:
    """``data`` as one printable line, cut at ``limit`` characters (with an ellipsis)."""
    text = data.decode("utf-8", "backslashreplace") if isinstance(data, bytes) else data
    text = _CONTROL.sub(lambda m: _ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def text_json(data: bytes) -> str:
    """Bytes as a JSON-safe string: UTF-8, other bytes as ``\\xNN``."""
    return data.decode("utf-8", "backslashreplace")


def flags_name(value: int, kind: type[enum.IntFlag]) -> str:
    """``ADD_HEADER|QUARANTINE`` for the known bits, then ``0x...`` for the others; ``NONE``."""
    names = [str(flag.name) for flag in kind if flag.value and value & flag.value == flag.value]
    known = 0
    for flag in kind:
        if flag.value and value & flag.value == flag.value:
            known |= flag.value
    if value & ~known:
        names.append(hex(value & ~known))
    return "|".join(names) or "NONE"


def os_error(exc: BaseException) -> str:
    """Why a connection failed, in a few words (trio's "all attempts to connect ...
    failed" has the reasons in its cause: the last one)."""
    cause: BaseException = exc
    if isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
        cause = exc.__cause__.exceptions[-1]
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(cause)
