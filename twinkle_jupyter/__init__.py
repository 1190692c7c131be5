"""twinkle in Jupyter: ``%load_ext twinkle_jupyter``, live loss plots, run and checkpoint browsers.

In a notebook::

    %load_ext twinkle_jupyter
    %twinkle connect                # URL from $TWINKLE_SERVER_URL, key from $TWINKLE_SERVER_TOKEN
    ...                             # train a twinkle_client model: a live loss plot appears
    %twinkle runs                   # browse runs: plot, checkpoints, compare
    %twinkle resume RUN latest      # continue a run from its newest checkpoint
    %twinkle chat RUN latest --compare base   # ask its newest checkpoint and the base model

or without the extension: ``from twinkle_jupyter import LossPlot, RunBrowser, CheckpointBrowser, ChatWidget``;
resume logic: ``twinkle_jupyter.resume.resume(run_id, checkpoint, namespace=globals())``.

This module stays light: widgets, matplotlib and twinkle_client are imported on first use, so
a Jupyter server that loads the package for its ``/twinkle`` dashboard does not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "ChatWidget",
    "CheckpointBrowser",
    "LossPlot",
    "ResumeResult",
    "RunBrowser",
    "TrainingInterrupted",
    "TwinkleMagics",
    "load_ipython_extension",
    "unload_ipython_extension",
]

_LAZY = {
    "LossPlot": "plot",
    "RunBrowser": "browsers",
    "CheckpointBrowser": "browsers",
    "ChatWidget": "chat",
    "TwinkleMagics": "magics",
    "ResumeResult": "resume",
    "TrainingInterrupted": "session",
}

if TYPE_CHECKING:
    from .browsers import CheckpointBrowser, RunBrowser
    from .chat import ChatWidget
    from .magics import TwinkleMagics
    from .plot import LossPlot
    from .resume import ResumeResult
    from .session import TrainingInterrupted


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'twinkle_jupyter' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{module}"), name)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext twinkle_jupyter``: the ``%twinkle`` magic, its settings, the training hook.

    Loading twice is a no-op; ``%reload_ext`` unloads first.
    """
    import sys

    from traitlets import TraitError

    from .magics import TwinkleMagics
    from .session import TwinkleSession, get_session

    if get_session(ipython) is not None:
        return
    # Magics.__init__ puts the instance in ipython.configurables (so `%config TwinkleMagics`
    # lists and sets its traits) with the shell as parent (so ipython_config.py applies).
    try:
        magics = TwinkleMagics(shell=ipython)
    except TraitError as exc:
        # A bad `%config TwinkleMagics.x = ...` stays in the shell's config and would make
        # every later load fail: report it once and start from the defaults.
        ipython.configurables[:] = [c for c in ipython.configurables if not isinstance(c, TwinkleMagics)]
        ipython.config.pop("TwinkleMagics", None)
        print(f"twinkle: ignoring the TwinkleMagics settings ({exc}); using the defaults", file=sys.stderr)
        magics = TwinkleMagics(shell=ipython)
    ipython.register_magics(magics)
    session = TwinkleSession(ipython, magics)
    session.magics = magics  # type: ignore[attr-defined]
    session.start()


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext twinkle_jupyter``: remove the magic, hooks, error display and threads."""
    from .session import get_session

    session = get_session(ipython)
    if session is None:
        return
    magics = getattr(session, "magics", None)
    session.close()
    if magics is not None:
        ipython.configurables[:] = [c for c in ipython.configurables if c is not magics]
        line_magics = ipython.magics_manager.magics.get("line", {})
        bound = line_magics.get("twinkle")
        if getattr(bound, "__self__", None) is magics:
            del line_magics["twinkle"]
        registry = ipython.magics_manager.registry
        if registry.get(type(magics).__name__) is magics:
            del registry[type(magics).__name__]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    """The ``/twinkle`` dashboard, a Jupyter server extension (see ``twinkle_jupyter.dashboard``)."""
    from .dashboard import TwinkleDashboardApp

    return [{"module": "twinkle_jupyter.dashboard", "app": TwinkleDashboardApp}]
