# The part of pymilter (Debian's python3-milter, for the system python3) that
# tests/tools/pymilter_modifier.py uses; pymilter ships no type information.
from typing import ClassVar

CONTINUE: int
REJECT: int
DISCARD: int
ACCEPT: int
TEMPFAIL: int

ADDHDRS: int
CHGBODY: int
MODBODY: int
ADDRCPT: int
ADDRCPT_PAR: int
DELRCPT: int
CHGHDRS: int
QUARANTINE: int
CHGFROM: int
SETSYMLIST: int

factory: type[Base]

class Base:
    _protocol_mask: ClassVar[int]
    def getsymval(self, sym: str) -> str | None: ...
    def setreply(
        self, rcode: str, xcode: str | None = None, msg: str | None = None, *ml: str
    ) -> None: ...
    def addheader(self, field: str, value: str, idx: int = -1) -> None: ...
    def chgheader(self, field: str, idx: int, value: str) -> None: ...
    def addrcpt(self, rcpt: str, params: str | None = None) -> None: ...
    def delrcpt(self, rcpt: str) -> None: ...
    def replacebody(self, body: bytes) -> None: ...
    def chgfrom(self, sender: str, params: str | None = None) -> None: ...
    def quarantine(self, reason: str) -> None: ...
    def progress(self) -> None: ...

def set_flags(flags: int) -> None: ...
def runmilter(name: str, socketname: str, timeout: int = 0, rmsock: bool = True) -> None: ...
