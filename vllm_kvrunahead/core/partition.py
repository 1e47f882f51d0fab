"""Where to cut a prompt: segment bounds for N chained workers (pure; no torch).

KV-Runahead gives worker k a contiguous segment [start_k, end_k) of the prompt.
Worker k attends over the prefix [0, start_k) it receives from worker k-1,
so later segments cost more per token; context-level load balancing therefore
makes earlier segments longer::

    tokens  0 ............................................................ n
            |<------ seg 0 ------>|<---- seg 1 ---->|<-- seg 2 -->|<-seg 3->|
    worker         w0   --KV[0,e0)-->   w1  --KV[0,e1)-->  w2 --KV[0,e2)--> head
                                                                   (samples, decodes)

    layer l of worker k starts once layer l of worker k-1 has sent its KV, so the
    chain is a pipeline over layers: finish_k(l) = max(finish_k(l-1),
    finish_{k-1}(l) + xfer_k) + compute_k.

One vocabulary for the split: a model's ``ModelShape`` gives its ``CostModel``, which
gives the ``Segment`` s (``even_split``, ``balanced_split``, or a whole step of
``Chunk`` s with ``balanced_step_bounds``); segments cover [0, n) exactly, in chain
order (the last one is the head's).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of one prompt, computed by chain position ``index``."""

    index: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ModelShape:
    """What a split depends on besides N and the GPU: its cost model comes from it, and tables record it
    under "model"."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int

    def matches(self, recorded: object) -> bool:
        """A table's "model" entry matches when every field it records equals ours (and it records some)."""
        if not isinstance(recorded, dict):
            return False
        mine = asdict(self)
        keys = [k for k in mine if k in recorded]
        return bool(keys) and all(recorded[k] == mine[k] for k in keys)


def layer_linear_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    """One decoder layer's linear weights: q, k, v, o and the MLP's gate, up, down (no norms, no biases)."""
    q, kv = shape.heads * shape.head_dim, 2 * shape.kv_heads * shape.head_dim
    return dtype_bytes * (shape.hidden * (q + kv) + q * shape.hidden + 3 * shape.hidden * shape.intermediate)


@dataclass(frozen=True)
class CostModel:
    """Seconds one worker spends per layer on a segment (constants per layer).

    linear: per own token (QKV/O projections, MLP);
    attn:   per (own token x attended token) pair (causal: own x (prefix + own/2));
    xfer:   per prefix token received (KV bytes / link bandwidth).
    Defaults: a Llama-3-8B layer; ``from_shape`` derives the constants from a model
    shape and effective rates. The rates (600 TFLOP/s matmul, 650 TFLOP/s causal
    attention counted as 4*heads*head_dim per pair) were fitted with ``fit`` to
    measured one-GPU TTFT (H200, vLLM 0.26.0, FA3, bf16, 4k-64k tokens; the fit
    predicts those TTFTs within 1%).
    """

    num_layers: int = 32
    linear: float = 2 * 218_103_808 / 600e12
    attn: float = 4 * 4096 / 650e12
    xfer: float = 2 * 8 * 128 * 2 / 300e9
    # Seconds each extra chain worker adds to a runahead step that the layer pipeline does not hide
    # (step set-up, per-layer hooks, launch latency): ~13 ms, from N=2 and N=4 TTFT at 1k-4k tokens
    # on 4x H200 (N=4: 0.6x of one GPU at 1k tokens, 1.05x at 2k). Decides what runs ahead.
    hop: float = 0.013

    @classmethod
    def for_shape(cls, shape: ModelShape | None, tp_size: int = 1) -> "CostModel":
        """The cost model of a model shape (None, an unusual config: the Llama-3-8B default), for a
        stage of ``tp_size`` tensor-parallel ranks (see ``tensor_parallel``)."""
        if shape is None:
            return cls().tensor_parallel(tp_size, 4096)
        return cls.from_shape(num_layers=shape.layers, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                              num_heads=shape.heads, num_kv_heads=shape.kv_heads,
                              head_dim=shape.head_dim).tensor_parallel(tp_size, shape.hidden, kv_heads=shape.kv_heads)

    def tensor_parallel(self, tp_size: int, hidden_size: int, dtype_bytes: int = 2,
                        allreduce_bytes_per_s: float = 300e9, kv_heads: int | None = None) -> "CostModel":
        """This model for one runahead stage of ``tp_size`` TP ranks (KV-Runahead x TP).

        Each rank computes 1/T of every projection, MLP and attention head (linear and attn / T)
        and moves only its 1/T of the KV heads to the next stage's same TP rank (xfer / T; the T
        chains run side by side on their own links). Per layer and token, TP adds two all-reduces
        of the hidden state (after attention and after the MLP); a ring all-reduce moves
        2 (T-1)/T of the bytes through each rank, counted on the linear term. With fewer KV heads
        than TP ranks (``kv_heads`` < T) vLLM gives each rank a copy of one KV head, so a rank moves
        1/kv_heads of the KV, not 1/T. T = 1: unchanged.
        """
        if tp_size == 1:
            return self
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        t = float(tp_size)
        allreduce = 2 * (2 * (t - 1) / t) * hidden_size * dtype_bytes / allreduce_bytes_per_s
        kv_share = 1 / t if kv_heads is None else max(1, kv_heads // tp_size) / kv_heads
        return replace(self, linear=self.linear / t + allreduce, attn=self.attn / t,
                                   xfer=self.xfer * kv_share)

    @classmethod
    def from_shape(
        cls,
        *,
        num_layers: int,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype_bytes: int = 2,
        matmul_flops: float = 600e12,
        attn_flops: float = 650e12,
        link_bytes_per_s: float = 300e9,
    ) -> "CostModel":
        q_out = num_heads * head_dim
        kv_out = 2 * num_kv_heads * head_dim
        params = hidden_size * (q_out + kv_out) + q_out * hidden_size
        params += 3 * hidden_size * intermediate_size
        return cls(
            num_layers=num_layers,
            linear=2 * params / matmul_flops,
            attn=4 * num_heads * head_dim / attn_flops,
            xfer=kv_out * dtype_bytes / link_bytes_per_s,
        )

    def validate(self) -> "CostModel":
        if self.num_layers < 1:
            raise ValueError(f"CostModel.num_layers must be >= 1, got {self.num_layers}")
        for name in ("linear", "attn", "xfer", "hop"):
            if getattr(self, name) < 0:
                raise ValueError(f"CostModel.{name} must be >= 0, got {getattr(self, name)}")
        if self.linear == 0 and self.attn == 0:
            raise ValueError("CostModel needs linear > 0 or attn > 0")
        return self

    @classmethod
    def fit(cls, one_gpu_ttft: dict[int, float], num_layers: int, xfer: float = 0.0) -> "CostModel":
        """Least-squares fit of linear and attention constants to one-GPU TTFT by length.

        One worker prefilling L tokens costs num_layers * (linear*L + attn*L^2/2) (+ a
        fixed overhead, also fitted and dropped: it does not move segment bounds).
        """
        import numpy as np

        if len(one_gpu_ttft) < 3:
            raise ValueError("fitting the cost model needs one-GPU TTFT at >= 3 prompt lengths")
        lengths = np.array(sorted(one_gpu_ttft), dtype=np.float64)
        t = np.array([one_gpu_ttft[int(n)] for n in lengths])
        a = np.stack([num_layers * lengths, num_layers * lengths**2 / 2, np.ones_like(lengths)], axis=1)
        w = 1 / t  # relative error: short and long prompts count alike
        (lin, att, _), *_ = np.linalg.lstsq(a * w[:, None], t * w, rcond=None)
        if lin <= 0 or att <= 0:
            raise ValueError(f"cost model fit gave non-positive constants (linear={lin}, attn={att})")
        return cls(num_layers=num_layers, linear=float(lin), attn=float(att), xfer=xfer).validate()

    def layer_compute(self, start: int, end: int) -> float:
        m = end - start
        return self.linear * m + self.attn * m * (start + m / 2)

    def layer_xfer(self, start: int) -> float:
        return self.xfer * start


def _check(n: int, n_workers: int) -> None:
    if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"number of workers must be an integer >= 1, got {n_workers!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"prompt length must be an integer >= 1, got {n!r}")
    if n_workers > n:
        raise ValueError(
            f"cannot split {n} prompt tokens over {n_workers} workers: every worker "
            f"needs >= 1 token; use at most {n} workers"
        )


def segments_from_lengths(lengths: list[int]) -> tuple[Segment, ...]:
    out, start = [], 0
    for i, m in enumerate(lengths):
        out.append(Segment(i, start, start + m))
        start += m
    return tuple(out)


def even_split(n: int, n_workers: int) -> tuple[Segment, ...]:
    """Equal lengths; the remainder goes to the earliest (cheapest per token) segments."""
    _check(n, n_workers)
    q, r = divmod(n, n_workers)
    return segments_from_lengths([q + (1 if i < r else 0) for i in range(n_workers)])


def finish_times(segments: tuple[Segment, ...], cost: CostModel) -> list[float]:
    """Predicted time each chain worker finishes its last layer (pipeline recurrence)."""
    cost.validate()
    prev, out = None, []
    for seg in segments:
        prev = _layers_done(seg.start, seg.end, prev, cost)
        out.append(prev[-1])
    return out


def predicted_ttft(segments: tuple[Segment, ...], cost: CostModel) -> float:
    return finish_times(segments, cost)[-1]


def worker_costs(segments: tuple[Segment, ...], cost: CostModel) -> list[float]:
    """Per-layer busy time of each worker (compute + receiving its prefix)."""
    return [cost.layer_compute(s.start, s.end) + cost.layer_xfer(s.start) for s in segments]


def _layers_done(start: int, end: int, prev_layers, cost: CostModel) -> list[float]:
    c, x = cost.layer_compute(start, end), cost.layer_xfer(start)
    t, out = 0.0, []
    for layer in range(cost.num_layers):
        t = (t if prev_layers is None else max(t, prev_layers[layer] + x)) + c
        out.append(t)
    return out


def _longest_within(start: int, most: int, budget: float, cost: CostModel) -> int:
    """Longest m in [1, most] with per-layer cost of [start, start+m) <= budget (1 at least)."""

    def c(m: int) -> float:
        return cost.layer_compute(start, start + m) + cost.layer_xfer(start)

    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if c(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _equal_cost(n: int, n_workers: int, cost: CostModel) -> list[int]:
    """Smallest per-worker budget B such that filling workers greedily covers n tokens."""

    def fill(budget: float) -> list[int] | None:
        lengths, start = [], 0
        for k in range(n_workers - 1):
            m = _longest_within(start, n - start - (n_workers - 1 - k), budget, cost)
            lengths.append(m)
            start += m
        last = n - start
        if cost.layer_compute(start, n) + cost.layer_xfer(start) > budget:
            return None
        return lengths + [last]

    even = even_split(n, n_workers)
    hi = max(worker_costs(even, cost))
    best = fill(hi)
    while best is None:  # cost not monotone in start (huge xfer): widen until covered
        hi *= 2
        best = fill(hi)
    return _smallest_budget(fill, hi, best, iters=64)


def _smallest_budget(fill, hi: float, best, iters: int):
    """Bisection for the smallest per-worker budget in (0, hi] that ``fill`` can meet (``fill(hi)``
    is ``best``, not None); returns what ``fill`` gave for it."""
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        got = fill(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
        if hi - lo <= 1e-9 * hi:
            break
    return best


def balanced_split(n: int, n_workers: int, cost: CostModel | None = None) -> tuple[Segment, ...]:
    """Lengths that equalize per-worker per-layer cost (compute + prefix receive).

    Equal per-layer cost keeps the layer pipeline flowing: no worker waits on a
    slower predecessor, so TTFT ~ (layers + N - 1) x that cost.
    """
    _check(n, n_workers)
    cost = (cost or CostModel()).validate()
    if n_workers == 1:
        return (Segment(0, 0, n),)
    return segments_from_lengths(_equal_cost(n, n_workers, cost))


def from_fractions(n: int, fractions: list[float] | tuple[float, ...]) -> tuple[Segment, ...]:
    """Segments whose lengths follow ``fractions`` (summing to 1), each >= 1 token."""
    _check(n, len(fractions))
    bounds = [0]
    acc = 0.0
    for i, f in enumerate(fractions[:-1]):
        acc += f
        b = int(round(acc * n))
        b = max(b, bounds[-1] + 1)                      # >= 1 token for this one
        b = min(b, n - (len(fractions) - 1 - i))        # >= 1 token for each later one
        bounds.append(b)
    bounds.append(n)
    return segments_from_lengths([b - a for a, b in zip(bounds, bounds[1:])])


# -- a step as one job: chunks of any start, several at once, with the head's other work ----------

def ring_receives(pos: int, n_workers: int, start: float, seg_start: float,
                  held: tuple[int, ...] = ()) -> tuple[float, float]:
    """What ring position ``pos`` receives per layer for a chunk [start, ...) whose segment at ``pos``
    starts at ``seg_start``, as tokens [lo, hi); the one statement of the ring's messages:

        head --[h0, c)--> pos 0 --[h1, s1)--> pos 1 --[h2, s2)--> ... pos N-2 --[c, s_head)--> head

    A chain position receives what it lacks of everything before its segment (``held``: the leading
    tokens it holds from earlier steps; position 0's segment starts at c, so it gets the cached prefix,
    from the head); the head holds [0, c) and receives only the chain's new KV."""
    if pos == n_workers - 1:
        return start, seg_start
    return (held[pos] if held else 0), seg_start


@dataclass(frozen=True)
class Chunk:
    """One request's tokens computed in a step: [start, end). KV of [0, start) is cached on the
    head (an earlier chunk, a prefix-cache hit, a resumed request); chain workers compute prompt
    tokens only, so their segments end at or before ``limit`` (the prompt's length). ``held``: per
    chain position, the tokens of [0, start) it holds from earlier steps and need not receive."""

    start: int
    end: int
    limit: int
    held: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return self.end - self.start

    def received(self, pos: int, n_workers: int, seg_start: float) -> tuple[float, float]:
        """The KV [lo, hi) ring position ``pos`` receives per layer before its segment, which starts at
        ``seg_start``: see ``ring_receives``."""
        return ring_receives(pos, n_workers, self.start, seg_start, self.held)

    def block_bounds(self, align: int) -> int:
        """How many multiples of ``align`` lie in (start, min(end - 1, limit)]: the places an inner
        segment bound may sit (a chain worker's segment ends within the prompt, the head keeps a token)."""
        return min(self.end - 1, self.limit) // align - self.start // align


def _position_at(chunk: Chunk, share: float, cost: CostModel) -> float:
    """Position x in the chunk where the per-layer compute of [start, x) is ``share`` of the chunk's:
    compute(start, x) = linear (x - start) + attn (x^2 - start^2) / 2 is increasing in x."""
    s, e = chunk.start, chunk.end
    if share <= 0:
        return float(s)
    if share >= 1:
        return float(e)
    target = share * cost.layer_compute(s, e) + cost.linear * s + cost.attn * s * s / 2
    if cost.attn == 0:
        return target / cost.linear
    return (-cost.linear + math.sqrt(cost.linear ** 2 + 2 * cost.attn * target)) / cost.attn


def balanced_step_bounds(chunks: list[Chunk], n_workers: int, cost: CostModel,
                         head_extra: float = 0.0, shard_share: float = 0.0) -> list[list[float]]:
    """Inner bounds (N-1 real positions per chunk) that give every worker the same per-layer busy
    time for the whole step: its segments of all chunks, the prefix KV it receives, and on the
    head ``head_extra`` (per-layer cost of the work only the head does: decodes, short chunks).
    ``shard_share`` (the TP layout): each position also receives that share of the KV of every chunk's
    tokens after its segment (its KV heads of the later segments, the shards).

    Worker k takes the same share of every chunk's compute (compute of [a, b) is F(b) - F(a), so
    equal shares add up); one bisection on the per-worker budget sets the shares. With one cold
    chunk and no head work this is ``balanced_split``.
    """
    cost.validate()
    total = sum(cost.layer_compute(c.start, c.end) for c in chunks)
    if n_workers < 2 or not chunks or total <= 0:
        return [[float(c.end)] * max(0, n_workers - 1) for c in chunks]

    def received(pos: int, u: float) -> float:  # u: the share of every chunk before pos's segment
        spans = (c.received(pos, n_workers, _position_at(c, u, cost)) for c in chunks)
        return cost.xfer * sum(hi - lo for lo, hi in spans)

    def shards(v: float) -> float:  # the later segments' KV heads into a position whose segments end at v
        return cost.xfer * shard_share * sum(c.end - _position_at(c, v, cost) for c in chunks)

    def fill(budget: float) -> list[float] | None:
        shares, u = [], 0.0
        for pos in range(n_workers - 1):
            room = budget - received(pos, u)
            v = min(1.0, u + max(0.0, room) / total)
            # The shards fall as the segment grows, far slower than its compute rises (a token's KV share
            # against its projections and MLP: 1e-3 to 1e-2 of it), so the fixed point is reached from
            # above in a few steps.
            for _ in range(4 if shard_share else 0):
                v = min(1.0, u + max(0.0, room - shards(v)) / total)
            shares.append(v)
            u = v
        head = (1 - u) * total + received(n_workers - 1, u) + head_extra
        return shares if head <= budget else None

    hi = total + received(n_workers - 1, 1.0) + head_extra + cost.xfer * sum(c.end for c in chunks)
    best = _smallest_budget(fill, hi, fill(hi), iters=100)
    return [[_position_at(c, u, cost) for u in best] for c in chunks]


def align_bounds(chunk: Chunk, bounds: list[float], align: int) -> tuple[Segment, ...]:
    """Segments of ``chunk`` whose inner bounds are multiples of ``align`` (a KV block), nearest
    first: >= 1 token for the first segment, >= one block for the others but the last, >= 1 token
    for the last (the head's); inner bounds stay <= ``chunk.limit``. Needs N-1 multiples of
    ``align`` in (start, min(end - 1, limit)]."""
    if align < 1:
        raise ValueError(f"alignment must be >= 1, got {align}")
    k = len(bounds)
    first = chunk.start // align + 1                       # smallest multiple (in blocks) > start
    last = first - 1 + chunk.block_bounds(align)           # largest allowed
    if chunk.block_bounds(align) < k:
        raise ValueError(f"cannot cut tokens [{chunk.start}, {chunk.end}) into {k + 1} segments at "
                         f"{align}-token blocks")
    out, prev = [], first - 1
    for i, b in enumerate(bounds):
        q = int(round(b / align))
        q = max(q, prev + 1)                               # after the previous bound
        q = min(q, last - (k - 1 - i))                     # room for the later ones
        out.append(q)
        prev = q
    edges = [chunk.start] + [q * align for q in out] + [chunk.end]
    return tuple(Segment(i, a, b) for i, (a, b) in enumerate(zip(edges, edges[1:])))


def runahead_gain(chunk: Chunk, n_workers: int, cost: CostModel) -> float:
    """Predicted seconds a chunk finishes sooner on the chain (balanced, layer pipeline of
    (layers + N - 1) steps of the busiest worker, plus ``hop`` per extra worker) than on the head
    alone; <= 0: keep it on the head."""
    if n_workers < 2:
        return 0.0
    alone = cost.num_layers * cost.layer_compute(chunk.start, chunk.end)
    edges = [float(chunk.start), *balanced_step_bounds([chunk], n_workers, cost)[0], float(chunk.end)]
    busy = []
    for k, (a, b) in enumerate(zip(edges, edges[1:])):
        lo, hi = chunk.received(k, n_workers, a)
        busy.append(cost.layer_compute(a, b) + cost.xfer * (hi - lo))
    chain = (cost.num_layers + n_workers - 1) * max(busy) + (n_workers - 1) * cost.hop
    return alone - chain


# -- fractions: a split as shares of the tokens, in chain order ------------------------------------

def check_fractions(fractions, n_workers: int | None = None, name: str = "fractions") -> tuple[float, ...]:
    """``fractions`` as floats when they are a split (``n_workers`` of them, if given; each a finite
    number > 0; summing to 1 within 1e-6), else a ValueError that starts with ``name``."""
    if not isinstance(fractions, (list, tuple)) or (n_workers is not None and len(fractions) != n_workers):
        count = "" if n_workers is None else f"{n_workers} "
        raise ValueError(f"{name} must be a list of {count}numbers, got {fractions!r}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
               for x in fractions):
        raise ValueError(f"{name} must all be finite and > 0, got {list(fractions)}")
    if abs(math.fsum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"{name} must sum to 1, sum is {math.fsum(fractions):.9f}")
    return tuple(float(x) for x in fractions)


def fractions_of(segments) -> tuple[float, ...]:
    """Each segment's share of the tokens that ``segments`` (contiguous, in chain order) cover."""
    n = segments[-1].end - segments[0].start
    return tuple(s.length / n for s in segments)
