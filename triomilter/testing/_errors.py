"""Errors of the test client, besides the engine's protocol errors.

Every way a milter can misbehave towards the client is a
`RemoteProtocolError`: it broke the protocol, it hung up (`MilterClosed`),
or it did not answer in time (`MilterTimeout`, also a `TimeoutError`). One
``except RemoteProtocolError`` covers them all.
"""

from __future__ import annotations

from ..protocol import RemoteProtocolError


class MilterClosed(RemoteProtocolError):
    """The milter closed the connection while the client still expected replies."""


class MilterTimeout(RemoteProtocolError, TimeoutError):
    """The milter did not answer (or finish) within the client's ``timeout``.

    The session cannot go on: a reply may still be on its way.
    """
