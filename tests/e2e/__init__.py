"""End-to-end tests against a real, private Postfix (see conftest.py)."""
