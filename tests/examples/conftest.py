"""The toolkit's pytest fixtures, loaded the way a user's conftest.py may load them.

(Installed, triomilter registers them as a pytest plugin by itself; importing
them here keeps these tests independent of the entry point.)
"""

from triomilter.testing.pytest_plugin import milter_client, milter_client_factory

__all__ = ["milter_client", "milter_client_factory"]
