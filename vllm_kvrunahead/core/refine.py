"""Online refinement of segment fractions from measured busy times (pure; no torch).

The base split (cost model or lookup table) is a prediction; on real hardware the
workers' busy times (compute, excluding stalls waiting for the predecessor's KV)
still differ. After each long prefill every worker feeds the same measurements to
its own ``Refiner``, which nudges that length bucket's fractions toward equal busy
times, a bounded step at a time. Only float arithmetic in chain order (no
randomness, no clocks, no set/dict iteration order), so all workers agree bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .partition import check_fractions

_RANGES = (  # (field, allowed, how the message says it)
    ("gain", lambda v: 0 < v <= 1, "0 < gain <= 1"),
    ("max_step", lambda v: 0 < v <= 0.5, "0 < max_step <= 0.5"),
    ("max_drift", lambda v: 0 <= v < 1, "0 <= max_drift < 1"),
    ("min_fraction", lambda v: 0 < v < 1, "0 < min_fraction < 1 (and < 1/n_workers)"),
    ("tolerance", lambda v: v >= 0, "tolerance >= 0"),
)


@dataclass(frozen=True)
class RefineConfig:
    gain: float = 0.5           # exponent of the multiplicative correction
    max_step: float = 0.02      # largest change of any one fraction per update (absolute)
    max_drift: float = 0.15     # largest |f_i - base_i| ever
    min_fraction: float = 0.02  # no segment below this share (unless its base already is)
    tolerance: float = 0.01     # max(busy)/min(busy) - 1 within this: no change

    def validate(self) -> "RefineConfig":
        for name, ok, allowed in _RANGES:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"RefineConfig.{name} must be a finite number with {allowed}, got {v!r}")
        return self


def _clip(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def _project(t: list[float], box: list[tuple[float, float]]) -> tuple[float, ...]:
    """Nearest point to t with lo_i <= g_i <= hi_i and sum(g) = 1: g_i = clip(t_i + lam).

    sum(g) is continuous and non-decreasing in lam, so bisection finds lam; it needs
    sum(lo) <= 1 <= sum(hi), which the caller guarantees.
    """
    def total(lam: float) -> float:
        return math.fsum(_clip(x + lam, lo, hi) for x, (lo, hi) in zip(t, box))

    a = min(lo - x for x, (lo, _) in zip(t, box))  # total(a) = sum(lo) <= 1
    z = max(hi - x for x, (_, hi) in zip(t, box))  # total(z) = sum(hi) >= 1
    for _ in range(200):
        mid = (a + z) / 2
        if mid <= a or mid >= z:  # float resolution reached
            break
        if total(mid) < 1:
            a = mid
        else:
            z = mid
    g = [_clip(x + z, lo, hi) for x, (lo, hi) in zip(t, box)]
    s = math.fsum(g)  # 1 up to rounding (~N ulp): dividing moves no bound by more than that
    return tuple(x / s for x in g)


def nudge(fractions, busy_s, base, cfg: RefineConfig) -> tuple[float, ...]:
    """One bounded update toward equal busy times.

    target_i ∝ f_i * (mean(busy)/busy_i) ** gain. Bounds: |g_i - f_i| <= max_step,
    |g_i - base_i| <= max_drift, g_i >= min(min_fraction, base_i) (a base below the
    floor is trusted). Clipping then renormalising would break the bounds again, so
    the target is instead projected (Euclidean) onto {bounds} ∩ {sum = 1} in one go;
    that set holds the old fractions, so it is never empty, and the final division by
    the sum only removes rounding (bounds hold to ~1e-15). If the old fractions lie
    outside the drift/floor box (e.g. the base moved), the drift/floor bounds win over
    max_step: the step box is clipped into them and, if that leaves no split summing
    to 1, dropped for this update.
    If max(busy)/min(busy) - 1 <= tolerance the fractions come back unchanged.
    """
    cfg.validate()
    if not len(fractions) == len(busy_s) == len(base):
        raise ValueError(f"lengths differ: {len(fractions)} fractions, {len(busy_s)} busy times, "
                         f"{len(base)} base fractions")
    f, b = check_fractions(fractions), check_fractions(base, name="base")
    busy = [float(x) for x in busy_s]
    if not all(math.isfinite(x) and x > 0 for x in busy):
        raise ValueError(f"busy times must all be finite and > 0, got {busy}")
    if max(busy) / min(busy) - 1 <= cfg.tolerance:
        return f
    mean = math.fsum(busy) / len(busy)
    t = [fi * (mean / bi) ** cfg.gain for fi, bi in zip(f, busy)]
    s = math.fsum(t)
    t = [x / s for x in t]
    hard = [(max(min(cfg.min_fraction, bi), bi - cfg.max_drift), bi + cfg.max_drift) for bi in b]
    box = [(_clip(fi - cfg.max_step, *h), _clip(fi + cfg.max_step, *h)) for fi, h in zip(f, hard)]
    if not math.fsum(lo for lo, _ in box) <= 1 <= math.fsum(hi for _, hi in box):
        box = hard  # holds base, so feasible
    return _project(t, box)


def bucket_of(n_tokens: int) -> int:
    """Length bucket floor(log2(n)): corrections learned at 40k apply to 32k..64k prompts."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"prompt length must be an integer >= 1, got {n_tokens!r}")
    return n_tokens.bit_length() - 1


class Refiner:
    """Per-bucket multiplicative weights on top of a base split (the cost model or a table)."""

    def __init__(self, n_workers: int, cfg: RefineConfig = RefineConfig()):
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 2:
            raise ValueError(f"Refiner needs n_workers >= 2, got {n_workers!r}")
        self.cfg = cfg.validate()
        if cfg.min_fraction * n_workers >= 1:
            raise ValueError(f"RefineConfig.min_fraction must be < 1/n_workers = {1 / n_workers:.6g}, "
                             f"got {cfg.min_fraction}")
        self.n_workers = n_workers
        self._weights: dict[int, tuple[float, ...]] = {}
        self._updates: dict[int, int] = {}

    def _check_len(self, name: str, xs) -> None:
        if len(xs) != self.n_workers:
            raise ValueError(f"{name} has {len(xs)} entries, expected n_workers={self.n_workers}")

    def fractions(self, n: int, base) -> tuple[float, ...]:
        """Base fractions for an n-token prompt times its bucket's weights, normalised."""
        self._check_len("base", base)
        w = self._weights.get(bucket_of(n))
        if w is None:
            return tuple(float(x) for x in base)
        f = [float(x) * y for x, y in zip(base, w)]
        s = math.fsum(f)
        return tuple(x / s for x in f)

    def observe(self, n: int, used_fractions, busy_s, base) -> bool:
        """One nudge for n's bucket from a step that used ``used_fractions`` and measured
        ``busy_s`` per worker (chain order, head last); True if the fractions changed.

        Mismatched lengths or bad fractions raise (a programming error); a non-positive
        or non-finite busy time is ignored (False, no change): a profiler glitch must
        not kill serving.
        """
        k = bucket_of(n)
        for name, xs in (("used_fractions", used_fractions), ("busy_s", busy_s), ("base", base)):
            self._check_len(name, xs)
        busy = [float(x) for x in busy_s]
        if not all(math.isfinite(x) and x > 0 for x in busy):
            return False
        new = nudge(used_fractions, busy, base, self.cfg)
        if new == tuple(float(x) for x in used_fractions):
            return False
        self._weights[k] = tuple(g / float(b) for g, b in zip(new, base))
        self._updates[k] = self._updates.get(k, 0) + 1
        return True

    def state(self) -> dict:
        """JSON-able {bucket: {"weights": [...], "updates": k}} (buckets ascending)."""
        return {k: {"weights": list(self._weights[k]), "updates": self._updates[k]}
                for k in sorted(self._weights)}
