import math

import numpy as np
import pytest

from vllm_kvrunahead.core.refine import RefineConfig, Refiner, bucket_of, nudge

A, B = 7e-7, 2.5e-11  # per token, per (token x attended token): a Llama-3-8B layer


def busy(fracs, n):
    """Causal cost of each segment: L*a + L*(prefix + L/2)*b."""
    out, prefix = [], 0.0
    for f in fracs:
        m = f * n
        out.append(m * A + m * (prefix + m / 2) * B)
        prefix += m
    return out


def balanced(n, k):
    """Fractions with equal cost per worker (bisection on the common budget)."""
    def fill(budget):
        lengths, prefix = [], 0.0
        for _ in range(k):
            lin = A + B * prefix
            m = 2 * budget / (lin + math.sqrt(lin * lin + 2 * B * budget))  # cost(m) = budget
            lengths.append(m)
            prefix += m
        return lengths

    lo, hi = 0.0, busy([1.0], n)[0]
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(fill(mid)) < n else (lo, mid)
    return [m / n for m in fill(hi)]


def run(refiner, n, base, steps):
    for _ in range(steps):
        used = refiner.fractions(n, base)
        refiner.observe(n, used, busy(used, n), base)
    return refiner.fractions(n, base)


def spread(b):
    return max(b) / min(b) - 1


@pytest.mark.parametrize("k", [2, 3, 4])
def test_converges_to_balanced_split(k):
    n, base = 40000, [1 / k] * k
    assert spread(busy(base, n)) > 0.2  # even split starts clearly unbalanced
    f = run(Refiner(k, RefineConfig(max_drift=0.5)), n, base, 60)
    assert spread(busy(f, n)) < 0.025
    assert f == pytest.approx(balanced(n, k), abs=0.005)


def test_max_drift_binds():
    n, base, drift = 40000, [0.25] * 4, 0.03
    r = Refiner(4, RefineConfig(max_drift=drift))
    for _ in range(60):
        f = run(r, n, base, 1)
        assert all(abs(x - b) <= drift + 1e-9 for x, b in zip(f, base))
    assert max(abs(x - b) for x, b in zip(f, base)) == pytest.approx(drift, abs=1e-9)
    assert spread(busy(f, n)) > 0.05  # still unbalanced: the bound, not the optimum, stopped it


def test_every_update_respects_bounds():
    rng = np.random.default_rng(1234)
    for trial in range(500):
        k = int(rng.integers(2, 7))
        cfg = RefineConfig(gain=rng.uniform(0.1, 1), max_step=rng.uniform(0.005, 0.2),
                           max_drift=rng.uniform(0, 0.5), min_fraction=rng.uniform(0.001, 0.04),
                           tolerance=float(rng.choice([0.0, 0.01])))
        base = np.maximum(rng.dirichlet(np.ones(k) * 3), 0.05)
        base = list(base / base.sum())
        f = base
        for _ in range(int(rng.integers(0, 6))):  # somewhere the refiner can reach
            f = nudge(f, list(rng.lognormal(0, 1, k)), base, cfg)
        moved = trial % 4 == 0  # the base moved under the fractions: only the hard bounds hold
        if moved:
            base = list(rng.dirichlet(np.ones(k) * 3) * 0.5 + 0.5 / k)
        g = nudge(f, list(rng.lognormal(0, 1, k)), base, cfg)
        assert len(g) == k and abs(math.fsum(g) - 1) <= 1e-12
        for gi, fi, bi in zip(g, f, base):
            assert gi >= min(cfg.min_fraction, bi) - 1e-9
            assert abs(gi - bi) <= cfg.max_drift + 1e-9
            assert moved or abs(gi - fi) <= cfg.max_step + 1e-9


def test_within_tolerance_is_unchanged():
    r, base = Refiner(3), (0.5, 0.3, 0.2)
    assert nudge(base, [2.0, 2.0, 2.0], base, RefineConfig()) == base
    assert nudge(base, [2.0, 2.01, 1.995], base, RefineConfig()) == base
    assert r.observe(40000, base, [1.0, 1.0, 1.0], base) is False
    assert r.state() == {} and r.fractions(40000, base) == base
    assert nudge(base, [2.0, 2.01, 1.995], base, RefineConfig(tolerance=0)) != base


def test_deterministic():
    def feed(r, seed):
        rng = np.random.default_rng(seed)
        base = [0.4, 0.3, 0.2, 0.1]
        for n in rng.integers(1000, 200000, 300):
            used = r.fractions(int(n), base)
            r.observe(int(n), used, [x * rng.uniform(0.9, 1.1) for x in busy(used, int(n))], base)
        return [r.fractions(n, base) for n in (2000, 40000, 150000)], r.state()

    assert feed(Refiner(4), 7) == feed(Refiner(4), 7)
    assert feed(Refiner(4), 7) != feed(Refiner(4), 8)


def test_buckets():
    assert [bucket_of(x) for x in (1, 2, 3, 32768, 40000, 65535, 65536)] == [0, 1, 1, 15, 15, 15, 16]
    r, base = Refiner(2), (0.5, 0.5)
    assert r.observe(40000, base, busy(base, 40000), base) is True
    for n in (33000, 60000):
        assert r.fractions(n, base)[0] > 0.5
    for n in (16000, 70000):
        assert r.fractions(n, base) == base
    (b, s), = r.state().items()
    assert b == 15 and s["updates"] == 1 and len(s["weights"]) == 2
    r, base = Refiner(3), (0.5, 0.3, 0.2)  # uneven base: weights are new / base, not new
    assert r.observe(40000, base, busy(base, 40000), base) is True
    new = nudge(base, busy(base, 40000), base, RefineConfig())
    assert r.fractions(50000, base) == pytest.approx(new, abs=1e-12)
    w = [x / y for x, y in zip(new, base)]
    other = (0.6, 0.25, 0.15)  # another base in the same bucket gets the same weights
    assert r.fractions(50000, other) == pytest.approx([x * y / sum(p * q for p, q in zip(w, other))
                                                       for x, y in zip(w, other)], abs=1e-12)


@pytest.mark.parametrize("field, bad", [
    ("gain", 0), ("gain", 1.5), ("gain", float("nan")), ("max_step", 0), ("max_step", 0.6),
    ("max_drift", -0.1), ("max_drift", 1.0), ("min_fraction", 0), ("min_fraction", 1),
    ("tolerance", -0.01), ("tolerance", float("inf")), ("gain", "0.5"), ("max_step", True),
])
def test_bad_config(field, bad):
    with pytest.raises(ValueError, match=f"RefineConfig.{field} must"):
        RefineConfig(**{field: bad}).validate()
    with pytest.raises(ValueError, match=f"RefineConfig.{field} must"):
        Refiner(2, RefineConfig(**{field: bad}))


def test_bad_inputs():
    base = (0.5, 0.3, 0.2)
    for n_workers in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="n_workers >= 2"):
            Refiner(n_workers)
    with pytest.raises(ValueError, match="min_fraction must be < 1/n_workers"):
        Refiner(10, RefineConfig(min_fraction=0.1))
    with pytest.raises(ValueError, match="lengths differ"):
        nudge(base, [1.0, 2.0], base, RefineConfig())
    for fr, msg in (((0.5, 0.5, 0.0), "finite and > 0"), ((0.5, 0.3, 0.3), "sum to 1")):
        with pytest.raises(ValueError, match=msg):
            nudge(fr, [1.0, 2.0, 3.0], base, RefineConfig())
    with pytest.raises(ValueError, match="busy times"):
        nudge(base, [1.0, 0.0, 3.0], base, RefineConfig())
    r = Refiner(3)
    with pytest.raises(ValueError, match="busy_s has 2 entries"):
        r.observe(40000, base, [1.0, 2.0], base)
    with pytest.raises(ValueError, match="base has 2 entries"):
        r.fractions(40000, (0.5, 0.5))
    assert r.observe(40000, base, [1.0, 2.0, 3.0], base) is True
    before = r.state()
    for glitch in (0.0, -1.0, float("nan"), float("inf")):
        assert r.observe(40000, base, [1.0, glitch, 3.0], base) is False
    assert r.state() == before
