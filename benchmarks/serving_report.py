"""serving.json -> serving.md (one table per device/model/interconnect: rows = scenario/prompt, columns =
1gpu, tp N, kvr N, kvr-tp N with speedup over 1 GPU on the same device; each engine's KV capacity) and
serving.png (speedup bars).

  python -m benchmarks.serving_report OUT [--merge A/serving.json B/serving.json ...]   (matplotlib for the PNG)
--merge first folds other runs' records (e.g. each device call's returned $OUT) into OUT/serving.json,
later files replacing records with the same key. Ratios are only taken within one device name, so give
records from different machines distinct device names before merging them.
"""
from collections import defaultdict

from benchmarks import common

KEY = ("device", "model", "scenario", "prompt_tokens", "max_tokens", "config", "n_gpus", "interconnect")
ORDER = {"1gpu": 0, "tp": 1, "kvr": 2, "kvr-tp": 3}


def _ok(r):
    return r is not None and "error" not in r and r.get("value_s") is not None


def _row_key(r):
    return (r["scenario"], r["prompt_tokens"], r["max_tokens"])


def _row_order(k):
    s, pt, mt = k
    kind = 0 if s == "default-budget" else 1 if s.startswith("concurrent") else 2
    return (kind, pt, mt, s)


def _k(n):
    return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)


def _row_label(r):
    s, pt, mt, nr = r["scenario"], r["prompt_tokens"], r["max_tokens"], r.get("num_requests")
    if s == "default-budget":
        return f"default-budget: 1 x {_k(pt)}, TTFT"
    if s == "multi-turn":
        turns = len(r.get("turns") or []) or "?"
        return f"multi-turn: {nr} conv x {turns} turns, +{_k(pt)}/turn, {mt} out; mean TTFT turns 2+"
    return f"{s}: {nr} x {_k(pt)}, max_tokens {mt}, wall"


def _representative(rs, k):
    """A record of row k to label it by, a measured one if any (it knows how many turns ran)."""
    row = [r for r in rs if _row_key(r) == k]
    return next((r for r in row if _ok(r)), row[0])


def _short_label(r):
    s, pt, mt, nr = r["scenario"], r["prompt_tokens"], r["max_tokens"], r.get("num_requests")
    if s == "default-budget":
        return f"1 x {_k(pt)}\nTTFT"
    if s == "multi-turn":
        return f"multi-turn {nr} conv\n+{_k(pt)}/turn, TTFT 2+"
    return f"{nr} x {_k(pt)}\nmax_tokens {mt}"


def _columns(rs):
    return sorted({(r["config"], r["n_gpus"]) for r in rs}, key=lambda c: (c[0] != "1gpu", c[1], ORDER.get(c[0], 9)))


def _col_name(c):
    return "1gpu" if c[0] == "1gpu" else f"{c[0]} N={c[1]}"


def baseline(recs, r):
    """The 1gpu record of r's device/model/row (any interconnect: one GPU uses no link)."""
    for b in recs:
        if (b["config"] == "1gpu" and _ok(b) and b["device"] == r["device"] and b["model"] == r["model"]
                and _row_key(b) == _row_key(r)):
            return b
    return None


def speedup(recs, r):
    b = baseline(recs, r)
    return b["value_s"] / r["value_s"] if _ok(r) and b is not None and r["value_s"] > 0 else None


def groups(recs):
    g = defaultdict(list)
    for r in recs:
        g[(r["device"], r["model"], r["interconnect"])].append(r)
    return dict(sorted(g.items(), key=lambda kv: tuple(map(str, kv[0]))))


def _cell(recs, r):
    if r is None:
        return "-"
    if not _ok(r):
        return "skipped" if str(r.get("error", "")).startswith("skipped") else "error"
    s = f"{r['value_s']:.3f} s"
    x = speedup(recs, r)
    if r["config"] != "1gpu" and x is not None:
        s += f" ({x:.2f}x)"
    return s


def markdown(recs):
    out = ["# Serving scenarios: plain vLLM vs tensor parallel vs KV-Runahead, vLLM's default scheduler", "",
           "`benchmarks/serving.py`, offline `vllm.LLM`: dummy weights, random token ids (new ones per repeat, "
           "the same for every config), vLLM's default step budget (chunked prefill) and prefix caching, "
           "KV-Runahead with no options. Each cell: value (Nx = speedup over 1 GPU on the same device; "
           "lower value is better). default-budget: TTFT = wall time of `generate(max_tokens=1)`, median; "
           "concurrent: wall time of one `generate()` of all prompts, median; multi-turn: mean per-request "
           "TTFT (arrival to first token) of turns 2+, the history served by the prefix cache.", ""]
    for (dev, model, ic), rs in groups(recs).items():
        vers = sorted({str(r.get("vllm_version")) for r in rs})
        cols = _columns(rs)
        budget = {(r["config"], r["n_gpus"]): r["max_num_batched_tokens"] for r in rs if r.get("max_num_batched_tokens")}
        budgets = [(_col_name(c), budget[c]) for c in cols if c in budget]
        out += [f"## {dev} / {model} / {ic}", "",
                f"- device: {dev}; vLLM {', '.join(vers)}; interconnect: {ic}; dtype: "
                + ", ".join(sorted({str(r.get('dtype')) for r in rs if r.get('dtype')})),
                f"- model: {rs[0].get('model_note', model)}",
                "- step budget (max_num_batched_tokens, vLLM default): "
                + (", ".join(f"{c} {b}" for c, b in budgets) or "-")
                + "; prefix caching: " + ", ".join(sorted({str(r.get("prefix_caching")) for r in rs
                                                            if "prefix_caching" in r}))] + \
            common.kv_capacity_line(rs, cols, _col_name) + [""]
        out += ["| scenario | " + " | ".join(_col_name(c) for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        by = {(_row_key(r), r["config"], r["n_gpus"]): r for r in rs}
        rows = sorted({_row_key(r) for r in rs}, key=_row_order)
        for k in rows:
            label = _row_label(_representative(rs, k))
            out.append(f"| {label} | " + " | ".join(_cell(recs, by.get((k, *c))) for c in cols) + " |")
        out += [""] + _kvr_table(rs) + _tp_layout_table(rs) + _turn_table(rs, cols) + _errors(rs)
    return "\n".join(out)


def _kvr_table(rs):
    ks = [r for r in rs if r["config"] == "kvr" and _ok(r) and r.get("kvr")]
    if not ks:
        return []
    out = ["KV-Runahead: tokens each worker computed during the scenario (kvr_stats deltas; chain position "
           "0 first, the head last; the head's count includes decode steps and everything that fell back to "
           "it). chain share = non-head tokens / all tokens computed.", "",
           "| scenario | N | chain share | tokens per worker | chain steps per worker |", "|---|---|---|---|---|"]
    for r in sorted(ks, key=lambda r: (r["n_gpus"], _row_order(_row_key(r)))):
        k = r["kvr"]
        share = f"{k['chain_share']:.2f}" if k.get("chain_share") is not None else "-"
        toks = " / ".join(str(w.get("tokens_run", "-")) for w in k["workers"])
        steps = " / ".join(str(w.get("chain_steps", "-")) for w in k["workers"])
        out.append(f"| {_row_label(r)} | {r['n_gpus']} | {share} | {toks} | {steps} |")
    return out + [""]


def _tp_layout_table(rs):
    ks = [r for r in rs if r["config"] == "kvr-tp" and _ok(r) and r.get("kvr")]
    if not ks:
        return []
    out = ["KV-Runahead TP layout: what ran ahead during the scenario (kvr_stats deltas). Chunks ahead: prefill "
           "chunks the guests ran; guest tokens per rank: each rank's segments; TP model tokens: what vLLM's TP "
           "step computed on every rank (each ahead chunk's last token, the chunks that did not run ahead, "
           "decodes). ahead share = guests' tokens / all prefill tokens computed.", "",
           "| scenario | N | ahead share | chunks ahead | guest tokens per rank | TP model tokens (of them decode) |",
           "|---|---|---|---|---|---|"]
    for r in sorted(ks, key=lambda r: (r["n_gpus"], _row_order(_row_key(r)))):
        k, w0 = r["kvr"], (r["kvr"]["workers"] or [{}])[0]
        share = f"{k['chain_share']:.2f}" if k.get("chain_share") is not None else "-"
        guests = " / ".join(str(w.get("guest_tokens", "-")) for w in k["workers"])
        out.append(f"| {_row_label(r)} | {r['n_gpus']} | {share} | {k.get('chunks_ahead')} | {guests} | "
                   f"{w0.get('tp_tokens', '-')} ({w0.get('decode_tokens', '-')}) |")
    return out + [""]


def _turn_table(rs, cols):
    mts = {(r["config"], r["n_gpus"]): r for r in rs if r["scenario"] == "multi-turn" and _ok(r) and r.get("turns")}
    if not mts:
        return []
    nt = max(len(r["turns"]) for r in mts.values())
    out = ["multi-turn per turn: mean per-request TTFT (s) / prefix-cache hit rate (cached / prompt tokens).", "",
           "| config | " + " | ".join(f"turn {t + 1}" for t in range(nt)) + " | hit rate turns 2+ |",
           "|---" * (nt + 2) + "|"]
    for c in cols:
        r = mts.get(c)
        if r is None:
            continue
        cells = [f"{tr['ttft_mean_s']:.3f} / {tr['hit_rate']:.2f}" for tr in r["turns"]]
        cells += ["-"] * (nt - len(cells))
        hr = f"{r['hit_rate']:.3f}" if r.get("hit_rate") is not None else "-"
        out.append(f"| {_col_name(c)} | " + " | ".join(cells) + f" | {hr} |")
    return out + [""]


def _errors(rs):
    errs = [f"- {_col_name((r['config'], r['n_gpus']))} @ {r['scenario']} {r['prompt_tokens']}: {r['error'][:300]}"
            for r in rs if "error" in r]
    notes = [f"- {_col_name((r['config'], r['n_gpus']))} @ {r['scenario']}: {r['note_budget']}"
             for r in rs if r.get("note_budget")]
    return (["Errors / skipped:", *errs, ""] if errs else []) + (["Cut short:", *notes, ""] if notes else [])


COLORS = {"tp": "tab:orange", "kvr": "tab:green", "kvr-tp": "tab:brown"}


def plot(recs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(k, rs) for k, rs in groups(recs).items()]
    if not panels:
        return False
    # without a 1-GPU run on that device, plot the figures themselves (seconds, lower is better)
    has_base = {k: any(speedup(recs, r) for r in rs) for k, rs in panels}
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 4.2 * len(panels)), squeeze=False)
    for ax, ((dev, model, ic), rs) in zip(axes.flat, panels):
        rows = sorted({_row_key(r) for r in rs}, key=_row_order)
        cols = [c for c in _columns(rs) if c[0] != "1gpu"]
        by = {(_row_key(r), r["config"], r["n_gpus"]): r for r in rs}
        w = 0.8 / max(1, len(cols))
        for j, c in enumerate(cols):
            val = (lambda r: speedup(recs, r)) if has_base[(dev, model, ic)] else (lambda r: r["value_s"])
            ys = [val(by[(k, *c)]) if (k, *c) in by else None for k in rows]
            xs = [i + (j - (len(cols) - 1) / 2) * w for i in range(len(rows))]
            most = c[1] == max(cc[1] for cc in cols)   # the largest N solid, smaller N hatched
            bars = ax.bar([x for x, y in zip(xs, ys) if y], [y for y in ys if y], w, label=_col_name(c),
                          color=COLORS.get(c[0]), alpha=1.0 if most else 0.6, hatch=None if most else "//",
                          edgecolor="black", linewidth=0.4)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        if has_base[(dev, model, ic)]:
            ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        labels = [_short_label(_representative(rs, k)) for k in rows]
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_ylabel("speedup over 1 GPU" if has_base[(dev, model, ic)] else "seconds (lower is better; no 1-GPU run)")
        ax.set_title(f"{dev}, {model}, {ic}, vLLM default scheduler", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write(out, png=True):
    return common.write_report(out, "serving", markdown, plot, png)


def main():
    common.report_main(__doc__, "serving", KEY, markdown, plot)


if __name__ == "__main__":
    main()
