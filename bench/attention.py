"""Speed of the fused Triton attention (minillavamed/kernels) against torch SDPA and the plain path.

Times forward and forward+backward on LLaVA-Med's two attention shapes (paper §4: the CLIP ViT-L/14-336
vision encoder, bidirectional, and the LLaMA-7B decoder, causal) for: our Triton kernels, torch's
scaled_dot_product_attention pinned to each backend it has (flash, memory-efficient, cuDNN, math) and the
plain reference path (full score matrix). Prints TFLOP/s and the ratio of ours to the best SDPA backend.

    python bench/attention.py                           # all shapes, bf16, on the GPU
    python bench/attention.py --shapes vit --dtype fp16
    python bench/attention.py --device cpu --batch 1 --vit-batch 1 --seqlens 128   # smoke test of the script
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from minillavamed.kernels import triton_attention_supported
from minillavamed.kernels.reference import attention_reference

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Shape:
    name: str
    batch: int
    nheads: int
    seqlen: int
    head_dim: int
    causal: bool

    def flops(self, backward: bool) -> float:
        # Forward: two matmuls of 2*s*s*d flops per head (Q K^T and P V); causal skips half of them. The backward
        # does five (S recomputed, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q): 2.5x the forward, as
        # counted in the FlashAttention papers.
        forward = 4 * self.batch * self.nheads * self.seqlen * self.seqlen * self.head_dim
        forward *= 0.5 if self.causal else 1.0
        return forward * (3.5 if backward else 1.0)


def build_shapes(args) -> list[Shape]:
    shapes = []
    if "decoder" in args.shapes:  # LLaMA-7B: 32 heads of dim 128, causal
        shapes += [Shape(f"decoder s={s}", args.batch, 32, s, 128, True) for s in args.seqlens]
    if "vit" in args.shapes:  # CLIP ViT-L/14 at 336 px: 24x24 patches + CLS = 577 tokens, 16 heads of dim 64
        shapes.append(Shape("vit-l/14-336", args.vit_batch, 16, 577, 64, False))
    return shapes


def implementations(with_triton: bool):
    """name -> (layout, attention(q, k, v, causal)). Layout "bshd" is flash-attn's, "bhsd" is SDPA's."""
    impls = {}
    if with_triton:
        from minillavamed.kernels import flash_attn_func

        impls["triton (ours)"] = ("bshd", lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal))
    for name, backend in SDPA_BACKENDS.items():
        def sdpa(q, k, v, causal, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        impls[name] = ("bhsd", sdpa)
    impls["plain"] = ("bshd", lambda q, k, v, causal: attention_reference(q, k, v, causal=causal))
    return impls


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, min_runs, min_seconds) -> float:
    """Median wall time of fn in ms after one warm-up call (which compiles and autotunes)."""
    fn()
    synchronize(device)
    times = []
    while len(times) < min_runs or sum(times) < min_seconds * 1e3:
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(shape, layout, attention, args, device, dtype):
    """(forward TFLOP/s, forward+backward TFLOP/s, output) or a short reason why this path cannot run."""
    # Every path gets the same numbers (so their outputs can be compared), laid out the way it wants them.
    torch.manual_seed(0)
    dims = (shape.batch, shape.seqlen, shape.nheads, shape.head_dim)
    q, k, v, grad_out = (torch.randn(dims, device=device, dtype=dtype) for _ in range(4))
    if layout == "bhsd":
        q, k, v, grad_out = (t.transpose(1, 2).contiguous() for t in (q, k, v, grad_out))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        with torch.no_grad():
            return attention(q, k, v, shape.causal)

    def forward_backward():
        torch.autograd.grad(attention(q, k, v, shape.causal), (q, k, v), grad_out)

    try:
        out = forward()
        fwd_ms = time_ms(forward, device, args.min_runs, args.min_seconds)
        fwd_bwd_ms = time_ms(forward_backward, device, args.min_runs, args.min_seconds)
    except torch.OutOfMemoryError:
        return "oom"
    except RuntimeError as e:  # SDPA raises this when the pinned backend does not take this shape/dtype/device
        return "n/a: " + str(e).splitlines()[0][:60]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if layout == "bhsd":
        out = out.transpose(1, 2)
    return shape.flops(False) / fwd_ms / 1e9, shape.flops(True) / fwd_bwd_ms / 1e9, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=["decoder", "vit"], default=["decoder", "vit"])
    parser.add_argument("--batch", type=int, default=32, help="decoder batch (x 32 heads)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="decoder lengths")
    parser.add_argument("--vit-batch", type=int, default=32, help="images per ViT batch")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda", help="cuda measures; cpu only smoke-tests this script")
    parser.add_argument("--min-runs", type=int, default=3, help="timed calls per measurement, at least")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timed seconds per measurement, at least")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/attention.py: no CUDA device here, nothing to measure. To smoke-test the script on the "
                 "CPU: --device cpu --batch 1 --vit-batch 1 --seqlens 128")
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test, not a measurement)"
    ok, reason = triton_attention_supported(torch.empty(1, 1, 1, 64, device=device, dtype=dtype))
    print(f"device: {name}; dtype: {args.dtype}; torch {torch.__version__}; triton: {reason}")

    impls = implementations(with_triton=ok)
    sdpa_names = [n for n in impls if n.startswith("sdpa")]
    columns = list(impls)
    header = f"{'shape':<18} {'pass':<9}" + "".join(f"{n:>16}" for n in columns)
    if ok:
        header += f"{'ours/best sdpa':>16}{'err vs sdpa':>13}"
    print("TFLOP/s\n" + header + "\n" + "-" * len(header))
    for shape in build_shapes(args):
        results = {n: measure(shape, layout, fn, args, device, dtype) for n, (layout, fn) in impls.items()}
        outputs = {n: r[2] for n, r in results.items() if isinstance(r, tuple)}
        for i, label in enumerate(("fwd", "fwd+bwd")):
            cells = [f"{r[i]:16.1f}" if isinstance(r, tuple) else f"{r[:15]:>16}" for r in results.values()]
            line = f"{shape.name:<18} {label:<9}" + "".join(cells)
            sdpa_best = max((results[n][i] for n in sdpa_names if isinstance(results[n], tuple)), default=None)
            if ok and isinstance(results["triton (ours)"], tuple) and sdpa_best:
                line += f"{results['triton (ours)'][i] / sdpa_best:15.2f}x"
                # A speed is only worth reporting for a kernel that computes the same thing.
                reference = next((outputs[n] for n in sdpa_names if n in outputs), None)
                if i == 0 and reference is not None:
                    ours = outputs["triton (ours)"].float()
                    err = ((ours - reference.float()).abs().max() / reference.float().abs().max()).item()
                    line += f"{err:13.1e}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
