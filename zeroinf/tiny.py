"""Tiny Hugging Face checkpoints made locally by transformers itself (random init).

Used by the tests (parity oracle: transformers on the same weights), by the README's main job
(the embedded default model) and by `zeroinf-bench` tiny shapes. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# Small but not degenerate: odd sizes, GQA where the family has it, >= 3 layers.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=384,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "mistral": dict(
        vocab_size=384,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=None,
    ),
    "qwen2": dict(
        vocab_size=384,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_sliding_window=False,
    ),
    "opt": dict(
        vocab_size=384,
        hidden_size=96,
        ffn_dim=200,
        num_hidden_layers=3,
        num_attention_heads=6,
        max_position_embeddings=256,
        word_embed_proj_dim=96,
    ),
    "mixtral": dict(
        vocab_size=384,
        hidden_size=96,
        intermediate_size=120,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=None,
    ),
    "gpt_neox": dict(
        vocab_size=384,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=3,
        num_attention_heads=6,
        max_position_embeddings=256,
        rotary_pct=0.5,
    ),
}

_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "opt": "OPTConfig",
    "mixtral": "MixtralConfig",
    "gpt_neox": "GPTNeoXConfig",
}


def tiny_hf_model(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised transformers CausalLM of the tiny shape, in float32, eval mode."""
    import transformers

    cfg_cls = getattr(transformers, _CONFIG_CLASSES[model_type])
    kwargs = {**TINY_CONFIGS[model_type], **overrides}
    config = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    # Random init leaves some norms at exactly 1 and biases at 0; perturb every parameter so a
    # wrong mapping of any tensor shows up in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def save_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over a made-up vocabulary, saved as tokenizer.json with its
    special tokens, loadable by transformers.AutoTokenizer (local files only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(folder)


def tiny_prompts(
    vocab: int, pads: tuple[int, ...] = (0, 2, 5), width: int = 7, seed: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch for tests: ids [len(pads), width] drawn from 4..vocab-1 and an
    attention mask with pads[i] leading zeros in row i."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(pads), width), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return ids, mask


def save_tiny_hf(
    folder: str | Path,
    model_type: str = "llama",
    seed: int = 0,
    max_shard_size: str | None = None,
    safe_serialization: bool = True,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **overrides: Any,
) -> torch.nn.Module:
    """Save a tiny random checkpoint (config.json + weights [+ tokenizer]) and return the model."""
    folder = Path(folder)
    model = tiny_hf_model(model_type, seed, **overrides)
    kwargs: dict[str, Any] = {"safe_serialization": safe_serialization}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.to(dtype).save_pretrained(folder, **kwargs)
    model.to(torch.float32)
    if tokenizer:
        save_tiny_tokenizer(folder, model.config.vocab_size)
        gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
        (folder / "generation_config.json").write_text(json.dumps(gen))
    return model
