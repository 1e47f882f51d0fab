"""Workers plus an observer for the tests: each records every request's prompt length and whole
block table (first step's blocks plus each later step's new ones; nothing else changes), so a test
can read a prompt's KV blocks afterwards, and what the scheduler put in each step. RecordingWorker is plain vLLM's CPU worker (the
reference), RecordingKVRWorker is KV-Runahead's."""
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvrunahead.worker import Worker


class _Recorder:
    def execute_model(self, scheduler_output):
        if not hasattr(self, "tables"):
            self.tables = {}  # request id -> (prompt length, block ids of group 0), in first-seen order
            self.steps = []   # tokens per scheduled request, per step the scheduler sent
        if scheduler_output.total_num_scheduled_tokens:
            self.steps.append(sorted(scheduler_output.num_scheduled_tokens.values()))
        for nr in scheduler_output.scheduled_new_reqs:
            self.tables.setdefault(nr.req_id, (len(nr.prompt_token_ids or ()), []))[1][:] = list(nr.block_ids[0])
        cr = scheduler_output.scheduled_cached_reqs
        for rid, new in zip(cr.req_ids, cr.new_block_ids):
            if rid in self.tables and new:
                blocks = self.tables[rid][1]
                if rid in cr.resumed_req_ids:
                    blocks.clear()
                blocks.extend(new[0])
        return super().execute_model(scheduler_output)

    def kvr_steps(self):
        return list(getattr(self, "steps", []))

    def kvr_request_blocks(self):
        return list(getattr(self, "tables", {}).values())


class RecordingWorker(_Recorder, CPUWorker):
    pass


class RecordingKVRWorker(_Recorder, Worker):
    def kvr_holdings(self):
        """Per chain position and KV block: the leading slots the record says equal the head's."""
        return self.holdings._valid.copy()
