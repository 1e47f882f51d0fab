"""TP layout against plain TP=N: which prefill chunks run ahead (pure; no torch, no vLLM).

In the TP layout (``--tensor-parallel-size N`` with the plugin's worker) a chunk that does not run ahead
is prefilled by vLLM's own TP=N model, not by one GPU, so "run ahead" must beat TP=N's prefill of the
same chunk on this host's links (``partition.runahead_gain`` compares the chain against one GPU). Per
engine step, in seconds (L layers, N ranks; docs/tp-layout-cost.md has the derivation and sources):

    one GPU:    fixed + L * sum(compute)
    TP=N:       fixed + tp_fixed + max(tp_floor, L * sum(compute) / N + 2L * 2(N-1)/N * tokens * hidden * 2 / busbw)
    run ahead:  fixed + max(guest_floor, pipeline) + (N - 1) * hop + drain + guest_step + TP forward
      pipeline: the guests' layer pipeline (``_pipeline``): rank k spends per layer
                busy_k = max(compute_k + recv_cost * recv_k, recv_k / bw, sent_k / bw), recv_k = KV bytes of
                the chain's [c, s_k) (all heads), its heads of the later segments (the shards) and, after c
                cached tokens, the prefix heads it lacks, (1 - 1/N) of [0, c) (the prefix gather); a layer
                starts when rank k-1's KV of it leaves, at that rank's attention exit; after cached tokens a
                rank cannot pass a layer's attention exit before every rank has passed the exit GATHER_AHEAD
                layers back (the gather is posted that far ahead: review 2026-12-07, R4)
      TP forward: vLLM's TP step of each chunk's last token and the step's other work; a CUDA-graph-sized
                step costs one measured TP=N decode step

``compute`` is linear * m + attn * m * (c + m/2) per layer for m tokens after c, at rates fitted to one
GPU; ``busbw``, ``tp_fixed``, ``recv_cost`` and ``hop`` are per link profile, fitted to the committed
TP=N and chain TTFTs (``tools/tp_cost_tables.py``: the committed rows, each cited, the fits, the
checks and the prediction tables; ``python -m vllm_kvrunahead.tools.tp_cost_tables --help``). A chunk runs ahead only where this model's estimate
of the run-ahead step is below its estimate of TP=N's step for the same chunk (``runs_ahead``), and a
step's set of such chunks only where the whole step's estimate is below TP=N's (``choose``). After c
cached tokens that weighs the prefix gather (grows with c) against TP's all-reduces (grow with the new
tokens), so a long history with a short new turn stays TP's.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping, Sequence

from ..config import FULL_GUEST, LINKS, PEER_GUEST
from .partition import Chunk, CostModel, ModelShape, align_bounds, balanced_step_bounds, layer_linear_bytes

LLAMA3_8B = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, head_dim=128)



# -- constants ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPURates:
    """One GPU's prefill, fitted (``fit_one_gpu``) to the 1gpu column of ``_X4`` (1k-64k, weighted least
    squares on relative error; within 2.2% at every length): an effective matmul rate over the layer's
    projections and MLP, an effective causal-attention rate (4 * heads * head_dim flops per query-key
    pair) and the fixed seconds of an engine step outside the forward. The same rates hold on H100:
    its 1-GPU TTFT is 1.198 / 3.292 s at 32k / 64k (``_H100``) against H200's 1.194 / 3.287 s.

    The floors are the shortest forward of a multi-GPU engine, whatever the length: the host, not the
    GPUs, sets it (TP=4 takes 0.042-0.043 s at 1k and 2k, the chain of copies 0.048-0.052 s at 1k-4k,
    where one GPU takes 0.029-0.053 s). ``tp_floor_s`` is fitted to TP=4's 1k/2k rows (``fit_tp``),
    ``guest_floor_s`` to the chain's 1k-4k rows together with the profile's hop and receive cost (grid
    fit, docs/tp-layout-cost.md); both measured at N=4 only and taken for every N."""

    matmul_flops: float = 638.3e12
    attn_flops: float = 602.2e12
    fixed_s: float = 5.73e-3
    tp_floor_s: float = 0.029
    guest_floor_s: float = 0.038


ONE_GPU = GPURates()


@dataclass(frozen=True)
class LinkProfile:
    """How this host's GPUs talk, as the cost model needs it.

    busbw: (N, bytes/s) bus bandwidth of vLLM's TP all-reduce at prefill sizes, 2(N-1)/N of the hidden
      state through each rank per all-reduce (fitted to TP=N TTFTs, ``fit_tp``); also the bandwidth each
      guest gets for its own traffic when every rank sends and receives at once (gather, shards).
      Between listed N: interpolated in log N; beyond: the last.
    tp_fixed_s: what a TP=N prefill step takes beyond one GPU's fixed time at any length (all-reduce
      latency x 2L, the executor's broadcast), fitted with busbw.
    recv_cost: seconds of a guest's per-layer time per KV byte it receives (NCCL's P2P kernels take SMs
      from attention and GEMMs: the chain's later positions ran up to 11% slower with NVLink P2P, 7%
      without, results README "Where the time goes"), fitted to the chain's TTFTs with ``hop_s``.
    hop_s: seconds each extra guest adds to a step beyond the layer pipeline (set-up, hooks).
    decode_s: (N, seconds) one TP=N decode step, the slowest measured (longest context): the TP tail of
      a runahead chunk (vLLM's TP forward of its last token and the sampling) costs one of these.
    pull_bw: bytes/s at which a peer guest's rank reads the (N-1)/N of a layer's weights its peers hold
      (copy-engine reads of CUDA IPC memory; assumed, not measured: docs/guest-beyond-one-gpu.md section 5).
    measured: the N whose busbw and decode_s come from GPU runs; everything else is assumed.
    """

    name: str
    busbw: tuple[tuple[int, float], ...]
    tp_fixed_s: float
    recv_cost: float
    hop_s: float
    decode_s: tuple[tuple[int, float], ...]
    pull_bw: float = 19.5e9
    measured: tuple[int, ...] = ()
    note: str = ""

    def _at(self, table: tuple[tuple[int, float], ...], n: int) -> float:
        pts = sorted(table)
        if n <= pts[0][0]:
            return pts[0][1]
        for (n0, v0), (n1, v1) in zip(pts, pts[1:]):
            if n <= n1:
                f = math.log(n / n0) / math.log(n1 / n0)
                return v0 * (v1 / v0) ** f
        return pts[-1][1]

    def bandwidth(self, n: int) -> float:
        return self._at(self.busbw, n)

    def decode(self, n: int) -> float:
        return self._at(self.decode_s, n)


KIB4 = 4096.0  # KV bytes per token per layer of Llama-3-8B (8 KV heads x 128 x 2 (K, V) x 2 bytes)

NVLINK = LinkProfile(
    "nvlink",
    # fit_tp: TP=2 rows of _X2 (4k-64k), TP=4 rows of _X4 (4k-64k); N=8: N=4's (assumed, not measured)
    busbw=((2, 274e9), (4, 325e9), (8, 325e9)),
    tp_fixed_s=8.1e-3,
    # fit_chain (with guest_floor_s) to the kvr-balanced columns of _X4 (N=4, 1k-64k) and _X4_N2 (N=2,
    # 4k-64k), split by the planner's cost model: 4.0e-8 s per token-layer received (4 KiB); the results
    # README's 2.7e-8 from per-worker busy times ("Where the time goes") is the same order
    recv_cost=4.0e-8 / KIB4,
    hop_s=2.0e-3,
    # 1 / decode tok/s at 64k: TP=2 221 (_X2 "tp decode tok/s", row 65536), TP=4 282 (_X4, row 65536);
    # N=8: N=4's (assumed)
    decode_s=((2, 1 / 221), (4, 1 / 282), (8, 1 / 282)),
    pull_bw=300e9,   # assumed: copy engines reading 7 peers over NV18 (~450 GB/s a direction on paper)
    measured=(2, 4),
    note="NVLink (NV18), H100 or H200",
)

NO_P2P = LinkProfile(
    "no-p2p",
    # fit_tp: TP=2 rows of _X2_NOP2P (16k, 32k), TP=4 rows of _X4_NOP2P (8k-64k); N=8 assumed: the drop
    # from N=2 to 4 again (33.3 -> 25.5 -> 19.5 GB/s; traffic staged through host memory shares it)
    busbw=((2, 33.3e9), (4, 25.5e9), (8, 19.5e9)),
    tp_fixed_s=20.7e-3,
    # fit_chain to the kvr-balanced columns of _X4_NOP2P (N=4) and _X2_NOP2P (N=2), floor as NVLink's:
    # host-staged copies take fewer SMs (the chain ran faster without P2P, results README)
    recv_cost=2.0e-8 / KIB4,
    hop_s=4.0e-3,
    # 1 / decode tok/s, slowest row: TP=2 218 (_X2_NOP2P, row 32768), TP=4 259 (_X4_NOP2P, row 32768)
    decode_s=((2, 1 / 218), (4, 1 / 259), (8, 1 / 259)),
    pull_bw=19.5e9,  # assumed: peer reads staged through host memory, as no-p2p's N=8 busbw
    measured=(2, 4),
    note="NCCL_P2P_DISABLE=1: through host memory, TP without custom all-reduce",
)

PCIE_P2P = LinkProfile(
    "pcie-p2p",
    # assumed, nothing measured: PCIe Gen5 x16 P2P (~64 GB/s a direction on paper), NCCL ~45 GB/s for a
    # pair, dropping with N as no-p2p's does
    busbw=((2, 45e9), (4, 34e9), (8, 26e9)),
    tp_fixed_s=NVLINK.tp_fixed_s,       # P2P kernels as on NVLink; the lower TP cost keeps TP's side safe
    recv_cost=NVLINK.recv_cost,
    hop_s=NVLINK.hop_s,
    decode_s=NO_P2P.decode_s,
    pull_bw=25e9,    # assumed: two GPUs behind one Gen5 x16 switch uplink
    note="PCIe peer-to-peer, no NVLink (assumed: no GPU run)",
)

SOCKETS = LinkProfile(
    "sockets",
    # ~3 GiB/s NCCL send/recv with NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 on 2x H200
    # (/work/shared/device/README.md, "NCCL send/recv GPU0 -> GPU1"); all-reduce and N > 2 assumed
    busbw=((2, 3.2e9), (4, 2.4e9), (8, 1.8e9)),
    tp_fixed_s=NO_P2P.tp_fixed_s,
    recv_cost=NO_P2P.recv_cost,
    hop_s=NO_P2P.hop_s,
    decode_s=((2, 10e-3), (4, 10e-3), (8, 10e-3)),  # assumed: 64 latency-bound all-reduces per token
    note="NCCL over sockets (assumed: no TP or chain run)",
)

PROFILES: dict[str, LinkProfile] = {p.name: p for p in (NVLINK, PCIE_P2P, NO_P2P, SOCKETS)}
LINK_CHOICES = LINKS  # the values of ``kv_runahead.link`` (config.LINKS): "auto" and every profile
assert set(LINK_CHOICES) == {"auto", *PROFILES}, (LINK_CHOICES, sorted(PROFILES))
NCCL_SWITCHES = ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE")


def _on(env: Mapping[str, str], key: str) -> bool:
    return str(env.get(key, "0")).strip().lower() not in ("", "0", "false", "no", "off")


def choose_link(env: Mapping[str, str], nvlink: bool | None = None, peer_access: bool | None = None) -> str:
    """The link profile for this host, from the facts a worker can read without moving data: NCCL's
    environment (``NCCL_P2P_DISABLE``, ``NCCL_SHM_DISABLE``), whether every pair of the TP group's GPUs
    has NVLink (vLLM's ``current_platform.is_fully_connected``, what it uses for custom all-reduce) and
    whether every pair has peer access (``torch.cuda.can_device_access_peer``). Unknown facts (no GPU, NVML
    unreadable): no-p2p, the profile whose TP=N is slowest. Guessing wrong that way runs some chunks ahead
    that NVLink's TP=N would finish a few per cent sooner (on NVLink a chunk gains or loses at most ~10% either
    way, docs/tp-layout-cost.md "Sensitivity"); the other way round, a host without P2P would keep chunks on a
    TP=N 1.5-6.3x slower than running them ahead."""
    if _on(env, "NCCL_P2P_DISABLE"):
        return "sockets" if _on(env, "NCCL_SHM_DISABLE") else "no-p2p"
    if nvlink:
        return "nvlink"
    if peer_access:
        return "pcie-p2p"
    return "no-p2p"


def resolve_link(option: str, facts: Sequence[Mapping], nvlink: bool | None) -> tuple[str, str]:
    """(profile, why) for ``kv_runahead.link``: the option itself unless "auto"; for "auto", ``choose_link``
    on what every rank of the TP group reported (``facts``, the same list on every rank: all-gathered), so
    every rank plans with the same profile. A rank's facts: ``env`` (its NCCL switches), ``device`` (its
    local GPU index, None without a GPU) and ``peers`` ({local GPU index: peer access from its GPU}).
    ``nvlink``: vLLM's NVLink test over the group's physical GPUs (None: not known). A switch set on any
    rank counts (NCCL then stages through host memory on that rank's links)."""
    if option != "auto":
        if option not in PROFILES:
            raise ValueError(f"KV-Runahead: unknown link {option!r}; choose one of {', '.join(LINK_CHOICES)}")
        return option, "set by kv_runahead.link"
    env = {k: "1" for k in NCCL_SWITCHES if any(_on(f.get("env", {}), k) for f in facts)}
    devices = [f.get("device") for f in facts]
    peer_access = None
    if facts and all(d is not None and f.get("peers") is not None for d, f in zip(devices, facts)):
        peer_access = all(f["peers"].get(d, False) for f in facts for d in devices if d != f["device"])
    name = choose_link(env, nvlink, peer_access)
    if env:
        why = " and ".join(sorted(env)) + " set"
    elif None in devices:
        why = "no GPU: nothing known"
    elif nvlink:
        why = "NVLink between every pair of the TP group's GPUs"
    elif peer_access:
        why = "peer access between every pair, no NVLink"
    elif nvlink is None and peer_access is None:
        why = "NVLink and peer access unknown"
    else:
        why = "no peer access between some pair of the TP group's GPUs"
    return name, "auto: " + why


# -- the model ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    """Per-layer constants of one model shape on one GPU (``for_shape``)."""

    layers: int
    linear: float          # s per token (projections + MLP)
    attn: float            # s per query-key pair (causal: m * (c + m/2) pairs for m tokens after c)
    qkv_share: float       # the share of ``linear`` before attention (QKV projection): a rank's time to
    kv_bytes: float        # its attention exit; KV bytes per token per layer (all heads)
    ar_bytes: float        # hidden-state bytes per token (one all-reduce)

    @classmethod
    def for_shape(cls, shape: ModelShape, gpu: GPURates = ONE_GPU, dtype_bytes: int = 2) -> "Rates":
        q_out, kv_out = shape.heads * shape.head_dim, 2 * shape.kv_heads * shape.head_dim
        qkv = shape.hidden * (q_out + kv_out)
        params = qkv + q_out * shape.hidden + 3 * shape.hidden * shape.intermediate
        return cls(layers=shape.layers, linear=2 * params / gpu.matmul_flops,
                   attn=4 * shape.heads * shape.head_dim / gpu.attn_flops, qkv_share=qkv / params,
                   kv_bytes=kv_out * dtype_bytes, ar_bytes=shape.hidden * dtype_bytes)

    def compute(self, start: float, end: float) -> float:
        """Per-layer seconds of tokens [start, end) attending over [0, end) on one full-model GPU."""
        m = end - start
        return self.linear * m + self.attn * m * (start + m / 2)

    def to_attention_exit(self, start: float, end: float) -> float:
        m = end - start
        return self.qkv_share * self.linear * m + self.attn * m * (start + m / 2)


@dataclass(frozen=True)
class StepCost:
    """One engine step's estimate, seconds, with its parts (``fixed``: the engine's own; ``forward``:
    the TP forward or one GPU's; ``guests``: the guests' pipeline incl. its floor and hops)."""

    total: float
    fixed: float = 0.0
    forward: float = 0.0
    guests: float = 0.0
    tau: float = 0.0
    parts: dict = field(default_factory=dict)


def _tp_share_of_heads(n: int, kv_heads: int) -> float:
    """The share of a layer's KV heads one of n TP ranks holds (vLLM replicates heads when n > kv_heads)."""
    return 1.0 / min(n, kv_heads)


@dataclass(frozen=True)
class TPLayoutCost:
    """The TP layout's cost model for N ranks of one model shape on one link profile.

    ``split``: the planner's cost model (``CostModel.for_shape``), which cuts chunks into segments; the
    estimate evaluates those segments at the fitted ``rates``. ``gather_lead``: layers of the prefix gather
    in flight ahead of the layer that needs them (``GuestConnector.GATHER_AHEAD``, 2); None: all posted
    at the step's start (the review's R4 fix), so only bandwidth bounds the gather. ``margin``: a chunk
    runs ahead only where it is predicted that share faster than TP=N (0: any gain).
    """

    shape: ModelShape
    n: int
    link: LinkProfile
    gpu: GPURates = ONE_GPU
    block_size: int = 16
    gather_lead: int | None = 2
    guest_step_s: float = 3e-3      # the guest's runner step on the host before vLLM's TP forward is
    #                                 enqueued (review R5: its sample_tokens blocks 1-3 ms): assumed, the top
    guest_slowdown: float = 1.029   # the guest (a V1 runner, no CUDA graphs) vs vLLM's V2 runner, which the
    #                                 chain's fits saw: m. 1.022 / 1.029 / 1.033 for cold 8k / 16k / 4k chunks on
    #                                 one H200, its KV copy into paged blocks included (benchmarks/results/
    #                                 gpu_smoke/guest_segments/README.md, "Issue 29", rows c = 0); the median.
    #                                 After cached tokens 1.03-1.09 (the prefix landing in its scratch as well)
    host_op_s: float = 15e-6        # host seconds per P2P post (shard or gather) per layer: assumed; it
    #                                 matters only where the host bounds the step (the floor)
    margin: float = 0.0
    weight_pull_s: float = 0.0      # a peer guest's pulls of every layer's weights in a runahead step, not
    #                                 hidden behind compute yet (they run on the layer's own stream): ``build``
    graph_tokens: int = 512         # vLLM captures CUDA graphs of steps up to min(2 max_num_seqs, 512) tokens
    #                                 (V/config/vllm.py:1745, review R1): such a TP step runs at decode cost
    rates: Rates = None  # type: ignore[assignment]
    split: CostModel = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"N must be an integer >= 1, got {self.n!r}")
        if self.shape is None:  # an unusual config (seam.model_shape gave none): as CostModel.for_shape
            object.__setattr__(self, "shape", LLAMA3_8B)
        if self.rates is None:
            object.__setattr__(self, "rates", Rates.for_shape(self.shape, self.gpu))
        if self.split is None:
            object.__setattr__(self, "split", CostModel.for_shape(self.shape))

    @classmethod
    def build(cls, shape: ModelShape | None, n: int, link: str, block_size: int = 16, guest: str = FULL_GUEST,
              dtype_bytes: int = 2, **kw) -> "TPLayoutCost":
        """The model for a link profile by name (one of ``PROFILES``: "nvlink", "pcie-p2p", "no-p2p",
        "sockets"; resolve "auto" with ``choose_link`` first). ``guest`` "peer": every runahead step also
        pulls (N-1)/N of every layer's weights at the profile's ``pull_bw``."""
        if link not in PROFILES:
            raise ValueError(f"KV-Runahead: unknown link profile {link!r}; choose one of "
                             f"{', '.join(LINK_CHOICES)}")
        if guest == PEER_GUEST and n > 1:
            s = shape or LLAMA3_8B
            kw["weight_pull_s"] = s.layers * layer_linear_bytes(s, dtype_bytes) * (n - 1) / n / PROFILES[link].pull_bw
        return cls(shape, n, PROFILES[link], block_size=block_size, **kw)

    # -- one GPU and TP=N ------------------------------------------------------------------------
    def one_gpu(self, chunks: Sequence[Chunk]) -> StepCost:
        fwd = self.rates.layers * sum(self.rates.compute(c.start, c.end) for c in chunks)
        return StepCost(self.gpu.fixed_s + fwd, self.gpu.fixed_s, fwd)

    def _tp_forward(self, chunks: Sequence[Chunk], extra_tokens: int = 0) -> float:
        r, n = self.rates, self.n
        tokens = sum(c.length for c in chunks) + extra_tokens
        compute = r.layers * sum(r.compute(c.start, c.end) for c in chunks) / n
        allreduce = 2 * r.layers * (2 * (n - 1) / n) * tokens * r.ar_bytes / self.link.bandwidth(n) if n > 1 else 0.0
        if tokens <= self.graph_tokens:  # a step of CUDA-graph size: a measured decode step, plus its work
            return self.link.decode(n) + compute + allreduce
        return self.link.tp_fixed_s + max(self.gpu.tp_floor_s, compute + allreduce)

    def tp(self, chunks: Sequence[Chunk], decodes: int = 0) -> StepCost:
        """vLLM's TP=N step prefilling ``chunks`` (and ``decodes`` one-token requests)."""
        if self.n == 1:
            return self.one_gpu(chunks)
        fwd = self._tp_forward(chunks, decodes)
        return StepCost(self.gpu.fixed_s + fwd, self.gpu.fixed_s, fwd)

    # -- the guests ----------------------------------------------------------------------------
    def cut(self, chunks: Sequence[Chunk]) -> list[list[float]]:
        """The TP layout's inner segment bounds of a step's chunks (``TPLayoutSplitter``'s cut), balanced with
        the planner's cost model (``split``, whose cut of the chain of copies the tuner could not beat:
        benchmarks/results/nvidia-h200-x4/tuning.md, Llama-3-8B N=4 at 4k-64k "model" or within 0.3% of
        "best"): every rank gets the same per-layer busy time, its compute plus what it receives, the
        chain's [c, s_k) (all heads) and its KV heads of the later segments (the shards, which shorten the
        earlier ranks' segments against the chain of copies'). The guests compute [c, c+m-1): the last
        token is vLLM's TP forward's, after every guest. The prefix gather is the same on every rank (no
        share); every rank holds [0, c), so nothing of it travels down the chain."""
        if self.n < 2:
            return [[] for _ in chunks]
        guest = tuple(_gathered(replace(c, end=max(c.start + 1, c.end - 1)), self.n) for c in chunks)
        return _tp_cut(self.split, self.n, _tp_share_of_heads(self.n, self.shape.kv_heads), guest)

    def bounds(self, chunks: Sequence[Chunk], copies: bool = False) -> list[list[float]]:
        """Each chunk's N+1 segment edges as the planner cuts it: the TP layout's ``cut``, or with ``copies``
        the chain of copies' (the planner's cost model, cold chunks)."""
        if self.n < 2:
            return [[float(c.start), float(c.end)] for c in chunks]
        if copies:
            inner = _cut(self.split, self.n, tuple(_gathered(c, self.n) for c in chunks))
        else:
            inner = self.cut(chunks)
        return [[float(c.start), *b, float(c.end)] for c, b in zip(chunks, inner)]

    def guests(self, chunks: Sequence[Chunk], copies: bool = False) -> StepCost:
        """The guests' pipeline for ``chunks`` (TP layout), or with ``copies`` the chain of copies'
        (no shards, no gather: the chain moves all heads of [0, s_k) to rank k; cold chunks only)."""
        r, n, link = self.rates, self.n, self.link
        h = _tp_share_of_heads(n, self.shape.kv_heads)
        bw = link.bandwidth(n)
        edges = self.bounds(chunks, copies)
        comp = [0.0] * n
        exit_ = [0.0] * n
        recv = [0.0] * n      # KV bytes per layer each rank receives
        sent = [0.0] * n
        cached = False
        for c, e in zip(chunks, edges):
            lens = [e[k + 1] - e[k] for k in range(n)]
            for k in range(n):
                s_k, e_k = e[k], e[k + 1]
                comp[k] += r.compute(s_k, e_k)
                exit_[k] += r.to_attention_exit(s_k, e_k)
                lo = 0.0 if copies else c.start
                if k > 0:
                    recv[k] += (s_k - lo) * r.kv_bytes            # the chain, all heads
                if k < n - 1:
                    sent[k] += (e_k - lo) * r.kv_bytes
                if not copies:
                    recv[k] += h * sum(lens[k + 1:]) * r.kv_bytes  # its heads of the later segments
                    sent[k] += k * h * lens[k] * r.kv_bytes        # earlier ranks' heads of its own
                    if c.start > 0:
                        cached = True
                        recv[k] += (1 - h) * c.start * r.kv_bytes  # the prefix heads it lacks
                        sent[k] += (1 - h) * c.start * r.kv_bytes  # its heads, to every rank lacking them
        slow = 1.0 if copies else self.guest_slowdown   # the chain of copies' workers are vLLM's own runners
        busy = [max(slow * comp[k] + link.recv_cost * recv[k], recv[k] / bw, sent[k] / bw) for k in range(n)]
        # a rank's time to its attention exit, where its KV goes out: its share of the layer's time
        to_exit = [busy[k] * exit_[k] / comp[k] if comp[k] > 0 else 0.0 for k in range(n)]
        lead = self.gather_lead if (cached and not copies) else None
        done = _pipeline(r.layers, busy, to_exit, lead)
        ops = 0 if copies else 2 * (n - 1) + (2 * (n - 1) if cached else 0)
        floor = self.gpu.guest_floor_s + r.layers * ops * self.host_op_s
        total = max(floor, done) + (n - 1) * link.hop_s
        drain = 0.0 if copies else sum((1 - h) * (e[-1] - e[-2]) for e in edges) * r.kv_bytes / bw
        return StepCost(total + drain, guests=total + drain, tau=max(busy),
                        parts=dict(pipeline=done, floor=floor, hops=(n - 1) * link.hop_s, drain=drain,
                                   busy=busy, to_exit=to_exit, recv=recv, sent=sent))

    def ahead(self, chunks: Sequence[Chunk], tp_chunks: Sequence[Chunk] = (), decodes: int = 0) -> StepCost:
        """A TP-layout step: ``chunks`` run ahead on the guests, then vLLM's TP forward computes their last
        tokens with ``tp_chunks`` and ``decodes`` (the rest of the step)."""
        if not chunks:
            return self.tp(tp_chunks, decodes)
        g = self.guests(chunks)
        fwd = self._tp_forward(tp_chunks, decodes + len(chunks))  # the tails ride in vLLM's TP step
        total = self.gpu.fixed_s + g.total + self.weight_pull_s + self.guest_step_s + fwd
        return StepCost(total, self.gpu.fixed_s, fwd, g.total, g.tau,
                        dict(g.parts, guest_step=self.guest_step_s, weight_pull=self.weight_pull_s))

    # -- the decision ------------------------------------------------------------------------------
    def gain(self, chunk: Chunk) -> float:
        """Seconds a chunk alone in its step is predicted to finish sooner run ahead than on TP=N."""
        if self.n < 2 or chunk.length < 2 * self.n:
            return -math.inf
        return _gain(self, replace(chunk, held=()))  # held: the chain of copies' record, not the TP layout's

    def runs_ahead(self, chunk: Chunk) -> bool:
        """Run ahead only where this model predicts it faster than TP=N's prefill of the same chunk (by
        ``margin`` of TP's time): cold or after cached tokens (then the prefix gather is in the cost)."""
        g = self.gain(chunk)
        return g > 0 and g > self.margin * self.tp([chunk]).total

    def window(self, cached: int = 0, most: int = 1 << 17) -> tuple[int, int] | None:
        """(lo, hi): the chunks after ``cached`` tokens, in whole blocks up to ``most`` tokens, that run ahead
        run from lo to hi tokens (hi = ``most`` when the longest does); None: none does. Short chunks lose
        to TP=N's lower fixed cost, very long ones to the guests' pipeline fill once TP's all-reduces are a
        small share of its quadratic attention (the measured chain / TP=4 ratio falls from 1.17x at 8k to
        1.05x at 64k, results README)."""
        bs = self.block_size
        top = max(bs, most // bs * bs)
        grid = sorted({max(bs, int(2 ** (x / 8)) // bs * bs) for x in range(8 * 6, 8 * 18 + 1)} | {top})
        grid = [m for m in grid if m <= top]
        runs = lambda m: self.runs_ahead(Chunk(cached, cached + m, cached + m))  # noqa: E731
        ok = [runs(m) for m in grid]
        if not any(ok):
            return None
        i = ok.index(True)
        j = len(ok) - 1 - ok[::-1].index(True)

        def edge(a: int, b: int, want: bool) -> int:  # runs(a) != want == runs(b): the block nearest a with want
            a, b = a // bs, b // bs
            while abs(b - a) > 1:
                mid = (a + b) // 2
                if runs(mid * bs) == want:
                    b = mid
                else:
                    a = mid
            return b * bs

        lo = grid[0] if i == 0 else edge(grid[i - 1], grid[i], True)
        hi = grid[j] if j == len(grid) - 1 else edge(grid[j + 1], grid[j], True)
        return lo, hi

    def choose(self, chunks: Sequence[Chunk], tp_chunks: Sequence[Chunk] = (), decodes: int = 0) -> list[bool]:
        """Which of a step's chunks run ahead, the rest of the step (``tp_chunks``, ``decodes``) on TP=N.

        Per-chunk decisions do not add up: a chunk that wins alone can lose next to a TP chunk (the step
        then pays the guests and a full TP forward). So: the chunks that win alone, then, one at a time, the
        one whose removal lowers the step's estimate most, while any does; run ahead only if that beats
        the whole step on TP=N (by ``margin``). The estimate of what this returns is never above TP=N's."""
        chunks = list(chunks)
        if len(chunks) == 1 and not tp_chunks and not decodes:  # the step is the chunk alone: its own answer
            return [self.runs_ahead(chunks[0])]
        sel = [i for i, c in enumerate(chunks) if self.runs_ahead(c)]

        def cost(pick: Sequence[int]) -> float:
            rest = [c for i, c in enumerate(chunks) if i not in pick] + list(tp_chunks)
            return self.ahead([chunks[i] for i in pick], rest, decodes).total

        cur = cost(sel) if sel else math.inf
        while len(sel) > 1:
            tries = [(cost([j for j in sel if j != i]), i) for i in sel]
            best, drop = min(tries)
            if best >= cur:
                break
            cur, sel = best, [j for j in sel if j != drop]
        on_tp = cost([])
        keep = bool(sel) and cur < on_tp and on_tp - cur > self.margin * on_tp
        return [keep and i in sel for i in range(len(chunks))]

    def crossover(self, cached: int = 0, most: int = 1 << 17) -> int | None:
        """The smallest chunk after ``cached`` tokens that runs ahead (in whole blocks, up to ``most``); None:
        none does (TP=N is predicted faster at every length)."""
        w = self.window(cached, most)
        return None if w is None else w[0]

    def startup_line(self, most: int = 1 << 17, cached: Iterable[int] = (16384, 32768),
                     min_tokens: int | None = None) -> str:
        """The start-up log line (rank 0): "TP layout on <link>: chunks of >= X tokens run ahead (TP=N is
        faster below)", for cold chunks of up to ``most`` tokens (the step's most), then after ``cached``
        tokens (those below ``most``). With ``min_tokens`` (the user's), that rule, then the model's."""
        if min_tokens is not None:
            model = self.startup_line(most, cached).split(": ", 1)[1]
            return (f"TP layout on {self.link.name}: chunks of >= {min_tokens} tokens run ahead "
                    f"(kv_runahead.min_tokens; the cost model alone: {model})")
        top = max(self.block_size, most // self.block_size * self.block_size)

        def say(w, lead):
            if w is None:
                return f"{lead}none (TP={self.n} is predicted faster at every length up to {top})"
            lo, hi = w
            if hi >= top:
                return f"{lead}chunks of >= {lo} tokens run ahead (TP={self.n} is faster below)"
            return f"{lead}chunks of {lo} to {hi} tokens run ahead (TP={self.n} is faster outside)"

        line = f"TP layout on {self.link.name}: " + say(self.window(0, most), "")
        later = [say(self.window(c, most), f"after {c} cached tokens ") for c in cached if c < most]
        return line + ("; " + "; ".join(later) if later else "")

    def describe(self, most: int = 1 << 17, cached: Iterable[int] = (32768,)) -> str:
        """The start-up log line: which chunks run ahead, cold and after cached tokens (``most``: the longest
        chunk a step can hold, e.g. the step budget)."""
        def say(w):
            if w is None:
                return f"none (TP={self.n} is predicted faster at every length)"
            lo, hi = w
            if hi >= most // self.block_size * self.block_size:
                return f">= {lo} tokens (TP={self.n} is faster below)"
            return f"{lo} to {hi} tokens (TP={self.n} is faster outside)"

        line = f"TP layout N={self.n}, link {self.link.name}: chunks that run ahead: cold {say(self.window(0, most))}"
        for c in cached:
            line += f"; after {c} cached tokens {say(self.window(c, most))}"
        return line

    # -- whole prompts (chunked by a step budget) --------------------------------------------------
    def prompt(self, tokens: int, budget: int, cached: int = 0, mode: str = "tp-layout") -> "PromptCost":
        """TTFT of one prompt of ``tokens`` (``cached`` of them in the prefix cache), alone, cut into steps
        of at most ``budget`` new tokens. mode: "tp-layout" (each chunk as ``runs_ahead`` says),
        "ahead" (every chunk run ahead), "tp" (TP=N), "1gpu"."""
        steps, c = [], cached
        while c < tokens:
            ch = Chunk(c, min(tokens, c + budget), tokens)
            if mode == "1gpu":
                steps.append(("1gpu", self.one_gpu([ch]).total))
            elif mode == "tp" or (mode == "tp-layout" and not self.runs_ahead(ch)):
                steps.append(("tp", self.tp([ch]).total))
            else:
                steps.append(("ahead", self.ahead([ch]).total))
            c = ch.end
        return PromptCost(sum(t for _, t in steps), tuple(steps))


@dataclass(frozen=True)
class PromptCost:
    ttft: float
    steps: tuple[tuple[str, float], ...]

    @property
    def ahead(self) -> int:
        return sum(1 for k, _ in self.steps if k == "ahead")


def _pipeline(layers: int, busy: Sequence[float], to_exit: Sequence[float], lead: int | None) -> float:
    """When the last rank ends its last layer. Rank k runs each layer in ``busy[k]`` seconds; its layer l
    starts once its layer l-1 is done and rank k-1 has sent layer l's KV, at that layer's attention exit
    (``to_exit[k-1]`` after its start). With ``lead`` (the prefix gather in flight), rank k's layer l
    cannot pass its attention exit before every rank has reached the attention exit of layer
    l - lead (``GuestConnector``: layer l+1's prefix lands at layer l's exit, posted when layer
    l+1-lead landed, i.e. at the senders' exit of layer l-lead)."""
    n = len(busy)
    start = [[0.0] * layers for _ in range(n)]
    exits = [[0.0] * layers for _ in range(n)]
    end = [[0.0] * layers for _ in range(n)]
    for layer in range(layers):
        gate = max(exits[j][layer - lead] for j in range(n)) if lead and layer - lead >= 0 else 0.0
        for k in range(n):
            t = end[k][layer - 1] if layer else 0.0
            if k:
                t = max(t, exits[k - 1][layer])
            start[k][layer] = t
            exits[k][layer] = max(t + to_exit[k], gate)
            end[k][layer] = exits[k][layer] + busy[k] - to_exit[k]
    return max(end[k][-1] for k in range(n))


@functools.lru_cache(maxsize=4096)
def _cut(split: CostModel, n: int, chunks: tuple[Chunk, ...]) -> list[list[float]]:
    return balanced_step_bounds(list(chunks), n, split)


@functools.lru_cache(maxsize=4096)
def _tp_cut(model: CostModel, n: int, share: float, chunks: tuple[Chunk, ...]) -> list[list[float]]:
    return balanced_step_bounds(list(chunks), n, model, shard_share=share)


@functools.lru_cache(maxsize=4096)
def _gain(model: "TPLayoutCost", chunk: Chunk) -> float:
    # A step's planning asks a chunk once per rank and again in ``choose``: cached (0.2-0.8 ms a call, the
    # doc's API section); the model is frozen, so its answer for a chunk never changes.
    return model.tp([chunk]).total - model.ahead([chunk]).total


def _gathered(c: Chunk, n: int) -> Chunk:
    """``c`` as the planner should see it in TP layout: every rank holds the prefix (it gathers it), so the
    ring's prefix to position 0 (``partition.ring_receives``) is not on anyone's bill."""
    return replace(c, held=(c.start,) * n) if c.start > 0 else c


# The reasons ``plan.make_plan`` records for a chunk a splitter turns down (plan.TOO_SHORT, plan.TP_FASTER;
# plan.py imports numpy, this module stays pure; tests/test_tp_cost.py keeps them equal).
TOO_SHORT, TP_FASTER = "too_short", "tp_faster"


class TPLayoutSplitter:
    """A ``plan.StepSplitter`` for the TP layout: ``cost`` decides which chunks run ahead, each alone
    (``runs_ahead``) and as a step (``choose``), against vLLM's TP=N on this host's links (``min_tokens``,
    when set, overrides both, as in the chain of copies); a chunk turned down is ``tp_faster``.

    The cut: the TP layout's own (``TPLayoutCost.cut``: the shards and the TP tail counted), unless the
    partitioner has a measured split for the chunk (the tuner's override, or a TP-layout table that covers
    a lone chunk: what was measured in this mode) or is "even". The step's TP work (decodes, short
    chunks) runs after the guests on every rank, so it takes no share of the cut; chunks after cached
    tokens are cut with every rank holding the prefix (each gathers it)."""

    def __init__(self, partitioner, cost: TPLayoutCost, min_tokens: int | None = None) -> None:
        self.partitioner, self.cost, self.min_tokens = partitioner, cost, min_tokens

    @property
    def declined(self) -> str:
        return TOO_SHORT if self.min_tokens is not None else TP_FASTER

    def runs_ahead(self, chunk: Chunk) -> bool:
        if self.min_tokens is not None:
            return chunk.length >= self.min_tokens
        return self.cost.runs_ahead(chunk)

    def choose(self, chunks: list[Chunk], others: list[Chunk], decodes: int) -> list[bool]:
        """Of the chunks ``runs_ahead`` let through, those that run ahead given the rest of the step
        (``others``: prefill chunks on TP, ``decodes``: decode tokens); see ``TPLayoutCost.choose``."""
        if self.min_tokens is not None:
            return [True] * len(chunks)
        return self.cost.choose([replace(c, held=()) for c in chunks], others, decodes)

    def _measured(self, chunks: list[Chunk]) -> bool:
        p = self.partitioner
        if p.method == "even":
            return True
        return len(chunks) == 1 and p.measured_fractions(chunks[0].length, chunks[0].start) is not None

    def split_step(self, chunks: list[Chunk], head_only: list[Chunk]):
        if self._measured(chunks):
            return self.partitioner.split_step([_gathered(c, self.cost.n) for c in chunks], [])
        bounds = self.cost.cut(chunks)
        return [align_bounds(c, b, self.partitioner.block_size) for c, b in zip(chunks, bounds)]

    def describe(self) -> str:
        return self.partitioner.describe()
