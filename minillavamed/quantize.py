"""Weight-only quantisation for sampling on a CPU: int8 per output channel, int4 in groups along the input.

Not part of the paper: this is how LLaVA-Med v1.5 (7B) fits and runs on a laptop. Decoding one token reads
every weight once, so it is bound by memory bandwidth, and fewer bytes per weight mean more tokens per
second. Only torch's own CPU kernels run the products (no new dependency):

- int8: `aten._weight_int8pack_mm(x, w_int8, scales)`, w ~= w_int8 * scale (one scale per output row);
- int4: `aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`, w ~= (q - 8) * scale + zero
  with q in 0..15 and one (scale, zero) per `group` consecutive inputs of a row (asymmetric, as in GPTQ/AWQ
  checkpoints and llama.cpp's Q4_1).

Those kernels are built for a few rows at a time. A prefill of hundreds of positions (an image question is
about 628) is faster through a dense GEMM, so above `DENSE_ROWS` rows a layer dequantises its weight, a slice
of output rows at a time, for that one product: in bf16 where oneDNN has a bf16 GEMM (AVX512) and in fp32
elsewhere (on an AVX2 CPU the bf16 GEMM is about 5x slower than fp32's at 628 rows; bench/local_7b.py
--products measures every path; bench/RESULTS.md).

`QuantizedLinear` replaces an nn.Linear module of the vision tower, the projector or the decoder (gemm.linear
calls it as a module). The int4 weight is kept in the kernel's own packed layout, which depends on the CPU:
blocks of 64 output rows with rows r and r + 32 sharing a byte where torch dispatches to AVX512, blocks of 32
(r and r + 16) elsewhere (`kernel_block_n`; `unpack_int4` reads it back). A checkpoint therefore holds int4
in a layout of its own, two inputs per byte (`pack_nibbles`), and loading packs it for the CPU at hand.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# Above DENSE_ROWS rows the dequantised dense product (in gemm.DENSE_DTYPE) beats the weight-only kernels.
from minillavamed import gemm
from minillavamed.gemm import DENSE_ROWS

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
INT4_PAD = 64  # int4 output rows are padded to a multiple of the largest kernel block (kernel_block_n)
# Weights quantised (or dequantised for a prefill) per pass over a layer's output rows: the fp32 temporaries of
# one pass over a 7B layer's 28672 rows would be 0.5 GB each, more than the int4 layer itself. A count of
# weights rather than of rows, so that a pass over the MLP's down projection (14336 inputs) holds no more than
# one over a 4096-input layer: 2048 rows of it made the last layer read a 7B int4 load's peak (4.84 GiB; 4.70
# in passes of this count, bench/RESULTS.md, issue 17).
WEIGHTS_PER_PASS = 2048 * 4096


def rows_per_pass(inputs: int) -> int:
    """Output rows per pass over a layer of `inputs` inputs: WEIGHTS_PER_PASS of them, in whole int4 blocks."""
    return max(INT4_PAD, WEIGHTS_PER_PASS // inputs // INT4_PAD * INT4_PAD)


@dataclass(frozen=True)
class QuantConfig:
    mode: str = "int8"
    group_size: int = 128  # int4 only

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown quantisation {self.mode!r}; choose one of {MODES}")
        if self.mode == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size {self.group_size}: choose one of {GROUP_SIZES}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, spec: "str | QuantConfig | dict") -> "QuantConfig":
        """'int8', 'int4' (groups of 128), 'int4-32'; or a QuantConfig; or its to_dict()."""
        if isinstance(spec, QuantConfig):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        mode, _, group = spec.partition("-")
        if group and not group.isdigit():
            raise ValueError(f"bad quantisation {spec!r}; expected int8, int4 or int4-<group size>")
        return cls(mode, int(group)) if group else cls(mode)


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 weights and fp32 scales (out,): symmetric, one scale per output row."""
    # In place on one fp32 copy: each temporary of a quantised load's pass adds to its peak memory.
    w = w.to(torch.float32, copy=True)
    scales = torch.linalg.vector_norm(w, ord=float("inf"), dim=1).clamp_(min=1e-8).div_(127)  # max |w| per row
    return w.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> q in 0..15 (int32, out x in) and scales_and_zeros (in / group, out, 2), fp32.

    Asymmetric per group: the group's minimum maps to 0 and its maximum to 15; the kernel dequantises as
    (q - 8) * scale + zero, so zero is the value of q = 8.
    """
    out, inp = w.shape
    g = w.to(torch.float32, copy=True).reshape(out, inp // group, group)
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    scales = (hi - lo).clamp_(min=1e-8).div_(15)
    zeros = lo + 8 * scales
    q = g.sub_(lo).div_(scales).round_().clamp_(0, 15).to(torch.int32).reshape(out, inp)
    return q, torch.cat([scales, zeros], dim=-1).transpose(0, 1).contiguous()


def _unpack_blocks(packed: torch.Tensor, out: int, inp: int, block: int) -> torch.Tensor:
    v = packed.view(out // block, inp, block // 2)
    q = torch.stack([v & 15, v >> 4], dim=1)  # (blocks, low/high nibble, in, block / 2 rows)
    return q.transpose(2, 3).reshape(out, inp)


@functools.cache
def kernel_block_n() -> int:
    """Output rows per block of this CPU's int4 packing (64 with AVX512, else 32), found by packing a probe."""
    probe = torch.arange(64 * 64, dtype=torch.int32).remainder_(16).view(64, 64)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    for block in (64, 32):
        if torch.equal(_unpack_blocks(packed, 64, 64, block).int(), probe):
            return block
    raise RuntimeError("torch's CPU int4 packing is neither of the known layouts (blocks of 64 or 32 rows)")


def unpack_int4(packed: torch.Tensor, out: int, inp: int) -> torch.Tensor:
    """The CPU kernel's packed (out, in / 2) uint8 weights -> q (out, in) uint8, the inverse of its packing."""
    return _unpack_blocks(packed, out, inp, kernel_block_n())


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q (out, in) in 0..15 -> (out, in / 2) uint8, inputs 2j and 2j + 1 in the low and high nibble of byte j:
    the int4 layout of a saved checkpoint, the same on every CPU."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)


class QuantizedLinear(nn.Module):
    """An nn.Linear whose weight is int8 or int4; activations, scales and bias stay in the model's dtype.

    The int4 weight is padded with zeros to a multiple of 64 output rows (the kernel's block) and of `group`
    inputs; the product is cut back to `out_features` (and the input padded) when it is.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig,
                 dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features, self.cfg = in_features, out_features, cfg
        if cfg.mode == "int8":
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.padded_out = _ceil_to(out_features, INT4_PAD)
            self.padded_in = _ceil_to(in_features, cfg.group_size)
            self.register_buffer("qweight", torch.empty(self.padded_out, self.padded_in // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(self.padded_in // cfg.group_size, self.padded_out, 2,
                                                       dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, cfg: QuantConfig) -> "QuantizedLinear":
        w = linear.weight
        if w.device.type != "cpu":
            raise ValueError(f"weight-only {cfg.mode} uses torch's CPU kernels; the model is on {w.device}")
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, cfg, w.dtype, w.device)
        q.fill_(w, linear.bias)
        return q

    @torch.no_grad()
    def fill_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantise a float (out, in) weight (and copy its bias) into this layer's storage, in place."""
        out, step = self.out_features, rows_per_pass(self.in_features)
        if self.cfg.mode == "int8":
            for r in range(0, out, step):
                qweight, scales = quantize_int8(weight[r:r + step])
                self.qweight[r:r + step] = qweight
                self.scales[r:r + step] = scales
        else:
            # Blocks of output rows are packed independently, so packing a pass's rows gives those rows.
            for r in range(0, self.padded_out, step):
                n = min(step, self.padded_out - r)
                real = weight[r:r + n]  # short (or empty) where the pass reaches the padding past out_features
                rows = F.pad(real, (0, self.padded_in - self.in_features, 0, n - real.shape[0]))
                values, scales = quantize_int4(rows, self.cfg.group_size)
                self.qweight[r:r + n] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
                self.scales[:, r:r + n] = scales
        if bias is not None:
            self.bias.copy_(bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.cfg.mode == "int4":
            destination[prefix + "qweight"] = pack_nibbles(unpack_int4(self.qweight, self.padded_out, self.padded_in))

    @torch.no_grad()
    def load_saved_qweight(self, saved: torch.Tensor) -> None:
        """Set qweight from its checkpoint tensor: for int4, `pack_nibbles`' layout packed for this CPU."""
        if self.cfg.mode == "int8":
            self.qweight = saved
            return
        self.qweight = torch.empty(self.padded_out, self.padded_in // 2, dtype=torch.uint8)
        step = rows_per_pass(self.padded_in)
        for r in range(0, self.padded_out, step):
            values = unpack_nibbles(saved[r:r + step]).to(torch.int32)
            self.qweight[r:r + step] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)

    def dequantize(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """The (out, in) weight the quantised values stand for, or its `rows` (int4: from a multiple of
        INT4_PAD, as the kernel packs blocks of rows independently)."""
        # In place after one cast: each pass over a 7B layer's weight costs as much as a tenth of its prefill.
        if self.cfg.mode == "int8":
            return self.qweight[rows].to(dtype).mul_(self.scales[rows, None].to(dtype))
        g = self.cfg.group_size
        start, stop, _ = rows.indices(self.out_features)
        end = _ceil_to(stop, INT4_PAD)  # whole blocks, cut back below
        scales, zeros = self.scales[:, start:end].transpose(0, 1).to(dtype).unbind(-1)  # (rows, in / group) each
        w = unpack_int4(self.qweight[start:end], end - start, self.padded_in).view(end - start, -1, g).to(dtype)
        w = w.mul_(scales[..., None]).add_((zeros - 8 * scales)[..., None])  # (q - 8) * scale + zero
        return w.view(end - start, self.padded_in)[:stop - start, :self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if x.shape[0] > DENSE_ROWS:
            # fp32 activations stay fp32; bf16 ones multiply in fp32 where the CPU has no bf16 GEMM. The weight
            # is dequantised rows_per_pass output rows at a time, so that a prefill holds one slice of it in
            # float (a 7B MLP layer's whole bf16 weight is 0.23 GB, more than int4 layers hold).
            dense = torch.float32 if gemm.DENSE_DTYPE is torch.float32 else x.dtype
            xd = x.to(dense)
            y = x.new_empty(x.shape[0], self.out_features)
            step = rows_per_pass(self.in_features)
            for r in range(0, self.out_features, step):
                rows = slice(r, r + step)
                bias = None if self.bias is None else self.bias[rows].to(dense)
                y[:, rows] = F.linear(xd, self.dequantize(dense, rows), bias)
            return y.view(*lead, self.out_features)
        if self.cfg.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        else:
            if self.padded_in != self.in_features:
                x = F.pad(x, (0, self.padded_in - self.in_features))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.cfg.group_size, self.scales)
            if self.padded_out != self.out_features:
                y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.cfg.group_size}" if self.cfg.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.cfg.mode}{group}"


def quantized_names(model: nn.Module) -> list[str]:
    """The linear layers weight-only quantisation replaces: the vision tower's, the projector's and the
    decoder's (the output layer too, unless it shares its weight with the embeddings). The vision tower runs
    once per image, as a prefill, so quantising it saves memory (0.45 GB of ViT-L/14 in int4) rather than time."""
    names = []
    for part in ("vision", "projector", "decoder"):
        for name, module in model.get_submodule(part).named_modules(prefix=part):
            if isinstance(module, nn.Linear):
                names.append(name)
    if model.cfg.decoder.tie_embeddings:
        names.remove("decoder.lm_head")
    return names


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, module)


def quantize_model(model: nn.Module, cfg: QuantConfig) -> None:
    """Replace each of `quantized_names(model)` with its QuantizedLinear, one layer at a time (in place)."""
    for name in quantized_names(model):
        linear = model.get_submodule(name)
        replace_module(model, name, QuantizedLinear.from_linear(linear, cfg))
        del linear  # the float weight is freed as soon as its layer is quantised


def empty_quantized(model: nn.Module, cfg: QuantConfig, dtype: torch.dtype, names: list[str]) -> None:
    """Give a model (on the meta device) the quantised layers `names` that a saved quantised checkpoint fills."""
    for name in names:
        linear = model.get_submodule(name)
        replace_module(model, name, QuantizedLinear(linear.in_features, linear.out_features,
                                                    linear.bias is not None, cfg, dtype, linear.weight.device))
