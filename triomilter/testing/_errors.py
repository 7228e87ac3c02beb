"""Errors of the test client, besides the engine's protocol errors."""

from __future__ import annotations

from ..protocol import RemoteProtocolError


class MilterClosed(RemoteProtocolError):
    """The milter closed the connection while the client still expected replies."""


class MilterTimeout(TimeoutError):
    """The milter did not answer (or finish) within the client's ``timeout``.

    The session cannot go on: a reply may still be on its way.
    """
