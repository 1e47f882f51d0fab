"""HF-style model dirs (config.json + generation_config.json, no weights) for `load_format="dummy"`.

The shapes are the real ones, so compute and KV size match the real models; only the weight values
are vLLM's dummy ones. With `skip_tokenizer_init=True` vLLM needs nothing else in the dir; the serve CLI
benchmark (serve_bench.py) also writes a word-level tokenizer over the vocabulary (write_tokenizer).
python -m benchmarks.models [DIR]   writes all of them (default /tmp/kvr_models)
"""
import json
import os
import sys

_COMMON = dict(bos_token_id=1, eos_token_id=2, dtype="bfloat16", torch_dtype="bfloat16",
               tie_word_embeddings=False)

_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
              rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, **_COMMON)

# name -> (config, note for the report: what differs from the real checkpoint's config)
MODELS = {
    "llama3-8b": (dict(_LLAMA, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=131072,
                       bos_token_id=128000, eos_token_id=128001),
                  "Llama-3-8B shape (GQA 32q/8kv), rope_theta 5e5, 128k positions, no llama3 rope scaling"),
    "llama2-7b": (dict(_LLAMA, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, intermediate_size=11008, vocab_size=32000,
                       rope_theta=10000.0, max_position_embeddings=131072, rms_norm_eps=1e-6),
                  "Llama-2-7B shape (MHA 32 kv heads); max_position_embeddings raised 4096 -> 131072 "
                  "so long prompts are allowed"),
    "falcon-7b": (dict(architectures=["FalconForCausalLM"], model_type="falcon", hidden_size=4544,
                       num_hidden_layers=32, num_attention_heads=71, new_decoder_architecture=False,
                       multi_query=True, parallel_attn=True, alibi=False, bias=False,
                       vocab_size=65024, layer_norm_epsilon=1e-5, rope_theta=10000.0,
                       max_position_embeddings=131072, **dict(_COMMON, bos_token_id=11, eos_token_id=11)),
                  "Falcon-7B shape (multi-query, 71 heads, parallel attn); max_position_embeddings "
                  "set to 131072 (the real config has none, vLLM would assume 2048)"),
    # Models whose full weights do not fit one GPU: the TP layout's peer guest (serving.py --guest peer, issue 31)
    "llama3-70b": (dict(_LLAMA, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                        rope_theta=500000.0, max_position_embeddings=131072,
                        bos_token_id=128000, eos_token_id=128001),
                   "Llama-3-70B shape (GQA 64q/8kv, 80 layers), rope_theta 5e5, 128k positions, no llama3 rope scaling"),
    "qwen2.5-32b": (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                         hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                         intermediate_size=27648, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         max_position_embeddings=131072, use_sliding_window=False,
                         **dict(_COMMON, bos_token_id=151643, eos_token_id=151645)),
                    "Qwen2.5-32B shape (GQA 40q/8kv, 64 layers, q/k/v biases), 128k positions (the real config: 32k "
                    "without YaRN)"),
    # CPU smoke runs. head_dim 32 is given explicitly: 64/4 = 16 is not a head size vLLM's CPU attention takes.
    "tiny": (dict(_LLAMA, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=32,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=512, rope_theta=10000.0,
                  max_position_embeddings=4096),
             "tiny Llama for CPU smoke runs (hidden 64, 2 layers, 4q/2kv heads of 32, vocab 512)"),
    # CPU smoke of the `vllm serve` / `vllm bench` CLIs: `bench latency` draws prompt ids below 10000.
    "tiny-serve": (dict(_LLAMA, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=32,
                        num_key_value_heads=2, intermediate_size=128, vocab_size=16384, rope_theta=10000.0,
                        max_position_embeddings=4096),
                   "tiny Llama for CPU smoke runs of the serve CLI (hidden 64, 2 layers, 4q/2kv heads of 32, "
                   "vocab 16384)"),
}


def vocab_size(name):
    return MODELS[name][0]["vocab_size"]


def note(name):
    return MODELS[name][1]


def write_tokenizer(d, cfg):
    """A word-level fast tokenizer over the model's whole vocabulary into dir d, for `vllm serve` and
    `vllm bench serve` (text prompts) with dummy weights: token i is the word "t<i>" (bos/eos/unk are
    special tokens at the config's ids), words are split on whitespace only and decoded joined by
    spaces, so decode -> encode gives back the same ids (bench serve's random datasets rely on it)
    and a k-word prompt is k tokens. Written with `tokenizers` (tokenizer.json) and a
    tokenizer_config.json naming PreTrainedTokenizerFast, which transformers 4.x and 5.x both load."""
    from tokenizers import AddedToken, Tokenizer, decoders, models as tok_models, pre_tokenizers
    bos, eos = cfg["bos_token_id"], cfg["eos_token_id"]
    names = {0: "<unk>", bos: "<s>", eos: "</s>"}    # bos == eos (Falcon): one special token
    vocab = {names.get(i, f"t{i}"): i for i in range(cfg["vocab_size"])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)   # join with spaces, nothing else
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(names.values())])
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=names[bos], eos_token=names[eos],
                       unk_token="<unk>", add_bos_token=False, add_eos_token=False,
                       model_max_length=cfg["max_position_embeddings"]), f, indent=1)


def write_model(name, root="/tmp/kvr_models", tokenizer=False):
    """Write MODELS[name] to root/name and return that path (idempotent). tokenizer: also write the
    word-level tokenizer (write_tokenizer), for the serve CLI."""
    cfg = MODELS[name][0]
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    # Without it vLLM logs a (harmless) lookup failure; it also pins the default sampling to plain greedy-able.
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(dict(bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"]), f)
    if tokenizer:
        write_tokenizer(d, cfg)
    return d


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "/tmp/kvr_models"
    for n in MODELS:
        print(write_model(n, root))
