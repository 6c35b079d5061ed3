"""What each autotune configuration of the fused attention (flash_attention.py) needs on the real GPUs, found
without one: registers, register spills and shared memory on sm_80 (A100) and sm_90 (H100/H200).

Triton compiles for a `GPUTarget` whether or not the machine has that GPU, and ships the ptxas that turns its
PTX into machine code. So every configuration the autotuner may pick is compiled here for both targets, at
LLaVA-Med's head dims (64 for the CLIP ViT-L, 128 for the 7B decoders), in fp16 and bf16, causal and not; the
arguments carry the 16-divisibility hints Triton's launcher gives 16-byte-aligned tensors and strides, so the
code is the code a GPU run gets. ptxas -v then reports registers and spills; Triton's metadata has the shared
memory it allocates. A configuration that spills (registers written to local memory inside the loop) or
needs more shared memory than the target has is a configuration the autotuner must not be offered.

    python -m minillavamed.kernels.resources   # the table in bench/RESULTS.md: 16 compiles per configuration

TRITON_INTERPRET must be unset: the interpreter replaces the kernels with Python functions.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

# Largest shared memory one block may opt into (CUDA programming guide, compute capabilities table).
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}
HEAD_DIMS = (64, 128)
DTYPES = ("fp16", "bf16")
_DATA = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}  # tensors in the input dtype; LSE and DELTA are fp32


@dataclass(frozen=True)
class Compiled:
    kernel: str
    config: tuple  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    target: str
    head_dim: int
    dtype: str
    causal: bool
    registers: int
    spill_bytes: int  # spill stores + spill loads, as ptxas -v counts them
    shared: int  # bytes of shared memory Triton allocates per block
    shared_limit: int

    @property
    def fits(self) -> bool:
        return self.spill_bytes == 0 and self.shared <= self.shared_limit


def kernels():
    """name -> (JIT function, autotune configurations) for the three tuned kernels."""
    from minillavamed.kernels import flash_attention as fa

    return {"fwd": (fa._attn_fwd, fa.FWD_CONFIGS), "bwd_dkdv": (fa._attn_bwd_dkdv, fa.DKDV_CONFIGS),
            "bwd_dq": (fa._attn_bwd_dq, fa.DQ_CONFIGS)}


def _signature(fn, dtype):
    signature, hints = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in ("CAUSAL", "HEAD_DIM", "BLOCK_M", "BLOCK_N"):
            signature[name] = "constexpr"
        elif name in _DATA or name in ("LSE", "DELTA", "CU_Q", "CU_K"):
            signature[name] = f"*{dtype}" if name in _DATA else ("*i32" if name.startswith("CU") else "*fp32")
            hints[(i,)] = [["tt.divisibility", 16]]
        elif name in ("scale_log2", "sm_scale"):
            signature[name] = "fp32"
        else:  # strides, head_dim, group_size
            signature[name] = "i32"
            if name.startswith("stride") or name == "head_dim":
                hints[(i,)] = [["tt.divisibility", 16]]
    return signature, hints


def compile_one(kernel: str, config: tuple, target: str, head_dim: int, dtype: str, causal: bool) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = kernels()[kernel][0]
    capability, shared_limit = TARGETS[target]
    block_m, block_n, warps, stages = config
    signature, hints = _signature(fn, dtype)
    source = ASTSource(fn, signature, {"CAUSAL": causal, "HEAD_DIM": head_dim, "BLOCK_M": block_m,
                                       "BLOCK_N": block_n}, hints)
    binary = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": warps, "num_stages": stages})
    # Triton's own ptxas call keeps its log only on failure, and a cache hit skips it: run it again, with the
    # architecture name and register-allocation flag Triton uses, for the report.
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(binary.asm["ptx"])
        log = subprocess.run([get_ptxas(capability).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", ptx,
                              "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    registers = int(re.search(r"Used (\d+) registers", log.stderr).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log.stderr))
    return Compiled(kernel, config, target, head_dim, dtype, causal, registers, spills, binary.metadata.shared,
                    shared_limit)


def _compile_args(args):
    return compile_one(*args)


def jobs(head_dims=HEAD_DIMS, dtypes=DTYPES, causals=(False, True)) -> list[tuple]:
    """(kernel, configuration, target, head dim, dtype, causal) for every configuration on every target."""
    return [(name, config, target, hd, dtype, causal)
            for name, (_, configs) in kernels().items() for config in configs
            for target, hd, dtype, causal in itertools.product(TARGETS, head_dims, dtypes, causals)]


def compile_all(todo: list[tuple], workers: int | None = None) -> list[Compiled]:
    """Compile `todo` (see jobs()) in parallel processes."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the interpreter cannot compile for a GPU target; unset it")
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        return list(pool.map(_compile_args, todo))


def table(results: list[Compiled]) -> str:
    """Markdown: one row per kernel and configuration, registers / shared KiB / spill bytes per target, each
    the worst case over head dims, dtypes and masks (the rows below break the worst out by head dim)."""
    lines = ["| kernel | BLOCK_M, BLOCK_N, warps, stages | head dim | " +
             " | ".join(f"{t} regs / smem KiB / spills" for t in TARGETS) + " |",
             "|---|---|---|" + "---|" * len(TARGETS)]
    key = lambda r: (r.kernel, r.config, r.head_dim)  # noqa: E731
    for (kernel, config, head_dim), group in itertools.groupby(sorted(results, key=key), key=key):
        group = list(group)
        cells = []
        for target in TARGETS:
            rs = [r for r in group if r.target == target]
            cells.append(f"{max(r.registers for r in rs)} / {max(r.shared for r in rs) / 1024:.0f} / "
                         f"{max(r.spill_bytes for r in rs)}")
        lines.append(f"| {kernel} | {', '.join(map(str, config))} | {head_dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    results = compile_all(jobs())
    print(table(results))
    bad = [r for r in results if not r.fits]
    for r in bad:
        print(f"does not fit: {r}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
