"""The twin of ``modifier_milter.py`` on libmilter, through Debian's pymilter.

Run with the system Python, where ``.ci/install-pymilter.sh`` installed it:
``/usr/bin/python3 tests/tools/pymilter_modifier.py --port PORT``. It makes
the same changes in the same order as the triomilter one (see there).
"""

from __future__ import annotations

import argparse
import sys

import Milter

REFUSED = "<refused@example.net>"
NEW_BODY = b"The body was replaced.\r\nSecond line.\r\n"


class Modifier(Milter.Base):
    def __init__(self) -> None:
        self.subject = ""

    def envfrom(self, sender: str, *args: str) -> int:
        self.subject = ""
        return Milter.CONTINUE

    def envrcpt(self, rcpt: str, *args: str) -> int:
        if rcpt == REFUSED:
            self.setreply("550", "5.1.1", "No such user here")
            return Milter.REJECT
        return Milter.CONTINUE

    def header(self, name: str, value: str) -> int:
        if name.lower() == "subject":
            self.subject = value
        return Milter.CONTINUE

    def eom(self) -> int:
        subject = self.subject
        if subject == "please reject":
            self.setreply("550", "5.7.1", "Rejected by the test milter")
            return Milter.REJECT
        if subject == "please tempfail":
            return Milter.TEMPFAIL
        if subject == "please discard":
            return Milter.DISCARD
        self.progress()
        self.addheader("X-Added", "added value")
        self.addheader("X-Folded", "first line\n\tsecond line")
        self.addheader("X-Utf8", "Grüße ✓")
        self.addheader("X-Inserted", "at index 1", 1)
        self.chgheader("Subject", 1, f"[checked] {subject}")
        self.chgheader("X-Remove", 1, "")
        self.addrcpt("<added@example.net>")
        self.addrcpt("<never@example.net>", "NOTIFY=NEVER")
        self.delrcpt("<removed@example.net>")
        self.chgfrom("<new-sender@example.org>", "RET=HDRS")
        if "body" in subject:
            self.replacebody(NEW_BODY)
        if "quarantine" in subject:
            self.quarantine("held by the test milter")
        return Milter.CONTINUE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    Milter.factory = Modifier
    Milter.set_flags(
        Milter.ADDHDRS
        | Milter.CHGHDRS
        | Milter.ADDRCPT
        | Milter.ADDRCPT_PAR
        | Milter.DELRCPT
        | Milter.CHGFROM
        | Milter.MODBODY
        | Milter.QUARANTINE
    )
    print(f"pymilter modifier on 127.0.0.1:{args.port}", flush=True)
    Milter.runmilter("modifier", f"inet:{args.port}@127.0.0.1", timeout=60)
    sys.exit(0)


if __name__ == "__main__":
    main()
