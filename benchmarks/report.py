"""ttft.json -> ttft.md (one table per device/model/n_gpus/interconnect/backend) and ttft.png.

  python -m benchmarks.report OUT [--merge A/ttft.json B/ttft.json ...]   (matplotlib for the PNG)
--merge first folds other runs' records (e.g. each device call's returned $OUT) into OUT/ttft.json,
newer files replacing records with the same key.
  python -m benchmarks.report benchmarks/results --collect nvidia-h200-x2 nvidia-h200-x4 ...
--collect rebuilds OUT/ttft.json from the per-machine folders' ttft.json, naming each record's machine in
its device ("NVIDIA H200 [nvidia-h200-x4 A]"), so ratios are only ever taken within one machine.
"""
import argparse
import json
import os
from collections import defaultdict

from benchmarks import common

ORDER = ["1gpu", "tp", "kvr-even", "kvr-balanced", "kvr-table", "kvr-tp"]


def _cfg_order(cfgs):
    return sorted(cfgs, key=lambda c: (ORDER.index(c) if c in ORDER else len(ORDER), c))


def _baseline(recs, r):
    """The 1gpu record for r: same group if there is one, else any 1gpu run of that device/model/length
    (the 1-GPU number does not depend on n_gpus or the interconnect)."""
    same = [b for b in recs if b["config"] == "1gpu" and "error" not in b and b["device"] == r["device"]
            and b["model"] == r["model"] and b["prompt_tokens"] == r["prompt_tokens"]]
    exact = [b for b in same if (b["n_gpus"], b["interconnect"], b["backend"]) ==
             (r["n_gpus"], r["interconnect"], r["backend"])]
    return (exact or same or [None])[0]


def with_baseline(recs, rs):
    """rs plus, when rs has no 1gpu run, the 1gpu records borrowed from another group (marked)."""
    if any(r["config"] == "1gpu" for r in rs):
        return rs
    extra = {}
    for r in rs:
        b = _baseline(recs, r)
        if b is not None:
            extra[b["prompt_tokens"]] = dict(b, borrowed=True, n_gpus=r["n_gpus"],
                                             interconnect=r["interconnect"], backend=r["backend"])
    return rs + list(extra.values())


def _cell(r, base):
    if r is None:
        return "-"
    if "error" in r:
        return "error" if not r["error"].startswith("skipped") else "skipped"
    s = f"{r['ttft_s_median']:.4g} s" + (" *" if r.get("borrowed") else "")
    if base is not None and r["config"] != "1gpu":
        s += f" ({base['ttft_s_median'] / r['ttft_s_median']:.2f}x)"
    return s


def groups(recs):
    g = defaultdict(list)
    for r in recs:
        g[(r["device"], r["model"], r["n_gpus"], r["interconnect"], r["backend"])].append(r)
    return dict(sorted(g.items(), key=lambda kv: tuple(map(str, kv[0]))))


def markdown(recs):
    out = ["# TTFT: plain vLLM vs tensor parallel vs KV-Runahead", "",
           "TTFT = wall time of `llm.generate([prompt], max_tokens=1)` for one prompt of random token ids "
           "(median of repeats; `vllm bench latency --output-len 1` semantics), dummy weights, "
           "prefix caching off, whole prompt in one prefill step. (Nx) = speedup over 1 GPU. "
           "decode tok/s: one request, (t(65 tokens) - TTFT) / 64.", ""]
    for (dev, model, n, ic, be), rs in groups(recs).items():
        rs = with_baseline(recs, rs)
        cfgs = _cfg_order({r["config"] for r in rs})
        vers = sorted({str(r.get("vllm_version")) for r in rs})
        dtypes = sorted({str(r.get("dtype")) for r in rs})
        out += [f"## {dev} / {model} / {n} GPUs / {ic} / {be}", "",
                f"- device: {dev}; vLLM {', '.join(vers)}; interconnect: {ic}"
                + (" (NCCL_P2P_DISABLE=1, TP without custom all-reduce)" if ic == "no-p2p" else "")
                + f"; executor backend: {be}; dtype: {', '.join(dtypes)}",
                f"- model: {rs[0].get('model_note', model)}"] + \
            common.kv_capacity_line(rs, [(c, n) for c in cfgs], lambda c: c[0]) + [""]
        hdr = ["prompt tokens"] + [f"{c} TTFT" for c in cfgs] + [f"{c} decode tok/s" for c in cfgs]
        out += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        by = {(r["prompt_tokens"], r["config"]): r for r in rs}
        errors = []
        for L in sorted({r["prompt_tokens"] for r in rs}):
            row = [str(L)]
            for c in cfgs:
                r = by.get((L, c))
                row.append(_cell(r, r and _baseline(recs, r)))
                if r and "error" in r:
                    errors.append(f"- {c} @ {L}: {r['error'][:300]}")
            for c in cfgs:
                r = by.get((L, c))
                row.append(f"{r['decode_tok_s']:.0f}" if r and "error" not in r and r.get("decode_tok_s") else "-")
            out.append("| " + " | ".join(row) + " |")
        if any(r.get("borrowed") for r in rs):
            out += ["", "\\* 1-GPU baseline taken from a run with other n_gpus/interconnect/backend settings."]
        if errors:
            out += ["", "Errors:", *errors]
        out.append("")
    return "\n".join(out)


COLORS = {"1gpu": "tab:blue", "tp": "tab:orange", "kvr-even": "tab:green", "kvr-balanced": "tab:red", "kvr-table": "tab:purple",
          "kvr-tp": "tab:brown"}


def plot(recs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator
    panels = {}
    for r in recs:
        panels.setdefault((r["device"], r["model"], r["n_gpus"], r["interconnect"]), []).append(r)
    keys = sorted((k for k, rs in panels.items() if any("error" not in r for r in rs)),   # all-error: table only
                  key=lambda k: tuple(map(str, k)))
    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        rs = [r for r in with_baseline(recs, panels[k]) if "error" not in r]
        lines = defaultdict(list)
        for r in rs:
            lines[(r["model"], r["config"], r["backend"])].append((r["prompt_tokens"], r["ttft_s_median"]))
        multi_model = len({m for m, _, _ in lines}) > 1
        multi_be = len({b for _, _, b in lines}) > 1
        for (m, c, b) in sorted(lines, key=lambda t: (t[0], ORDER.index(t[1]) if t[1] in ORDER else 9, t[2])):
            pts = sorted(lines[(m, c, b)])
            label = c + (f" [{m}]" if multi_model else "") + (f" ({b})" if multi_be else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    linestyle="--" if c == "1gpu" else "-", color=COLORS.get(c))
        ax.set_xscale("log", base=2)
        ticks = sorted({r["prompt_tokens"] for r in rs})
        ax.set_xticks(ticks, [f"{t // 1024}k" if t % 1024 == 0 else str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_yscale("log")
        plain = FuncFormatter(lambda y, _: f"{y:g}")   # 0.2 rather than 2x10^-1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT (s)")
        ax.set_title(f"{k[0]}, {k[1]}, {k[2]} GPUs, {k[3]}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", help="dir with ttft.json; ttft.md and ttft.png are written next to it")
    ap.add_argument("--merge", nargs="*", default=[], help="ttft.json files to merge into OUT/ttft.json first")
    ap.add_argument("--collect", nargs="*", default=[], help="machine folders under OUT to rebuild OUT/ttft.json from")
    a = ap.parse_args()
    if a.collect:
        recs = []
        for folder in a.collect:
            with open(os.path.join(a.out, folder, "ttft.json")) as f:
                for r in json.load(f):
                    machine = folder + (f" {r['machine']}" if r.get("machine") else "")
                    recs.append(dict(r, device=f"{r['device']} [{machine}]"))
        with open(os.path.join(a.out, "ttft.json"), "w") as f:
            json.dump(recs, f, indent=1)
    if a.merge:
        from benchmarks.ttft import merge_records
        os.makedirs(a.out, exist_ok=True)
        for path in a.merge:
            with open(path) as f:
                merge_records(os.path.join(a.out, "ttft.json"), json.load(f))
    with open(os.path.join(a.out, "ttft.json")) as f:
        recs = json.load(f)
    md = markdown(recs)
    with open(os.path.join(a.out, "ttft.md"), "w") as f:
        f.write(md)
    print(md)
    try:
        plot(recs, os.path.join(a.out, "ttft.png"))
        print("wrote", os.path.join(a.out, "ttft.png"))
    except ImportError:
        print("matplotlib missing: no ttft.png (pip install matplotlib)")


if __name__ == "__main__":
    main()
