"""The guest: the full model (TP=1 weights) beside vLLM's own TP=N model on every rank (issue 22).

The second seam module, next to ``seam.py``: everything here reaches into vLLM internals, and only
worker-side code calls it. vLLM runs plain ``--tensor-parallel-size N`` and owns the decode model; each
rank also holds a guest, a second model runner of the platform's V1 kind, built from a config copy that
says TP=1, loaded and run under a one-rank TP group, with a small scratch KV cache of its own.

Why each piece (``V/`` = vLLM 0.26.0's ``site-packages/vllm/``, ``W/`` = 0.32.0's):
- Linear layers, the vocab embedding and the model's head split read the TP size and rank from the
  ``_TP`` global when they are built (``V/distributed/parallel_state.py:1365-1370``,
  ``V/model_executor/models/llama.py:140-150``), and logits gathering reads it on every call; so
  ``_TP`` is swapped around the guest's construction, load and every forward (``active``).
- A new group is collective (``torch.distributed.new_group`` for every rank list,
  ``parallel_state.py:433-440``), so every rank builds all the one-rank groups, at worker init.
- Attention layers register under their prefix in the *current* config's ``static_forward_context`` and
  refuse a duplicate name (``V/model_executor/layers/attention/attention.py:443-446``); a copy taken
  before vLLM loads its model still has an empty context, so the guest's layers live in the copy's.
- The guest's pieces get CUDA-graph wrappers only under a piecewise mode (``V/compilation/backends.py:656``),
  and a wrapper captures on a size's first call (``V/compilation/cuda_graph.py:233-277``): its mode is NONE.
- The runner collects KV specs and binds caches from its own config's context
  (``V/v1/worker/gpu_model_runner.py:7718-7730``, ``:7528``), so vLLM's KV sizing never sees the guest.

The peer guest (``kv_runahead.guest: "peer"``; ``PeerWeights``) is built by a registered model loader
(``register_model_loader``, vLLM's public hook) on the meta device: no decoder layer's weights are
allocated; each linear weight is a view into a ring of one-layer slots, which a forward pre-hook fills from
the N ranks' TP shards (``transport/weight_pull.py``: one-sided reads of what every rank publishes at
start-up) before the layer runs. Everything else (embedding,
norms, attention scales) is made from vLLM's TP model on the rank: copied, or gathered where it is sharded.
It runs eager (its hooks move weights between layers, which a compiled graph would not see).
"""
from __future__ import annotations

import contextlib
import copy
import math
import re

import torch
import torch.distributed as dist
from vllm.config import CompilationMode, CUDAGraphMode, VllmConfig, set_current_vllm_config
from vllm.distributed import parallel_state
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, KVCacheTensor

from ..config import FULL_GUEST, PEER_GUEST
from ..core.memory import PEER_LAYERS
from ..core.tp_order import CommBytes, comm_buffer_bytes
from ..core.tp_step import MAX_CHUNKS
from ..core.weight_shards import column_pieces, row_pieces
from ..log import logger
from ..transport.comm import CommArena
from ..transport.weight_pull import SharedShards, ShardedWeight
from .seam import has_field, kv_caches_by_layer, layer_order

GROUP_NAME = "kvr_guest_tp"


def singleton_tp_groups(local_rank: int):
    """A one-rank TP group per rank (this rank's is returned). Collective: every rank of the world calls
    it at the same point of its set-up, after vLLM's own groups."""
    world = parallel_state.get_world_group()
    backend = torch.distributed.get_backend(world.device_group)
    return parallel_state.init_model_parallel_group(
        [[r] for r in range(world.world_size)], local_rank, backend, group_name=GROUP_NAME)


@contextlib.contextmanager
def tp_group_swapped(group):
    """``group`` is vLLM's TP group inside the block (what TP-aware layers and collectives read)."""
    saved = parallel_state._TP
    parallel_state._TP = group
    try:
        yield
    finally:
        parallel_state._TP = saved


def guest_config(vllm_config: VllmConfig, kind: str = FULL_GUEST) -> VllmConfig:
    """The guest's config: a copy with TP=1. Take it before vLLM loads its model: the copy must start
    with an empty forward context, or the guest's layer names collide with vLLM's. A peer guest loads
    through ``PeerLoader`` and runs eager."""
    if vllm_config.compilation_config.static_forward_context:
        raise RuntimeError("KV-Runahead: the guest's config must be copied before vLLM loads its model "
                           "(its attention layers are already registered)")
    cfg = copy.deepcopy(vllm_config)
    pc = cfg.parallel_config
    pc.world_size //= pc.tensor_parallel_size
    pc.tensor_parallel_size = 1
    # The guest's step returns its output at once (no async output to wait for on a private runner).
    cfg.scheduler_config.async_scheduling = False
    # No CUDA graphs (torch.compile stays): nothing captures the guest's graphs up front, so its runner
    # would capture each size up to the capture size lazily, mid-step, and return outputs whose kernels
    # never ran (measured on one H100, issue 33). Its segments are long prefills, where graphs gain little.
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
    if kind == PEER_GUEST:
        cfg.compilation_config.mode = CompilationMode.NONE
        cfg.model_config.enforce_eager = True
        cfg.load_config.load_format = PEER_LOAD_FORMAT
    return cfg


def _runner_class() -> type:
    """The platform's V1 model runner (the guest's kind; two runners in one process are proven on V1 only)."""
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        return CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def _unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared tensor counts once; a meta tensor,
    which holds no memory, not at all)."""
    seen = {}
    for t in tensors:
        if t.is_meta:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _region_tensors(names: list[str], regions: int, page: int, num_blocks: int) -> list[KVCacheTensor]:
    """``regions`` scratch regions of ``num_blocks`` pages, region i shared by layers i, i + regions, ...
    vLLM 0.26 allocates a tensor per entry for the layers in ``shared_by``. 0.32 views one backing
    allocation (every entry names its whole size) at ``offset + l * layer_stride + b * block_stride``
    (``W/v1/kv_cache_interface.py:1409-1429``) and refuses a zero stride (``:348``), so each layer gets
    an entry of its own at its region's offset."""
    region = page * num_blocks
    if has_field(KVCacheTensor, "shared_by"):
        return [KVCacheTensor(size=region, shared_by=names[i::regions]) for i in range(regions)]
    return [KVCacheTensor(size=region * regions, layers=[name], layer_stride=region, block_stride=page,
                          offset=region * (i % regions)) for i, name in enumerate(names)]


def model_weight_bytes(model) -> int:
    """Bytes of a loaded model's weights. On CPU vLLM moves each linear layer's weight into a packed GEMM
    kernel and leaves an empty parameter behind (``remove_weight``: ``V/model_executor/layers/linear.py:218``,
    ``V/model_executor/layers/utils.py:283-309``), so such a layer counts by the shape of its shard.
    Buffers are left out: a Llama's are the rotary cos/sin cache, one module per shape that vLLM's and
    the guest's model share (``V/model_executor/layers/rotary_embedding/__init__.py:83-84``), and each
    attention layer's scalar KV scales."""
    total = _unique_bytes(model.parameters())
    for m in model.modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "cpu_linear") and isinstance(w, torch.Tensor) and w.numel() == 0:
            rows = getattr(m, "output_size_per_partition", m.output_size)
            cols = getattr(m, "input_size_per_partition", m.input_size)
            total += rows * cols * m.params_dtype.itemsize
    return total


# -- the peer guest --------------------------------------------------------------------------------------
PEER_LOAD_FORMAT = "kv_runahead_peer"
PEER_SLOTS = PEER_LAYERS   # layer l runs in slot l % PEER_SLOTS (GPUs: the next layers' pulls land in the others)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class PeerSource:
    """What a peer guest is built from: vLLM's TP model on this rank (its shards and every other tensor)
    and a group of every rank (gloo) to publish the shards and gather what vLLM shards beside them."""

    def __init__(self, vllm_model, group, n: int) -> None:
        self.vllm_model, self.group, self.n = vllm_model, group, n
        self.weights: PeerWeights | None = None   # set by the loader


def _linears(model) -> dict[int, list[tuple[str, torch.nn.Module]]]:
    """The decoder layers' linear layers, by layer index, in module order."""
    from vllm.model_executor.layers.linear import LinearBase

    by_layer: dict[int, list] = {}
    for name, m in model.named_modules():
        match = _LAYER.search(name + ".")
        if isinstance(m, LinearBase) and match:
            by_layer.setdefault(int(match.group(1)), []).append((name, m))
    return dict(sorted(by_layer.items()))


def _sharded(guest_linear, vllm_linear, n: int, rank: int) -> list[tuple[str, ShardedWeight]]:
    """Each weight of one linear layer: vLLM's shard on this rank and where every rank's pieces go."""
    from vllm.model_executor.layers.linear import RowParallelLinear

    out = []
    for pname, full in guest_linear.named_parameters(recurse=False):
        shard = getattr(vllm_linear, pname)
        if shard.numel() == 0:
            raise RuntimeError(f"KV-Runahead's peer guest: vLLM's {pname} of {type(vllm_linear).__name__} holds no "
                               "data (on CPU it is kept only while the TP layout loads a peer guest)")
        if isinstance(vllm_linear, RowParallelLinear):
            if full.dim() == 1:   # the bias: whole on every rank (only rank 0 adds it)
                pieces = [[] for _ in range(n)]
                pieces[0] = column_pieces([full.shape[0]], [shard.shape[0]], 1, 0)
                dim = 0
            else:
                pieces, dim = [row_pieces(full.shape[1], shard.shape[1], n, k) for k in range(n)], 1
        else:
            full_sizes, shard_sizes = list(guest_linear.output_partition_sizes), list(vllm_linear.output_partition_sizes)
            pieces, dim = [column_pieces(full_sizes, shard_sizes, n, k) for k in range(n)], 0
        out.append((pname, ShardedWeight(shard=shard, pieces=pieces, dim=dim)))
    return out


class PeerWeights:
    """The peer guest's decoder-layer weights: every linear weight of layer l is a view into slot
    l % PEER_SLOTS, filled from the N ranks' shards by a pre-hook on the layer (``SharedShards``)."""

    def __init__(self, model, source: PeerSource, device: torch.device) -> None:
        rank = dist.get_rank(source.group)
        guest_layers, vllm_model = _linears(model), source.vllm_model
        if not guest_layers:
            raise ValueError("KV-Runahead's peer guest found no decoder layers (model.layers.<i>) in the model")
        self.layers = list(guest_layers)
        if self.layers != list(range(len(self.layers))):
            raise ValueError(f"KV-Runahead's peer guest needs layers 0..L-1, found {self.layers[:4]}...")
        weights = [[(m, pname, w) for name, m in guest_layers[i]
                    for pname, w in _sharded(m, vllm_model.get_submodule(name), source.n, rank)] for i in self.layers]
        self.shards = SharedShards([[w for _, _, w in ws] for ws in weights], rank, source.n, source.group)
        shapes = [getattr(m, pname).shape for m, pname, _ in weights[0]]
        dtype = weights[0][0][2].shard.dtype
        sizes = [math.prod(sh) for sh in shapes]
        self.slots = [torch.empty(sum(sizes), dtype=dtype, device=device)
                      for _ in range(min(PEER_SLOTS, len(self.layers)))]
        # every layer's weights: views into its slot
        self.views: list[list[torch.Tensor]] = []
        for i, ws in zip(self.layers, weights, strict=True):
            views = list(torch.split(self.slots[i % len(self.slots)], sizes))
            self.views.append([v.view(sh) for v, sh in zip(views, shapes, strict=True)])
            for (m, pname, _), v in zip(ws, self.views[-1], strict=True):
                if tuple(getattr(m, pname).shape) != tuple(v.shape):
                    raise ValueError(f"KV-Runahead's peer guest: layer {i}'s {pname} differs from layer 0's")
                setattr(m, pname, torch.nn.Parameter(v, requires_grad=False))
        self.modules = [[m for _, m in guest_layers[i]] for i in self.layers]
        self._cpu = device.type == "cpu"
        if self._cpu:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            self._pack = dispatch_cpu_unquantized_gemm

    @property
    def nbytes(self) -> int:
        """The ring's slots: all the decoder-layer weight memory the guest holds."""
        return sum(s.numel() * s.element_size() for s in self.slots)

    def install(self, decoder_layers) -> None:
        for i, layer in zip(self.layers, decoder_layers, strict=True):
            layer.register_forward_pre_hook(lambda _m, _a, i=i: self.fill(i))
            if self._cpu:
                layer.register_forward_hook(lambda _m, _a, _o, i=i: self._release(i))

    def fill(self, i: int) -> None:
        self.shards.take(i, self.views[i])
        if self._cpu:
            # vLLM's CPU GEMM runs a oneDNN handle packed from the weight when the layer is loaded
            # (V/model_executor/layers/utils.py:228-320); pack this layer's now, as vLLM packs its own, so the
            # guest's products are one worker's bit for bit
            for m in self.modules[i]:
                self._pack(m, remove_weight=False)

    def _release(self, i: int) -> None:
        for m in self.modules[i]:   # the packed copy goes with the layer; the next fill packs again
            m.__dict__.pop("cpu_linear", None)


def _materialize(model, source: PeerSource, device: torch.device, skip: set[int]) -> None:
    """Every meta tensor of ``model`` not in ``skip`` (by id) made from vLLM's TP model's tensor of the same
    name on this rank: copied where it has the same shape, gathered from every rank where vLLM shards it
    (the vocabulary embedding)."""
    made: dict[int, torch.Tensor] = {}
    vllm_model = source.vllm_model

    def real(t: torch.Tensor, mname: str, attr: str) -> torch.Tensor:
        if id(t) in made:
            return made[id(t)]
        theirs = getattr(vllm_model.get_submodule(mname), attr, None)
        if not isinstance(theirs, torch.Tensor):
            raise ValueError(f"KV-Runahead's peer guest: vLLM's model has no {mname}.{attr} to make the guest's from")
        if theirs.shape == t.shape:
            out = theirs.detach().to(device=device, copy=True)
        else:
            dims = [d for d in range(t.dim()) if t.shape[d] != theirs.shape[d]]
            if len(dims) != 1 or theirs.shape[dims[0]] * source.n != t.shape[dims[0]]:
                raise ValueError(f"KV-Runahead's peer guest: {mname}.{attr} is {tuple(t.shape)} in the guest, "
                                 f"{tuple(theirs.shape)} in vLLM's TP={source.n} model")
            mine = theirs.detach().cpu().contiguous()   # start-up only, on the gloo group
            parts = [torch.empty_like(mine) for _ in range(source.n)]
            dist.all_gather(parts, mine, group=source.group)
            out = torch.cat(parts, dim=dims[0]).to(device)
        made[id(t)] = out
        return out

    for mname, m in model.named_modules():
        for pname, p in list(m._parameters.items()):
            if p is not None and p.is_meta and id(p) not in skip:
                if id(p) not in made:
                    made[id(p)] = torch.nn.Parameter(real(p, mname, pname), requires_grad=False)
                m._parameters[pname] = made[id(p)]
        for bname, b in list(m._buffers.items()):
            if b is not None and b.is_meta:
                m._buffers[bname] = real(b, mname, bname)
        for aname, a in list(vars(m).items()):
            if isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter) and a.is_meta:
                setattr(m, aname, real(a, mname, aname))
    left = [n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
            if t.is_meta and id(t) not in skip]
    if left:
        raise RuntimeError(f"KV-Runahead's peer guest left {len(left)} tensors unmade: {left[:5]}")


def _logits_unused(model, vocab: int):
    """The guest's sampled tokens are thrown away (``Guest.run``): no LM head, logits of zeros."""
    def compute_logits(hidden_states, *args, **kwargs):
        return hidden_states.new_zeros((hidden_states.shape[0], vocab), dtype=torch.float32)
    model.compute_logits = compute_logits


def _register_peer_loader() -> None:
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    @register_model_loader(PEER_LOAD_FORMAT)
    class PeerLoader(BaseModelLoader):
        """Builds the peer guest (``model_loader_extra_config[PEER_LOAD_FORMAT]``: its ``PeerSource``)."""

        def download_model(self, model_config) -> None:
            pass

        def load_weights(self, model, model_config) -> None:
            raise RuntimeError("KV-Runahead's peer guest has no checkpoint to load: its weights come from vLLM's")

        def load_model(self, vllm_config, model_config, prefix: str = ""):
            from vllm.model_executor.layers.attention import Attention

            source: PeerSource = self.load_config.model_loader_extra_config[PEER_LOAD_FORMAT]
            device = torch.device(vllm_config.device_config.device)
            with set_default_torch_dtype(model_config.dtype), torch.device("meta"):
                model = initialize_model(vllm_config=vllm_config, model_config=model_config, prefix=prefix)
            source.weights = weights = PeerWeights(model, source, device)
            # the LM head's weight is not needed, unless it is the embedding's (tied)
            users: dict[int, set[str]] = {}
            for name, p in model.named_parameters(remove_duplicate=False):
                users.setdefault(id(p), set()).add(name.split(".")[0])
            unused = {i for i, owners in users.items() if owners == {"lm_head"}}
            _materialize(model, source, device, skip=unused)
            _logits_unused(model, model_config.get_vocab_size())
            for m in model.modules():   # what vLLM's loader does for attention after loading
                if isinstance(m, Attention) and hasattr(m, "process_weights_after_loading"):
                    m.process_weights_after_loading(model_config.dtype)
            weights.install(_decoder_layers(model, len(weights.layers)))
            return model.eval()


def _decoder_layers(model, count: int):
    """The model's decoder layers (``model.layers``, a ModuleList of ``count``)."""
    for name, m in model.named_modules():
        if name.endswith("layers") and isinstance(m, torch.nn.ModuleList) and len(m) == count:
            return list(m)
    raise ValueError("KV-Runahead's peer guest found no ModuleList of the decoder layers")


_register_peer_loader()


class Guest:
    """The full model under a one-rank TP group, with a scratch KV cache of ``regions`` tensors shared by
    every ``regions``-th layer (layer i writes its KV and attends before layer i + regions overwrites it, so a
    whole prefill in one forward needs no more). The scratch holds one request of ``max_model_len``
    tokens, or a whole step's budget where that is more."""

    def __init__(self, config: VllmConfig, group, device: torch.device, regions: int,
                 peer: PeerSource | None = None):
        """``peer``: build a peer guest (its config from ``guest_config(..., PEER_GUEST)``) from this source."""
        self.config, self.group, self.regions = config, group, regions
        if peer is not None:
            config.load_config.model_loader_extra_config = {PEER_LOAD_FORMAT: peer}
        with self.active():
            self.runner = _runner_class()(config, device)
            self.runner.load_model()
        self.peer = peer.weights if peer is not None else None
        self.kv_cache_config: KVCacheConfig | None = None  # the scratch, once allocated

    def allocate_scratch(self, host_cache_config) -> None:
        """Allocate the scratch KV; call it before vLLM measures memory for its KV cache (a GPU worker
        profiles then). vLLM 0.32 resolves the KV layout in the engine core after the models are loaded
        and sends it to the workers before profiling (``W/v1/engine/core.py:292-300``); the guest takes
        the same layout."""
        layout = getattr(host_cache_config, "kv_cache_layout", None)
        if layout is not None:
            self.config.cache_config.kv_cache_layout = layout
        with self.active():
            self.kv_cache_config = self._scratch_config(self.regions)
            self.runner.initialize_kv_cache(self.kv_cache_config)

    @contextlib.contextmanager
    def active(self):
        """The guest's TP group and config are vLLM's current ones inside the block."""
        with tp_group_swapped(self.group), set_current_vllm_config(self.config):
            yield

    def _scratch_config(self, regions: int) -> KVCacheConfig:
        specs = self.runner.get_kv_cache_spec()
        names = layer_order(list(specs))
        spec = specs[names[0]]
        if any(specs[n] != spec for n in names):
            raise ValueError("KV-Runahead's guest supports models whose attention layers share one KV spec")
        tokens = max(self.config.model_config.max_model_len, self.config.scheduler_config.max_num_batched_tokens)
        num_blocks = math.ceil(tokens / spec.block_size)
        tensors = _region_tensors(names, min(regions, len(names)), spec.page_size_bytes, num_blocks)
        return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=tensors,
                             kv_cache_groups=[KVCacheGroupSpec(names, spec)])

    # -- memory ------------------------------------------------------------------
    def weight_bytes(self) -> int:
        # the GPU runner measures its load as vLLM's own does (V/v1/worker/gpu_model_runner.py:5335);
        # the CPU runner does not (a peer guest's slots are its parameters' storage)
        return getattr(self.runner, "model_memory_usage", 0) or model_weight_bytes(self.runner.get_model())

    def scratch_bytes(self) -> int:
        return _unique_bytes(self.runner.kv_caches)

    def reserved_bytes(self) -> int:
        """What the guest holds for good: the KV budget of vLLM's own layers must leave room for it."""
        return self.weight_bytes() + self.scratch_bytes()

    def profile(self) -> int:
        """One run of the guest at the step budget, as vLLM profiles its own model: its kernels are warm
        before the first request (without it the first runahead chunk paid 0.75-0.9 s more on CPU), and on
        GPUs the bytes its activations took at their peak (the guest's forward and vLLM's never overlap,
        so counting both peaks in full is conservative)."""
        with self.active():
            if current_platform.is_cpu():
                self.runner.warming_up_model()
                return 0
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.runner.profile_run()
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - before)

    def scratch_by_layer(self) -> dict[str, torch.Tensor]:
        return kv_caches_by_layer(self.runner, self.kv_cache_config)

    # -- running -------------------------------------------------------------------
    def run(self, scheduler_output) -> None:
        """One step of segments (``seam.segments_only``, whose metadata drives the installed KV
        connector's per-layer hooks). Its tokens are thrown away."""
        with self.active():
            if self.runner.execute_model(scheduler_output) is None:  # V1: the forward now, sampling next
                self.runner.sample_tokens(None)


def comm_bytes(guest: Guest, n: int, total_kv_heads: int, max_chunks: int = MAX_CHUNKS) -> CommBytes:
    """The comm buffers one of ``n`` TP-layout ranks holds (``tp_order.comm_buffer_bytes``): the worst step
    of at most vLLM's ``max_num_batched_tokens`` tokens in ``max_chunks`` runahead chunks after up to
    ``max_model_len`` cached tokens, in the guest's KV blocks (every KV head)."""
    group = guest.kv_cache_config.kv_cache_groups[0]
    spec, cfg = group.kv_cache_spec, guest.config
    return comm_buffer_bytes(n=n, layers=len(group.layer_names), kv_bytes_per_token_layer=spec.page_size_bytes // spec.block_size,
                             total_kv_heads=total_kv_heads, step_budget=cfg.scheduler_config.max_num_batched_tokens,
                             max_model_len=cfg.model_config.max_model_len, block_size=spec.block_size,
                             max_chunks=max_chunks)


def kv_bytes_left(measured: int, guest_bytes: int, cache_config, rss_counted: bool | None = None) -> int:
    """vLLM's KV budget on this rank once the guest (``guest_bytes``: ``Guest.reserved_bytes()``, its
    activation peak and the comm arena) is in place, from what vLLM's worker measured.

    - An explicit KV size (``kv_cache_memory_bytes``; on CPU ``VLLM_CPU_KVCACHE_SPACE``) is for vLLM's
      own layers: the guest comes on top, as vLLM's own weights do there.
    - The CPU worker's automatic size subtracts the process's RSS (``V/v1/worker/cpu_worker.py:223-224``),
      which already holds the guest (``rss_counted``; default: on CPU).
    - The GPU worker's profile counts only its own runner's weights (``V/v1/worker/gpu_worker.py:484-486``)
      and the torch peak's increase while it profiles; the guest, allocated before, is in neither.
    """
    if rss_counted is None:
        rss_counted = current_platform.is_cpu()
    if cache_config.kv_cache_memory_bytes or rss_counted:
        return measured
    return measured - guest_bytes


# Two scratch regions: layer i + 1 receives its prefix while layer i's KV is still being sent.
SCRATCH_REGIONS = 2


class NoGuest:
    """No guest on this rank (one worker, or the chain-of-copies mode): vLLM's worker as it is."""

    def init_device(self, local_rank: int) -> None:
        pass

    @contextlib.contextmanager
    def loading(self, vllm_config, device, vllm_model):
        yield

    def kv_bytes_left(self, measure, cache_config) -> int:
        return measure()


NO_GUEST = NoGuest()


class GuestHost:
    """Builds this rank's guest at the three points of vLLM's worker set-up it needs (TP layout): the full
    model, or (``kind`` "peer") one whose decoder layers are gathered from vLLM's TP shards as it runs."""

    def __init__(self, kind: str = FULL_GUEST, regions: int = SCRATCH_REGIONS) -> None:
        self.kind, self.regions = kind, regions

    def init_device(self, local_rank: int) -> None:
        self.group = singleton_tp_groups(local_rank)  # collective: after vLLM's groups, on every rank

    @contextlib.contextmanager
    def loading(self, vllm_config, device, vllm_model):
        """Around vLLM's load_model: the config is copied before it (empty forward context), the guest
        loaded after it (a peer guest from ``vllm_model()``, vLLM's TP model, which keeps its shards)."""
        from .patches.cpu_linear_keeps_weight import keeping_linear_weights

        config = guest_config(vllm_config, self.kind)
        self.n, self.total_kv_heads = vllm_config.parallel_config.tensor_parallel_size, \
            vllm_config.model_config.get_total_num_kv_heads()
        self.device = device
        with keeping_linear_weights(self.kind == PEER_GUEST):
            yield
        peer = PeerSource(vllm_model(), parallel_state.get_world_group().cpu_group, self.n) \
            if self.kind == PEER_GUEST else None
        self.guest = Guest(config, self.group, device, self.regions, peer)
        if peer is not None:
            w = self.guest.peer
            logger.info("KV-Runahead: TP rank %d's guest pulls each of its %d decoder layers from the %d ranks' TP "
                        "shards into a ring of %d layers (%.1f MiB); guest weights %.1f MiB in all",
                        dist.get_rank(peer.group), len(w.layers), self.n, len(w.slots), w.nbytes / 2 ** 20,
                        self.guest.weight_bytes() / 2 ** 20)

    def kv_bytes_left(self, measure, cache_config) -> int:
        """vLLM's KV budget (``measure``: its worker's own measure) once the guest's scratch and the comm
        arena are in place and the guest has been profiled. The arena is allocated here, once, before vLLM
        measures: a step never allocates comm buffers, and an allocation that fails does so at start-up."""
        self.guest.allocate_scratch(cache_config)
        self.comm = comm_bytes(self.guest, self.n, self.total_kv_heads)
        self.arena = CommArena(self.comm.slots, self.device)
        self.activation_peak = self.guest.profile()
        return kv_bytes_left(measure(), self.guest.reserved_bytes() + self.activation_peak + self.arena.nbytes,
                             cache_config)
