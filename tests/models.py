"""Small models for tests and the demo, made or unpacked locally (no hub)."""
from __future__ import annotations

import json
import os
from pathlib import Path

CACHE = Path(os.environ.get("KVR_MODEL_CACHE", Path(__file__).resolve().parent.parent / ".models"))


def tiny_llama(path: Path | None = None, *, layers: int = 2, seed: int = 0) -> str:
    """A random tiny Llama (fp32 weights) saved with transformers; cached on disk."""
    path = Path(path or CACHE / f"tiny-llama-h128-l{layers}-s{seed}")
    if (path / "config.json").exists():
        return str(path)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1,  # GQA, head_dim 64 (CPU kernels)
                      max_position_embeddings=8192,
                      rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init: logits far from ties
        for p in model.parameters():
            p.normal_(0, 0.1)
    tmp = path.with_suffix(".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(path)
    return str(path)
