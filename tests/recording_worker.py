"""Plain vLLM's CPU worker plus an observer: records each new request's block ids
(nothing else changes), so a test can read its KV blocks as the reference."""
import collections

from vllm.v1.worker.cpu_worker import CPUWorker


class RecordingWorker(CPUWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.new_requests = collections.deque(maxlen=256)

    def execute_model(self, scheduler_output):
        for nr in scheduler_output.scheduled_new_reqs:
            self.new_requests.append((len(nr.prompt_token_ids or ()), [list(g) for g in nr.block_ids]))
        return super().execute_model(scheduler_output)

    def kvr_request_blocks(self):
        return list(self.new_requests)
