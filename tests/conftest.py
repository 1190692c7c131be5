"""Shared test set-up: everything offline, caches and outputs in temporary folders."""

from __future__ import annotations

import os
import tempfile

# Set before twinkle, transformers or datasets are imported by any test module.
_ROOT = tempfile.mkdtemp(prefix="twinkle-tests-")
os.environ.setdefault("TWINKLE_CACHE_DIR", os.path.join(_ROOT, "cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ.setdefault("HF_HOME", os.path.join(_ROOT, "hf"))
os.environ.setdefault("MPLCONFIGDIR", os.path.join(_ROOT, "mpl"))
