"""Load the toolkit's pytest fixtures for these tests.

Once triomilter is installed with its ``pytest11`` entry point the plugin
loads by itself; importing the fixtures here keeps these tests independent
of that.
"""

from triomilter.testing.pytest_plugin import milter_client, milter_client_factory

__all__ = ["milter_client", "milter_client_factory"]
