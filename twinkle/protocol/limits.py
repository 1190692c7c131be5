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
"""Largest call seq: what JSON numbers and msgpack integers both carry exactly. Also the
largest step, offset or other integer a query parameter takes."""
MAX_SMALL_BODY_BYTES = 64 * 1024
"""Largest body of a management request (a run's name, tags and dataset are a few hundred
bytes): such a route never reads more, also after gzip is undone."""
MAX_WIRE_VALUES = 1 << 20
"""Values one request body may hold: every item of a list and every key and every value of
a map counts one. Token ids travel as packed arrays, which count as one value each."""
MAX_WIRE_DEPTH = 32
"""How deeply lists and maps may nest in one request body."""
MAX_WIRE_ELEMENTS = 1 << 23
"""Elements of all packed arrays (``codec``'s ``__nd__`` form) in one request body together
(8M: 64 calls of 16384 tokens each, with their ids, labels and a mask, still fit)."""
MAX_ARRAY_DIMS = 32
"""Dimensions of one packed array."""
COMPRESS_MIN_BYTES = 4096
"""Bodies at least this large are gzipped by the client (token batches shrink to ~10%)."""
MAX_BATCHES_IN_FLIGHT = 2
"""Call batches of one object a client keeps in flight: while the server runs one, the next is
already there, so the device does not wait a round trip between them."""
ORDER_WAIT_S = 30.0
"""How long the server holds a batch whose predecessor (``CallBatch.after``) has not arrived;
then its calls are refused, not run (a lost request is resent within seconds, and the batch
behind it came over the same network). A predecessor that arrived is waited for however
long its calls run."""
MAX_SAMPLE_TOKENS = 2048
"""Tokens one sampled sequence may generate (``SamplingParams.max_tokens``)."""
MAX_SAMPLE_SEQUENCES = 64
"""Sequences one ``sample`` call generates at most: its inputs times ``num_samples``."""
MAX_STOP_SEQUENCES = 16
"""Stop strings and token ids one ``sample`` call may give."""
MAX_SAMPLING_ADAPTERS = 8
"""Checkpoints a served base model keeps loaded for sampling (least recently used go first)."""
