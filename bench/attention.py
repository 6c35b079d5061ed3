"""Speed of the fused Triton attention (minillavamed/kernels) against torch SDPA and the plain path.

Times forward and forward+backward on LLaVA-Med's two attention shapes (paper §4: the CLIP ViT-L/14-336
vision encoder, bidirectional, and the LLaMA-7B decoder, causal) for: our Triton kernels, torch's
scaled_dot_product_attention pinned to each backend it has (flash, memory-efficient, cuDNN, math) and the
plain reference path (full score matrix). Prints TFLOP/s and the ratio of ours to the best SDPA backend.

Each path is first validated (llm.c's validate-then-benchmark): one forward and backward, whose output and
dQ, dK, dV on the first sequence's first heads are compared with the fp32 reference (reference.py) on the
same inputs. A path that is off by more than the stated tolerance is reported as wrong and not timed.

    python bench/attention.py                           # all shapes, bf16, on the GPU
    python bench/attention.py --shapes vit --dtype fp16
    TRITON_INTERPRET=1 python bench/attention.py --dry_run   # tiny shapes on the CPU: checks the script only
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minillavamed.kernels import triton_attention_supported  # noqa: E402
from minillavamed.kernels.reference import attention_reference  # noqa: E402

SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Largest error allowed, relative to the reference's largest magnitude, for the output and each gradient: the
# half types round the inputs, P and dS of every product (bf16 keeps 8 mantissa bits, fp16 11).
TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2}
VALIDATED_HEADS = 4  # the reference's score matrix is (heads, seqlen, seqlen) in fp32: 1 GiB at 8k tokens


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
    if args.dry_run:  # the interpreter runs every program in numpy: tiny shapes, the real masks and head dims
        tiny = {"decoder": Shape("decoder s=48", 1, 2, 48, 128, True), "vit": Shape("vit 37 tokens", 1, 2, 37, 64, False)}
        return [tiny[s] for s in args.shapes]
    if "decoder" in args.shapes:  # LLaMA-7B: 32 heads of dim 128, causal
        shapes += [Shape(f"decoder s={s}", args.batch, 32, s, 128, True) for s in args.seqlens]
    if "vit" in args.shapes:  # CLIP ViT-L/14 at 336 px: 24x24 patches + CLS = 577 tokens, 16 heads of dim 64
        shapes.append(Shape("vit-l/14-336", args.vit_batch, 16, 577, 64, False))
    return shapes


def implementations():
    """name -> (layout, attention(q, k, v, causal)). Layout "bshd" is flash-attn's, "bhsd" is SDPA's."""
    from minillavamed.kernels import flash_attn_func

    impls = {"triton (ours)": ("bshd", lambda q, k, v, causal: flash_attn_func(q, k, v, causal=causal))}
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


def validate(shape, q, k, v, grad_out, out, grads, layout):
    """Largest error of out, dQ, dK, dV against the fp32 reference on sequence 0, heads 0..VALIDATED_HEADS-1
    (heads and sequences are independent, so their gradients are those of the whole call)."""
    def part(t):  # -> (1, seqlen, heads', head_dim), fp32
        t = t.transpose(1, 2) if layout == "bhsd" else t
        return t[:1, :, :VALIDATED_HEADS].float()

    q32, k32, v32 = (part(t).detach().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q32, k32, v32, causal=shape.causal)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), part(grad_out))
    return max(((part(x) - r).abs().max() / r.abs().max()).item()
               for x, r in zip((out, *grads), (ref, *ref_grads)))


def measure(shape, layout, attention, args, device, dtype):
    """(forward TFLOP/s, forward+backward TFLOP/s, error) or a short reason why this path was not timed."""
    torch.manual_seed(0)  # every path gets the same numbers, laid out the way it wants them
    dims = (shape.batch, shape.seqlen, shape.nheads, shape.head_dim)
    q, k, v, grad_out = (torch.randn(dims, device=device, dtype=dtype) for _ in range(4))
    if layout == "bhsd":
        q, k, v, grad_out = (t.transpose(1, 2).contiguous() for t in (q, k, v, grad_out))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def forward():
        with torch.no_grad():
            return attention(q, k, v, shape.causal)

    def forward_backward():
        return torch.autograd.grad(attention(q, k, v, shape.causal), (q, k, v), grad_out)

    try:
        with torch.enable_grad():
            out = attention(q, k, v, shape.causal)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        err = validate(shape, q, k, v, grad_out, out.detach(), grads, layout)
        del out, grads
        if not err <= TOLERANCE[args.dtype]:  # also catches NaN
            return f"WRONG {err:.1e}"
        fwd_ms = time_ms(forward, device, args.min_runs, args.min_seconds)
        fwd_bwd_ms = time_ms(forward_backward, device, args.min_runs, args.min_seconds)
    except torch.OutOfMemoryError:
        return "oom"
    except RuntimeError as e:  # SDPA raises this when the pinned backend does not take this shape/dtype/device
        return "n/a: " + str(e).splitlines()[0][:60]
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return shape.flops(False) / fwd_ms / 1e9, shape.flops(True) / fwd_bwd_ms / 1e9, err


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=["decoder", "vit"], default=["decoder", "vit"])
    parser.add_argument("--batch", type=int, default=32, help="decoder batch (x 32 heads)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="decoder lengths")
    parser.add_argument("--vit-batch", type=int, default=32, help="images per ViT batch")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--min-runs", type=int, default=3, help="timed calls per measurement, at least")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timed seconds per measurement, at least")
    parser.add_argument("--dry_run", action="store_true",
                        help="tiny shapes on the CPU in fp16, one timed call each, under the Triton interpreter "
                             "(TRITON_INTERPRET=1): runs the script end to end, measures nothing")
    args = parser.parse_args()

    if args.dry_run:
        device, args.dtype, args.min_runs, args.min_seconds = torch.device("cpu"), "fp16", 1, 0.0
    elif not torch.cuda.is_available():
        sys.exit("bench/attention.py: no CUDA device here, nothing to measure; on a CPU run it with --dry_run "
                 "(and TRITON_INTERPRET=1) to check the script")
    else:
        device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, not a measurement)"
    ok, reason = triton_attention_supported(torch.empty(1, 1, 1, 64, device=device, dtype=dtype))
    if not ok:
        sys.exit(f"bench/attention.py: the Triton kernels cannot run here: {reason}")
    print(f"device: {name}; dtype: {args.dtype}; torch {torch.__version__}; triton: {reason}; validated against "
          f"the fp32 reference on {VALIDATED_HEADS} heads of one sequence, tolerance {TOLERANCE[args.dtype]:.0e}")

    impls = implementations()
    sdpa_names = [n for n in impls if n.startswith("sdpa")]
    header = f"{'shape':<18} {'pass':<9}" + "".join(f"{n:>16}" for n in impls) + f"{'ours/best sdpa':>16}"
    print("TFLOP/s\n" + header + "\n" + "-" * len(header))
    errors = []
    for shape in build_shapes(args):
        results = {n: measure(shape, layout, fn, args, device, dtype) for n, (layout, fn) in impls.items()}
        for i, label in enumerate(("fwd", "fwd+bwd")):
            cells = [f"{r[i]:16.1f}" if isinstance(r, tuple) else f"{r[:15]:>16}" for r in results.values()]
            line = f"{shape.name:<18} {label:<9}" + "".join(cells)
            sdpa_best = max((results[n][i] for n in sdpa_names if isinstance(results[n], tuple)), default=None)
            if isinstance(results["triton (ours)"], tuple) and sdpa_best:
                line += f"{results['triton (ours)'][i] / sdpa_best:15.2f}x"
            print(line, flush=True)
        errors.append((shape.name, {n: r[2] for n, r in results.items() if isinstance(r, tuple)}))
    print("\nlargest relative error of out, dQ, dK, dV against the fp32 reference (timed paths only)")
    for shape_name, errs in errors:
        print(f"{shape_name:<18} " + "  ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    return 0 if all("triton (ours)" in errs for _, errs in errors) else 1  # ours validated and timed everywhere


if __name__ == "__main__":
    sys.exit(main())
