"""Whole-block access to one layer's paged KV cache.

The chain moves KV as whole paged blocks: a block's bytes are copied as they
are, so the attention backend's layout inside a block (vLLM's CPU kernel
keeps K and V tiled per ISA) never matters. vLLM 0.26's CPU, FlashAttention
and Triton backends all put the block dimension first. vLLM 0.32 allocates one
backing tensor for all layers and gives each layer a view; on CPU each view
still holds whole contiguous blocks along dim 0, which the check below verifies.
A scheduler block may be split into several kernel blocks; they are consecutive.
"""
from __future__ import annotations

import numpy as np
import torch


def check_layer_cache(name: str, cache: torch.Tensor) -> None:
    per_block = int(np.prod(cache.shape[1:]))
    # a block must be one contiguous chunk; its inner stride order is free (HND or NHD)
    if cache.dim() < 2 or cache.stride(0) != per_block:
        raise ValueError(
            f"KV-Runahead: layer {name} has a KV cache of shape {tuple(cache.shape)} and strides "
            f"{cache.stride()}; only attention backends whose KV blocks are contiguous along dim 0 "
            "are supported (vLLM's CPU, FLASH_ATTN and TRITON_ATTN)")


def kernel_blocks(block_ids: np.ndarray, per_block: int) -> np.ndarray:
    """Scheduler block ids -> the kernel block ids that make them up, in order."""
    if per_block == 1:
        return block_ids
    return (block_ids[:, None] * per_block + np.arange(per_block)[None, :]).reshape(-1)


def gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The given blocks, as one new contiguous tensor (blocks, ...)."""
    return cache.index_select(0, blocks)


def scatter(cache: torch.Tensor, blocks: torch.Tensor, data: torch.Tensor) -> None:
    cache.index_copy_(0, blocks, data)
