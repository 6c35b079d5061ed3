"""gemm.py: which product each linear layer runs on a CPU, checked against F.linear's own.

A bf16 prefill multiplies in the dtype the CPU's GEMM runs fastest; a 7B's one-row decode products stream through
the compiled kernel (or torch.mv on AMX CPUs); without a C++ compiler decoding warns and falls back to F.linear.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minillavamed import LlavaMed, gemm
from minillavamed.config import IMAGE_TOKEN_INDEX, preset


@pytest.mark.parametrize("mv", [False, True])
@pytest.mark.parametrize("dense", [torch.float32, torch.bfloat16])
def test_a_bf16_prefill_multiplies_in_the_cpus_fast_dtype(monkeypatch, dense, mv):
    # Where oneDNN has no bf16 GEMM (AVX2), a bf16 product of many rows is about 5x faster in fp32: the weight and
    # the input cast exactly, so the result is the fp32 product rounded once. Decode rows keep bf16's own products.
    monkeypatch.setattr(gemm, "DENSE_DTYPE", dense)
    monkeypatch.setattr(gemm, "BF16_MATRIX_VECTOR", mv)
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32).bfloat16()
    x = torch.randn(2, gemm.DENSE_ROWS, 64).bfloat16()
    y = gemm.linear(x, lin)
    want = (F.linear(x.float(), lin.weight.float(), lin.bias.float()).bfloat16() if dense is torch.float32
            else F.linear(x, lin.weight, lin.bias))
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias))  # bf16's tolerance of its own product
    one = x[:1, :1]  # a decode step: with AMX, bf16's matrix-vector kernel; the same fp32 sums rounded once
    want = ((torch.mv(lin.weight, one.reshape(-1)) + lin.bias).view(1, 1, -1) if mv
            else F.linear(one, lin.weight, lin.bias))
    assert torch.equal(gemm.linear(one, lin), want)
    torch.testing.assert_close(gemm.linear(one, lin), F.linear(one, lin.weight, lin.bias))


@pytest.mark.parametrize("inputs", [4096, 14336])  # a 7B's rows: attention and gate/up; the MLP's down projection
def test_a_large_bf16_decode_row_streams_through_the_compiled_kernel(inputs):
    # A 7B decode step streams every weight once; the compiled loop (fp32 products and sums, one rounding)
    # streams them faster than oneDNN's one-row product. It must agree with the fp32 product, for a row summed
    # in one pass and for one cut into chunks (14336 into 4 of 3584).
    torch.manual_seed(0)
    assert gemm.row_chunks(inputs) == -(-inputs // gemm.STREAM_CHUNK)
    lin = torch.nn.Linear(inputs, -(-gemm.STREAM_MIN_WEIGHTS // inputs)).bfloat16()
    with torch.inference_mode():  # as in a decode, the row is made under inference mode
        x = torch.randn(1, 1, inputs).bfloat16()
        exact = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        assert gemm.streams(x[0], lin.weight)
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        y = gemm.linear(x, lin)
        frozen = gemm.linear(x, lin.requires_grad_(False))
    # Built on first use for every output size: nothing compiles in the middle of a decode.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
    assert y.shape == (1, 1, lin.out_features) and y.dtype == torch.bfloat16 and torch.equal(frozen, y)
    # The sum rounds to bf16 before the bias adds (as F.linear's does): two roundings at most.
    torch.testing.assert_close(y.float(), exact, rtol=2 * 2**-8, atol=1e-2)


def test_what_does_not_stream():
    # With autograd on (training), a small weight, fp32, a transposed weight, and a row that no equal chunks of
    # 1024-4096 cut (4099 is prime): F.linear.
    lin = torch.nn.Linear(gemm.STREAM_CHUNK, gemm.STREAM_MIN_WEIGHTS // gemm.STREAM_CHUNK).bfloat16()
    x = torch.randn(1, gemm.STREAM_CHUNK).bfloat16()
    assert not gemm.streams(x, lin.weight)
    with torch.inference_mode():
        assert gemm.streams(x, lin.weight)
        assert not gemm.streams(x, lin.weight[:8])
        assert not gemm.streams(x.float(), lin.weight.float())
        assert not gemm.streams(x, lin.weight.t().contiguous().t())
        assert gemm.row_chunks(4099) is None
        assert not gemm.streams(torch.randn(1, 4099).bfloat16(), torch.randn(1024, 4099).bfloat16())
    assert [gemm.row_chunks(n) for n in (64, 4096, 8192, 11008, 14336, 28672)] == [1, 1, 2, 4, 4, 7]


def test_without_a_compiler_decoding_warns_and_uses_f_linear(monkeypatch):
    def no_compiler(fn, **kwargs):
        def broken(*args):
            raise RuntimeError("Compiler: cc is not found\nmore detail")
        return broken

    monkeypatch.setattr(torch, "compile", no_compiler)
    gemm.stream_kernel.cache_clear()
    try:
        with pytest.warns(UserWarning, match="decoding uses F.linear.*cc is not found"):
            assert gemm.stream_kernel(gemm.STREAM_CHUNK) is None
        lin = torch.nn.Linear(gemm.STREAM_CHUNK, gemm.STREAM_MIN_WEIGHTS // gemm.STREAM_CHUNK).bfloat16()
        x = torch.randn(1, gemm.STREAM_CHUNK).bfloat16()
        with torch.inference_mode():
            assert not gemm.streams(x, lin.weight)
            assert torch.equal(gemm.linear(x, lin), F.linear(x, lin.weight, lin.bias))
    finally:
        gemm.stream_kernel.cache_clear()


def test_a_bf16_models_decode_steps_stream_and_match_f_linear(monkeypatch):
    # The tiny preset's weights are below the size that streams; with the bar lowered, every one-row product (and
    # none of the prefill's many-row ones) goes through the kernel, and the greedy reply is the same as F.linear's.
    torch.manual_seed(0)
    model = LlavaMed(preset("tiny")).to(torch.bfloat16).eval()
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6, 7]])
    px = torch.randn(1, 3, 64, 64).bfloat16()
    want = model.generate(ids, px, max_new_tokens=6, eos_id=-1)
    rows, stream = [], gemm.stream

    def spy(x, w):
        rows.append(x.numel() // x.shape[-1])
        return stream(x, w)

    monkeypatch.setattr(gemm, "STREAM_MIN_WEIGHTS", 0)
    monkeypatch.setattr(gemm, "stream", spy)
    got = model.generate(ids, px, max_new_tokens=6, eos_id=-1)
    per_step = 4 * model.cfg.decoder.layers + 1  # wqkv, wo, gate_up, down in each layer, then lm_head
    # The prefill's last position (its last block's wo, gate_up and down, then lm_head), then 5 decode steps.
    assert rows == [1] * (4 + 5 * per_step)
    assert got == want


def test_every_prefill_product_of_a_bf16_model_takes_the_fast_dtype(monkeypatch):
    # The ViT and the projector as well as the decoder: an image question's 576 patches go through all three.
    calls = []

    def spy(x, w, b=None):
        calls.append((x.shape[:-1].numel(), x.dtype, w.dtype))
        return F.linear(x, w, b)

    monkeypatch.setattr(gemm, "DENSE_DTYPE", torch.float32)
    monkeypatch.setattr(gemm, "F", type("F", (), {"linear": staticmethod(spy)}))
    torch.manual_seed(0)
    model = LlavaMed(preset("tiny")).to(torch.bfloat16).eval()
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6, 7]])
    with torch.no_grad():
        model(ids, torch.randn(1, 3, 64, 64).bfloat16())
    vit_layers = model.cfg.vision.layers + model.cfg.vision.select_layer + 1  # blocks up to the selected one
    assert len(calls) >= 4 * vit_layers + 2 + 4 * model.cfg.decoder.layers
    prefill = [c for c in calls if c[0] > gemm.DENSE_ROWS]
    assert prefill and all(c[1:] == (torch.float32, torch.float32) for c in prefill), prefill


@pytest.fixture
def reorders(monkeypatch):
    """The shapes of the weights gemm reorders into oneDNN's layout, in order (skips without oneDNN)."""
    if not gemm.PACKED_FP32:
        pytest.skip("this torch has no oneDNN")
    shapes, reorder = [], gemm._reorder
    monkeypatch.setattr(gemm, "_reorder", lambda w: shapes.append(w.shape) or reorder(w))
    return shapes


@pytest.mark.parametrize("rows", [1, 8, 448])  # a decode step at batch 1 and 8; the tiny preset's batch-8 prefill
def test_a_small_fp32_product_runs_through_onednn_with_its_weight_reordered_once(reorders, rows):
    # Without autograd, a small fp32 weight is reordered into oneDNN's layout on first use and reused after that:
    # the product is F.linear's to fp32 rounding (the same sums in another order).
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 688)
    x = torch.randn(rows, 1, 256)
    with torch.no_grad():
        assert gemm.packs(x, lin.weight)
        for _ in range(3):
            torch.testing.assert_close(gemm.linear(x, lin), F.linear(x, lin.weight, lin.bias))
        assert reorders == [(688, 256)]
        lin.weight.mul_(-1)  # changed in place (as by an optimizer step or load_state_dict): reordered again
        torch.testing.assert_close(gemm.linear(x, lin), F.linear(x, lin.weight, lin.bias))
        lin.weight.data = torch.randn(688, 256) / 16  # its storage swapped, the version counter untouched
        torch.testing.assert_close(gemm.linear(x, lin), F.linear(x, lin.weight, lin.bias))
        assert len(reorders) == 3
    # Not where the product is trained through or computed in bf16 under autocast, nor for a large model's
    # weights (the copy doubles them). A weight made under inference mode counts none of its changes: F.linear.
    assert not gemm.packs(x, lin.weight)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not gemm.packs(x, lin.weight)
        assert not gemm.packs(x.bfloat16(), lin.weight.bfloat16())
        assert not gemm.packs(x[..., :1], torch.empty(gemm.STREAM_MIN_WEIGHTS, 1))
        with torch.inference_mode():
            made = torch.nn.Linear(256, 8)
        assert gemm.packed_weight(made.weight) is None
        assert torch.equal(gemm.linear(x, made), F.linear(x, made.weight, made.bias))
        assert len(reorders) == 3


def test_a_reordered_copy_goes_with_its_weight(reorders):
    before = len(gemm._PACKED)
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        gemm.linear(torch.randn(2, 64), lin)
    assert len(gemm._PACKED) == before + 1
    del lin
    assert len(gemm._PACKED) == before


@pytest.mark.slow
def test_a_compiled_fp32_decode_reorders_each_weight_once_and_follows_new_weights(reorders):
    # The compiled step calls the reordered product as an operator of its own, which looks the weight up when the
    # step runs: one reorder per weight for a whole reply, and weights loaded after compiling are the ones used.
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.decoder.layers = 2
    model, other = LlavaMed(cfg).eval(), LlavaMed(cfg).eval()
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6, 7]] * 2)
    px = torch.randn(2, 3, 64, 64)
    want = [model.generate(ids, px, max_new_tokens=8, eos_id=-1), other.generate(ids, px, max_new_tokens=8, eos_id=-1)]
    model.compile_decoding()
    reorders.clear()
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    assert model.generate(ids, px, max_new_tokens=8, eos_id=-1) == want[0]
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks  # the step is one graph
    assert reorders == []  # eager generate reordered every weight already, and the compiled step finds them
    model.load_state_dict(other.state_dict())
    assert model.generate(ids, px, max_new_tokens=8, eos_id=-1) == want[1]
