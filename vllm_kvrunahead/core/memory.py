"""One GPU's memory in the TP layout, planned from the model's shape before any worker loads weights (pure).

Every rank holds vLLM's 1/N shard of the weights and its guest's weights (``kv_runahead.guest``: "full", the
whole model; "peer", a ring of ``PEER_LAYERS`` one-layer slots it gathers each decoder layer into from the N
ranks' TP shards, plus the embedding and the norms: ``guest_weight_bytes``), the guest's scratch KV
(two regions of max(max_model_len, step budget) tokens), both models' activation peaks at the step budget
(counted in full, as ``GuestHost.kv_bytes_left`` does), the TP layout's comm buffers in flight (``tp_order.comm_buffer_bytes``) and vLLM's own extras; KV gets
the rest. vLLM measures its part when the workers start; this estimate exists to refuse, with numbers,
a model that cannot fit, before minutes of loading end in an out-of-memory error
(``vllm_side/patches/config_hook.py``), and to log the plan. Figures are estimates (est.): the
activation peak is fitted to the guest's measured peaks on one H200 (Llama-3-8B: 1.10 / 1.78 / 6.84 GiB at
8k / 16k / 64k-token budgets, ``benchmarks/results/gpu_smoke/guest_segments/``), about 4 x intermediate x
dtype bytes per budget token (the MLP's gate/up output and its activation) plus 0.25 GiB; vLLM's TP shard
computes 1/N of the MLP. On that H200 the plan gives 2-3% fewer KV tokens than vLLM then had.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import FULL_GUEST, PEER_GUEST
from .partition import ModelShape, layer_linear_bytes  # noqa: F401  (re-exported: the plan's unit)
from .tp_order import comm_buffer_bytes
from .tp_step import MAX_CHUNKS

GIB = 2 ** 30
PEAK_FIXED = GIB // 4
# vLLM's own extras on a rank: CUDA graphs (0.59 GiB measured at capture size 512), non-torch memory
# (0.22 GiB measured), NCCL communicators (est. 0.5 GiB): one H200, gpu_guest_segments.log
EXTRAS = int(1.5 * GIB)
SCRATCH_REGIONS = 2  # vllm_side/guest.py: layer i and i + 2 share a region
# The peer guest's resident decoder layers: a ring of one-layer slots, the layer it runs and (on GPUs) the next
# two being pulled from the peers' shards (docs/guest-beyond-one-gpu.md, option (b))
PEER_LAYERS = 3


def weight_bytes(shape: ModelShape, vocab: int, tied: bool, dtype_bytes: int) -> int:
    """A Llama-like decoder's weights: attention and MLP projections, norms, embeddings, LM head."""
    return shape.layers * (layer_linear_bytes(shape, dtype_bytes) + dtype_bytes * 2 * shape.hidden) \
        + dtype_bytes * (vocab * shape.hidden * (1 if tied else 2) + shape.hidden)


def guest_weight_bytes(shape: ModelShape, vocab: int, tied: bool, dtype_bytes: int, guest: str) -> int:
    """What a TP-layout rank's guest holds of the weights. "full": the whole model (``weight_bytes``). "peer":
    ``PEER_LAYERS`` layers' linear weights (its ring of slots), the embedding (gathered once), the final
    norm and every layer's two norms; no LM head (the guest's logits are never used; a tied one is the
    embedding)."""
    if guest == FULL_GUEST:
        return weight_bytes(shape, vocab, tied, dtype_bytes)
    if guest == PEER_GUEST:
        return PEER_LAYERS * layer_linear_bytes(shape, dtype_bytes) \
            + dtype_bytes * (vocab * shape.hidden + shape.hidden + 2 * shape.hidden * shape.layers)
    raise ValueError(f"unknown guest {guest!r}; one of {FULL_GUEST!r}, {PEER_GUEST!r}")


def kv_bytes_per_token(shape: ModelShape, dtype_bytes: int) -> int:
    """One token's K and V, every KV head, every layer."""
    return 2 * shape.kv_heads * shape.head_dim * dtype_bytes * shape.layers


@dataclass(frozen=True)
class GPUPlan:
    usable: int          # the GPU's memory x gpu_memory_utilization
    vllm_weights: int    # vLLM's TP shard
    guest_weights: int   # the full model, or the peer guest's ring, embedding and norms
    scratch: int
    activation_peak: int  # the guest's and vLLM's
    comm: int
    extras: int
    kv_tokens: int       # tokens of KV this rank's cache holds (its KV heads of each)
    guest: str = FULL_GUEST  # what the guest holds: "full" or "peer" (guest_weight_bytes)

    @property
    def kv(self) -> int:
        return self.usable - self.vllm_weights - self.guest_weights - self.scratch - self.activation_peak \
            - self.comm - self.extras

    def line(self) -> str:
        g = lambda b: f"{b / GIB:.1f}"  # noqa: E731
        kind = f" ({PEER_GUEST}: {PEER_LAYERS} layers + embedding)" if self.guest == PEER_GUEST else ""
        return (f"{g(self.usable)} GiB usable = vLLM's weights {g(self.vllm_weights)} + guest's weights{kind} "
                f"{g(self.guest_weights)} + scratch {g(self.scratch)} + activation peak {g(self.activation_peak)} + "
                f"comm buffers {g(self.comm)} + graphs/NCCL {g(self.extras)} + KV {g(self.kv)} GiB "
                f"({max(self.kv_tokens, 0)} tokens)")


def tp_layout_plan(shape: ModelShape, *, vocab: int, tied: bool, n: int, dtype_bytes: int, step_budget: int,
                   max_model_len: int, block_size: int, gpu_bytes: int, utilization: float,
                   guest: str = FULL_GUEST) -> GPUPlan:
    """est. memory of one TP-layout rank (N ranks) on a GPU of ``gpu_bytes``, its guest ``guest`` (GUESTS)."""
    w = weight_bytes(shape, vocab, tied, dtype_bytes)
    per_layer = kv_bytes_per_token(shape, dtype_bytes) // shape.layers
    scratch_tokens = -(-max(max_model_len, step_budget) // block_size) * block_size
    comm = comm_buffer_bytes(n=n, layers=shape.layers, kv_bytes_per_token_layer=per_layer,
                             total_kv_heads=shape.kv_heads, step_budget=step_budget, max_model_len=max_model_len,
                             block_size=block_size, max_chunks=MAX_CHUNKS).total   # GuestHost's arena
    mlp = 4 * shape.intermediate * dtype_bytes * step_budget
    plan = GPUPlan(usable=int(gpu_bytes * utilization), vllm_weights=w // n,
                   guest_weights=guest_weight_bytes(shape, vocab, tied, dtype_bytes, guest),
                   scratch=SCRATCH_REGIONS * scratch_tokens * per_layer,
                   activation_peak=mlp + mlp // n + 2 * PEAK_FIXED,
                   comm=comm, extras=EXTRAS, kv_tokens=0, guest=guest)
    share = max(1, shape.kv_heads // n) / shape.kv_heads   # fewer KV heads than ranks: one replicated head each
    tokens = math.floor(plan.kv / (kv_bytes_per_token(shape, dtype_bytes) * share)) if plan.kv > 0 else 0
    return GPUPlan(**{**plan.__dict__, "kv_tokens": tokens})
