"""A reference KV-Runahead prefill in plain PyTorch (no vLLM).

A tiny Llama-like causal transformer (RMSNorm, RoPE, GQA, SwiGLU) that can
prefill either in one process or as one link of the chain: worker k gets
tokens [start, end), receives the prefix KV [0, start) layer by layer from
worker k-1 through ``ChainComm`` and sends KV [0, end) on. It is the
executable specification the vLLM integration is tested against in spirit,
and the demo of the algorithm that needs no engine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.partition import Segment
from ..transport.comm import ChainComm


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 256
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos.to(torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype)[:, None, :], ang.sin().to(x.dtype)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class TinyLlama(nn.Module):
    def __init__(self, cfg: TinyConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        h, kvd = cfg.hidden, cfg.kv_heads * cfg.head_dim

        def w(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g) * 0.2)

        self.embed = w(cfg.vocab, h)
        self.wq = nn.ParameterList([w(h, h) for _ in range(cfg.layers)])
        self.wk = nn.ParameterList([w(h, kvd) for _ in range(cfg.layers)])
        self.wv = nn.ParameterList([w(h, kvd) for _ in range(cfg.layers)])
        self.wo = nn.ParameterList([w(h, h) for _ in range(cfg.layers)])
        self.w1 = nn.ParameterList([w(h, cfg.ffn) for _ in range(cfg.layers)])
        self.w3 = nn.ParameterList([w(h, cfg.ffn) for _ in range(cfg.layers)])
        self.w2 = nn.ParameterList([w(cfg.ffn, h) for _ in range(cfg.layers)])
        self.lm_head = w(h, cfg.vocab)

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def _qkv(self, layer: int, x: torch.Tensor, pos: torch.Tensor):
        c = self.cfg
        t = x.shape[0]
        hn = self._norm(x)
        q = (hn @ self.wq[layer]).view(t, c.heads, c.head_dim)
        k = (hn @ self.wk[layer]).view(t, c.kv_heads, c.head_dim)
        v = (hn @ self.wv[layer]).view(t, c.kv_heads, c.head_dim)
        return _rope(q, pos, c.rope_theta), _rope(k, pos, c.rope_theta), v

    def _finish_layer(self, layer, x, q, k_all, v_all, start):
        """Attention of own queries (positions start..) over k_all/v_all, then MLP."""
        c = self.cfg
        t, total = q.shape[0], k_all.shape[0]
        rep = c.heads // c.kv_heads
        kk = k_all.repeat_interleave(rep, dim=1).transpose(0, 1)
        vv = v_all.repeat_interleave(rep, dim=1).transpose(0, 1)
        qpos = torch.arange(start, start + t)[:, None]
        mask = torch.arange(total)[None, :] <= qpos  # causal with a prefix offset
        att = F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask)
        x = x + att.transpose(0, 1).reshape(t, c.hidden) @ self.wo[layer]
        hn = self._norm(x)
        return x + (F.silu(hn @ self.w1[layer]) * (hn @ self.w3[layer])) @ self.w2[layer]

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor):
        """One process: (last-token logits, per-layer KV [2, n, kv_heads, head_dim])."""
        return self.prefill_segment(tokens, Segment(0, 0, len(tokens)), comm=None)

    @torch.no_grad()
    def prefill_segment(self, tokens: torch.Tensor, seg: Segment, comm: ChainComm | None):
        """One chain link: tokens is the whole prompt; computes ``seg`` only.

        Returns (last-token logits of this segment, per-layer KV [2, seg.end, ...]).
        """
        c = self.cfg
        own = tokens[seg.start : seg.end]
        pos = torch.arange(seg.start, seg.end)
        x = self.embed[own]
        has_prev = seg.start > 0
        has_next = comm is not None and comm.next_rank is not None
        recv_shape = (2, seg.start, c.kv_heads, c.head_dim)
        if has_prev:  # post the first receive before any compute
            comm.post_recv(recv_shape, x.dtype)
        kv_out = []
        for layer in range(c.layers):
            q, k, v = self._qkv(layer, x, pos)          # compute while layer's KV is in flight
            if has_prev:
                if layer + 1 < c.layers:                 # post the next layer's receive
                    comm.post_recv(recv_shape, x.dtype)
                buf = comm.wait_recv()
                k_all, v_all = torch.cat([buf[0], k]), torch.cat([buf[1], v])
            else:
                k_all, v_all = k, v
            kv = torch.stack([k_all, v_all])
            if has_next:
                comm.post_send(kv)
            kv_out.append(kv)
            x = self._finish_layer(layer, x, q, k_all, v_all, seg.start)
        if comm is not None:
            comm.end_step()
        logits = self._norm(x[-1]) @ self.lm_head
        return logits, kv_out
