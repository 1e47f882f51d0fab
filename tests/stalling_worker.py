"""Fault injection for tests: KV-Runahead's worker whose first chain worker stalls
before its runahead steps (stands for a hung or overloaded peer)."""
import os
import time

from vllm_kvrunahead.worker import Worker


class StallingWorker(Worker):
    def execute_model(self, scheduler_output):
        if not self.is_head and self.plan(scheduler_output):
            time.sleep(float(os.environ.get("KVR_TEST_STALL_S", "60")))
        return super().execute_model(scheduler_output)
