"""A chain worker that stalls or dies at any point of a step ends in a bounded error, never a hang.

vLLM reads only the head's replies, and the head decodes without the chain workers, so a
dead chain worker is noticed only through vLLM's executor monitor (see the patch
step-broadcast-stops-on-shutdown). Each test injects one fault (tests/faulty_worker.py) into a
fresh engine and asserts the error, its cause in the log, and the time it took.
"""
import os
import random
import re
import time

import pytest

from tests import timing
from tests.models import tiny_llama
from tests.procs import run_python

BS = 128
DIED = re.compile(r"Worker proc \S+ died unexpectedly")


def faulty_engine_run(tmp_path, fault: str, recv_timeout_s: float, max_tokens: int,
                      layout: str = "prefill_context_parallel_size=2") -> tuple[str, str]:
    """One generate() on an engine whose first chain worker misbehaves; (RESULT line, output)."""
    model = tiny_llama(kv_heads=2) if "tensor" in layout else tiny_llama()
    code = f"""
import time
from vllm import LLM, SamplingParams
llm = LLM(model={model!r}, skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
          max_model_len=4096, block_size={BS}, worker_cls="tests.faulty_worker.FaultyWorker",
          {layout},
          additional_config={{"kv_runahead": {{"min_tokens": 0, "recv_timeout_s": {recv_timeout_s}}}}})
t = time.time()
try:
    llm.generate([{{"prompt_token_ids": list(range(1, 400))}}],
                 SamplingParams(max_tokens={max_tokens}, ignore_eos=True), use_tqdm=False)
    print("RESULT no error")
except Exception as e:
    print("RESULT", type(e).__name__, round(time.time() - t, 1))
"""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0|1", KVR_TEST_STALL_S="40",
               KVR_TEST_FAULT=fault)
    t = time.monotonic()
    done = run_python(["-c", code], tmp_path / f"{fault}.log", 300, env=env)
    timing.record(f"fault-{fault}", "fault", 2, model, None, time.monotonic() - t)
    if done.timed_out:
        pytest.fail(f"fault {fault}: the engine hung (no result within 300 s):\n{done.output[-4000:]}")
    result = [line for line in done.output.splitlines() if line.startswith("RESULT")]
    return (result[0] if result else ""), done.output


def assert_failed_within(result: str, out: str, bound_s: float) -> None:
    assert result.startswith("RESULT EngineDeadError"), out[-4000:]
    assert float(result.split()[-1]) < bound_s, result


def test_stalled_chain_peer_fails_the_request_within_the_timeout(tmp_path):
    """A peer that stalls mid-prefill: the head's bounded receive fails the step with a
    clear error, vLLM then shuts the engine down (EngineDeadError); nothing hangs."""
    result, out = faulty_engine_run(tmp_path, "stall", 3, max_tokens=2)
    assert_failed_within(result, out, 30)             # well before the peer's 40 s stall ends
    assert re.search(r"no KV from chain rank 0 within 3(\.0)? s", out), out[-4000:]


def test_tp_layout_stalled_guest_fails_the_request_within_the_timeout(tmp_path):
    """TP layout: rank 1's guest stalls; rank 0, waiting for its heads of rank 1's segment, fails the step
    within its bounded receive and exits (a guest that fails exits: its peers wait for its shards), and
    vLLM ends the engine (EngineDeadError) long before the stall would."""
    result, out = faulty_engine_run(tmp_path, "guest_stall", 3, max_tokens=2, layout="tensor_parallel_size=2")
    assert_failed_within(result, out, 30)
    # rank 0 waits for its KV heads of rank 1's segment (the step's last rounds), or on gloo for its chain
    # sends to rank 1 to be taken: either wait gives up after 3 s
    assert re.search(r"no KV (from TP rank 1 \(shards\)|to chain rank 1 delivered) within 3(\.0)? s", out), out[-4000:]
    assert "failed mid-prefill" in out, out[-4000:]


def test_tp_layout_round_failing_mid_step_stops_the_engine_at_once(tmp_path):
    """TP layout: rank 1's first round of KV head shards fails inside its guest's forward (out of memory):
    its connector drops the step's traffic, the rank exits (fail-fast), rank 0's wait for those shards
    ends at once (the connection closed) and vLLM ends the engine (EngineDeadError), long before the 120 s
    receive timeout: an error, never a hang."""
    result, out = faulty_engine_run(tmp_path, "round_fail", 120, max_tokens=2, layout="tensor_parallel_size=2")
    assert_failed_within(result, out, 60)
    assert "injected comm failure" in out and "failed mid-prefill" in out, out[-4000:]


def test_chain_worker_failing_in_its_forward_stops_the_engine_at_once(tmp_path):
    """The forward raises (say, out of memory) before any KV is sent: the head would wait for
    that KV until its receive timeout (NCCL has none); the worker exits instead."""
    result, out = faulty_engine_run(tmp_path, "raise", 120, max_tokens=2)
    assert_failed_within(result, out, 60)             # not the 120 s receive timeout
    assert "injected chain worker failure" in out and "failed mid-prefill" in out, out[-4000:]


@pytest.mark.parametrize("fault, cause", [
    ("exit_after", "FAULT after execute_model"),        # dies between execute_model and sample_tokens
    ("raise_sample", "injected chain worker failure"),  # sampling raises; fail-fast exits
    ("exit_idle", "FAULT idle"),                        # dies while the head decodes alone
])
def test_chain_worker_dying_outside_its_forward_stops_the_engine(tmp_path, fault, cause):
    """The head has its KV and decodes on without the chain: vLLM's monitor must turn the death
    into a failed engine. Without the step-broadcast patch these hang: the engine core spins in
    the step broadcast to the dead worker once the ring is full (max_tokens keeps it stepping)."""
    result, out = faulty_engine_run(tmp_path, fault, 120, max_tokens=3000)
    assert cause in out and DIED.search(out), out[-4000:]
    assert_failed_within(result, out, 90)


def test_dead_chain_peer_fails_requests_fast_and_server_exits():
    """SIGKILL the first chain worker while long prompts are in flight: the requests end with
    an error (not a hang) after the kill, and vLLM shuts the server down, as for any dead vLLM worker."""
    import concurrent.futures as cf
    import time

    import psutil

    from benchmarks.serve_load import run_one
    from tests import timing

    proc, base, log = timing.server("fault-dead-peer-server", tiny_llama(), 2)
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
        workers = sorted((p for p in kids if "Worker" in p.name() or "Worker" in " ".join(p.cmdline())),
                         key=lambda p: p.create_time())
        assert len(workers) == 2, [(p.name(), p.cmdline()) for p in kids]
        rng = random.Random(3)
        reqs = [dict(id=i, prompt=[rng.randrange(1, 512) for _ in range(2499)],  # valid ids: vocab 512
                     max_tokens=1500, stream=i % 2 == 0, cancel=None) for i in range(8)]

        def timed(req):
            res = run_one(base, tiny_llama(), req)
            return res, time.time()

        with cf.ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(timed, r) for r in reqs]
            time.sleep(0.5)
            # on a busy machine this thread may wake seconds late and some requests may be done by
            # then; those in flight at the kill must fail, after it (asserted below)
            t_kill = time.time()
            workers[0].kill()  # rank 0: the first chain worker (the head is vLLM's output rank, the last)
            results = [f.result(timeout=120) for f in futs]
        server_log = "".join(log[-80:])
        assert all(res["status"] != "cancelled" for res, _ in results)
        failed = [(res, t) for res, t in results if res["status"] != "ok"]
        assert failed, f"killing a chain worker must fail the in-flight requests\n{server_log}"
        assert all(t >= t_kill for _, t in failed), server_log   # failed because of the kill, not before
        assert max(t for _, t in results) - t_kill < 120, server_log
        proc.wait(timeout=120)  # vLLM shuts the server down once its engine is dead
        assert any(DIED.search(line) for line in log), "".join(log[-60:])
        # a head that was waiting for the dead peer's KV says the peer closed the connection, at once,
        # and that the step was aborted, not that it timed out or that the model hides layers
        text = "".join(log)
        assert "no KV from chain rank" not in text and "were never consumed" not in text, text[-6000:]
        if "closed the connection" in text:
            assert "step aborted at attention layer" in text, text[-6000:]
    finally:
        timing.stop(proc)
