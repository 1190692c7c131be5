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


def generate(
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
) -> list[SampleResponse]:
    """``num_samples`` sequences after each prompt, in one batch."""
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    n, width = len(rows), max(len(p) for p in rows)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, prompt in enumerate(rows):
        ids[r, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[r, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = new_cache()
    out = forward(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                  logits_to_keep=0 if params.prompt_logprobs else 1, **{cache_kw: cache})
    prompt_lp = _prompt_logprobs(out.logits, ids, [len(p) for p in rows]) if params.prompt_logprobs else None
    logits = out.logits[:, -1].float()
    del out

    generators = _generators(n, params.seed, device)
    stop_ids = stop_token_ids | {s for s in params.stop if isinstance(s, int)}
    stop_strings = [s for s in params.stop if isinstance(s, str)]
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    texts: list[str | None] = [None] * n
    last = positions[:, -1:]
    for t in range(params.max_tokens):
        chosen = _choose(logits, params, generators)
        lp = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
        picked = chosen.tolist()
        for r in range(n):
            if reasons[r] is not None:
                continue
            tokens[r].append(picked[r])
            logprobs[r].append(lp[r])
            if picked[r] in stop_ids:
                reasons[r] = "stop"
            elif stop_strings:
                # A trailing U+FFFD may be a character whose bytes have not all come yet.
                text = decode(tokens[r]).rstrip("\ufffd")
                cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
                if cut >= 0:
                    reasons[r], texts[r] = "stop", text[:cut]
        if t == params.max_tokens - 1 or all(reason is not None for reason in reasons):
            break
        step = torch.tensor([[t if reasons[r] is None else pad_token_id] for r, t in enumerate(picked)],
                            dtype=torch.long, device=device)
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        last = last + 1
        out = forward(input_ids=step, attention_mask=mask, position_ids=last, use_cache=True,
                      logits_to_keep=1, **{cache_kw: cache})
        logits = out.logits[:, -1].float()
        del out

    sequences = [
        SampledSequence(
            tokens=tokens[r],
            logprobs=logprobs[r],
            decoded=texts[r] if texts[r] is not None else decode(tokens[r]),
            stop_reason=reasons[r] or "length",
        )
        for r in range(n)
    ]
    return [
        SampleResponse(
            sequences=sequences[i * num_samples:(i + 1) * num_samples],
            prompt_tokens=list(prompt),
            prompt_logprobs=None if prompt_lp is None else prompt_lp[i * num_samples],
        )
        for i, prompt in enumerate(prompts)
    ]


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
