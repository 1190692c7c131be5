"""``get_logger()``: the logger the seed's examples use.

Its lines are the training loop's ordinary output (``loss: 1.23``), so in a Jupyter kernel
they go to stdout: a kernel shows everything written to stderr as a red block, which reads
as an error. Anywhere else (a terminal, a script, a server's log) they go to stderr, where
log lines belong and where they stay apart from a program's own output.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any

_FORMAT = "[%(levelname)s:%(name)s] %(message)s"


def in_kernel_output(stream: Any) -> bool:
    """True when ``stream`` is a Jupyter kernel's output stream (ipykernel's ``OutStream``,
    which it puts in place of ``sys.stdout``/``sys.stderr``), found by its type, so this never
    imports IPython."""
    return any(cls.__module__.split(".")[0] == "ipykernel" for cls in type(stream).__mro__)


class _NotebookAwareHandler(logging.StreamHandler):
    """A ``StreamHandler`` that picks its stream at every line: stdout when stderr is a Jupyter
    kernel's (``in_kernel_output``), else stderr. Picked late, not when the handler is made: a
    logger set up before the kernel's streams are in place (an import at start-up), or while a
    test captures them, still writes where the output goes now."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @staticmethod
    def current_stream() -> IO[str]:
        return sys.stdout if in_kernel_output(sys.stderr) else sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        # Called with the handler's lock held (Handler.handle), so the swap cannot race another line.
        self.stream = self.current_stream()
        super().emit(record)


def get_logger(name: str = "twinkle") -> logging.Logger:
    """A logger that prints INFO and above once, without duplicating handlers: to stdout in a
    Jupyter kernel (plain output, not a red stderr block), to stderr anywhere else."""
    logger = logging.getLogger(name)
    root = logging.getLogger("twinkle")
    if not root.handlers:
        handler = _NotebookAwareHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logger
