"""The language model of LLaVA-Med (paper §4): a LLaMA-style decoder (LLaMA/Vicuna in v1, Mistral in v1.5).

Pre-norm blocks with RMSNorm, rotary position embeddings (RoPE, base `rope_theta`: 1e4 for LLaMA, 1e6 for
Mistral-7B-v0.2), grouped-query attention (kv_heads < heads shares each key/value head among a group of
query heads) and a SwiGLU MLP. The decoder takes embeddings rather than token ids so that LLaVA can splice
image features in among the words (see llava.py). A KV cache makes generation incremental.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minillavamed.attention import attention, attention_varlen
from minillavamed.config import DecoderConfig
from minillavamed.gemm import linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one call: decoding a small model is bound by the number of calls
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalize in fp32 even under bf16: the mean of squares loses too much precision otherwise. The
        # weight multiplies after the cast back, as in the released models' code.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables (..., seqlen, 1, head_dim) for integer positions (..., seqlen).

    The released checkpoints rotate the two halves of each head (HF's convention), not interleaved pairs:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). The sin table carries the minus sign on its first half, so
    that apply_rope only has to swap the halves.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    cos, sin = freqs.cos(), freqs.sin()
    cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
    return cos[..., None, :].to(dtype), sin[..., None, :].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin  # roll swaps the halves: (x2, x1)


class KVCache:
    """Preallocated keys and values of every layer, so that each generated token costs one step."""

    def __init__(self, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        """`dtype` is the embeddings' dtype. Keys and values are held in the dtype attention computes in: the
        autocast dtype when the cache is made under autocast, else `dtype`."""
        shape = (batch, max_len, cfg.kv_heads, cfg.head_dim)
        device_type = torch.device(device).type
        kv_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype
        # One tensor per layer rather than one stacked tensor: a decode step then indexes one level less.
        self.k = [torch.empty(shape, dtype=kv_dtype, device=device) for _ in range(cfg.layers)]
        self.v = [torch.empty(shape, dtype=kv_dtype, device=device) for _ in range(cfg.layers)]
        self.max_len = max_len
        self.length = 0  # tokens already cached; advanced by the decoder after each forward
        # Rotary tables for every position the cache can reach, so that a decode step only looks them up.
        self.cos, self.sin = rope_cos_sin(torch.arange(max_len, device=device), cfg.head_dim, cfg.rope_theta, dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} needed")
        keys, values = self.k[layer], self.v[layer]
        keys[:, self.length:end] = k
        values[:, self.length:end] = v
        return keys[:, :end], values[:, :end]


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        # Queries, keys and values in one product (rows in that order; the checkpoint key maps split and join
        # them): decoding a small model one token at a time is bound by the number of calls, not by flops.
        self.wqkv = nn.Linear(cfg.dim, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, layer, key_padding_mask, cache, cu_seqlens, max_seqlen, backend, last_only):
        b, t, _ = x.shape
        h, kvh = self.heads, self.kv_heads
        qkv = linear(x, self.wqkv).view(b, t, h + 2 * kvh, self.head_dim)
        # Queries and keys rotate together. Under autocast the product is in the compute dtype while the rotary
        # tables stay fp32 (as in the released models' code), so the rotation runs in fp32 and is rounded once,
        # back to the compute dtype: q, k and v then reach attention (and the cache) in one dtype.
        qk = apply_rope(qkv[:, :, :h + kvh], cos, sin).to(qkv.dtype)
        q, k, v = qk[:, :, :h], qk[:, :, h:], qkv[:, :, h + kvh:]
        if cu_seqlens is not None:  # packed training rows: batch is 1, segments never see each other
            out = attention_varlen(q[0], k[0], v[0], cu_seqlens, max_seqlen, causal=True, backend=backend)[None]
        else:
            if cache is not None:
                k, v = cache.update(layer, k, v)
            if last_only:  # every key and value is cached above; only the newest query goes on
                q, t = q[:, -1:], 1
            out = attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, backend=backend)
        return linear(out.reshape(b, t, -1), self.wo)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.mlp_dim, bias=False)  # gate rows, then up rows: one product
        self.down = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, layer, key_padding_mask, cache, cu_seqlens, max_seqlen, backend, last_only):
        h = self.attn(self.attn_norm(x), cos, sin, layer, key_padding_mask, cache, cu_seqlens, max_seqlen, backend,
                      last_only)
        x = (x[:, -1:] if last_only else x) + h
        gate, up = linear(self.mlp_norm(x), self.gate_up).chunk(2, dim=-1)
        return x + linear(F.silu(gate) * up, self.down)  # SwiGLU


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.backend = "sdpa"
        # Activation checkpointing: recompute each block in the backward instead of storing its activations.
        self.checkpointing = False

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Embeddings (batch, seqlen, dim) at `positions` (batch, seqlen) -> final normalized hidden states.

        `key_padding_mask` (batch, cached + seqlen) marks real tokens; `cu_seqlens` marks the boundaries of
        samples packed into one row (batch must be 1 then). `last_only` returns the last position alone
        (batch, 1, dim), all generation needs: the last block then computes the other positions' keys and
        values for the cache and nothing more.
        """
        if last_only and cu_seqlens is not None:
            raise ValueError("last_only is for generation; packed rows (cu_seqlens) hold several last positions")
        if cache is None:
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        else:
            cos, sin = cache.cos[positions], cache.sin[positions]
        x = embeds
        for i, block in enumerate(self.blocks):
            last = last_only and i == len(self.blocks) - 1
            args = (cos, sin, i, key_padding_mask, cache, cu_seqlens, max_seqlen, self.backend, last)
            if self.checkpointing and self.training:
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)
        if cache is not None:
            cache.length += embeds.shape[1]
        return self.norm(x)
