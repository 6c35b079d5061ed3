"""attention.py: every backend against the textbook formula, for the masks the model uses (bidirectional for
the ViT, causal for the decoder, left padding and single-query decode steps in batched generation)."""

from __future__ import annotations

import warnings

import pytest
import torch

from minillavamed.attention import attention, attention_varlen
from minillavamed.kernels.reference import attention_reference

CASES = [
    # batch, seqlen_q, seqlen_k, heads, kv_heads, causal
    (2, 9, 9, 4, 4, False),  # the ViT
    (2, 9, 9, 4, 2, True),  # a GQA decoder over a whole prompt
    (2, 3, 11, 4, 2, True),  # new queries after a cached prefix: causal aligned to the bottom right
    (3, 1, 12, 4, 2, True),  # a decode step, GQA: each kv head's query heads become its queries
    (3, 1, 12, 4, 1, True),  # a decode step, MQA
    (3, 1, 12, 2, 2, True),  # a decode step, no grouping
]


def tensors(b, tq, tk, h, kvh, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, tq, h, d, generator=g), torch.randn(b, tk, kvh, d, generator=g),
            torch.randn(b, tk, kvh, d, generator=g))


def left_padding(b, tk):
    """Row i starts with i padded keys, as batched generation left-pads shorter prompts."""
    return torch.arange(tk)[None, :] >= torch.arange(b)[:, None]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + ("-causal" if c[5] else ""))
def test_naive_is_the_textbook_formula(case):
    *shape, causal = case
    q, k, v = tensors(*shape)
    expected = attention_reference(q.double(), k.double(), v.double(), causal=causal).float()
    torch.testing.assert_close(attention(q, k, v, causal=causal, backend="naive"), expected)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])) + ("-causal" if c[5] else ""))
def test_backends_match_naive(case, padded, backend):
    *shape, causal = case
    b, tq, tk = shape[:3]
    q, k, v = tensors(*shape)
    mask = left_padding(b, tk) if padded else None
    expected = attention(q, k, v, causal=causal, key_padding_mask=mask, backend="naive")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # triton falls back to SDPA for padding masks, and says so
        out = attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
    real = torch.ones(b, tq, dtype=torch.bool) if mask is None else mask[:, tk - tq:]  # padding queries are unused
    torch.testing.assert_close(out[real], expected[real], rtol=1e-5, atol=1e-5)


def test_varlen_keeps_segments_apart():
    q, k, v = (t[0] for t in tensors(1, 10, 10, 4, 2))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    out = attention_varlen(q, k, v, cu, 6, causal=True)
    for s, e in ((0, 4), (4, 10)):
        alone = attention(q[None, s:e], k[None, s:e], v[None, s:e], causal=True, backend="naive")[0]
        torch.testing.assert_close(out[s:e], alone, rtol=1e-5, atol=1e-5)


def test_bad_input():
    q, k, v = tensors(1, 2, 2, 3, 2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, v, causal=True)
    q, k, v = tensors(1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, k, v, causal=True, backend="flash")
