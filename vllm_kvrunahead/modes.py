"""Which KV-Runahead a worker runs, decided once from its options (``KVRunaheadConfig.decode``).

- one worker: plain vLLM (``NO_GUEST``, ``NO_CHAIN``);
- "head": a chain of full-model workers; the head decodes (``chain.Chain``);
- "tp": vLLM's plain TP=N decodes on every rank, each rank's guest runs the prefill ahead
  (``guest.GuestHost``, ``tp_chain.TPChain``).
"""
from __future__ import annotations

from . import chain, guest
from .config import KVRunaheadConfig
from .tp_chain import TPChain


def _tp_layout(kvr: KVRunaheadConfig) -> bool:
    return kvr.decode == "tp" and kvr.num_workers > 1


def host_for(kvr: KVRunaheadConfig):
    """What builds this rank's guest during vLLM's worker set-up (``NO_GUEST``: nothing)."""
    return guest.GuestHost() if _tp_layout(kvr) else guest.NO_GUEST


def chain_for(kvr: KVRunaheadConfig, vllm_config, rank: int, kv_cache_config, host):
    """This worker's share of KV-Runahead, its links made (collective: every rank calls it at once)."""
    if _tp_layout(kvr):
        return TPChain(kvr, vllm_config, rank, kv_cache_config, host.guest)
    return chain.chain_for(kvr, vllm_config, rank, kv_cache_config)
