"""Tests for the Triton fused attention (minillavamed/kernels) against the float64 reference beside it.

Without CUDA the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py before anything
imports them) in float32 on tiny shapes; with CUDA the same cases run compiled in float16 and bfloat16, plus
LLaVA's real shapes. Every output buffer the kernels allocate starts as NaN, so an element a kernel forgets
to write shows up as a NaN in the comparison.
"""

import os
from contextlib import contextmanager

import pytest
import torch

ON_GPU = torch.cuda.is_available()  # without one, conftest.py has set TRITON_INTERPRET=1

from minillavamed.kernels import flash_attention
from minillavamed.kernels.reference import attention_reference, attention_reference_varlen

flash_attn_func = flash_attention.flash_attn_func
flash_attn_varlen_func = flash_attention.flash_attn_varlen_func
triton_attention_supported = flash_attention.triton_attention_supported

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = (torch.float16, torch.bfloat16) if ON_GPU else (torch.float32,)
# Max error relative to the largest reference value. float32 only differs from float64 by summation order;
# the half types round P and the inputs of every matmul (bf16 has 8 mantissa bits).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


@contextmanager
def poisoned_allocations():
    """Make torch.empty / torch.empty_like return NaN-filled tensors (O, LSE, D, dQ, dK, dV all come from them)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    torch.empty = lambda *a, **kw: poison(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def relative_error(x, ref):
    # The floor keeps exact zeros (dQ is 0 when a query sees a single key) from dividing rounding noise by 0.
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(0.1)).item()


def check_against_reference(kernel, reference, tensors, dtype):
    """Run kernel forward+backward on `tensors` (in dtype) and compare O, dQ, dK, dV with reference in float64."""
    q, k, v = (t.to(DEVICE, dtype).requires_grad_() for t in tensors)
    with poisoned_allocations():
        out = kernel(q, k, v)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert x.shape == r.shape, name
        assert not torch.isnan(x).any(), f"{name} has unwritten (NaN) elements"
        err = relative_error(x, r)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


FIXED_SHAPES = [
    # batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim
    (2, 1, 1, 2, 2, 16),  # one token
    (1, 7, 7, 4, 2, 16),  # GQA 2, shorter than one block
    (1, 7, 7, 2, 2, 8),  # head dim below tl.dot's minimum, padded to 16
    (1, 97, 97, 2, 2, 32),  # masked tail block
    (1, 97, 97, 4, 1, 16),  # MQA
    (1, 40, 40, 8, 2, 16),  # GQA 4
    (1, 33, 97, 2, 1, 16),  # fewer queries than keys (prefill after a cached prefix)
    (2, 97, 33, 4, 2, 16),  # more queries than keys: causal rows that see no key give 0
    (1, 20, 20, 2, 1, 64),  # the ViT's head dim
    (1, 9, 9, 2, 2, 128),  # the decoder's head dim
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", FIXED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_attn_func_matches_reference(shape, causal, dtype):
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, head_dim = shape
    torch.manual_seed(0)
    tensors = (torch.randn(batch, seqlen_q, nheads, head_dim), torch.randn(batch, seqlen_k, nheads_kv, head_dim),
               torch.randn(batch, seqlen_k, nheads_kv, head_dim))
    check_against_reference(lambda q, k, v: flash_attn_func(q, k, v, causal=causal),
                            lambda q, k, v: attention_reference(q, k, v, causal=causal), tensors, dtype)


VARLEN_CASES = [
    # lengths of q segments, lengths of k segments, nheads, nheads_kv
    ([5, 1, 37, 16], [5, 1, 37, 16], 2, 2),
    ([5, 1, 37, 16], [5, 1, 37, 16], 4, 1),
    ([9, 1, 20, 3], [12, 1, 20, 40], 4, 2),  # cross lengths: bottom-right causal per segment
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=["self", "mqa", "cross-gqa"])
def test_flash_attn_varlen_func_matches_reference(case, causal, dtype):
    lens_q, lens_k, nheads, nheads_kv = case
    head_dim = 16
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    torch.manual_seed(1)
    tensors = (torch.randn(sum(lens_q), nheads, head_dim), torch.randn(sum(lens_k), nheads_kv, head_dim),
               torch.randn(sum(lens_k), nheads_kv, head_dim))
    check_against_reference(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal),
        lambda q, k, v: attention_reference_varlen(q, k, v, cu_q, cu_k, causal=causal), tensors, dtype)


def test_strided_qkv_and_softmax_scale():
    # q, k, v sliced out of one fused projection (non-contiguous token stride) with a non-default scale.
    torch.manual_seed(2)
    qkv = torch.randn(2, 19, 3, 2, 32)
    check_against_reference(lambda q, k, v: flash_attn_func(q, k, v, softmax_scale=0.3, causal=True),
                            lambda q, k, v: attention_reference(q, k, v, softmax_scale=0.3, causal=True),
                            (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]), DTYPES[0])


@pytest.mark.skipif(ON_GPU, reason="float16 in the interpreter is a CPU-only check; the GPU cases cover float16")
def test_float16_in_interpreter():
    torch.manual_seed(3)
    tensors = (torch.randn(1, 37, 4, 16), torch.randn(1, 37, 2, 16), torch.randn(1, 37, 2, 16))
    check_against_reference(lambda q, k, v: flash_attn_func(q, k, v, causal=True),
                            lambda q, k, v: attention_reference(q, k, v, causal=True), tensors, torch.float16)


def test_bad_input_raises_value_error():
    q = torch.randn(1, 8, 4, 16, device=DEVICE, dtype=DTYPES[0])
    kv = torch.randn(1, 8, 2, 16, device=DEVICE, dtype=DTYPES[0])
    with pytest.raises(ValueError, match=r"q must be \(batch, seqlen, nheads, headdim\)"):
        flash_attn_func(q[0], kv, kv)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        flash_attn_func(q, kv, kv[:, :7])
    with pytest.raises(ValueError, match=r"nheads of q \(4\) must be a multiple of nheads of k/v \(3\)"):
        flash_attn_func(q, kv[:, :, :1].expand(1, 8, 3, 16), kv[:, :, :1].expand(1, 8, 3, 16))
    with pytest.raises(ValueError, match="same batch size"):
        flash_attn_func(q, kv.expand(2, 8, 2, 16), kv.expand(2, 8, 2, 16))
    with pytest.raises(ValueError, match="same head dim"):
        flash_attn_func(q, kv[..., :8], kv[..., :8])
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="cu_seqlens_k must be an int32 tensor"):
        flash_attn_varlen_func(q[0], kv[0], kv[0], cu, cu.long(), 8, 8)
    with pytest.raises(ValueError, match="different numbers of sequences"):
        flash_attn_varlen_func(q[0], kv[0], kv[0], cu, torch.tensor([0, 4, 8], dtype=torch.int32, device=DEVICE), 8, 8)


@pytest.mark.skipif(ON_GPU, reason="describes the CPU interpreter")
def test_supported_in_interpreter():
    ok, reason = triton_attention_supported(torch.zeros(1, 4, 2, 16))
    assert ok, reason
    ok, reason = triton_attention_supported(torch.zeros(1, 4, 2, 16, dtype=torch.bfloat16))
    assert not ok and "bfloat16" in reason


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape,causal", [
    ((2, 577, 577, 16, 16, 64), False),  # CLIP ViT-L/14-336: 576 patches + CLS, bidirectional
    ((1, 1024, 1024, 32, 32, 128), True),  # LLaMA-7B decoder
    ((1, 1024, 1024, 32, 8, 128), True),  # Mistral-7B decoder (GQA 4)
], ids=["vit-l-336", "llama-7b", "mistral-7b"])
def test_llava_shapes_on_gpu(shape, causal, dtype):
    batch, seqlen_q, seqlen_k, nheads, nheads_kv, head_dim = shape
    assert triton_attention_supported(torch.zeros(1, device="cuda", dtype=dtype).view(1, 1, 1, 1))[0]
    torch.manual_seed(4)
    tensors = (torch.randn(batch, seqlen_q, nheads, head_dim), torch.randn(batch, seqlen_k, nheads_kv, head_dim),
               torch.randn(batch, seqlen_k, nheads_kv, head_dim))
    check_against_reference(lambda q, k, v: flash_attn_func(q, k, v, causal=causal),
                            lambda q, k, v: attention_reference(q, k, v, causal=causal), tensors, dtype)


@pytest.mark.slow
def test_every_autotune_config_fits_sm80_and_sm90():
    """Each configuration the autotuner may pick, compiled for A100 and H100 by Triton's bundled ptxas (no GPU
    needed), uses no local memory for spills and no more shared memory than the target has. CI compiles each in
    bf16 with the causal mask at both head dims: in the full matrix (`python -m minillavamed.kernels.resources`,
    which also compiles fp16 and the bidirectional mask) fp16 spilled exactly where bf16 did, and every case that
    spilled without the mask also spilled with it."""
    import subprocess
    import sys

    code = ("from minillavamed.kernels import resources as r\n"
            "todo = r.jobs(dtypes=('bf16',), causals=(True,))\n"
            "for c in r.compile_all(todo):\n"
            "    print(c.kernel, c.config, c.target, c.registers, c.spill_bytes, c.shared, c.shared_limit, c.fits)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = out.stdout.splitlines()
    n_configs = len(flash_attention.FWD_CONFIGS + flash_attention.DKDV_CONFIGS + flash_attention.DQ_CONFIGS)
    assert len(rows) == 2 * 2 * n_configs, out.stdout  # two targets, two head dims
    assert all(row.endswith("True") for row in rows), "\n".join(r for r in rows if not r.endswith("True"))
