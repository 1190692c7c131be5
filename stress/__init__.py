"""Reliability scripts: each starts real twinkle-server processes on loopback, prints a table
and ends with one JSON line of its figures (see stress/README.md)."""
