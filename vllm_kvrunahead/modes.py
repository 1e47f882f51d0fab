"""Which KV-Runahead a rank runs, decided once, here, from its options (``KVRunaheadConfig.mode``): the
factory of the mode contract (``runahead.Runahead``). Nothing else asks which mode runs.

- "off" (one worker): plain vLLM (``NO_GUEST``, ``NO_RUNAHEAD``);
- "copies": a chain of full-model workers; the head decodes (``copies.rank.Chain``);
- "tp_layout": vLLM's plain TP=N decodes on every rank, each rank's guest runs the prefill ahead
  (``vllm_side.guest.GuestHost``, ``tp_layout.rank.TPLayoutRank``).
"""
from __future__ import annotations

from .config import COPIES, TP_LAYOUT, KVRunaheadConfig
from .copies.rank import chain_for
from .runahead import NO_RUNAHEAD, Runahead
from .tp_layout.rank import tp_layout_for
from .vllm_side.guest import NO_GUEST, GuestHost


def host_for(kvr: KVRunaheadConfig):
    """What builds this rank's guest during vLLM's worker set-up (``NO_GUEST``: nothing)."""
    return GuestHost(kvr.guest) if kvr.mode == TP_LAYOUT else NO_GUEST


def runahead_for(kvr: KVRunaheadConfig, vllm_config, rank: int, kv_cache_config, host) -> Runahead:
    """This rank's share of KV-Runahead, its links made (collective: every rank calls it at once)."""
    if kvr.mode == TP_LAYOUT:
        return tp_layout_for(kvr, vllm_config, rank, kv_cache_config, host.guest, host.arena)
    if kvr.mode == COPIES:
        return chain_for(kvr, vllm_config, rank, kv_cache_config)
    return NO_RUNAHEAD
