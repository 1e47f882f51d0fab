"""How many tokens one engine step may take (pure; no vLLM).

One long prompt runs fastest on the chain in one step (Llama-3-8B shape, 4x H100, N=4: a 64k prompt alone
takes 1.002 s at a step budget of 4 x 16384, 1.079 s at 16384, where it is cut into four chunks that each
pay the layer pipeline's fill and drain). But a budget that large, held for every step, packs several long
prompts into one step, and each of their first tokens then waits for the whole step (16 x 16k prompts at
once: mean TTFT 1.541 s at 65536 against 1.186 s at 16384, the same wall time; multi-turn chat: 0.700 s
against 0.623 s).

So a step takes ``base`` tokens (vLLM's own default), and more, up to ``most``, only as far as the work
already running plus the first prompt in line needs: one long prompt still runs in one step, several are
served one after another.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepBudget:
    base: int   # tokens any step may take (vLLM's default budget)
    most: int   # tokens one step may take at most (max_num_batched_tokens)

    def tokens(self, running: int, prefilling: bool, first_waiting: int) -> int:
        """This step's budget. running: tokens the running requests want now (decodes, the rest of a
        chunked prompt); prefilling: one of them is still in its prompt (then nothing new is pulled in
        beyond ``base``); first_waiting: tokens of the first waiting request."""
        need = running if prefilling else running + first_waiting
        return max(self.base, min(self.most, need))
