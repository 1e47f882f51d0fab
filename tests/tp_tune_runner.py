"""One TP-layout engine for tests/test_tune.py: the tuner (tools/tune.py) on it, then the split RPCs the
benchmarks use (kvr_set_partition with a table, "even" and back; kvr_set_fractions), each followed by a
prompt whose segments every rank reports.

    python -m tests.tp_tune_runner SPEC.json OUT.pt

SPEC: model, workers (the TP size), lengths, offsets, engine (LLM kwargs on top of the tuner's own).
"""
import json
import random

from tests.engine_runner import run_as_script, save_and_stop, set_engine_env


def main(spec_path, out_path):
    spec = json.loads(open(spec_path).read())
    n = spec["workers"]
    set_engine_env(n)
    from vllm import LLM, SamplingParams

    from vllm_kvrunahead.tools.tune import engine_kwargs, tune

    llm = LLM(**engine_kwargs(spec["model"], n, spec["lengths"], spec["offsets"], "tp", spec["engine"]))
    out = {"table": tune(llm, n, spec["lengths"], offsets=spec["offsets"], repeats=1, search_repeats=1, levels=1,
                         log=lambda m: print("tune: " + m, flush=True))}
    rng = random.Random(5)

    def segments(length):
        """Every rank's segments of a fresh cold prompt of ``length`` tokens."""
        ids = [rng.randrange(1, 512) for _ in range(length)]
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
        return [s["last_segments"] for s in llm.collective_rpc("kvr_stats")]

    out["model_desc"] = llm.collective_rpc("kvr_set_partition")
    out["table_desc"] = llm.collective_rpc("kvr_set_partition", args=(None, out["table"]))
    out["table_split"] = segments(spec["lengths"][0])
    out["even_desc"] = llm.collective_rpc("kvr_set_partition", args=("even", None))
    out["even_split"] = segments(spec["lengths"][-1])
    llm.collective_rpc("kvr_set_fractions", args=([0.25, 0.75],))
    out["fixed_split"] = segments(spec["lengths"][-1])
    llm.collective_rpc("kvr_set_fractions", args=(None,))
    out["back_desc"] = llm.collective_rpc("kvr_set_partition")
    out["model_split"] = segments(spec["lengths"][-1])
    out["stats"] = llm.collective_rpc("kvr_stats")
    save_and_stop(llm, out, out_path)


if __name__ == "__main__":
    run_as_script(main)
