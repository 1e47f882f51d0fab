"""What one worker's chain did (pure): the counters ``kvr_stats`` reports, in one place.

The chain (``chain.Chain``) counts its plans and what its runner ran; the KV connector counts the
blocks and layers it moved. Every worker plans the same steps, so the plan counters are equal on all.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ChainStats:
    steps_run: int = 0               # forward passes this worker's runner ran
    tokens_run: int = 0              # ... and the tokens it computed in them
    last_segments: list = field(default_factory=list)  # per request, the segments of the last runahead step
    chunks_ahead: int = 0            # prefill chunks that ran on the chain ...
    chunks_ahead_cached: int = 0     # ... of them, after cached tokens (later chunk, cache hit, resumed)
    tokens_ahead: int = 0            # ... and their tokens
    prefix_tokens_held: int = 0      # cached-prefix tokens chain positions held and were not sent
    chunks_prefix_not_final: int = 0  # chunks kept on the head: their cached prefix was computed in their step
    steps: int = 0                   # steps that moved KV on this worker (kvr_stats: chain_steps)
    blocks_received: int = 0         # kernel blocks x layers
    blocks_sent: int = 0
    layers_sent: int = 0             # per-layer sends (a layer of one step counts once)
    layers_sent_on_entry: int = 0    # ... of them, sent at attention entry (early_send)

    def count_plan(self, plan) -> None:
        """One step's plan (``plan.StepPlan``), as every worker sees it."""
        self.chunks_prefix_not_final += len(plan.prefix_not_final)
        if not plan:
            return
        reqs = plan.requests
        self.last_segments = [[(g.start, g.end) for g in r.segments] for r in reqs]
        self.chunks_ahead += len(reqs)
        self.chunks_ahead_cached += sum(r.start > 0 for r in reqs)
        self.tokens_ahead += sum(r.segments[-1].end - r.start for r in reqs)
        self.prefix_tokens_held += sum(sum(r.held) for r in reqs)

    def count_run(self, tokens: int) -> None:
        if tokens:
            self.steps_run += 1
            self.tokens_run += tokens
