"""Row preprocessors and filters that ``Dataset.map`` / ``Dataset.filter`` find by name.

A preprocessor turns a batch of rows (``dict[str, list]``, column → values) into the columns
to add or replace; a filter says of one row whether to keep it.
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidArgumentError
from .registry import REGISTRY


class Preprocessor:
    """Base class: call it on a batch ``dict[str, list]``; it returns the columns to set.

    Subclasses either override ``preprocess`` (one row in, one row out) and inherit the batch
    loop, or override ``__call__`` to work on whole columns.
    """

    #: columns the input must have; checked once per batch so the error names them all
    required_columns: tuple[str, ...] = ()

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        missing = [c for c in self.required_columns if c not in batch]
        if missing:
            raise InvalidArgumentError(
                f"{type(self).__name__} needs column(s) {', '.join(missing)}; "
                f"the data has {', '.join(batch) or 'none'}"
            )
        columns = list(batch)
        n = len(batch[columns[0]]) if columns else 0
        out: dict[str, list] = {}
        for i in range(n):
            row = self.preprocess({c: batch[c][i] for c in columns})
            for key, value in row.items():
                out.setdefault(key, []).append(value)
        return out

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        """Turn one row into the columns to set on it."""
        raise NotImplementedError(f"{type(self).__name__} must implement preprocess() or __call__()")


@REGISTRY.register("preprocessor")
class SelfCognitionProcessor(Preprocessor):
    """Fills a self-cognition row's ``{{NAME}}`` / ``{{AUTHOR}}`` and builds its ``messages``.

    Output columns: ``query`` and ``response`` with the placeholders replaced, and
    ``messages``: an optional system turn, the user's query and the assistant's response.
    """

    required_columns = ("query", "response")

    def __init__(
        self, model_name: str = "twinkle robot", model_author: str = "twinkle lab", system: str | None = None
    ):
        for label, value in (("model_name", model_name), ("model_author", model_author)):
            if not isinstance(value, str) or not value:
                raise InvalidArgumentError(f"{label} must be a non-empty string, got {value!r}")
        if system is not None and not isinstance(system, str):
            raise InvalidArgumentError(f"system must be a string or None, got {system!r}")
        self.model_name = model_name
        self.model_author = model_author
        self.system = system

    def fill(self, text: str) -> str:
        """``text`` with the placeholders replaced by this model's name and author."""
        return text.replace("{{NAME}}", self.model_name).replace("{{AUTHOR}}", self.model_author)

    def preprocess(self, row: dict[str, Any]) -> dict[str, Any]:
        query, response = self.fill(str(row["query"])), self.fill(str(row["response"]))
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
        return {"query": query, "response": response, "messages": messages}


class Filter:
    """Base class of named filters: ``filter(row) -> bool``, ``True`` keeps the row."""

    def __call__(self, row: dict[str, Any]) -> bool:
        raise NotImplementedError


@REGISTRY.register("filter")
class LengthFilter(Filter):
    """Keeps encoded rows whose ``length`` is at most ``max_length`` tokens (run after ``encode``)."""

    def __init__(self, max_length: int) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise InvalidArgumentError(f"max_length must be a positive int, got {max_length!r}")
        self.max_length = max_length

    def __call__(self, row: dict[str, Any]) -> bool:
        if "length" not in row:
            raise InvalidArgumentError("LengthFilter needs a 'length' column; call encode() first")
        return row["length"] <= self.max_length


@REGISTRY.register("filter")
class LanguageFilter(Filter):
    """Keeps rows whose ``lang`` column is ``lang`` (or one of a list of languages)."""

    def __init__(self, lang: str | list[str]) -> None:
        langs = [lang] if isinstance(lang, str) else lang
        if not isinstance(langs, list | tuple) or not langs or not all(isinstance(x, str) for x in langs):
            raise InvalidArgumentError(f"lang must be a string or a list of strings, got {lang!r}")
        self.langs = frozenset(langs)

    def __call__(self, row: dict[str, Any]) -> bool:
        if "lang" not in row:
            raise InvalidArgumentError("LanguageFilter needs a 'lang' column")
        return row["lang"] in self.langs
