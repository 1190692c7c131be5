"""What sampling takes and returns. Plain pydantic models: the same objects travel over the wire."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .limits import MAX_SAMPLE_TOKENS, MAX_STOP_SEQUENCES

StopReason = Literal["stop", "length"]
MIN_TEMPERATURE = 1e-3
"""The smallest temperature above 0 (below it, float32 logits overflow when divided)."""


class SamplingParams(BaseModel):
    """How to sample. A dict with these keys is accepted wherever a ``SamplingParams`` is.

    ``temperature=0`` is greedy decoding (``top_p``, ``top_k`` and ``seed`` then do nothing).
    ``stop`` ends a sequence at any of these strings or token ids (the end-of-turn and
    end-of-text tokens always stop it). ``seed`` makes temperature sampling reproducible: the
    same call with the same seed returns the same tokens (each sequence of a call draws from
    its own generator, seeded from ``seed`` and its index). ``prompt_logprobs`` also returns
    each prompt token's log-probability under the model.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(64, ge=1, le=MAX_SAMPLE_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    """0: no top-k cut."""
    stop: list[str | int] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=0, lt=2**63)
    prompt_logprobs: bool = False

    @field_validator("temperature")
    @classmethod
    def _check_temperature(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str | int) and not isinstance(value, bool):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str | int]) -> list[str | int]:
        for item in value:
            if isinstance(item, str) and not 0 < len(item) <= 256:
                raise ValueError("a stop string must have 1 to 256 characters")
            if isinstance(item, int) and item < 0:
                raise ValueError(f"a stop token id must be >= 0, got {item}")
        return value


def sampling_params(value: Any) -> SamplingParams:
    """``value`` (None, a ``SamplingParams`` or a dict) as ``SamplingParams``; anything else, or
    a bad field, is an ``InvalidArgumentError`` naming the field, on one line."""
    from pydantic import ValidationError

    from .errors import InvalidArgumentError

    if value is None:
        return SamplingParams()
    if isinstance(value, SamplingParams):
        return value
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"sampling_params must be a SamplingParams or a dict, got {type(value).__name__}")
    try:
        return SamplingParams(**value)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidArgumentError(f"sampling_params{'.' + where if where else ''}: {err['msg']}") from None


class SampledSequence(BaseModel):
    """One generated sequence: its tokens, their log-probabilities, its text and why it ended.

    ``tokens`` include the token that ended the sequence (an end-of-turn token or the one
    completing a stop string); ``decoded`` leaves out special tokens and a stop string.
    ``logprobs[i]`` is ``log p(tokens[i] | prompt, tokens[:i])`` under the model itself
    (before temperature, top-p or top-k).
    """

    tokens: list[int]
    logprobs: list[float]
    decoded: str
    stop_reason: StopReason

    def __str__(self) -> str:
        return self.decoded


class SampleResponse(BaseModel):
    """The samples of one input: ``num_samples`` sequences after the same prompt."""

    sequences: list[SampledSequence]
    prompt_tokens: list[int]
    """The prompt as the model saw it (the chat template applied)."""
    prompt_logprobs: list[float | None] | None = None
    """With ``prompt_logprobs=True``: each prompt token's log-probability (None for the first)."""

    def __str__(self) -> str:
        return self.sequences[0].decoded if len(self.sequences) == 1 else str([s.decoded for s in self.sequences])
