"""Every linear layer's product, in the one place that knows which GEMM a CPU runs fastest.

Not part of the paper: sampling LLaVA-Med on a laptop is a prefill of about 628 positions (576 of them image
patches) through the ViT, the projector and the decoder, then one position at a time. oneDNN has a bf16 GEMM
only on AVX512 CPUs; elsewhere a bf16 product of hundreds of rows is about 5x slower than the same product in
fp32 (bench/RESULTS.md, issue 17), so there such products multiply in fp32: exact casts, the same fp32 sums,
one rounding of the result. A bf16 decode row goes through torch.mv where the CPU has AMX, F.linear elsewhere.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

# Rows (batch x positions) above which a product is a GEMM rather than a matrix-vector product.
DENSE_ROWS = 16


@functools.cache
def dense_dtype() -> torch.dtype:
    """The dtype bf16 activations' CPU GEMMs run fastest in: bf16 where oneDNN has a bf16 GEMM (AVX512), else
    fp32."""
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


@functools.cache
def bf16_matrix_vector() -> bool:
    """Whether a one-row bf16 product runs faster through torch.mv than through F.linear: on CPUs with AMX,
    where oneDNN's one-row GEMM streams the weights 1.3x slower than torch.mv does; without AMX (an AVX512-BF16
    AMD EPYC) torch.mv is 1.75x slower (bench/RESULTS.md, issue 17). Linux names AMX in /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_bf16" in f.read()
    except OSError:
        return False


def linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """x through a linear layer: F.linear on a plain nn.Linear's weights, else the module (a QuantizedLinear).

    F.linear rather than calling the module: a module call's overhead is a large part of each small product
    when decoding (bench/RESULTS.md, "Speed choices")."""
    if type(module) is not nn.Linear:
        return module(x)
    w, b = module.weight, module.bias
    if (x.numel() == x.shape[-1] and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
            and x.device.type == "cpu" and bf16_matrix_vector()):
        # One row (a decode step): the same fp32 sums and one rounding as F.linear's.
        y = torch.mv(w, x.reshape(-1))
        return (y if b is None else y + b).view(*x.shape[:-1], w.shape[0])
    if (x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.numel() > DENSE_ROWS * x.shape[-1] and dense_dtype() is torch.float32):
        return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    return F.linear(x, w, b)
