"""A third-party component package, as a user would write one; tests/test_components.py loads it as a plugin."""
