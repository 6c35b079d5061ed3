"""Scaled dot-product attention, computed in one place for the vision encoder and the language model.

Both halves of LLaVA-Med (paper §4) are transformers; the only part that differs between them is the mask:
the CLIP ViT attends bidirectionally over its patches, the decoder causally over its tokens (with padding
masked out in batched generation). Everything goes through `attention()` / `attention_varlen()` so that
backends can be swapped without touching the model:

- `naive`: the textbook formula, softmax(q k^T / sqrt(d)) v, in fp32. The reference the others are checked
  against.
- `sdpa`: torch's fused `scaled_dot_product_attention` (flash / memory-efficient / cuDNN on GPUs).
- `triton`: our FlashAttention-2 kernels in `minillavamed.kernels` (see there), for every call with more than
  one query: the ViT, training (dense rows and packed segments, forward and backward) and the prefill of
  generation, whose left-padded rows are unpadded into packed segments first. Where the kernels cannot run
  (no GPU and no interpreter, float32 on a GPU, bfloat16 in the interpreter) it raises with the reason; it
  never falls back silently.

A decode step (one new query against the KV cache) is memory-bound, with nothing for a kernel to fuse: under
`sdpa` and `triton` alike it runs SDPA's decode path (`_sdpa_decode`).

Layout everywhere is flash-attn's: q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, kv_heads,
head_dim). Grouped-query attention (kv_heads < heads) is handled by each backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("naive", "sdpa", "triton")


def _allowed(tq: int, tk: int, causal: bool, key_padding_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean (batch|1, 1, tq, tk) mask of allowed query->key pairs, or None when everything is allowed.

    Causal masks are aligned to the bottom right (query i sits at key position tk - tq + i), which is what a
    KV cache needs: new queries see every cached key and themselves.
    """
    mask = None
    if causal:
        q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
        mask = (torch.arange(tk, device=device)[None, :] <= q_pos)[None, None]
    if key_padding_mask is not None:
        keys = key_padding_mask.bool()[:, None, None, :]
        mask = keys if mask is None else mask & keys
        # A padding query can have every key masked; let such rows attend to all keys so that softmax stays
        # finite. Their outputs are never used (their labels are ignored and they are never sampled from).
        mask = mask | ~mask.any(-1, keepdim=True)
    return mask


def _naive(q, k, v, mask, scale):
    heads, kv_heads = q.shape[2], k.shape[2]
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    with torch.autocast(q.device.type, enabled=False):  # the reference stays in fp32 under autocast too
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.float()).to(q.dtype)


def _sdpa(q, k, v, mask, is_causal, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def _sdpa_decode(q, k, v, key_padding_mask, scale):
    """One new query per row (a decode step): the query heads that share a key/value head are handed to SDPA
    as that head's queries, so it runs plain multi-head attention, which CPUs run faster than its grouped-query
    path (bench/RESULTS.md, "Speed choices"). The newest key is always a real token, so no row is ever fully masked."""
    b, _, heads, d = q.shape
    kv_heads = k.shape[2]
    mask = None if key_padding_mask is None else key_padding_mask.bool()[:, None, None, :]
    out = F.scaled_dot_product_attention(q.view(b, kv_heads, heads // kv_heads, d), k.transpose(1, 2),
                                         v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.view(b, 1, heads, d)


def require_triton(q) -> None:
    """Raise, with the reason, when the Triton kernels cannot run on tensors like `q`."""
    try:
        from minillavamed.kernels import triton_attention_supported
    except ImportError as e:  # triton itself missing or broken on this platform
        ok, reason = False, f"the Triton kernels could not be imported ({e})"
    else:
        ok, reason = triton_attention_supported(q)
    if not ok:
        raise RuntimeError(f"attention backend 'triton' cannot run here: {reason}; choose the 'sdpa' backend "
                           "(--attn sdpa) or a setup the kernels take")


def _triton_unpadded(q, k, v, key_padding_mask, causal, scale):
    """Padded rows (the left-padded prefill of batched generation) as packed segments of their real tokens, so
    that the varlen kernel never sees padding. A row's real queries are its last real keys, so the kernel's
    bottom-right causal alignment within each segment is the padded row's causal mask. Padding queries get
    zeros; their outputs are never used."""
    from minillavamed.kernels import flash_attn_varlen_func

    b, tq, heads, d = q.shape
    keys = key_padding_mask.bool()
    queries = keys[:, keys.shape[1] - tq:]
    q_rows, k_rows = queries.flatten().nonzero()[:, 0], keys.flatten().nonzero()[:, 0]
    len_q, len_k = queries.sum(1, dtype=torch.int32), keys.sum(1, dtype=torch.int32)
    cu_q, cu_k = (F.pad(n.cumsum(0, dtype=torch.int32), (1, 0)) for n in (len_q, len_k))
    out = flash_attn_varlen_func(q.flatten(0, 1)[q_rows], k.flatten(0, 1)[k_rows], v.flatten(0, 1)[k_rows], cu_q,
                                 cu_k, int(len_q.max()), int(len_k.max()), softmax_scale=scale, causal=causal)
    return q.new_zeros(b * tq, heads, d).index_copy(0, q_rows, out).view(b, tq, heads, d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Attention over (batch, seqlen, heads, head_dim) tensors; `key_padding_mask` (batch, seqlen_k) is True
    for real tokens. Returns (batch, seqlen_q, heads, head_dim)."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    scale = 1.0 / math.sqrt(q.shape[-1])
    tq, tk = q.shape[1], k.shape[1]
    causal = causal and tq > 1  # a single newest query sees every key anyway
    if backend == "naive":
        return _naive(q, k, v, _allowed(tq, tk, causal, key_padding_mask, q.device), scale)
    if tq == 1 and backend in ("sdpa", "triton"):  # a decode step: see the module docstring
        return _sdpa_decode(q, k, v, key_padding_mask, scale)
    if backend == "triton":
        require_triton(q)
        if key_padding_mask is not None and not bool(key_padding_mask.all()):
            return _triton_unpadded(q, k, v, key_padding_mask, causal, scale)
        from minillavamed.kernels import flash_attn_func

        return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    if backend != "sdpa":
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if key_padding_mask is None and (not causal or tq == tk):
        return _sdpa(q, k, v, None, causal, scale)  # lets SDPA pick its fused causal kernels
    return _sdpa(q, k, v, _allowed(tq, tk, causal, key_padding_mask, q.device), False, scale)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Attention over packed (total_tokens, heads, head_dim) tensors holding several sequences back to back,
    with boundaries `cu_seqlens` (int32, [0, len0, len0+len1, ...]); no token attends across a boundary."""
    if backend == "triton":
        require_triton(q)
        from minillavamed.kernels import flash_attn_varlen_func

        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen,
                                      softmax_scale=1.0 / math.sqrt(q.shape[-1]), causal=causal)
    # Without the varlen kernel: the segments laid out as right-padded rows of one batch. A block-diagonal mask
    # over the packed row would cost (total tokens)^2 per head; padded rows cost (rows x longest^2), and causal
    # rows need no mask at all (a real query never reaches the padding after it), so SDPA runs its fused kernel.
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(q.device)
    total, rows = q.shape[0], len(lengths)
    if int(lengths.sum()) != total:
        raise ValueError(f"cu_seqlens covers {int(lengths.sum())} tokens but the packed tensors hold {total}")
    longest = int(lengths.max())
    segment = torch.repeat_interleave(torch.arange(rows, device=q.device), lengths)
    starts = cu_seqlens[:-1].to(q.device, torch.long)
    slot = torch.arange(total, device=q.device) - starts[segment] + segment * longest

    def padded(t):
        return t.new_zeros(rows * longest, *t.shape[1:]).index_copy(0, slot, t).view(rows, longest, *t.shape[1:])

    keys = None if causal else torch.arange(longest, device=q.device)[None, :] < lengths[:, None]
    if backend not in ("naive", "sdpa"):
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    out = attention(padded(q), padded(k), padded(v), causal=causal, key_padding_mask=keys, backend=backend)
    return out.reshape(rows * longest, *out.shape[2:]).index_select(0, slot)
