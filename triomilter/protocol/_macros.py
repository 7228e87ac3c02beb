"""The macro store with libmilter's stage scoping (protocol.md §5.1).

A ``D`` packet names the command it precedes. libmilter keeps one set per
stage, a new ``D`` replacing its stage's set; ``C``, ``H``, ``M`` and ``R``
clear the sets of every later stage (so RCPT macros are per recipient and MAIL
macros per message); lookups search the latest stage first. ``D`` packets for
other codes (Postfix sends ``D L`` before each header and ``D B`` before each
body chunk) are ignored, as libmilter does.

Sets are stored raw and parsed on first lookup: Postfix sends a ``D`` before
every command and most are never read.
"""

from __future__ import annotations

from ._constants import CommandCode
from ._errors import RemoteProtocolError

# Internal stage slots in protocol order (EOH before EOM, unlike MacroStage).
SLOT_OF_CODE: dict[int, int] = {
    CommandCode.CONNECT: 0,
    CommandCode.HELO: 1,
    CommandCode.MAIL: 2,
    CommandCode.RCPT: 3,
    CommandCode.DATA: 4,
    CommandCode.EOH: 5,
    CommandCode.EOM: 6,
}
_SLOTS = 7
MESSAGE_SLOT = SLOT_OF_CODE[CommandCode.MAIL]


def normalize_name(name: bytes) -> bytes:
    """``{x}`` and ``x`` name the same macro."""
    if name[:1] == b"{" and name[-1:] == b"}":
        return name[1:-1]
    return name


class MacroStore:
    """Macros as the MTA last defined them, scoped by stage like libmilter."""

    __slots__ = ("_parsed", "_raw")

    def __init__(self) -> None:
        self._raw: list[bytes | None] = [None] * _SLOTS
        self._parsed: list[dict[bytes, bytes] | None] = [None] * _SLOTS

    def define(self, payload: bytes) -> None:
        """Store the payload of a ``D`` packet (command code byte, then pairs)."""
        if not payload:
            raise RemoteProtocolError("MACRO ('D'): missing the command code byte")
        slot = SLOT_OF_CODE.get(payload[0])
        if slot is None:
            return
        pairs = payload[1:]
        if pairs:
            if pairs[-1] != 0 or pairs.count(0) % 2:
                raise RemoteProtocolError(
                    f"MACRO ('D') for {chr(payload[0])!r}: pairs are not name\\0value\\0"
                )
            self._raw[slot] = pairs
        else:
            # Postfix's empty packets: an empty set replaces the stage's set.
            self._raw[slot] = None
        self._parsed[slot] = None

    def clear_after(self, slot: int) -> None:
        """Forget the sets of every stage after ``slot``."""
        raw = self._raw
        parsed = self._parsed
        for i in range(slot + 1, _SLOTS):
            raw[i] = None
            parsed[i] = None

    def clear_from(self, slot: int) -> None:
        """Forget the sets of ``slot`` and every later stage."""
        self.clear_after(slot - 1)

    def clear(self) -> None:
        self.clear_after(-1)

    def get(self, name: bytes) -> bytes | None:
        """The value of macro ``name`` (``x`` or ``{x}``), latest stage first."""
        key = normalize_name(name)
        raw = self._raw
        for slot in range(_SLOTS - 1, -1, -1):
            if raw[slot] is None:
                continue
            values = self._parsed[slot]
            if values is None:
                values = self._parse(slot)
            value = values.get(key)
            if value is not None:
                return value
        return None

    def snapshot(self) -> dict[bytes, bytes]:
        """Every macro visible now (names without braces), for logging and tests."""
        result: dict[bytes, bytes] = {}
        for slot in range(_SLOTS):
            if self._raw[slot] is not None:
                values = self._parsed[slot]
                result.update(values if values is not None else self._parse(slot))
        return result

    def _parse(self, slot: int) -> dict[bytes, bytes]:
        raw = self._raw[slot]
        assert raw is not None
        parts = raw[:-1].split(b"\0")
        values = {normalize_name(parts[i]): parts[i + 1] for i in range(0, len(parts), 2)}
        self._parsed[slot] = values
        return values
