"""Workers plus an observer for the tests: each records every request's prompt length and whole
block table (kept after the request finishes), so a test can read a prompt's KV blocks afterwards,
and what the scheduler put in each step. RecordingWorker is plain vLLM's CPU worker (the reference),
RecordingKVRWorker is KV-Runahead's."""
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvrunahead.vllm_seam import RequestBook
from vllm_kvrunahead.worker import Worker


class _Recorder:
    def execute_model(self, scheduler_output):
        if not hasattr(self, "tables"):
            self.recorded = RequestBook()   # plain vLLM's worker keeps none
            self.tables = {}  # request id -> (prompt length, block ids of group 0), in first-seen order
            self.steps = []   # tokens per scheduled request, per step the scheduler sent
        so = scheduler_output
        if so.total_num_scheduled_tokens:
            self.steps.append(sorted(so.num_scheduled_tokens.values()))
        self.recorded.update(so)
        for nr in so.scheduled_new_reqs:
            self.tables.setdefault(nr.req_id, (len(nr.prompt_token_ids or ()), []))
        for rid in [nr.req_id for nr in so.scheduled_new_reqs] + list(so.scheduled_cached_reqs.req_ids):
            if rid in self.tables:
                self.tables[rid][1][:] = self.recorded.blocks(rid)
        return super().execute_model(so)

    def kvr_steps(self):
        return list(getattr(self, "steps", []))

    def kvr_request_blocks(self):
        return list(getattr(self, "tables", {}).values())


class RecordingWorker(_Recorder, CPUWorker):
    pass


class RecordingKVRWorker(_Recorder, Worker):
    def kvr_holdings(self):
        """Per chain position and KV block: the leading slots the record says equal the head's."""
        return self.chain.holdings._valid.copy()
