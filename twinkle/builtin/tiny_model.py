"""``builtin://tiny-qwen2``: a tiny Qwen2-architecture chat model made on this machine.

The weights are random from a fixed seed, the tokenizer is byte-level (every UTF-8 byte is
one token, plus the ChatML specials) and the chat template is ChatML, as in Qwen2. Being
deterministic, two processes that build it get bit-identical weights, which is what lets a
remote run be compared number for number with a local one.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..paths import atomic_directory, cache_dir

NAME = "tiny-qwen2"
VERSION = 2
EMBED_STD = 0.07
SEED = 20240601
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=10000.0,
)


def tiny_model_dir() -> Path:
    """The folder holding the built-in model, built on first use."""
    target = cache_dir() / "builtin" / f"{NAME}-v{VERSION}"
    if not (target / "config.json").exists():
        with atomic_directory(target) as tmp:
            _build(tmp)
    return target


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=CONFIG["max_position_embeddings"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _build(folder: Path) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = _build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config)
        # Frozen, tiny-std embeddings would cap the logits near zero (the final norm bounds the
        # hidden state), leaving LoRA nothing to learn with; wider embeddings make it trainable.
        torch.nn.init.normal_(model.get_input_embeddings().weight, std=EMBED_STD)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "twinkle_builtin.json").write_text(json.dumps({"name": NAME, "version": VERSION, "seed": SEED}))
