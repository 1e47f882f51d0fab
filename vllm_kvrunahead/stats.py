"""What one worker's chain did (pure): the counters ``kvr_stats`` reports and the interval figures
vLLM's KV-connector stats path carries to ``/metrics`` and its stats log line, in one place.

The chain (``chain.Chain``) counts its plans and what its runner ran; the KV connector counts the
blocks and layers it moved. Every worker plans the same steps, so the plan's figures, every chain
position's included (tokens computed, KV bytes sent and received), are the same on all of them:
the head, the only worker whose output vLLM reads, reports them for every position.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MARK = "kv_runahead"  # the key that tells KV-Runahead's interval data from another connector's


@dataclass
class ChainStats:
    n_positions: int = 1
    steps_run: int = 0               # forward passes this worker's runner ran
    tokens_run: int = 0              # ... and the tokens it computed in them
    last_segments: list = field(default_factory=list)  # per request, the segments of the last runahead step
    chunks_ahead: int = 0            # prefill chunks that ran on the chain ...
    chunks_ahead_cached: int = 0     # ... of them, after cached tokens (later chunk, cache hit, resumed)
    tokens_ahead: int = 0            # ... and their tokens
    tokens_ahead_cached: int = 0
    chunks_on_head: dict = field(default_factory=dict)  # prefill chunks that stayed on the head, by reason
    prefix_tokens_held: int = 0      # cached-prefix tokens chain positions held and were not sent ...
    prefix_tokens_sent: int = 0      # ... and those they received
    segment_tokens: list = field(default_factory=list)   # per position: tokens it computed on the chain
    kv_bytes_sent: list = field(default_factory=list)    # per position: KV bytes the plan had it send ...
    kv_bytes_received: list = field(default_factory=list)  # ... and receive
    steps: int = 0                   # steps that moved KV on this worker (kvr_stats: chain_steps)
    blocks_received: int = 0         # kernel blocks x layers
    blocks_sent: int = 0
    layers_sent: int = 0             # per-layer sends (a layer of one step counts once)
    layers_sent_on_entry: int = 0    # ... of them, sent at attention entry (early_send)

    def __post_init__(self) -> None:
        n = self.n_positions
        self.segment_tokens = self.segment_tokens or [0] * n
        self.kv_bytes_sent = self.kv_bytes_sent or [0] * n
        self.kv_bytes_received = self.kv_bytes_received or [0] * n
        self._times: list[tuple[list[float], list[float]]] = []  # per runahead step since the last report
        self._reported = self._figures()
        self._changed = False  # report() runs after every step, decodes too: most have nothing to say

    def count_plan(self, plan, block_bytes: int = 0) -> None:
        """One step's plan (``plan.StepPlan``), as every worker sees it; ``block_bytes``: one KV block
        of every layer, as it crosses a link."""
        for _, why in plan.on_head:
            self.chunks_on_head[why] = self.chunks_on_head.get(why, 0) + 1
            self._changed = True
        if not plan:
            return
        self._changed = True
        reqs = plan.requests
        self.last_segments = [[(g.start, g.end) for g in r.segments] for r in reqs]
        for r in reqs:
            tokens = r.segments[-1].end - r.start
            self.chunks_ahead += 1
            self.tokens_ahead += tokens
            if r.start > 0:
                self.chunks_ahead_cached += 1
                self.tokens_ahead_cached += tokens
            self.prefix_tokens_held += sum(r.held)
            self.prefix_tokens_sent += sum(r.start - h for h in (r.held or (0,) * (len(r.segments) - 1)))
            for pos, seg in enumerate(r.segments):
                self.segment_tokens[pos] += seg.length
        for pos in range(plan.n_workers):
            t = plan.traffic_for(pos)
            self.kv_bytes_sent[pos] += (len(t.send) + len(t.send_prefix) + len(t.upfront_send)) * block_bytes
            self.kv_bytes_received[pos] += (len(t.recv) + len(t.upfront_recv)) * block_bytes

    def count_tp_step(self, step) -> None:
        """One TP-layout step (``tp_layout.TPStep``), as every rank sees it: the guests' chunks, and the
        prefill chunks vLLM's TP model computed, by reason (the cached prefix gathered counts as sent)."""
        for _, why in step.on_tp:
            self.chunks_on_head[why] = self.chunks_on_head.get(why, 0) + 1
            self._changed = True
        for r in step.requests:
            self._changed = True
            tokens = r.tail + 1 - r.start
            self.chunks_ahead += 1
            self.tokens_ahead += tokens
            if r.start > 0:
                self.chunks_ahead_cached += 1
                self.tokens_ahead_cached += tokens
                self.prefix_tokens_sent += r.start
            for pos, seg in enumerate(r.segments):
                self.segment_tokens[pos] += seg.length

    def count_run(self, tokens: int) -> None:
        if tokens:
            self.steps_run += 1
            self.tokens_run += tokens

    def observe_times(self, step_s: list[float], stall_s: list[float]) -> None:
        """One runahead step's time and receive stalls, per position (``profile``: timed on every worker)."""
        self._times.append((list(step_s), list(stall_s)))
        self._changed = True

    def _figures(self) -> dict:
        return dict(chunks_ahead_cold=self.chunks_ahead - self.chunks_ahead_cached,
                    chunks_ahead_cached=self.chunks_ahead_cached,
                    tokens_ahead_cold=self.tokens_ahead - self.tokens_ahead_cached,
                    tokens_ahead_cached=self.tokens_ahead_cached, chunks_on_head=dict(self.chunks_on_head),
                    prefix_tokens_held=self.prefix_tokens_held, prefix_tokens_sent=self.prefix_tokens_sent,
                    segment_tokens=list(self.segment_tokens), kv_bytes_sent=list(self.kv_bytes_sent),
                    kv_bytes_received=list(self.kv_bytes_received))

    def report(self) -> dict | None:
        """What happened since the last report (None: nothing), as plain data for vLLM's stats path."""
        if not self._changed:
            return None
        self._changed = False
        now, before = self._figures(), self._reported
        out: dict = {}
        for k, v in now.items():
            if isinstance(v, dict):
                d = {why: n - before[k].get(why, 0) for why, n in v.items() if n != before[k].get(why, 0)}
            elif isinstance(v, list):
                d = [a - b for a, b in zip(v, before[k])]
                d = d if any(d) else None
            else:
                d = v - before[k]
            if d:
                out[k] = d
        if self._times:
            out["step_seconds"], out["stall_seconds"] = (list(x) for x in zip(*self._times))
        self._reported, self._times = now, []
        return {MARK: self.n_positions, **out} if out else None
