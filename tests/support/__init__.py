"""Helpers the tests share (importable as ``support.*``: conftest puts ``tests/`` on the path)."""
