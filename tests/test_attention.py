"""attention.py: every backend against the textbook formula, for the masks the model uses (bidirectional for
the ViT, causal for the decoder, left padding and single-query decode steps in batched generation).

Tests that use the `triton` backend count the kernels' launches: a call the kernels do not run (a decode
step, which is SDPA's whichever backend is asked for) is tested as what it is, and asking for the kernels
where they cannot run is an error, never a quiet SDPA call."""

from __future__ import annotations

import contextlib

import pytest
import torch

from minillavamed import LlavaMed
from minillavamed.attention import attention, attention_varlen
from minillavamed.config import IMAGE_TOKEN_INDEX, DecoderConfig, LlavaConfig, VisionConfig
from minillavamed.kernels import flash_attention
from minillavamed.kernels.reference import attention_reference

PREFILL = [
    # batch, seqlen_q, seqlen_k, heads, kv_heads, causal
    (2, 9, 9, 4, 4, False),  # the ViT
    (2, 9, 9, 4, 2, True),  # a GQA decoder over a whole prompt
    (2, 3, 11, 4, 2, True),  # new queries after a cached prefix: causal aligned to the bottom right
]
DECODE = [
    (3, 1, 12, 4, 2, True),  # a decode step, GQA: each kv head's query heads become its queries
    (3, 1, 12, 4, 1, True),  # a decode step, MQA
    (3, 1, 12, 2, 2, True),  # a decode step, no grouping
]
CASES = PREFILL + DECODE
case_id = lambda c: "x".join(map(str, c[:5])) + ("-causal" if c[5] else "")  # noqa: E731
# Without a GPU the kernels run in the interpreter (conftest.py) in fp32; on a GPU they take fp16 / bf16 only.
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_DTYPE = torch.float16 if ON_GPU else torch.float32


class LaunchCounter:
    """Stands in for one of flash_attention's kernels and counts its launches (and the dtype of their first
    tensor), so that a test can tell the kernels ran rather than infer it from the absence of a warning."""

    def __init__(self, kernel):
        self.kernel, self.dtypes = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.dtypes.append(args[0].dtype)
            return launch(*args, **kwargs)

        return run

    @property
    def launches(self):
        return len(self.dtypes)


@contextlib.contextmanager
def counting_launches():
    """{"fwd", "dkdv", "dq"} -> LaunchCounter while the block runs."""
    names = {"fwd": "_fwd_kernel", "dkdv": "_dkdv_kernel", "dq": "_dq_kernel"}
    counters = {k: LaunchCounter(getattr(flash_attention, n)) for k, n in names.items()}
    try:
        for k, n in names.items():
            setattr(flash_attention, n, counters[k])
        yield counters
    finally:
        for k, n in names.items():
            setattr(flash_attention, n, counters[k].kernel)


def tensors(b, tq, tk, h, kvh, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, tq, h, d, generator=g), torch.randn(b, tk, kvh, d, generator=g),
            torch.randn(b, tk, kvh, d, generator=g))


def left_padding(b, tk):
    """Row i starts with i padded keys, as batched generation left-pads shorter prompts."""
    return torch.arange(tk)[None, :] >= torch.arange(b)[:, None]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_naive_is_the_textbook_formula(case):
    *shape, causal = case
    q, k, v = tensors(*shape)
    expected = attention_reference(q.double(), k.double(), v.double(), causal=causal).float()
    torch.testing.assert_close(attention(q, k, v, causal=causal, backend="naive"), expected)


def check_against_naive(case, padded, backend, device="cpu", dtype=torch.float32):
    *shape, causal = case
    b, tq, tk = shape[:3]
    q, k, v = (t.to(device, dtype) for t in tensors(*shape))
    mask = left_padding(b, tk).to(device) if padded else None
    expected = attention(q, k, v, causal=causal, key_padding_mask=mask, backend="naive")
    out = attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
    real = torch.ones(b, tq, dtype=torch.bool, device=device) if mask is None else mask[:, tk - tq:]  # padding
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # queries are unused; fp16 rounds P and the output
    torch.testing.assert_close(out[real], expected[real], rtol=tol, atol=tol)


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("case", PREFILL, ids=case_id)
def test_sdpa_matches_naive(case, padded):
    check_against_naive(case, padded, "sdpa")


@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("case", PREFILL, ids=case_id)
def test_triton_kernels_match_naive(case, padded):
    """Left-padded rows run the varlen kernel on their real tokens (one forward launch per call)."""
    with counting_launches() as counters:
        check_against_naive(case, padded, "triton", DEVICE, KERNEL_DTYPE)
    assert counters["fwd"].launches == 1


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "left-padded"])
@pytest.mark.parametrize("case", DECODE, ids=case_id)
def test_decode_step_is_sdpa_under_either_backend(case, padded, backend):
    with counting_launches() as counters:
        check_against_naive(case, padded, backend, DEVICE, KERNEL_DTYPE)
    assert counters["fwd"].launches == 0


def test_triton_refuses_what_the_kernels_cannot_run():
    # The interpreter computes bf16 wrongly; a GPU's kernels take fp16 and bf16 only.
    refused, named = (torch.float32, "float32") if ON_GPU else (torch.bfloat16, "bfloat16")
    q, k, v = (t.to(DEVICE, refused) for t in tensors(1, 4, 4, 2, 2))
    with pytest.raises(RuntimeError, match=f"attention backend 'triton' cannot run here: .*{named}.*--attn sdpa"):
        attention(q, k, v, causal=True, backend="triton")
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(RuntimeError, match=named):
        attention_varlen(q[0], k[0], v[0], cu, 4, causal=True, backend="triton")


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_varlen_keeps_segments_apart(causal, backend):
    q, k, v = (t[0].requires_grad_() for t in tensors(1, 10, 10, 4, 2))
    cu = torch.tensor([0, 4, 5, 10], dtype=torch.int32)  # a segment of one token among them
    out = attention_varlen(q, k, v, cu, 5, causal=causal, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for s, e in ((0, 4), (4, 5), (5, 10)):
        parts = [t.detach()[None, s:e].requires_grad_() for t in (q, k, v)]
        alone = attention(*parts, causal=causal, backend="naive")[0]
        torch.testing.assert_close(out[s:e], alone, rtol=1e-5, atol=1e-5)
        for g, g_alone in zip(grads, torch.autograd.grad(alone.square().sum(), parts)):
            torch.testing.assert_close(g[s:e], g_alone[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="covers 9 tokens but the packed tensors hold 10"):
        attention_varlen(q, k, v, cu - torch.tensor([0, 0, 0, 1], dtype=torch.int32), 5, causal=causal)


def test_bad_input():
    q, k, v = tensors(1, 2, 2, 3, 2)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, v, causal=True)
    q, k, v = tensors(1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        attention(q, k, v, causal=True, backend="flash")


# A training step of a small model, all of it trainable (stage 0): the ViT runs 2 of its 3 blocks, the decoder 2.
TINY = LlavaConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64),
                   decoder=DecoderConfig(vocab_size=50, dim=32, layers=2, heads=4, kv_heads=2, mlp_dim=64))
ROWS = [[1, 5, IMAGE_TOKEN_INDEX, 7, 8, 9, 3], [1, IMAGE_TOKEN_INDEX, 6, 2]]  # 10 and 7 positions once spliced
# fp32 differs from SDPA by summation order only. Under autocast SDPA and the kernels both compute in the half
# type and round in different places (the kernels keep P and the accumulators in fp32); the bound is relative to
# each gradient's largest element. Measured in the interpreter: 5e-7 (fp32) and 2.4e-3 (fp16).
STEP_TOLERANCE = {None: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
STEP_DTYPES = {"fp16-autocast": torch.float16, "bf16-autocast": torch.bfloat16} if ON_GPU else {
    "fp32": None, "fp16-autocast": torch.float16}


def training_step(backend, packed, dtype):
    torch.manual_seed(0)
    model = LlavaMed(TINY).to(DEVICE)
    model.set_attention_backend(backend)
    pixels = torch.randn(2, 3, 16, 16)
    if packed:
        ids, extra = torch.tensor([ROWS[0] + ROWS[1]]), dict(cu_seqlens=torch.tensor([0, 10, 17], dtype=torch.int32),
                                                             max_seqlen=10)
    else:
        ids = torch.tensor([ROWS[0], ROWS[1] + [0] * 3])  # right-padded
        extra = dict(attention_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3]))
    labels = ids.masked_fill(ids == IMAGE_TOKEN_INDEX, -100)
    if not packed:
        labels = labels.masked_fill(extra["attention_mask"] == 0, -100)
    extra = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in extra.items()}
    with torch.autocast(DEVICE, dtype=dtype) if dtype else contextlib.nullcontext():
        _, loss = model(ids.to(DEVICE), pixels.to(DEVICE), labels=labels.to(DEVICE), **extra)
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(STEP_DTYPES.values()), ids=list(STEP_DTYPES))
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_training_step_runs_the_kernels_in_every_layer(packed, dtype):
    """Forward and backward of every ViT and decoder layer go through the kernels (one launch of each kernel per
    layer), in the autocast dtype, and the step's loss and gradients are SDPA's."""
    with counting_launches() as counters:
        loss, grads = training_step("triton", packed, dtype)
    layers = TINY.decoder.layers + 2  # the decoder's and the two ViT blocks the projector reads from
    assert {k: c.launches for k, c in counters.items()} == {"fwd": layers, "dkdv": layers, "dq": layers}
    assert all(d == (dtype or torch.float32) for c in counters.values() for d in c.dtypes)
    ref_loss, ref_grads = training_step("sdpa", packed, dtype)
    tol = STEP_TOLERANCE[dtype]
    assert abs(loss.item() - ref_loss.item()) <= tol * ref_loss.item()
    assert grads.keys() == ref_grads.keys() and any(n.startswith("vision.blocks.0.") for n in grads)
    for name, g in grads.items():
        err = ((g - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-12)).item()
        assert err <= tol, f"{name}: relative error {err:.1e}"


def test_generation_runs_the_kernels_in_the_prefill_only():
    """Batched generation: the left-padded prefill runs the kernels (unpadded into segments) in the ViT and in
    every decoder block but the last, which computes only the last query (last_only, a one-query call); every
    decode step is SDPA's. The tokens are those of the sdpa backend."""
    torch.manual_seed(0)
    model = LlavaMed(TINY).to(DEVICE).eval()
    if ON_GPU:
        model.half()
    ids = torch.tensor([ROWS[0], [0] * 3 + ROWS[1]], device=DEVICE)  # the second prompt is left-padded
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4], device=DEVICE)
    pixels = torch.randn(2, 3, 16, 16, device=DEVICE, dtype=next(model.parameters()).dtype)
    tokens = {}
    for backend in ("sdpa", "triton"):
        model.set_attention_backend(backend)
        with counting_launches() as counters:
            tokens[backend] = model.generate(ids, pixels, mask, max_new_tokens=6, eos_id=-1)
    assert counters["fwd"].launches == 2 + TINY.decoder.layers - 1
    assert tokens["triton"] == tokens["sdpa"]
