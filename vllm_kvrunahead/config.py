"""KV-Runahead settings: one frozen dataclass, one clear error per bad value.

A vLLM user turns KV-Runahead on with two things:
  --worker-cls vllm_kvrunahead.Worker  --tensor-parallel-size N         (TP layout: every GPU decodes)
  --worker-cls vllm_kvrunahead.Worker  --prefill-context-parallel-size N  (chain of copies: the head decodes)
and may tune it with --additional-config '{"kv_runahead": {...}}' (keys below).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

ADDITIONAL_CONFIG_KEY = "kv_runahead"
WORKER_CLS_PREFIX = "vllm_kvrunahead"
# auto: the shipped table for this model shape, N and GPU, else the cost model ("model");
# even; table: the lookup table at table_path.
PARTITIONS = ("auto", "model", "even", "table")
# Who decodes and holds the KV (set by the flags, see patches/config_hook.py): "tp", vLLM's TP=N model on
# every GPU, each holding its KV heads (docs/decode-design.md); "head", the last worker of a chain of
# full-model copies, each holding every head.
DECODES = ("tp", "head")


@dataclass(frozen=True)
class KVRunaheadConfig:
    # Number of chained workers (one GPU each, each with the whole model).
    num_workers: int = 1
    # How prompts are cut: auto | model | even | table (see PARTITIONS).
    partition: str = "auto"
    # Which prefill chunks run ahead. None: those the cost model predicts finish sooner on the
    # chain than on the head alone (per N; ~1.1k tokens at N=2, ~2.3k at N=4 for Llama-3-8B).
    # An int: chunks of at least that many new tokens.
    min_tokens: int | None = None
    # Lookup table JSON for partition="table" (its n_workers must match).
    table_path: str | None = None
    # Bound on every chain receive on CPU (gloo); a dead or stalled peer then
    # fails the step with an error instead of hanging.
    recv_timeout_s: float = 300.0
    # Time runahead steps per worker (forward, stalls on the chain): kvr_stats()["profile"].
    # Costs one event sync per runahead step on GPUs, so off by default.
    profile: bool = False
    # Online refinement: after each long prefill, nudge the split toward equal per-worker
    # busy times (bounded, logged). Implies profile's timing and one tiny gloo all-gather
    # per runahead step, so off by default.
    refine: bool = False
    # Tokens every step may take; a step takes more, up to max_num_batched_tokens, only for the work
    # running plus the first prompt in line (one long prompt in one step, several one after another).
    # None: a fixed budget. Set to vLLM's default budget when --max-num-batched-tokens is not given.
    step_budget: int | None = None
    # Send each layer's KV on at the layer's attention entry (its K and V are already in the cache
    # there) instead of after its attention, so a successor waits for this layer's QKV projection
    # only, not its attention and MLP. Not yet measured on a GPU, so off by default.
    early_send: bool = False
    # Set by the flags: "tp" with --tensor-parallel-size N, "head" with --prefill-context-parallel-size N.
    decode: str = "head"

    def validate(self) -> "KVRunaheadConfig":
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(
                f"KV-Runahead: number of workers must be an integer >= 1, got {self.num_workers!r} "
                "(set --prefill-context-parallel-size N)")
        if self.partition not in PARTITIONS:
            raise ValueError(
                f"KV-Runahead: unknown partition {self.partition!r}; choose one of {', '.join(PARTITIONS)} "
                "(--additional-config '{\"kv_runahead\": {\"partition\": ...}}')")
        if self.partition == "table" and not self.table_path:
            raise ValueError('KV-Runahead: partition "table" needs "table_path" (a lookup table JSON)')
        if self.table_path and self.partition != "table":
            raise ValueError(f'KV-Runahead: "table_path" is used only with partition "table", '
                             f'not {self.partition!r}; set "partition": "table" or drop "table_path"')
        if self.min_tokens is not None and (isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int)
                                            or self.min_tokens < 0):
            raise ValueError(f"KV-Runahead: min_tokens must be an integer >= 0 (or null: the cost model "
                             f"decides), got {self.min_tokens!r}")
        if not isinstance(self.recv_timeout_s, (int, float)) or self.recv_timeout_s <= 0:
            raise ValueError(f"KV-Runahead: recv_timeout_s must be > 0, got {self.recv_timeout_s!r}")
        if self.step_budget is not None and (isinstance(self.step_budget, bool) or not isinstance(self.step_budget, int)
                                             or self.step_budget < 1):
            raise ValueError(f"KV-Runahead: step_budget must be an integer >= 1 (or null: a fixed step budget), "
                             f"got {self.step_budget!r}")
        if self.decode not in DECODES:
            raise ValueError(f"KV-Runahead: decode must be one of {', '.join(DECODES)}, got {self.decode!r}")
        for name in ("profile", "refine", "early_send"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KV-Runahead: {name} must be true or false, got {getattr(self, name)!r}")
        return self

    @classmethod
    def from_dict(cls, num_workers: int, options: Any, decode: str = "head") -> "KVRunaheadConfig":
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ValueError(f'KV-Runahead: additional_config["{ADDITIONAL_CONFIG_KEY}"] must be an object, got {options!r}')
        known = {f.name for f in fields(cls)} - {"num_workers", "decode"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"KV-Runahead: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if options.get("partition") == "balanced":   # the cost model's other name, still in users' configs
            options = {**options, "partition": "model"}
        return cls(num_workers=num_workers, decode=decode, **options).validate()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def chain_options(vllm_config) -> dict | None:
    """KV-Runahead's converted options when this engine runs a chain of >= 2 full-model workers (stages)
    beside vLLM's own parallel layout, else None (one worker, or TP layout: vLLM's plain TP=N)."""
    options = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if not isinstance(options, dict) or options.get("decode", "head") != "head":
        return None
    return options if options.get("num_workers", 1) >= 2 else None


def runahead_options(vllm_config) -> dict | None:
    """KV-Runahead's converted options when prompts run ahead on >= 2 workers, in either mode, else None."""
    options = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    return options if isinstance(options, dict) and options.get("num_workers", 1) >= 2 else None


def is_kvrunahead_worker(worker_cls: Any) -> bool:
    """vllm_kvrunahead.Worker, or a user's subclass of it (given as a class or "module.Class")."""
    if isinstance(worker_cls, str):
        if worker_cls.split(".")[0] == WORKER_CLS_PREFIX:
            return True
        if worker_cls == "auto" or "." not in worker_cls:
            return False
        import importlib

        module, _, name = worker_cls.rpartition(".")
        try:
            worker_cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return False  # vLLM reports a bad --worker-cls itself
    return isinstance(worker_cls, type) and getattr(worker_cls, "_kvrunahead_worker", False)
