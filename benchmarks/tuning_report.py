"""Lookup tables -> markdown: TTFT of the tuned (table), cost-model and even splits per length.

  python -m benchmarks.tuning_report vllm_kvrunahead/core/tables/*.json > OUT/tuning.md
The numbers are the tuner's re-measurements (median of 3 on fresh prompts, after the search),
all in one engine, so the three columns of a row are side by side.
"""
import json
import sys


def markdown(paths):
    out = ["# Tuned split vs cost model vs even (tuner re-measurements)", ""]
    for p in paths:
        t = json.load(open(p))
        m = t["model"]
        out += [f"## {m['name']}, N={t['n_workers']}, {t['device']}, vLLM {t['vllm_version']}, {t.get('dtype', '')}",
                "", f"`{p}`", "",
                "| prompt | table | cost model | even | table vs even | table split | search evals |",
                "|---|---|---|---|---|---|---|"]
        for e in t["measured"]:
            s = e["ttft_s"]
            table = min(s.values())  # the table keeps the fastest re-measured split
            # a chunk after cached tokens (tune --offsets): "cached + new"
            prompt = f"{e['offset']} + {e['tokens']}" if e.get("offset") else f"{e['tokens']}"
            out.append(f"| {prompt} | {table:.4f} s ({e.get('chosen', 'best')}) | {s['model']:.4f} s | "
                       f"{s['even']:.4f} s | {s['even'] / table:.2f}x | "
                       f"{', '.join(f'{x:.3f}' for x in e['fractions'])} | {e['measurements']} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(sys.argv[1:]))
