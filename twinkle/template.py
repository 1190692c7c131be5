"""``Template``: turns a chat conversation into ``input_ids`` and ``labels`` for training.

The tokenizer's own chat template renders the conversation, so the tokens match what the
model sees at inference. Only the assistant's answers are learnt: every other position of
``labels`` is ``-100`` (ignored by the loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import hub
from .errors import InvalidArgumentError, NotFoundError, first_line
from .registry import REGISTRY

IGNORE_INDEX = -100
TRUNCATION_STRATEGIES = ("raise", "right", "left", "delete")
ROLES = ("system", "user", "assistant", "tool")

# For tokenizers of base models, which ship no chat template (use_chat_template=False). The
# assistant turn ends with the eos token so that the model learns to stop.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- 'Assistant:\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- else %}{{- message['role'] | capitalize + ':\\n' + message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Assistant:\\n' }}{%- endif %}"
)


@REGISTRY.register("template")
class Template:
    """Encodes conversations for one model's tokenizer.

    Args:
        model_id: whose tokenizer to use (``builtin://tiny-qwen2``, ``ms://...``, a folder, ...).
        max_length: the most tokens a sample may have.
        truncation_strategy: what to do with a longer sample: ``'raise'`` an error, keep the
            first (``'right'``) or last (``'left'``) ``max_length`` tokens, or ``'delete'`` it.
        default_system: a system prompt put first in conversations that have none.
        use_chat_template: render with the tokenizer's chat template; ``False`` uses a plain
            ``Role:\\ncontent`` format instead (for base models without a chat template).
    """

    def __init__(
        self,
        model_id: str,
        max_length: int = 8192,
        truncation_strategy: str = "raise",
        default_system: str | None = None,
        use_chat_template: bool = True,
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise InvalidArgumentError(f"max_length must be a positive int, got {max_length!r}")
        if truncation_strategy not in TRUNCATION_STRATEGIES:
            raise InvalidArgumentError(
                f"unknown truncation_strategy {truncation_strategy!r}; use one of "
                + ", ".join(repr(s) for s in TRUNCATION_STRATEGIES)
            )
        if default_system is not None and not isinstance(default_system, str):
            raise InvalidArgumentError(f"default_system must be a string or None, got {default_system!r}")
        self.model_id = model_id
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.default_system = default_system
        self.use_chat_template = bool(use_chat_template)
        self.tokenizer = _load_tokenizer(model_id)
        if self.use_chat_template:
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidArgumentError(
                    f"the tokenizer of {model_id!r} has no chat template; pass use_chat_template=False"
                )
            self._chat_template: str | None = None
        else:
            self._chat_template = PLAIN_CHAT_TEMPLATE
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int | None = pad if pad is not None else self.tokenizer.eos_token_id
        self._special_ids = set(self.tokenizer.all_special_ids)

    def __repr__(self) -> str:
        return (
            f"Template(model_id={self.model_id!r}, max_length={self.max_length}, "
            f"truncation_strategy={self.truncation_strategy!r})"
        )

    def encode(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> dict | None:
        """Tokenize one conversation.

        Returns ``{'input_ids', 'labels', 'length'}``, where ``labels`` copies the tokens of
        each assistant answer (its text and the end-of-turn token that closes it) and is
        ``-100`` elsewhere. Returns ``None`` when the sample is too long and the strategy is
        ``'delete'``. With ``add_generation_prompt`` the prompt for a new assistant turn is
        appended (for generation) and an assistant turn is not required.
        """
        messages = self._normalise(messages)
        if not add_generation_prompt and not any(m["role"] == "assistant" for m in messages):
            raise InvalidArgumentError("conversation has no assistant turn to train on")
        input_ids = self._tokens(messages, add_generation_prompt)
        labels = [IGNORE_INDEX] * len(input_ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end = self._assistant_span(messages, i, input_ids)
            labels[start:end] = input_ids[start:end]
        if len(input_ids) > self.max_length:
            n = len(input_ids)
            if self.truncation_strategy == "raise":
                raise InvalidArgumentError(
                    f"sample has {n} tokens, more than max_length={self.max_length} "
                    "(truncation_strategy='raise')"
                )
            if self.truncation_strategy == "delete":
                return None
            if self.truncation_strategy == "right":
                input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
            else:
                input_ids, labels = input_ids[n - self.max_length :], labels[n - self.max_length :]
        return {"input_ids": input_ids, "labels": labels, "length": len(input_ids)}

    def _normalise(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
            raise InvalidArgumentError("messages must be a non-empty list of {'role', 'content'} dicts")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping):
                raise InvalidArgumentError(f"message {i} must be a dict, got {type(m).__name__}")
            # Arrow stores a list of structs, so keys missing from one message come back as
            # None; chat templates test for presence, not for None, so drop them.
            m = {k: v for k, v in m.items() if v is not None}
            if m.get("role") not in ROLES:
                raise InvalidArgumentError(
                    f"message {i} has role {m.get('role')!r}; use one of {', '.join(ROLES)}"
                )
            if not isinstance(m.get("content"), str):
                raise InvalidArgumentError(f"message {i} ({m['role']}) needs a string 'content'")
            out.append(m)
        if self.default_system is not None and out[0]["role"] != "system":
            out.insert(0, {"role": "system", "content": self.default_system})
        return out

    def _tokens(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        from jinja2 import TemplateError

        try:
            out = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self._chat_template,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
        except TemplateError as exc:  # the template's own raise_exception(...), e.g. bad role order
            raise InvalidArgumentError(
                f"chat template of {self.model_id!r} rejected the conversation: {exc}"
            ) from None
        # transformers 4.x returns a list; 5.x returns a BatchEncoding unless return_dict=False,
        # and some versions ignore that flag. Accept every shape.
        if isinstance(out, Mapping):
            out = out["input_ids"]
        if hasattr(out, "tolist"):
            out = out.tolist()
        if out and isinstance(out[0], list):  # a batch of one
            out = out[0]
        return [int(t) for t in out]

    def _assistant_span(
        self, messages: list[dict[str, Any]], i: int, input_ids: list[int]
    ) -> tuple[int, int]:
        """Where assistant turn ``i`` sits in ``input_ids``, found by rendering token prefixes."""
        prompt = self._tokens(messages[:i], add_generation_prompt=True)
        through = self._tokens(messages[: i + 1], add_generation_prompt=False)
        if through[: len(prompt)] != prompt or input_ids[: len(through)] != through:
            raise InvalidArgumentError(
                f"cannot locate assistant turn {i}: the chat template of {self.model_id!r} renders the "
                "conversation differently once later turns are added (token prefixes do not match)"
            )
        start, end = len(prompt), len(through)
        # Keep the end-of-turn token but not the separator after it (ChatML's '\n' after <|im_end|>):
        # the model should learn to stop, not to start the next turn.
        k = end
        while (
            k > start
            and through[k - 1] not in self._special_ids
            and not self.tokenizer.decode([through[k - 1]]).strip()
        ):
            k -= 1
        if k > start and through[k - 1] in self._special_ids:
            end = k
        return start, end


def _load_tokenizer(model_id: str) -> Any:
    from transformers import AutoTokenizer

    # Inside hub.hub_credentials the download is the user's (their token, or anonymous); the
    # tokenizer is then read from the local folder only.
    folder = hub.resolve_model_dir(model_id)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        # The reason may quote the folder, a path on this machine: never shown to the caller.
        reason = hub.hide_paths(first_line(exc).replace(str(folder), "<model folder>"))
        raise NotFoundError(f"no usable tokenizer for {model_id!r} ({reason})") from exc
