"""Reliability scripts: each starts real twinkle-server processes on loopback, prints a table
and ends with one JSON line of its figures; ``--smoke`` sizes it for tests/test_stress_smoke.py.
The README's "Reliability figures" says how to run them and what they measured."""
