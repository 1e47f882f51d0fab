"""Where a runahead step's time goes, per worker (on only with {"profile": true}).

step_s:  forward time of runahead steps (first layer's receive posted .. last send done);
stall_s: time the compute stream sat waiting for prefix KV from the predecessor.
On GPUs both come from CUDA events on the compute stream (the stall is the gap
between an event before and after the stream-wait on the NCCL receive), read
with one event sync per step; on CPU from the host clock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class ChainProfile:
    steps: int = 0
    step_s: float = 0.0
    stall_s: float = 0.0
    last_step_s: float = 0.0
    last_stall_s: float = 0.0


class StepProfiler:
    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled
        self.cuda = enabled and device.type == "cuda"
        self.total = ChainProfile()
        self._marks: list = []

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _elapsed(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def begin(self) -> None:
        if self.enabled:
            self._marks = [self._mark()]

    def around_wait(self):
        """Call before the wait; call the returned function after it."""
        if not self.enabled:
            return lambda: None
        a = self._mark()
        return lambda: self._marks.append((a, self._mark()))

    def end(self) -> None:
        if not self.enabled or not self._marks:
            return
        first, end = self._marks[0], self._mark()
        if self.cuda:
            end.synchronize()
        step = self._elapsed(first, end)
        stall = sum(self._elapsed(a, b) for a, b in self._marks[1:])
        t = self.total
        t.steps, t.step_s, t.stall_s = t.steps + 1, t.step_s + step, t.stall_s + stall
        t.last_step_s, t.last_stall_s = step, stall
        self._marks = []
