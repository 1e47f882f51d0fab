"""serve_gpu.json (benchmarks/serve_bench.py) -> serve_gpu.md (tables per device/model/workload: rows =
request rate, columns = configs) and serve_gpu.png (P50 solid / P99 dashed TTFT vs request rate, one
panel per workload, one colour per config).

  python -m benchmarks.serve_report OUT [--merge A/serve_gpu.json B/serve_gpu.json ...]   (matplotlib for the PNG)
--merge first folds other runs' records (e.g. each device call's returned $OUT) into OUT/serve_gpu.json,
later files replacing records with the same key.
"""
from collections import defaultdict

from benchmarks import common

KEY = ("device", "model", "workload", "request_rate", "config", "n_gpus", "input_len")
ORDER = {"1gpu": 0, "tp": 1, "kvr": 2, "kvr-tp": 3}
COLORS = {"1gpu": "black", "tp": "tab:orange", "kvr": "tab:green", "kvr-tp": "tab:brown"}


def _ok(r):
    return "error" not in r


def _col(r):
    return (r["config"], r["n_gpus"])


def _col_name(c):
    return "1gpu" if c[0] == "1gpu" else f"{c[0]} N={c[1]}"


def _cols(rs):
    return sorted({_col(r) for r in rs}, key=lambda c: (c[0] != "1gpu", c[1], ORDER.get(c[0], 9)))


def groups(recs):
    g = defaultdict(list)
    for r in recs:
        g[(r["device"], r["model"])].append(r)
    return dict(sorted(g.items(), key=lambda kv: tuple(map(str, kv[0]))))


def _wl_order(w):
    return (("random", "longmix", "prefix").index(w) if w in ("random", "longmix", "prefix") else 9, w)


def _s(ms):
    return "-" if ms is None else f"{ms / 1000:.3f}"


def _err(r):
    e = str(r.get("error", ""))
    return "skipped" if e.startswith("skipped") else "error"


def _workload_label(r):
    ins, outs = r.get("input_tokens_range") or [None, None], r.get("output_tokens_range") or [None, None]
    rng = (lambda x: f"{x[0]}" if x[0] == x[1] else f"{x[0]}-{x[1]}")
    s = f"{r['workload']} ({r.get('dataset')}): input {rng(ins)} tokens, output {rng(outs)} tokens"
    if r.get("num_prefixes"):
        s += f"; {r['num_prefixes']} shared prefixes of {r['prefix_len']} tokens + {r['suffix_len']}-token suffixes"
    return s


def markdown(recs):
    out = ["# `vllm serve` under load: plain vLLM vs tensor parallel vs KV-Runahead", "",
           "`benchmarks/serve_bench.py`: `vllm serve` (dummy weights, real model config, word-level tokenizer "
           "over the vocabulary; vLLM's serving defaults: default step budget, prefix caching reset before each "
           "run) driven by `vllm bench serve --backend vllm` (Poisson arrivals at the request rate, "
           "`--ignore-eos`); every figure is vLLM's own. Cells: median / P99 TTFT in seconds; second table: mean "
           "TPOT (ms), request throughput (req/s), output throughput (tok/s), failed requests.", ""]
    for (dev, model), rs in groups(recs).items():
        vers = sorted({str(r.get("vllm_version")) for r in rs})
        out += [f"## {dev} / {model}", "", f"- device: {dev}; vLLM {', '.join(vers)}",
                f"- model: {rs[0].get('model_note', model)}"]
        starts = {_col(r): r["server_start_s"] for r in rs if r.get("server_start_s") and _ok(r)}
        if starts:
            out.append("- server start (s): " + ", ".join(f"{_col_name(c)} {starts[c]}" for c in _cols(rs) if c in starts))
        out += common.kv_capacity_line([r for r in rs if _ok(r)], _cols(rs), _col_name) + [""]
        serve = [r for r in rs if r.get("request_rate") is not None]
        for wl in sorted({r["workload"] for r in serve}, key=_wl_order):
            ws = [r for r in serve if r["workload"] == wl]
            cols = _cols(ws)
            by = {(r["request_rate"], _col(r)): r for r in ws}
            rates = sorted({r["request_rate"] for r in ws})
            rep = next((r for r in ws if r.get("input_tokens_range")), ws[0])
            out += [f"### {_workload_label(rep)}" if rep.get("dataset") else f"### {wl}", "",
                    "| req/s | " + " | ".join(_col_name(c) + " TTFT p50 / p99 (s)" for c in cols) + " |",
                    "|---" * (len(cols) + 1) + "|"]
            for rate in rates:
                cells = []
                for c in cols:
                    r = by.get((rate, c))
                    cells.append("-" if r is None else _err(r) if not _ok(r) else
                                 f"{_s(r.get('median_ttft_ms'))} / {_s(r.get('p99_ttft_ms'))}")
                out.append(f"| {rate:g} | " + " | ".join(cells) + " |")
            out += ["", "| req/s | " + " | ".join(_col_name(c) + " TPOT ms, req/s, tok/s, failed" for c in cols) + " |",
                    "|---" * (len(cols) + 1) + "|"]
            for rate in rates:
                cells = []
                for c in cols:
                    r = by.get((rate, c))
                    if r is None or not _ok(r):
                        cells.append("-" if r is None else _err(r))
                        continue
                    tpot = r.get("mean_tpot_ms")
                    cells.append(f"{tpot:.1f}, " if tpot is not None else "-, ")
                    cells[-1] += f"{r.get('request_throughput') or 0:.2f}, {r.get('output_throughput') or 0:.0f}, " \
                                 f"{r.get('failed')}"
                out.append(f"| {rate:g} | " + " | ".join(cells) + " |")
            kv = [r for r in ws if r.get("kvr") and _ok(r)]
            if kv:
                out += ["", "KV-Runahead per run (kvr_stats deltas): chunks that ran ahead (of them after cached "
                        "tokens; -: not counted), and the share ahead: kvr, computed tokens on non-head workers; "
                        "kvr-tp, prefill tokens on the guests.", "",
                        "| config | req/s | chunks ahead (cached) | tokens ahead | share ahead |", "|---|---|---|---|---|"]
                for r in sorted(kv, key=lambda r: (r["n_gpus"], ORDER.get(r["config"], 9), r["request_rate"])):
                    k = r["kvr"]
                    share = f"{k['chain_share']:.2f}" if k.get("chain_share") is not None else "-"
                    cached = "-" if k.get("chunks_ahead_cached") is None else k["chunks_ahead_cached"]
                    out.append(f"| {_col_name(_col(r))} | {r['request_rate']:g} | {k.get('chunks_ahead')} "
                               f"({cached}) | {k.get('tokens_ahead')} | {share} |")
            out.append("")
        out += _latency(rs) + _load(rs) + _errors(rs)
    return "\n".join(out) + "\n"


def _latency(rs):
    ls = [r for r in rs if r["workload"] == "latency"]
    if not ls:
        return []
    cols = _cols(ls)
    by = {(r["input_len"], _col(r)): r for r in ls}
    out = ["### `vllm bench latency --input-len L --output-len 1 --batch-size 1` (TTFT, second source)", "",
           "Mean / P50 latency in seconds of one prompt with max_tokens=1 (prefix caching off, default step budget).", "",
           "| input tokens | " + " | ".join(_col_name(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for length in sorted({r["input_len"] for r in ls}):
        cells = []
        for c in cols:
            r = by.get((length, c))
            cells.append("-" if r is None else _err(r) if not _ok(r) else
                         f"{r['avg_latency_s']:.3f} / {r['p50_latency_s']:.3f}")
        out.append(f"| {length} | " + " | ".join(cells) + " |")
    return out + [""]


def _load(rs):
    ls = [r for r in rs if r["workload"] == "load-check"]
    if not ls:
        return []
    out = ["### Load / fault check against the KV-Runahead server (benchmarks/serve_load.py's mix)", "",
           "| config | requests | finished | cancelled | clean errors | unclean errors | incomplete | "
           "KV cache usage after | still serving | passed |", "|---" * 10 + "|"]
    for r in sorted(ls, key=_col):
        if not _ok(r) and "requests_per_s" not in r:
            out.append(f"| {_col_name(_col(r))} | {_err(r)}: {str(r['error'])[:120]} |" + " |" * 8)
            continue
        out.append(f"| {_col_name(_col(r))} | {r['requests']} | {r.get('finished')} | {r.get('cancelled')} | "
                   f"{r.get('clean_errors')} | {r.get('unclean_errors')} | {r.get('incomplete')} | "
                   f"{r.get('kv_cache_usage_after')} | {r.get('still_serving')} | **{r.get('passed')}** |")
    return out + [""]


def _errors(rs):
    errs = [f"- {_col_name(_col(r))} @ {r['workload']} {r.get('request_rate') or r.get('input_len') or ''}: "
            f"{str(r['error'])[:300]}" for r in rs if "error" in r]
    return ["Errors / skipped:", *errs, ""] if errs else []


def plot(recs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    for (dev, model), rs in groups(recs).items():
        for wl in sorted({r["workload"] for r in rs if r.get("request_rate") is not None}, key=_wl_order):
            ws = [r for r in rs if r["workload"] == wl and r.get("request_rate") is not None and _ok(r)
                  and r.get("median_ttft_ms") is not None]
            if ws:
                panels.append((dev, model, wl, ws))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (dev, model, wl, ws) in zip(axes.flat, panels):
        ns = sorted({r["n_gpus"] for r in ws})
        for c in _cols(ws):
            pts = sorted((r["request_rate"], r["median_ttft_ms"] / 1000, r["p99_ttft_ms"] / 1000)
                         for r in ws if _col(r) == c)
            xs = [x[0] for x in pts]
            mk = "o" if c[1] == max(ns) or c[0] == "1gpu" else "s"
            ax.plot(xs, [x[1] for x in pts], marker=mk, color=COLORS.get(c[0]), label=f"{_col_name(c)} P50",
                    alpha=1.0 if c[1] == max(ns) or c[0] == "1gpu" else 0.6)
            ax.plot(xs, [x[2] for x in pts], marker=mk, linestyle="--", color=COLORS.get(c[0]),
                    label=f"{_col_name(c)} P99", alpha=1.0 if c[1] == max(ns) or c[0] == "1gpu" else 0.6)
        ax.set_yscale("log")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("TTFT (s)")
        ax.set_title(f"{wl}: {dev}, {model}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write(out, png=True):
    return common.write_report(out, "serve_gpu", markdown, plot, png)


def main():
    common.report_main(__doc__, "serve_gpu", KEY, markdown, plot)


if __name__ == "__main__":
    main()
