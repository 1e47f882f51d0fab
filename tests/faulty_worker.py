"""Fault injection for tests: KV-Runahead's worker whose first chain worker stalls
(KVR_TEST_FAULT=stall, a hung or overloaded peer) or whose model runner raises
before sending any KV (KVR_TEST_FAULT=raise, e.g. out of memory) in its runahead steps."""
import os
import time

from vllm_kvrunahead.worker import Worker


def _boom(*args, **kwargs):
    raise RuntimeError("injected chain worker failure")


class StallingWorker(Worker):
    def execute_model(self, scheduler_output):
        if not self.is_head and self.plan(scheduler_output):
            if os.environ.get("KVR_TEST_FAULT", "stall") == "raise":
                self.model_runner.execute_model = _boom
            else:
                time.sleep(float(os.environ.get("KVR_TEST_STALL_S", "60")))
        return super().execute_model(scheduler_output)
