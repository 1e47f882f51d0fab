"""What one rank's KV-Runahead did (pure): the one record both modes count into, the one key set
``kvr_stats`` reports (``worker_stats``), and the interval figures vLLM's KV-connector stats path carries to
``/metrics`` and its stats log line.

Each mode counts its plans (``count_step``: the chunks that ran ahead and those that did not, by reason,
and the KV bytes every position moves) and what its runner ran; the KV connector counts the blocks and
layers it moved. Every rank plans the same steps, so the plan's figures, every position's included, are the
same on all of them: vLLM's output rank reports them for every position. A "position" is a chain position
(the chain of copies; the head is the last) or a TP rank (the TP layout: rank k computes segment k).
"""
from __future__ import annotations

from dataclasses import dataclass, field

MARK = "kv_runahead"  # the key that tells KV-Runahead's interval data from another connector's


@dataclass
class RunaheadStats:
    n_positions: int = 1
    steps_run: int = 0               # forward passes this worker's runner ran
    tokens_run: int = 0              # ... and the tokens it computed in them
    last_segments: list = field(default_factory=list)  # per request, the segments of the last runahead step
    chunks_ahead: int = 0            # prefill chunks that ran on the chain ...
    chunks_ahead_cached: int = 0     # ... of them, after cached tokens (later chunk, cache hit, resumed)
    tokens_ahead: int = 0            # ... and their tokens
    tokens_ahead_cached: int = 0
    chunks_not_ahead: dict = field(default_factory=dict)  # prefill chunks vLLM's own model computed, by reason
    decode_tokens: int = 0           # decode tokens (vLLM's model: the head's, or the TP model's)
    prefix_tokens_held: int = 0      # cached-prefix tokens positions held from earlier steps, not sent ...
    prefix_tokens_sent: int = 0      # ... and those they received (summed over positions)
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

    def count_step(self, plan, kv_bytes: tuple[list[int], list[int]]) -> None:
        """One step's plan (``plan.StepPlan`` or ``tp_step.TPStep``), as every rank sees it, and the KV
        bytes it has each position send and receive."""
        for _, why in plan.not_ahead:
            self.chunks_not_ahead[why] = self.chunks_not_ahead.get(why, 0) + 1
            self._changed = True
        if not plan:
            return
        self._changed = True
        self.last_segments = [[(g.start, g.end) for g in r.segments] for r in plan.requests]
        for r in plan.requests:
            self.chunks_ahead += 1
            self.tokens_ahead += r.tokens
            if r.start > 0:
                self.chunks_ahead_cached += 1
                self.tokens_ahead_cached += r.tokens
            received = plan.prefix_received(r)
            self.prefix_tokens_held += r.start * len(received) - sum(received)
            self.prefix_tokens_sent += sum(received)
            for pos, seg in enumerate(r.segments):
                self.segment_tokens[pos] += seg.length
        for pos, (sent, received) in enumerate(zip(*kv_bytes)):
            self.kv_bytes_sent[pos] += sent
            self.kv_bytes_received[pos] += received

    def count_decodes(self, tokens: int) -> None:
        self.decode_tokens += tokens

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
                    tokens_ahead_cached=self.tokens_ahead_cached, chunks_not_ahead=dict(self.chunks_not_ahead),
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


def worker_stats(counters: RunaheadStats, *, mode: str, position: int, returns_output: bool,
                 tp_rank: int, tp_size: int, tp_group: list[int], live_requests: int, bytes_sent: int,
                 bytes_received: int, partition: str | None, profile: dict | None = None,
                 refine: dict | None = None, scratch_blocks: int = 0, link: str | None = None) -> dict:
    """``kvr_stats`` (the worker adds its ``rank``): one key set in every mode. A count that does not apply
    to the mode is 0 (the TP layout holds no prefix between steps; the chain of copies has no scratch); a
    setting that is off is None."""
    c = {f: getattr(counters, f) for f in (
        "steps_run", "tokens_run", "decode_tokens", "last_segments", "chunks_ahead", "chunks_ahead_cached",
        "tokens_ahead", "tokens_ahead_cached", "chunks_not_ahead", "prefix_tokens_held", "prefix_tokens_sent",
        "segment_tokens", "kv_bytes_sent", "kv_bytes_received", "blocks_received", "blocks_sent", "layers_sent",
        "layers_sent_on_entry")}
    return {"mode": mode, "position": position, "n_workers": counters.n_positions,
            "returns_output": returns_output, "tp_rank": tp_rank, "tp_size": tp_size, "tp_group": list(tp_group),
            **c, "kv_steps": counters.steps, "live_requests": live_requests, "bytes_sent": bytes_sent,
            "bytes_received": bytes_received, "partition": partition, "profile": profile, "refine": refine,
            "scratch_blocks": scratch_blocks, "link": link}


def idle_stats() -> dict:
    """``worker_stats`` of one worker (plain vLLM: nothing runs ahead)."""
    return worker_stats(RunaheadStats(1), mode="off", position=0, returns_output=True, tp_rank=0, tp_size=1,
                        tp_group=[0], live_requests=0, bytes_sent=0, bytes_received=0, partition=None)
