"""Matchers for end-of-message changes: exact values, `ANY`, regexes, predicates."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, TypeAlias


class AnyValue:
    """The type of `ANY`: matches every value (including a missing one)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ANY"


ANY: Final = AnyValue()
"""Matches any value: ``result.has_added_header("X-Spam", ANY)``."""

Matcher: TypeAlias = (
    str | bytes | re.Pattern[str] | re.Pattern[bytes] | Callable[[str], bool] | AnyValue
)
"""What a text matcher may be.

- ``str`` or ``bytes``: the exact value (``str`` is compared as UTF-8);
- a compiled regex (``str`` or ``bytes`` pattern): found anywhere in the
  value (``re.search``; anchor it to match the whole value);
- a predicate ``(str) -> bool``;
- `ANY`.
"""

BodyMatcher: TypeAlias = (
    bytes | str | re.Pattern[bytes] | re.Pattern[str] | Callable[[bytes], bool] | AnyValue
)
"""Like `Matcher`, for a body: the predicate receives ``bytes``."""

IndexMatcher: TypeAlias = int | Callable[[int], bool] | AnyValue
"""An exact header index, a predicate ``(int) -> bool``, or `ANY`."""


def to_bytes(text: str) -> bytes:
    """The wire bytes of a decoded value (lossless for non-UTF-8 input)."""
    return text.encode("utf-8", "surrogateescape")


def to_text(data: bytes) -> str:
    """Decode wire bytes as UTF-8; invalid bytes survive as surrogates."""
    return data.decode("utf-8", "surrogateescape")


def match_text(matcher: Matcher, value: str, *, ignore_case: bool = False) -> bool:
    """Whether ``value`` matches; ``ignore_case`` applies to exact values (header names)."""
    if isinstance(matcher, AnyValue):
        return True
    if isinstance(matcher, str):
        return matcher.lower() == value.lower() if ignore_case else matcher == value
    if isinstance(matcher, bytes):
        raw = to_bytes(value)
        return matcher.lower() == raw.lower() if ignore_case else matcher == raw
    if isinstance(matcher, re.Pattern):
        if isinstance(matcher.pattern, str):
            return matcher.search(value) is not None
        return matcher.search(to_bytes(value)) is not None
    return bool(matcher(value))


def match_optional(matcher: Matcher | None, value: str | None) -> bool:
    """Like `match_text` for an optional value: ``None`` matches only ``None``."""
    if isinstance(matcher, AnyValue):
        return True
    if matcher is None or value is None:
        return matcher is None and value is None
    return match_text(matcher, value)


def match_body(matcher: BodyMatcher, value: bytes) -> bool:
    if isinstance(matcher, AnyValue):
        return True
    if isinstance(matcher, bytes):
        return matcher == value
    if isinstance(matcher, str):
        return to_bytes(matcher) == value
    if isinstance(matcher, re.Pattern):
        if isinstance(matcher.pattern, bytes):
            return matcher.search(value) is not None
        return matcher.search(to_text(value)) is not None
    return bool(matcher(value))


def match_index(matcher: IndexMatcher, value: int) -> bool:
    if isinstance(matcher, AnyValue):
        return True
    if isinstance(matcher, int):
        return matcher == value
    return bool(matcher(value))
