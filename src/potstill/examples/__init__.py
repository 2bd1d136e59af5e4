"""Small, self-contained models used by the bundled recipes and tests."""
