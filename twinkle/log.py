"""``get_logger()``: the logger the seed's examples use."""

from __future__ import annotations

import logging
import sys

_FORMAT = "[%(levelname)s:%(name)s] %(message)s"


def get_logger(name: str = "twinkle") -> logging.Logger:
    """A logger that prints INFO and above to stderr once, without duplicating handlers."""
    logger = logging.getLogger(name)
    root = logging.getLogger("twinkle")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logger
