"""Plain attention, the reference the fused Triton kernels (flash_attention.py) are checked against.

It spells out softmax(Q K^T * scale) V with the full score matrix, in whatever dtype it is given (the tests
use float64), with exactly the kernels' conventions: GQA by repeating K/V heads, causal masks aligned to the
bottom-right when seqlen_q != seqlen_k, and a zero output for a query that sees no key. Gradients come from
torch autograd through these few lines. The benchmark also times it as the "plain" path.
"""

import torch


def attention_reference(q, k, v, softmax_scale=None, causal=False):
    """q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_kv, headdim) -> like q."""
    seqlen_q, nheads, head_dim = q.shape[1:]
    seqlen_k, nheads_kv = k.shape[1:3]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    group = nheads // nheads_kv
    k = k.repeat_interleave(group, dim=2)  # query head h reads K/V head h // group
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(seqlen_q, device=q.device)[:, None]
        j = torch.arange(seqlen_k, device=q.device)[None, :]
        visible = j <= i + (seqlen_k - seqlen_q)
    scores = scores.masked_fill(~visible, float("-inf"))
    # Softmax written out so that a row with no visible key gives zeros instead of NaN.
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.einsum("bhij,bjhd->bihd", p, v)


def attention_reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False):
    """Packed q (total_q, nheads, headdim), k/v (total_k, nheads_kv, headdim): one sequence at a time."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs = []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b]:cu_q[b + 1]].unsqueeze(0)
        kb = k[cu_k[b]:cu_k[b + 1]].unsqueeze(0)
        vb = v[cu_k[b]:cu_k[b + 1]].unsqueeze(0)
        outs.append(attention_reference(qb, kb, vb, softmax_scale, causal)[0])
    return torch.cat(outs)
