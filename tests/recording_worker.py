"""Workers plus an observer for the tests: each records every request's prompt length and whole
block table (kept after the request finishes), so a test can read a prompt's KV blocks afterwards,
and what the scheduler put in each step. RecordingWorker is plain vLLM's CPU worker (the reference),
RecordingKVRWorker is KV-Runahead's."""
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_kvrunahead.vllm_side.seam import RequestBook
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
        return self.runahead.holdings._valid.copy()

    def kvr_guest_report(self) -> dict:
        """TP layout: what this rank's guest holds (its weights, its scratch) and where it runs."""
        from vllm.distributed.parallel_state import get_tp_group

        from vllm_kvrunahead.vllm_side import guest

        g = self.host.guest
        rope = lambda m: {id(b) for n, b in m.named_buffers() if "rotary" in n}  # noqa: E731
        mine = rope(g.runner.get_model())
        return dict(rope_shared=bool(mine) and mine == rope(self.model_runner.get_model()),
                    vllm_weights=guest.model_weight_bytes(self.model_runner.get_model()),
                    weights=g.weight_bytes(), scratch=g.scratch_bytes(), reserved=g.reserved_bytes(),
                    scratch_blocks=g.kv_cache_config.num_blocks, arena=self.host.arena.nbytes,
                    scratch_regions=len({c.data_ptr() for c in g.runner.kv_caches}),
                    guest_tp_ranks=list(g.group.ranks), vllm_tp_ranks=list(get_tp_group().ranks),
                    guest_layers=sorted(g.config.compilation_config.static_forward_context),
                    vllm_layers=sorted(self.vllm_config.compilation_config.static_forward_context),
                    **(dict(peer_bytes=g.peer.nbytes, peer_slots=len(g.peer.slots), layers_taken=g.peer.shards.layers_taken,
                            weight_bytes_pulled=g.peer.shards.bytes_pulled,
                            linear_bytes=sum(p.numel() * p.element_size() for m in g.peer.modules[0]
                                             for p in m.parameters(recurse=False)))
                       if g.peer else {}))
