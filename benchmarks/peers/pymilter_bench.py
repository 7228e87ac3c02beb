"""pymilter peer: a minimal add-header milter on pymilter's public API.

pymilter is a C binding to Sendmail's libmilter (one thread per connection).
Every stage is handled and answers CONTINUE; end of message adds
``X-Bench: 1``.  With ``--eom-only`` the class overrides only ``eom``, so
pymilter's default negotiation sets NO_* for every other stage (W2).

usage: pymilter_bench.py [--host 127.0.0.1] --port PORT [--eom-only]
       pymilter_bench.py --unix PATH [--eom-only]

``--unix`` gives libmilter the socket ``unix:PATH``; libmilter removes a
stale socket file there first (``runmilter(..., rmsock=True)``).
"""

from __future__ import annotations

import argparse
import logging

import Milter


class EveryStage(Milter.Base):
    """Handles every stage (W1): each callback answers CONTINUE."""

    def connect(self, hostname, family, hostaddr):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def hello(self, hostname):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def envfrom(self, f, *args):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def envrcpt(self, to, *args):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def data(self):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def header(self, name, value):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def eoh(self):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def body(self, chunk):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def eom(self):  # type: ignore[no-untyped-def]
        self.addheader("X-Bench", "1")
        return Milter.CONTINUE

    def abort(self):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE

    def close(self):  # type: ignore[no-untyped-def]
        return Milter.CONTINUE


class EomOnly(Milter.Base):
    """Handles only end of message (W2): the rest are negotiated away (NO_*)."""

    def eom(self):  # type: ignore[no-untyped-def]
        self.addheader("X-Bench", "1")
        return Milter.CONTINUE


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="listen on TCP HOST:PORT")
    where.add_argument("--unix", metavar="PATH", help="listen on a UNIX-domain socket at PATH")
    p.add_argument("--eom-only", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    Milter.factory = EomOnly if a.eom_only else EveryStage
    Milter.set_flags(Milter.ADDHDRS)
    if a.unix:
        spec = f"unix:{a.unix}"
    else:
        spec = f"{'inet6' if ':' in a.host else 'inet'}:{a.port}@{a.host}"
    # timeout: the MTA-side I/O timeout libmilter applies; 600 s is plenty.
    # rmsock: remove a stale UNIX socket file before binding.
    Milter.runmilter("bench", spec, timeout=600, rmsock=True)


if __name__ == "__main__":
    main()
