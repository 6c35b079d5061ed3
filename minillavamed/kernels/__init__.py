"""Fused attention kernels (Triton, FlashAttention-2 style) for the ViT and the decoder; see flash_attention.py.

Importing this package never fails on a machine without a usable Triton: `triton_attention_supported` then
says why, and the attention dispatch raises with that reason when the `triton` backend is asked for.
resources.py compiles every autotune configuration for the real GPUs (sm_80, sm_90) to check registers,
spills and shared memory without one.
"""

try:
    from minillavamed.kernels.flash_attention import (
        flash_attn_func,
        flash_attn_varlen_func,
        triton_attention_supported,
    )
except ImportError as _error:  # Triton missing or broken on this machine
    _reason = f"Triton cannot be imported ({_error})"

    def triton_attention_supported(q):
        return False, _reason

    __all__ = ["triton_attention_supported"]
else:
    __all__ = ["flash_attn_func", "flash_attn_varlen_func", "triton_attention_supported"]
