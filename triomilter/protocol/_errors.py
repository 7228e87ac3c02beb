"""Errors of the protocol engine, split like h11's: who is at fault."""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error the engine raises."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid; the connection cannot go on.

    The message names the command (or reply), the state and what was expected.
    """


class NegotiationError(RemoteProtocolError):
    """Option negotiation failed: the offer and the wishes cannot be reconciled."""


class LocalProtocolError(ProtocolError):
    """The caller misused the engine (for example sent a reply nobody asked for)."""
