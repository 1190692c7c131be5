"""Where errors leave the server: one line, a stable code, no traceback and no server path.

``ErrorScrubber.info`` is the one place a failure becomes what a client reads. A
``TwinkleError`` keeps its code (the HTTP status comes from its class); its message has the
error's ``aliases`` applied (a checkpoint folder becomes its ``twinkle://`` path, the server's
name of an adapter the user's) and any remaining path under the server's own folders
replaced. Anything else is logged with its traceback and reported only as ``internal``
with the request id.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from twinkle.errors import InvalidArgumentError, ServerError, TwinkleError, one_line
from twinkle.protocol.wire import ErrorInfo

log = logging.getLogger("twinkle_server")

INTERNAL_MESSAGE = "internal server error"
HIDDEN_PATH = "<server path>"


def _hub_caches() -> list[str]:
    """Where the hub libraries keep their files (they may lie outside home, tmp and cwd)."""
    found = [os.environ[name] for name in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "MODELSCOPE_CACHE")
             if os.environ.get(name)]
    try:
        from huggingface_hub import constants

        found += [constants.HF_HOME, constants.HF_HUB_CACHE]
    except ImportError:
        pass
    return found


class ErrorScrubber:
    """Turns exceptions into ``ErrorInfo`` without revealing the server's files."""

    def __init__(self, hidden_roots: Iterable[str | os.PathLike[str]] = ()) -> None:
        roots = {str(Path(r).resolve()) for r in [*hidden_roots, *_hub_caches()]}
        roots |= {os.getcwd(), str(Path.home()), tempfile.gettempdir(), sys.prefix}
        roots = sorted((r for r in roots if r not in ("/", "")), key=len, reverse=True)
        # A path under a root, up to the next character that cannot be part of a plain path.
        self._paths = re.compile("(?:" + "|".join(re.escape(r) for r in roots) + r")[^\s'\",;:()\[\]]*")

    def scrub(self, text: str, aliases: dict[str, str] | None = None) -> str:
        for name, shown in sorted((aliases or {}).items(), key=lambda kv: len(kv[0]), reverse=True):
            text = text.replace(name, shown)
        return self._paths.sub(HIDDEN_PATH, text)

    def info(self, exc: BaseException, request_id: str | None, *, call: str | None = None) -> ErrorInfo:
        """The client-facing form of ``exc``."""
        if isinstance(exc, IndexError):  # the library's own "index out of range" for dataset[i]
            exc = InvalidArgumentError(one_line(str(exc)) or "index out of range")
        if isinstance(exc, TwinkleError) and not isinstance(exc, ServerError):
            message = one_line(self.scrub(exc.message, exc.aliases)) or exc.code
            return ErrorInfo(code=exc.code, message=message, request_id=request_id, call=call)
        where = f" in call {call!r}" if call else ""
        log.error("request %s failed%s", request_id, where, exc_info=exc)
        return ErrorInfo(code=ServerError.code, message=INTERNAL_MESSAGE, request_id=request_id, call=call)
