"""Every linear layer's product, in the one place that knows which GEMM a CPU runs fastest.

Not part of the paper: sampling LLaVA-Med on a laptop is a prefill of about 628 positions (576 of them image
patches) through the ViT, the projector and the decoder, then one position at a time. oneDNN has a bf16 GEMM
only on AVX512 CPUs; elsewhere a bf16 product of hundreds of rows is about 5x slower than the same product in
fp32 (bench/RESULTS.md, issue 17), so there such products multiply in fp32: exact casts, the same fp32 sums,
one rounding of the result.

A decode step multiplies one row by every weight, so it runs at the speed the weights stream from memory.
oneDNN's one-row bf16 product streams a 7B's weights at about 18 GB/s on an AVX512-BF16 CPU; a plain fused
loop that widens each weight to fp32, multiplies and sums (compiled by torch.compile's C++ backend) streams
them at about 30-40 GB/s where the activation row stays in the L1 cache (bench/RESULTS.md, issue 17); a longer
row is summed in chunks that do. The other one-row products go through torch.mv where the CPU has AMX, F.linear
elsewhere.

A small model in fp32 (the tiny preset's decode and prefill) is bound by products too small for MKL's GEMM,
which F.linear calls: on an AVX512 AMD EPYC (the one CPU it was measured on) oneDNN's product with the weight
reordered once into its blocked layout runs them 1.3-3.5x faster from 8 to 448 rows, and a whole decode 1.4x
faster (bench/RESULTS.md, issue 17). Such weights are reordered on first use and again after any change to them;
the reordered copies double those weights' memory, so only weights below STREAM_MIN_WEIGHTS take this path.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rows (batch x positions) above which a product is a GEMM rather than a matrix-vector product.
DENSE_ROWS = 16


def _has_amx() -> bool:
    """Whether this CPU has AMX, where a one-row bf16 product runs faster through torch.mv than through F.linear:
    there oneDNN's one-row GEMM streams the weights 1.3x slower than torch.mv does; without AMX (an AVX512-BF16
    AMD EPYC) torch.mv is 1.75x slower (bench/RESULTS.md, issue 17). Linux names AMX in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_bf16" in f.read()
    except OSError:
        return False


# What this CPU runs fastest, decided once at import: a compiled decode step (LlavaMed.compile_decoding) then
# reads them as constants, where a call to a cached function would break its graph.
# The dtype bf16 activations' GEMMs run fastest in: bf16 where oneDNN has a bf16 GEMM (AVX512), else fp32.
DENSE_DTYPE = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
BF16_MATRIX_VECTOR = _has_amx()


# One-row bf16 products go through the compiled kernel with at least this many weights (below it a compiled
# call's overhead, tens of microseconds, is more than the product: the tiny preset never takes this path) ...
STREAM_MIN_WEIGHTS = 1 << 22
# ... summing at most this many inputs in one pass: that much of the row of activations stays in L1 while the
# weights stream past it, and the compiler sums it in one pass (beyond 4096 it sums in cascades, no faster than
# F.linear). A longer row (a 7B's MLP down projection, 14336) is cut into equal chunks that each fit.
STREAM_CHUNK = 4096


def row_chunks(inputs: int) -> int | None:
    """Into how many equal chunks of at most STREAM_CHUNK the kernel cuts a row of `inputs` (1 where it fits),
    or None where no such cut leaves chunks of about a quarter of that or more (a row of a prime length)."""
    fewest = -(-inputs // STREAM_CHUNK)
    return next((c for c in range(fewest, 4 * fewest + 1) if inputs % c == 0), None)


def _widen_multiply_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (1, in) against w (out, in): products and sums in fp32, chunk by chunk of the row, one rounding to x's
    dtype."""
    chunks = row_chunks(w.shape[1])
    return (w.view(w.shape[0], chunks, -1).float() * x.view(1, chunks, -1).float()).sum(-1).sum(-1).to(x.dtype)


@functools.cache
def stream_kernel(inputs: int):
    """The compiled one-row product `_widen_multiply_sum` for rows of `inputs`, or None where torch.compile
    cannot build it (no C++ compiler): then F.linear, with a warning.

    Built once per row length, as a decode calls it (a model's weights against a row made under inference mode)
    and for two output sizes, so that the output size is dynamic while the row length stays a constant of the
    loop: a model's products then never recompile in the middle of a decode."""
    kernel = torch.compile(_widen_multiply_sum)
    with torch.inference_mode(False):
        weights = [torch.ones(rows, inputs, dtype=torch.bfloat16) for rows in (8, 16)]
    try:
        with torch.inference_mode():
            for w in weights:
                kernel(torch.ones(1, inputs, dtype=torch.bfloat16), w)
    except Exception as e:  # noqa: BLE001 -- torch.compile's failures (compiler missing, broken) vary widely
        warnings.warn(f"torch.compile could not build the bf16 decode kernel, so decoding uses F.linear, about "
                      f"1.6x slower on large models: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return None
    return kernel


def streams(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x (one row) times w goes through the compiled kernel: bf16 on the CPU, without autograd, at least
    STREAM_MIN_WEIGHTS contiguous weights, in rows that cut into equal chunks (`row_chunks`)."""
    return (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and w.numel() >= STREAM_MIN_WEIGHTS and row_chunks(w.shape[1]) is not None and w.is_contiguous()
            and not torch.is_grad_enabled()
            and (torch.compiler.is_compiling() or stream_kernel(w.shape[1]) is not None))


# A compiled decode step (LlavaMed.compile_decoding) leaves its graph to call the kernel: with the loop compiled
# into the step's own graph, a bf16 step at a 7B's width took 1.4x as long (bench/RESULTS.md, issue 17).
@torch.compiler.disable
def stream(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One row x (in,) or (1, in) times w (out, in) -> (out,), through the compiled kernel."""
    # detach: one compiled graph for trainable and frozen weights alike (their requires_grad is guarded on).
    return stream_kernel(w.shape[1])(x.reshape(1, -1), w.detach())


# oneDNN's fp32 product runs from a weight reordered into its blocked layout (an opaque "mkldnn" tensor).
PACKED_FP32 = torch.backends.mkldnn.is_available()


@dataclass
class _Packed:
    ref: weakref.ref  # the weight, whose id keys this entry: a new tensor at a freed one's id is not it
    version: int  # the weight's version counter when reordered: in-place changes (an optimizer step) bump it
    data_ptr: int  # `weight.data = other` swaps the storage without bumping the counter
    packed: torch.Tensor


_PACKED: dict[int, _Packed] = {}


def _reorder(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach())


def packed_weight(w: torch.Tensor) -> torch.Tensor | None:
    """`w` in oneDNN's layout: reordered on first use and whenever it changed since; the copy is dropped with `w`.
    None for a weight made under inference mode, which counts none of its changes."""
    if w.is_inference():
        return None
    key, entry = id(w), _PACKED.get(id(w))
    if entry is None or entry.ref() is not w or entry.version != w._version or entry.data_ptr != w.data_ptr():
        entry = _Packed(weakref.ref(w, lambda _, key=key: _PACKED.pop(key, None)), w._version, w.data_ptr(),
                        _reorder(w))
        _PACKED[key] = entry
    return entry.packed


def _packed_product(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    packed = packed_weight(w)
    return F.linear(x, w, b) if packed is None else torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")


# A compiled step cannot hold oneDNN's opaque layout, so it calls the product as an operator of its own and the
# weight is looked up, and reordered if it changed, when the step runs.
@torch.library.custom_op("minillavamed::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return _packed_product(x, w, b)


@packed_linear.register_fake
def _(x, w, b):
    return x.new_empty(x.shape[0], w.shape[0])


def packs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x times w runs through oneDNN with `w` reordered (`packed_weight`): fp32 on the CPU outside
    autocast, without autograd, a weight below STREAM_MIN_WEIGHTS."""
    return (PACKED_FP32 and x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
            and w.numel() < STREAM_MIN_WEIGHTS and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def _decode_row(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """One row (a decode step) times w through a faster kernel than F.linear where this CPU has one, else None.
    Both sum in fp32 and round once, as F.linear does."""
    if streams(x, w):
        return stream(x, w)
    if x.dtype == w.dtype == torch.bfloat16 and x.device.type == "cpu" and BF16_MATRIX_VECTOR:
        return torch.mv(w, x.reshape(-1))
    return None


def linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x through a linear layer: F.linear on a plain nn.Linear's weights, else the module (a QuantizedLinear).

    F.linear rather than calling the module: a module call's overhead is a large part of each small product
    when decoding (bench/RESULTS.md, "Speed choices")."""
    if type(module) is not nn.Linear:
        return module(x)
    w, b = module.weight, module.bias
    if packs(x, w):
        rows = x.reshape(-1, x.shape[-1])
        y = packed_linear(rows, w, b) if torch.compiler.is_compiling() else _packed_product(rows, w, b)
        return y.view(*x.shape[:-1], w.shape[0])
    y = _decode_row(x, w) if x.numel() == x.shape[-1] else None
    if y is not None:
        return (y if b is None else y + b).view(*x.shape[:-1], w.shape[0])
    if (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() > DENSE_ROWS * x.shape[-1] and DENSE_DTYPE is torch.float32):
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    return F.linear(x, w, b)
