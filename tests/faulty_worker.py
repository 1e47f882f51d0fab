"""Fault injection for tests: KV-Runahead's worker whose first chain worker (rank 0) fails at
one point of its first runahead step, chosen by KVR_TEST_FAULT:

  stall         sleeps KVR_TEST_STALL_S before its forward (a hung or overloaded peer)
  raise         its model runner raises before sending any KV (e.g. out of memory)
  exit_after    the process dies right after its forward, before sample_tokens
  raise_sample  sampling raises (the worker's fail-fast then exits)
  exit_idle     the process dies ~1 s after its runahead step, while the head decodes alone
  guest_stall   TP layout: rank 1's guest sleeps KVR_TEST_STALL_S before its forward
  round_fail    TP layout: rank 1's first round of KV head shards fails mid-step (its buffers could not be
                had: out of memory), inside its guest's forward

A chain worker's model runner runs nothing but runahead segments, so its calls mark them.
"""
import os
import threading
import time

import torch

from vllm_kvrunahead.worker import Worker


def _boom(*args, **kwargs):
    raise RuntimeError("injected chain worker failure")


def _die(point):
    print(f"FAULT {point}: chain worker exits", flush=True)
    os._exit(1)


class FaultyWorker(Worker):
    def execute_model(self, scheduler_output):
        fault = os.environ.get("KVR_TEST_FAULT", "stall")
        if fault == "guest_stall":
            runner = self.host.guest.runner
            if self.rank == 1 and not getattr(runner, "_faulty", False):
                forward = runner.execute_model

                def stalled_forward(*args, **kwargs):
                    time.sleep(float(os.environ.get("KVR_TEST_STALL_S", "60")))
                    return forward(*args, **kwargs)
                runner.execute_model, runner._faulty = stalled_forward, True
            return super().execute_model(scheduler_output)
        if fault == "round_fail":
            shards = self.runahead.shards
            if self.rank == 1 and not getattr(shards, "_faulty", False):
                def failing_round(*args, **kwargs):
                    raise torch.OutOfMemoryError("injected comm failure: a round's buffers could not be had")
                shards.batch, shards._faulty = failing_round, True
            return super().execute_model(scheduler_output)
        if self.rank != 0 or self.runahead.returns_output:
            return super().execute_model(scheduler_output)
        runner = self.model_runner
        before = self.runahead.counters.steps_run
        if fault in ("stall", "raise") and not getattr(runner, "_faulty", False):
            forward = runner.execute_model

            def faulty_forward(*args, **kwargs):
                if fault == "raise":
                    _boom()
                time.sleep(float(os.environ.get("KVR_TEST_STALL_S", "60")))
                return forward(*args, **kwargs)
            runner.execute_model, runner._faulty = faulty_forward, True
        out = super().execute_model(scheduler_output)
        if self.runahead.counters.steps_run > before:  # this step ran a runahead segment here
            if fault == "exit_after":
                _die("after execute_model")
            elif fault == "raise_sample":
                runner.sample_tokens = _boom
            elif fault == "exit_idle":
                threading.Timer(1.0, _die, ("idle",)).start()
        return out
