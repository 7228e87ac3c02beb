"""pytest fixtures for testing milters (needs pytest-trio).

Installed with triomilter, this plugin is loaded by pytest automatically
(entry point ``pytest11``); without the entry point, load it from a
``conftest.py``: ``pytest_plugins = ["triomilter.testing.pytest_plugin"]``.

- ``milter_client``: a negotiated in-memory `MilterClient` for the milter
  your own ``milter`` fixture returns (without one, the test fails saying
  how to write it); closed after the test, and the test errors with
  `triomilter.MilterPanic` if a handler panicked::

      @pytest.fixture
      def milter() -> triomilter.Milter:
          return triomilter.Milter.from_module(my_milter)

      async def test_helo(milter_client: MilterClient) -> None:
          reply = await milter_client.helo("mx.example")
          assert reply.status is Status.CONTINUE

- ``milter_client_factory``: `open_client`, to open sessions with other
  offers or with a milter over a socket::

      async def test_no_actions(milter_client_factory: OpenClient) -> None:
          async with milter_client_factory(milter, actions=Actions.NONE) as client:
              ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import pytest
import trio

from .._milter import Milter
from ..protocol import Actions, ProtocolOpts
from ._client import MilterClient
from ._open import open_client, open_in_memory


class OpenClient(Protocol):
    """The type of the ``milter_client_factory`` fixture: `open_client`."""

    def __call__(
        self,
        target: Milter[Any, Any] | str | tuple[str, int] | trio.abc.Stream,
        *,
        actions: Actions = ...,
        opts: ProtocolOpts = ...,
        version: int = ...,
        timeout: float = ...,
    ) -> AbstractAsyncContextManager[MilterClient]: ...


@pytest.fixture
def milter() -> Milter[Any, Any]:
    """Yours to define: the milter that ``milter_client`` talks to.

    This default only says so, instead of pytest's bare "fixture 'milter'
    not found".
    """
    pytest.fail(
        "the milter_client fixture needs a `milter` fixture returning your Milter; "
        "define one in your test module or conftest.py:\n\n"
        "    @pytest.fixture\n"
        "    def milter() -> triomilter.Milter:\n"
        "        return mymilter.milter\n",
        pytrace=False,
    )


@pytest.fixture
def milter_client_factory() -> OpenClient:
    """`triomilter.testing.open_client`: open a session with a milter, a socket spec or a stream."""
    return open_client


@pytest.fixture
async def milter_client(milter: Milter[Any, Any]) -> AsyncIterator[MilterClient]:
    """A negotiated in-memory session with the ``milter`` fixture (which you define)."""
    async with open_in_memory(milter) as client:
        yield client
