"""The TP layout's cost model (``core/tp_cost.py``) against the committed GPU measurements: the rows its
constants were fitted to (each cited), the fits, the check of the model against every row, and the
prediction tables the multi-GPU run will check (docs/tp-layout-cost.md).

    python -m vllm_kvrunahead.tools.tp_cost_tables crossover|predict|check|fit
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from ..core.partition import Chunk, ModelShape
from ..core.tp_cost import KIB4, LLAMA3_8B, ONE_GPU, PROFILES, GPURates, LinkProfile, Rates, TPLayoutCost

RESULTS = "benchmarks/results/README.md"
TTFT_MD = "benchmarks/results/ttft.md"      # the same figures, with decode tok/s, per machine
SERVING_MD = "benchmarks/results/serving.md"


# -- measurements the constants come from ------------------------------------------------------------

@dataclass(frozen=True)
class Measured:
    """One committed TTFT: ``kind`` 1gpu / tp / chain (the chain of copies, kvr-balanced: the cost
    model's split), N GPUs, link profile, prompt tokens (one prompt, whole prompt in one step unless
    ``budget`` says how it was chunked), seconds; ``where`` names the table and row."""

    kind: str
    n: int
    link: str
    tokens: int
    ttft: float
    where: str
    machine: str = "h200-x4-A"
    budget: int | None = None
    scenario: str = "one"    # one prompt; "16x16k-mean" / "16x16k-wall" / "multi-turn": serving.md's


def _rows(kind, n, link, machine, where, pairs, budget=None):
    return [Measured(kind, n, link, t, s, f"{where}, row {t}", machine, budget) for t, s in pairs]


def _scenarios(kind, n, column, pairs):
    return [Measured(kind, n, "nvlink", 16384 if sc != "multi-turn" else 8192, s,
                     f"{_H100}, {column} column, row {row}", "h100-x4", 16384, sc) for sc, row, s in pairs]


_X4 = f'{RESULTS} "TTFT, 4x H200" (= {TTFT_MD} "[nvidia-h200-x4 A] / llama3-8b / 4 GPUs / nvlink")'
_X4_NOP2P = f'{RESULTS} "N=4 with NCCL_P2P_DISABLE=1" (= {TTFT_MD} "[nvidia-h200-x4 A] / llama3-8b / 4 GPUs / no-p2p")'
_X4_N2 = f'{RESULTS} "N=2 on GPUs 0,1 of machine A" (= {TTFT_MD} "[nvidia-h200-x4 A] / llama3-8b / 2 GPUs / nvlink")'
_X2 = f'{RESULTS} "TTFT, 2x H200" (= {TTFT_MD} "[nvidia-h200-x2] / llama3-8b / 2 GPUs / nvlink")'
_X2_NOP2P = f'{RESULTS} "TTFT, 2x H200", NCCL_P2P_DISABLE=1 table (= {TTFT_MD} "[nvidia-h200-x2] / ... / no-p2p")'
_H100 = f'{SERVING_MD} "NVIDIA H100 80GB HBM3 / llama3-8b / nvlink"'

# Medians of 3 as in benchmarks/results/ttft.json (tests/test_tp_cost.py checks them against that file).
MEASURED: tuple[Measured, ...] = tuple(
    _rows("1gpu", 1, "nvlink", "h200-x4-A", _X4 + " 1gpu column",
          [(1024, 0.02852), (2048, 0.05285), (4096, 0.10173), (8192, 0.21076), (16384, 0.49093),
           (32768, 1.19367), (65536, 3.28688)])
    + _rows("tp", 4, "nvlink", "h200-x4-A", _X4 + " TP=4 column",
            [(1024, 0.04234), (2048, 0.04300), (4096, 0.04887), (8192, 0.08407), (16384, 0.17147),
             (32768, 0.38950), (65536, 1.01266)])
    + _rows("chain", 4, "nvlink", "h200-x4-A", _X4 + " kvr-balanced column",
            [(1024, 0.04802), (2048, 0.05051), (4096, 0.05163), (8192, 0.07258), (16384, 0.14576),
             (32768, 0.35650), (65536, 0.96462)])
    + _rows("tp", 4, "no-p2p", "h200-x4-A", _X4_NOP2P + " TP=4 column",
            [(8192, 0.33024), (32768, 1.34678), (65536, 2.85354)])
    + _rows("chain", 4, "no-p2p", "h200-x4-A", _X4_NOP2P + " kvr-balanced column",
            [(8192, 0.07409), (32768, 0.34480), (65536, 0.91736)])
    + _rows("chain", 2, "nvlink", "h200-x4-A", _X4_N2 + " kvr-balanced column",
            [(4096, 0.06005), (16384, 0.26200), (32768, 0.64016), (65536, 1.74826)])
    + _rows("1gpu", 1, "nvlink", "h200-x2", _X2 + " 1gpu column",
            [(4096, 0.10108), (8192, 0.21036), (16384, 0.49272), (32768, 1.20110), (65536, 3.26504)])
    + _rows("tp", 2, "nvlink", "h200-x2", _X2 + " TP=2 column",
            [(4096, 0.07041), (8192, 0.13024), (16384, 0.28222), (32768, 0.68446), (65536, 1.81006)])
    + _rows("chain", 2, "nvlink", "h200-x2", _X2 + " kvr-balanced column",
            [(4096, 0.06348), (8192, 0.12117), (16384, 0.26829), (32768, 0.66375), (65536, 1.77694)])
    + _rows("tp", 2, "no-p2p", "h200-x2", _X2_NOP2P + " TP=2 column", [(16384, 0.52468), (32768, 1.12896)])
    + _rows("chain", 2, "no-p2p", "h200-x2", _X2_NOP2P + " kvr-balanced column",
            [(16384, 0.25726), (32768, 0.64463)])
    # 4x H100 under vLLM's default scheduler: 1 GPU and TP=N at budget 16384 (a 64k prompt in 4 steps),
    # the chain of copies at N x 16384 (one step at N=4). A machine the fit never saw: a check only.
    + _rows("1gpu", 1, "nvlink", "h100-x4", _H100 + " 1gpu column, default-budget rows",
            [(32768, 1.198), (65536, 3.292)], budget=16384)
    + _rows("tp", 2, "nvlink", "h100-x4", _H100 + " tp N=2 column, default-budget rows",
            [(32768, 0.694), (65536, 1.859)], budget=16384)
    + _rows("tp", 4, "nvlink", "h100-x4", _H100 + " tp N=4 column, default-budget rows",
            [(32768, 0.412), (65536, 1.059)], budget=16384)
    + _rows("chain", 4, "nvlink", "h100-x4", _H100 + " kvr N=4 column, default-budget rows",
            [(32768, 0.373), (65536, 1.002)], budget=65536)
    # the same machine and table: 16 cold 16k prompts at once (max_tokens 1; mean TTFT from the results
    # README's "... mean TTFT per request" row), 8 conversations x 4 turns of +8k (32 output tokens)
    + _scenarios("1gpu", 1, "1gpu", [("16x16k-wall", "concurrent-16x16k", 7.767),
                                     ("16x16k-mean", "mean TTFT per request (results README)", 4.165),
                                     ("multi-turn", "multi-turn", 1.889)])
    + _scenarios("tp", 2, "tp N=2", [("16x16k-wall", "concurrent-16x16k", 4.527),
                                     ("16x16k-mean", "mean TTFT per request (results README)", 2.412)])
    + _scenarios("tp", 4, "tp N=4", [("16x16k-wall", "concurrent-16x16k", 2.669),
                                     ("16x16k-mean", "mean TTFT per request (results README)", 1.421),
                                     ("multi-turn", "multi-turn", 0.617)])
)


# -- fits (pure Python least squares) ------------------------------------------------------------------

def _solve(a: list[list[float]], y: list[float], w: list[float]) -> list[float]:
    """Weighted least squares by the normal equations (a few unknowns, well conditioned after scaling)."""
    k = len(a[0])
    scale = [max(abs(row[j]) for row in a) or 1.0 for j in range(k)]
    rows = [[row[j] / scale[j] for j in range(k)] for row in a]
    m = [[sum(wi * wi * r[i] * r[j] for r, wi in zip(rows, w)) for j in range(k)] for i in range(k)]
    v = [sum(wi * wi * r[i] * yi for r, yi, wi in zip(rows, y, w)) for i in range(k)]
    for i in range(k):                       # Gauss-Jordan with partial pivoting
        p = max(range(i, k), key=lambda r: abs(m[r][i]))
        m[i], m[p], v[i], v[p] = m[p], m[i], v[p], v[i]
        for r in range(k):
            if r != i and m[i][i]:
                f = m[r][i] / m[i][i]
                m[r] = [x - f * z for x, z in zip(m[r], m[i])]
                v[r] -= f * v[i]
    return [v[i] / m[i][i] / scale[i] for i in range(k)]


def fit_one_gpu(points: Mapping[int, float], shape: ModelShape = LLAMA3_8B) -> GPURates:
    """One GPU's rates from its TTFT by prompt length: t = fixed + L (linear n + attn n^2 / 2), least
    squares on relative error."""
    lengths = sorted(points)
    a = [[shape.layers * n, shape.layers * n * n / 2, 1.0] for n in lengths]
    t = [points[n] for n in lengths]
    lin, att, fixed = _solve(a, t, [1 / x for x in t])
    probe = Rates.for_shape(shape, GPURates(matmul_flops=1.0, attn_flops=1.0))
    return replace(ONE_GPU, matmul_flops=probe.linear / lin, attn_flops=probe.attn / att, fixed_s=fixed)


def fit_tp(points: Mapping[int, Mapping[int, float]], shape: ModelShape = LLAMA3_8B,
           gpu: GPURates = ONE_GPU, shortest: int = 4096) -> tuple[dict[int, float], float]:
    """busbw per N and one tp_fixed_s from TP=N TTFTs ({N: {tokens: s}}) at >= ``shortest`` tokens (above
    the floor): t - fixed - L compute / N = 2L 2(N-1)/N tokens ar_bytes / busbw_N + tp_fixed."""
    r = Rates.for_shape(shape, gpu)
    ns = sorted(points)
    a, y, w = [], [], []
    for i, n in enumerate(ns):
        for tok, t in sorted(points[n].items()):
            if tok < shortest:
                continue
            row = [0.0] * (len(ns) + 1)
            row[i] = 2 * r.layers * (2 * (n - 1) / n) * tok * r.ar_bytes
            row[-1] = 1.0
            a.append(row)
            y.append(t - gpu.fixed_s - r.layers * r.compute(0, tok) / n)
            w.append(1 / t)
    sol = _solve(a, y, w)
    return {n: 1 / sol[i] for i, n in enumerate(ns)}, sol[-1]


def fit_chain(rows: Sequence["Measured"], link: LinkProfile, shape: ModelShape = LLAMA3_8B,
              gpu: GPURates = ONE_GPU, floors: Sequence[float] | None = None) -> tuple[float, float, float, float]:
    """(recv_cost per KV byte, hop_s, guest_floor_s, rms relative error) that fit the chain of copies'
    cold single-step TTFTs ``rows`` best (grid search; the split is the planner's, fixed)."""
    floors = floors if floors is not None else [gpu.guest_floor_s]
    best = None
    for i in range(0, 33):                       # 0 .. 8e-8 s per 4-KiB token-layer
        for j in range(0, 31):                   # 0 .. 15 ms
            for f in floors:
                lk = replace(link, recv_cost=i * 0.25e-8 / KIB4, hop_s=j * 0.5e-3)
                g = replace(gpu, guest_floor_s=f)
                err = [math.log(model_of(m, shape, lk, g) / m.ttft) for m in rows]
                rms = math.sqrt(sum(e * e for e in err) / len(err))
                if best is None or rms < best[3]:
                    best = (lk.recv_cost, lk.hop_s, f, rms)
    return best


# -- checks and predictions ----------------------------------------------------------------------------

def model_of(m: Measured, shape: ModelShape = LLAMA3_8B, link: LinkProfile | None = None,
             gpu: GPURates = ONE_GPU) -> float:
    """This model's figure for one committed measurement (same N, link, prompt and step budget)."""
    model = TPLayoutCost(shape, max(2, m.n), link or PROFILES[m.link], gpu)
    budget = m.budget or m.tokens
    if m.scenario != "one":
        mode = "1gpu" if m.kind == "1gpu" else "tp"
        if m.scenario == "multi-turn":
            return multi_turn(model, mode, budget=budget)
        mean, wall = concurrent(model, 16, m.tokens, budget, mode)
        return wall if m.scenario == "16x16k-wall" else mean
    if m.kind == "1gpu":
        return model.prompt(m.tokens, budget, mode="1gpu").ttft
    if m.kind == "tp":
        return model.prompt(m.tokens, budget, mode="tp").ttft
    if m.kind == "chain":  # the chain of copies, one cold step (every committed chain row is one step)
        assert budget >= m.tokens, "chain rows are single steps"
        return model.gpu.fixed_s + model.guests([Chunk(0, m.tokens, m.tokens)], copies=True).total
    raise ValueError(m.kind)


def check_table(shape: ModelShape = LLAMA3_8B) -> str:
    """Markdown: every committed measurement against the model."""
    out = ["| what | N | link | machine | scenario | tokens | budget | measured | model | model / measured |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for m in MEASURED:
        v = model_of(m, shape)
        out.append(f"| {m.kind} | {m.n} | {m.link} | {m.machine} | {m.scenario} | {m.tokens} | "
                   f"{m.budget or 'one step'} | "
                   f"{m.ttft:.4g} s | {v:.4g} s | {v / m.ttft:.3f} |")
    return "\n".join(out)


def step_cost(model: TPLayoutCost, chunks: Sequence[Chunk], decodes: int, mode: str,
              count: list[int] | None = None) -> float:
    """One engine step of ``chunks`` and ``decodes``: "1gpu", "tp" (TP=N), "tp-layout" (each chunk as
    ``runs_ahead`` says, the rest in vLLM's TP forward) or "ahead" (every chunk of >= 2N tokens run ahead).
    ``count``: [chunks run ahead, chunks] is added to."""
    if mode == "1gpu":
        return model.one_gpu(list(chunks)).total  # a decode token costs one GPU next to nothing
    if mode == "tp":
        return model.tp(chunks, decodes).total
    if mode == "tp-layout":
        flags = model.choose(chunks, (), decodes)
    else:
        flags = [c.length >= 2 * model.n for c in chunks]
    ahead = [c for c, f in zip(chunks, flags) if f]
    rest = [c for c, f in zip(chunks, flags) if not f]
    if count is not None:
        count[0] += len(ahead)
        count[1] += len(chunks)
    return model.ahead(ahead, rest, decodes).total


def serve(model: TPLayoutCost, prompts: Sequence[tuple[int, int]], budget: int, mode: str,
          gen: int = 1, count: list[int] | None = None) -> list[float]:
    """TTFT of each prompt (cached tokens, prompt tokens), all arriving at once, under vLLM's scheduler as
    the model sees it: every step first gives each running request its decode token, then prefills the
    waiting prompts in order up to ``budget`` tokens (the last one chunked); ``gen`` output tokens each."""
    todo = [[c, t] for c, t in prompts]      # next token to compute, prompt length
    left = [gen - 1] * len(prompts)          # decodes still to run after the first token
    ttft: list[float | None] = [None] * len(prompts)
    now, decoding = 0.0, []
    while any(x is None for x in ttft):
        room = budget - len(decoding)
        chunks, finishing = [], []
        for i, (c, t) in enumerate(todo):
            if ttft[i] is not None or c >= t or room <= 0:
                continue
            m = min(room, t - c)
            chunks.append(Chunk(c, c + m, t))
            todo[i][0] += m
            room -= m
            if c + m >= t:
                finishing.append(i)
        now += step_cost(model, chunks, len(decoding), mode, count)
        for i in decoding:
            left[i] -= 1
        decoding = [i for i in decoding if left[i] > 0]
        for i in finishing:
            ttft[i] = now
            if left[i] > 0:
                decoding.append(i)
    return ttft  # type: ignore[return-value]


def concurrent(model: TPLayoutCost, prompts: int, tokens: int, budget: int, mode: str,
               count: list[int] | None = None) -> tuple[float, float]:
    """(mean TTFT, wall) of ``prompts`` cold prompts of ``tokens`` arriving together (``max_tokens=1``)."""
    t = serve(model, [(0, tokens)] * prompts, budget, mode, count=count)
    return sum(t) / len(t), max(t)


def multi_turn(model: TPLayoutCost, mode: str, convs: int = 8, turns: int = 4, new: int = 8192, gen: int = 32,
               budget: int = 16384, count: list[int] | None = None) -> float:
    """Mean TTFT of turns 2.. of ``convs`` lock-step conversations (``benchmarks/serving.py`` multi-turn:
    each turn adds ``new`` tokens after the history, the answer adds ``gen``); the prefix cache serves the
    history's whole blocks (the last answer token's KV is never computed)."""
    bs, out, hist = model.block_size, [], 0
    for t in range(turns):
        total = hist + new
        cached = (hist - 1) // bs * bs if hist else 0
        ttft = serve(model, [(cached, total)] * convs, budget, mode, gen, count if t else None)
        if t:
            out += ttft
        hist = total + gen
    return sum(out) / len(out)


def predictions(ns: Sequence[int] = (2, 4, 8), links: Sequence[str] = ("nvlink", "no-p2p"),
                shape: ModelShape = LLAMA3_8B, base: int = 16384) -> str:
    """Markdown tables of the model's predictions (docs/tp-layout-cost.md, "Predictions"): one GPU and TP=N
    at vLLM's default budget ``base``; the TP layout at N x ``base`` for one prompt (the chain of copies'
    per-step budget; its TP-layout form is the lead's) and at ``base``; several prompts go one step each."""
    def win(w):
        return "none" if w is None else (f">= {w[0]}" if w[1] >= (1 << 17) else f"{w[0]}-{w[1]}")

    out = ["### Which chunks run ahead (tokens; *est.*)", "",
           "| link | N | cold | after 16k cached | after 32k cached | after 64k cached |", "|---|---|---|---|---|---|"]
    for link in links:
        for n in ns:
            m = TPLayoutCost(shape, n, PROFILES[link])
            out.append(f"| {link} | {n} | " + " | ".join(win(m.window(c)) for c in (0, 16384, 32768, 65536)) + " |")
    out.append("")
    for link in links:
        rows = ["| N | scenario | 1 GPU | TP=N | **TP layout** | chunks ahead | vs TP=N | vs 1 GPU | "
                "TP=N, budget N x 16k | TP layout, budget 16k |", "|---|---|---|---|---|---|---|---|---|---|"]
        for n in ns:
            m = TPLayoutCost(shape, n, PROFILES[link])
            for tok in (16384, 32768, 65536, 131072):
                one = m.prompt(tok, base, mode="1gpu").ttft
                tp, tp_big = m.prompt(tok, base, mode="tp").ttft, m.prompt(tok, n * base, mode="tp").ttft
                big, small = m.prompt(tok, n * base), m.prompt(tok, base)
                rows.append(f"| {n} | 1 x {tok // 1024}k | {one:.3f} | {tp:.3f} | **{big.ttft:.3f}** | "
                            f"{big.ahead}/{len(big.steps)} | {tp / big.ttft:.2f}x | {one / big.ttft:.2f}x | "
                            f"{tp_big:.3f} | {small.ttft:.3f} ({small.ahead}/{len(small.steps)}) |")
            cnt = [0, 0]
            (o1, w1), (o2, w2), (o3, w3) = (concurrent(m, 16, 16384, base, k, cnt if k == "tp-layout" else None)
                                            for k in ("1gpu", "tp", "tp-layout"))
            rows.append(f"| {n} | 16 x 16k: mean TTFT / wall | {o1:.2f} / {w1:.2f} | {o2:.2f} / {w2:.2f} | "
                        f"**{o3:.2f} / {w3:.2f}** | {cnt[0]}/{cnt[1]} | {o2 / o3:.2f}x | {o1 / o3:.2f}x | | |")
            cnt = [0, 0]
            one, tp = multi_turn(m, "1gpu"), multi_turn(m, "tp")
            lay = multi_turn(m, "tp-layout", count=cnt)
            rows.append(f"| {n} | multi-turn, 8 x 4 turns of +8k: mean TTFT turns 2-4 | {one:.3f} | {tp:.3f} | "
                        f"**{lay:.3f}** | {cnt[0]}/{cnt[1]} | {tp / lay:.2f}x | {one / lay:.2f}x | | |")
            for c, new in ((32768, 1024), (65536, 2048), (122880, 8192)):
                one = m.prompt(c + new, base, cached=c, mode="1gpu").ttft
                tp = m.prompt(c + new, base, cached=c, mode="tp").ttft
                lay = m.prompt(c + new, n * base, cached=c)
                forced = m.prompt(c + new, n * base, cached=c, mode="ahead").ttft
                rows.append(f"| {n} | {c // 1024}k cached + {new // 1024}k new | {one:.3f} | {tp:.3f} | "
                            f"**{lay.ttft:.3f}** (run ahead: {forced:.3f}) | {lay.ahead}/{len(lay.steps)} | "
                            f"{tp / lay.ttft:.2f}x | {one / lay.ttft:.2f}x | | |")
        out += [f"### {PROFILES[link].note} ({link}), Llama-3-8B shape, seconds (*est.*)", "", *rows, ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m vllm_kvrunahead.tools.tp_cost_tables",
        description="The TP layout's cost model against plain TP=N (Llama-3-8B shape unless --shape): "
                    "crossovers, predictions, and the committed measurements it reproduces.")
    p.add_argument("what", nargs="?", default="all", choices=("all", "crossover", "predict", "check", "fit"),
                   help="crossover: the start-up line per N and link (rank 0's); predict: the prediction tables "
                        "(docs/tp-layout-cost.md); check: committed TTFTs vs the model; all: the three; "
                        "fit: the fitted constants again from MEASURED (the chain's grid takes minutes)")
    p.add_argument("--n", type=int, nargs="+", default=[2, 4, 8], help="TP sizes (default 2 4 8)")
    p.add_argument("--link", nargs="+", default=["nvlink", "no-p2p"], choices=sorted(PROFILES),
                   help="link profiles (default nvlink no-p2p)")
    p.add_argument("--shape", default=None, help="a model shape as layers,hidden,heads,kv_heads,intermediate,"
                                                 "head_dim (default Llama-3-8B: 32,4096,32,8,14336,128)")
    p.add_argument("--most", type=int, default=0, help="crossover: the step's most tokens (default N x 16384, "
                                                       "an LLM engine's budget for the first prompt in line)")
    a = p.parse_args(argv)
    shape = LLAMA3_8B
    if a.shape:
        f = [int(x) for x in a.shape.split(",")]
        shape = ModelShape(*f)
    if a.what in ("all", "crossover"):   # the line an engine's rank 0 logs at start
        for link in a.link:
            for n in a.n:
                print("KV-Runahead: " + TPLayoutCost(shape, n, PROFILES[link]).startup_line(a.most or n * 16384))
        print()
    if a.what in ("all", "predict"):
        print(predictions(a.n, a.link, shape))
    if a.what in ("all", "check"):
        print(check_table(shape))
    if a.what == "fit":
        print_fits()
    return 0


def print_fits() -> None:
    """Every fitted constant again, from ``MEASURED`` (Llama-3-8B)."""
    g = fit_one_gpu({m.tokens: m.ttft for m in MEASURED if m.kind == "1gpu" and m.machine == "h200-x4-A"})
    print(f"one GPU: matmul {g.matmul_flops / 1e12:.1f} TFLOP/s, attention {g.attn_flops / 1e12:.1f} TFLOP/s, "
          f"fixed {g.fixed_s * 1e3:.2f} ms")
    for link in ("nvlink", "no-p2p"):
        pts: dict[int, dict[int, float]] = {}
        for m in MEASURED:
            if m.kind == "tp" and m.link == link and m.budget is None:
                pts.setdefault(m.n, {})[m.tokens] = m.ttft
        bw, fixed = fit_tp(pts, gpu=g)
        print(f"{link} TP: busbw " + ", ".join(f"N={n} {v / 1e9:.1f} GB/s" for n, v in sorted(bw.items())) +
              f"; tp_fixed {fixed * 1e3:.1f} ms")
        chain = [m for m in MEASURED if m.kind == "chain" and m.link == link and m.scenario == "one"
                 and (m.machine == "h200-x4-A" or link == "no-p2p") and m.budget is None]
        floors = [x / 1000 for x in range(30, 47)] if link == "nvlink" else None
        rc, hop, floor, rms = fit_chain(chain, PROFILES[link], gpu=g, floors=floors)
        print(f"{link} chain: recv_cost {rc * KIB4:.2e} s per 4-KiB token-layer, hop {hop * 1e3:.1f} ms, "
              f"guest_floor {floor * 1e3:.0f} ms (rms {rms:.3f})")


if __name__ == "__main__":
    sys.exit(main())
