"""Plain vLLM's CPU worker with a guest (vllm_kvrunahead/guest.py) on every rank: the full model under a
one-rank TP group beside vLLM's TP model. Test-only until the plugin's Worker builds one (issue 22)."""
from vllm_kvrunahead import guest

from tests.recording_worker import RecordingWorker


class GuestWorker(RecordingWorker):
    RING = 1  # one scratch tensor shared by every layer: the smallest scratch a whole prefill needs

    def init_device(self):
        super().init_device()
        self.guest_group = guest.singleton_tp_groups(self.local_rank)  # every rank, after vLLM's groups

    def load_model(self, *args, **kwargs):
        config = guest.guest_config(self.vllm_config)  # before vLLM registers its attention layers
        super().load_model(*args, **kwargs)
        self.guest = guest.Guest(config, self.guest_group, self.device, ring=self.RING)

    def determine_available_memory(self) -> int:
        self.guest.allocate_scratch(self.cache_config)  # before vLLM measures: the scratch is in place
        return guest.kv_bytes_left(super().determine_available_memory(), self.guest.reserved_bytes(),
                                  self.cache_config)

    # -- RPCs (collective_rpc) --------------------------------------------------
    def kvr_guest_prefill(self, prompts):
        """Per prompt: the guest's greedy token, and its logprobs over the whole vocabulary by token id."""
        import numpy as np

        out = []
        for p in prompts:
            token, ids, lps = self.guest.prefill(p)
            full = np.full(self.guest.config.model_config.get_vocab_size(), np.nan, dtype=np.float32)
            full[ids[1:]] = lps[1:]  # column 0 is the sampled token, then the top-k (here: all)
            out.append((token, full.tolist()))  # plain floats: RPC replies carry no arrays
        return out

    def kvr_guest_report(self) -> dict:
        from vllm.distributed.parallel_state import get_tp_group

        g = self.guest
        rope = lambda m: {id(b) for n, b in m.named_buffers() if "rotary" in n}  # noqa: E731
        mine = rope(g.runner.get_model())
        return dict(rope_shared=bool(mine) and mine == rope(self.model_runner.get_model()),
                    vllm_weights=guest.model_weight_bytes(self.model_runner.get_model()),
                    weights=g.weight_bytes(), scratch=g.scratch_bytes(), reserved=g.reserved_bytes(),
                    scratch_blocks=g.kv_cache_config.num_blocks,
                    scratch_regions=len({c.data_ptr() for c in g.runner.kv_caches}),  # where layers' KV starts
                    guest_tp_ranks=list(g.group.ranks), vllm_tp_ranks=list(get_tp_group().ranks),
                    guest_layers=sorted(g.config.compilation_config.static_forward_context),
                    vllm_layers=sorted(self.vllm_config.compilation_config.static_forward_context))
