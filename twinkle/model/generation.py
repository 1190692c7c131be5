"""Batched generation with a KV cache: the decoding loop behind ``sample``.

Prompts are left-padded into one batch; each sequence draws from its own ``torch.Generator``
(seeded from ``SamplingParams.seed`` and its index), never from torch's global RNG that
other tenants share, so a seeded call returns the same tokens whatever else the server does.
Log-probabilities are those of the model itself (float32 log-softmax of its logits), before
temperature, top-k or top-p reshape the distribution that tokens are drawn from.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..protocol.sampling import SampledSequence, SampleResponse, SamplingParams

Forward = Callable[..., Any]
"""The model's forward: ``(input_ids, attention_mask, position_ids, <cache keyword>, use_cache,
logits_to_keep) -> output with .logits``."""


def cache_keyword(model_class: type) -> str:
    """What the model's forward calls its KV cache (``cache`` in newer transformers)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


DECODE_STEPS_PER_TURN = 16
"""Tokens a ``Generation`` decodes per ``advance`` on a server: between two advances the device
serves other users' calls, so a long generation never holds it for long."""


class Generation:
    """``num_samples`` sequences after each prompt, generated in one batch, a few tokens per
    ``advance`` (the first also reads the prompts). Run it inside the model's generation
    context (``MultiLoraTransformersModel`` does)."""

    def __init__(
        self,
        forward: Forward,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        num_samples: int,
        *,
        device: torch.device,
        pad_token_id: int,
        stop_token_ids: set[int],
        decode: Callable[[list[int]], str],
        new_cache: Callable[[], Any],
        cache_kw: str = "past_key_values",
    ) -> None:
        self.forward, self.params, self.num_samples = forward, params, num_samples
        self.prompts = [list(p) for p in prompts]
        self.device, self.pad, self.decode = device, pad_token_id, decode
        self.new_cache, self.cache_kw = new_cache, cache_kw
        self.rows = [p for p in self.prompts for _ in range(num_samples)]
        n = len(self.rows)
        self.stop_ids = stop_token_ids | {s for s in params.stop if isinstance(s, int)}
        self.stop_strings = [s for s in params.stop if isinstance(s, str)]
        self.generators = _generators(n, params.seed, device)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.reasons: list[str | None] = [None] * n
        self.texts: list[str | None] = [None] * n
        self.prompt_lp: list[list[float | None]] | None = None
        self.done = False
        self._steps = 0
        self._cache: Any = None
        self._logits: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._last: torch.Tensor | None = None

    def advance(self, steps: int | None = None) -> bool:
        """Decode up to ``steps`` more tokens per sequence (all of them: None); True when done."""
        if self.done:
            return True
        if self._logits is None:
            self._prefill()
        left = self.params.max_tokens - self._steps if steps is None else steps
        while left > 0 and not self.done:
            self._decode_one()
            left -= 1
        return self.done

    def close(self) -> None:
        """Free the KV cache (a generation given up half way)."""
        self._cache = self._logits = self._mask = self._last = None

    def result(self) -> list[SampleResponse]:
        assert self.done, "the generation has not finished"
        k = self.num_samples
        sequences = [
            SampledSequence(
                tokens=self.tokens[r],
                logprobs=self.logprobs[r],
                decoded=self.texts[r] if self.texts[r] is not None else self.decode(self.tokens[r]),
                stop_reason=self.reasons[r] or "length",
            )
            for r in range(len(self.rows))
        ]
        return [
            SampleResponse(
                sequences=sequences[i * k:(i + 1) * k],
                prompt_tokens=list(prompt),
                prompt_logprobs=None if self.prompt_lp is None else self.prompt_lp[i * k],
            )
            for i, prompt in enumerate(self.prompts)
        ]

    def _prefill(self) -> None:
        n, width = len(self.rows), max(len(p) for p in self.rows)
        ids = torch.full((n, width), self.pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, prompt in enumerate(self.rows):
            ids[r, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[r, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self._cache = self.new_cache()
        out = self.forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                           logits_to_keep=0 if self.params.prompt_logprobs else 1, **{self.cache_kw: self._cache})
        if self.params.prompt_logprobs:
            self.prompt_lp = _prompt_logprobs(out.logits, ids, [len(p) for p in self.rows])
        self._logits = out.logits[:, -1].float()
        self._mask, self._last = mask, positions[:, -1:]

    def _decode_one(self) -> None:
        assert self._logits is not None and self._mask is not None and self._last is not None
        n = len(self.rows)
        chosen = _choose(self._logits, self.params, self.generators)
        lp = torch.log_softmax(self._logits, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
        picked = chosen.tolist()
        for r in range(n):
            if self.reasons[r] is not None:
                continue
            self.tokens[r].append(picked[r])
            self.logprobs[r].append(lp[r])
            if picked[r] in self.stop_ids:
                self.reasons[r] = "stop"
            elif self.stop_strings:
                # A trailing U+FFFD may be a character whose bytes have not all come yet.
                text = self.decode(self.tokens[r]).rstrip("\ufffd")
                cut = min((i for i in (text.find(s) for s in self.stop_strings) if i >= 0), default=-1)
                if cut >= 0:
                    self.reasons[r], self.texts[r] = "stop", text[:cut]
        self._steps += 1
        if self._steps >= self.params.max_tokens or all(reason is not None for reason in self.reasons):
            self.done = True
            self.close()
            return
        step = torch.tensor([[t if self.reasons[r] is None else self.pad] for r, t in enumerate(picked)],
                            dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, torch.ones((n, 1), dtype=self._mask.dtype, device=self.device)], dim=1)
        self._last = self._last + 1
        out = self.forward(input_ids=step, attention_mask=self._mask, position_ids=self._last, use_cache=True,
                           logits_to_keep=1, **{self.cache_kw: self._cache})
        self._logits = out.logits[:, -1].float()


def _generators(n: int, seed: int | None, device: torch.device) -> list[torch.Generator]:
    """One generator per sequence, seeded from ``(seed, i)`` by a mixing hash: calls with
    neighbouring seeds (``seed=step`` in a loop) share no sequence's stream."""
    base = seed if seed is not None else secrets.randbits(62)
    out = []
    for i in range(n):
        g = torch.Generator(device=device)
        g.manual_seed(_mix(base, i))
        out.append(g)
    return out


def _mix(seed: int, index: int) -> int:
    """splitmix64 of the pair: a well-spread 63-bit seed."""
    mask = 2**64 - 1
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xD1B54A32D192ED03) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) >> 1


def _choose(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """The next token of each row: greedy at temperature 0, else drawn after top-k and top-p."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.shape[-1]:
        # Exactly k tokens (ties at the k-th score, common in bf16, do not widen the cut).
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(1, torch.topk(scores, params.top_k, dim=-1).indices,
                                                                   True)
        scores = scores.masked_fill(~keep, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        # Drop a token when the ones before it already reach top_p (the first one always stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(1, order, ordered)
    probs = torch.softmax(scores, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        from ..errors import InvalidArgumentError

        raise InvalidArgumentError("the model's next-token scores are not finite at this temperature; raise it")
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


def _prompt_logprobs(logits: torch.Tensor, ids: torch.Tensor, lengths: list[int]) -> list[list[float | None]]:
    width = ids.shape[1]
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None])[:, :, 0]
    out: list[list[float | None]] = []
    for r, n in enumerate(lengths):
        values = lp[r, width - n:].tolist() if n > 1 else []
        out.append([None, *values])
    return out


def prompts_of(inputs: Any, encode: Callable[[list[dict[str, Any]]], list[int]], vocab_size: int,
               max_length: int, why: str = "") -> list[list[int]]:
    """The token ids of each prompt in ``inputs``: one conversation, one token list, a dataset
    row with ``messages`` or ``input_ids``, or a list of any of these."""
    from ..errors import InvalidArgumentError
    from ..protocol.limits import MAX_SAMPLE_SEQUENCES

    def one(item: Any) -> list[int]:
        if isinstance(item, dict):
            if "input_ids" in item:
                return one(list(item["input_ids"]))
            if "messages" in item:
                return one(list(item["messages"]))
            raise InvalidArgumentError("a prompt dict needs 'messages' or 'input_ids'")
        if isinstance(item, list | tuple) and item and all(isinstance(m, dict) for m in item):
            ids = encode(list(item))
        elif isinstance(item, list | tuple) and item and all(type(t) is int for t in item):
            ids = list(item)
        else:
            raise InvalidArgumentError(
                "each prompt must be a conversation (a list of {'role', 'content'} dicts) or a list of token ids"
            )
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidArgumentError(f"prompt contains token id {bad[0]}, outside the vocabulary of {vocab_size}")
        if len(ids) > max_length:
            raise InvalidArgumentError(f"prompt has {len(ids)} tokens; at most {max_length} fit{why}")
        return ids

    if hasattr(inputs, "tolist"):
        inputs = inputs.tolist()
    single = isinstance(inputs, dict) or (
        isinstance(inputs, list | tuple) and bool(inputs) and
        (all(isinstance(m, dict) and "role" in m for m in inputs) or all(type(t) is int for t in inputs))
    )
    if single:
        return [one(inputs)]
    if not isinstance(inputs, list | tuple) or not inputs:
        raise InvalidArgumentError(
            "inputs must be a conversation, a list of token ids, or a non-empty list of either"
        )
    if len(inputs) > MAX_SAMPLE_SEQUENCES:
        raise InvalidArgumentError(f"{len(inputs)} prompts in one call; at most {MAX_SAMPLE_SEQUENCES}")
    return [one(list(p) if isinstance(p, tuple) else p) for p in inputs]
