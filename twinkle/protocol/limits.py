"""Sizes both sides agree on. The server enforces them; the client stays inside them."""

from __future__ import annotations

MAX_CALLS_PER_BATCH = 64
"""Calls one request may carry. A retried batch must find every result it needs among the
``RESULTS_KEPT`` an object keeps."""
RESULTS_KEPT = 256
"""Results of its latest calls that each remote object keeps for retries."""
MAX_BATCHES_PER_CALL = 1024
"""Dataloader batches one ``_twinkle_next`` call returns at most."""
MAX_BODY_BYTES = 256 * 1024 * 1024
"""Largest request body, after gzip is undone."""
MAX_SEQ = 2**53 - 1
"""Largest call seq: what JSON numbers and msgpack integers both carry exactly."""
COMPRESS_MIN_BYTES = 4096
"""Bodies at least this large are gzipped by the client (token batches shrink to ~10%)."""
