"""Fused attention in Triton, FlashAttention-2 style (Dao 2023), for the vision encoder and the language model.

LLaVA-Med's two transformers (the CLIP ViT, bidirectional, and the LLaMA/Mistral decoder, causal) spend most
of their training time in softmax(Q K^T * scale) V. This file computes it without ever writing the
(seqlen_q x seqlen_k) score matrix to memory:

- forward: one program per (block of queries, head, sequence) streams over key/value blocks keeping a running
  max and a running sum (the "online softmax"), and saves the log-sum-exp (LSE) of each query row. As in
  Triton's fused-attention tutorial the loop has two phases: the blocks every row sees whole run without a
  mask, and only the diagonal blocks of a causal mask (and a sequence's tail block) are masked;
- backward: P is recomputed from Q, K and the saved LSE. One program per key/value block accumulates dK and
  dV (looping over every query head of its GQA group, so no two programs write the same rows and no atomics
  are needed); a separate kernel, one program per query block, accumulates dQ.

Public calling conventions are flash-attn's: `flash_attn_func` for (batch, seqlen, nheads, headdim) tensors and
`flash_attn_varlen_func` for packed (total_tokens, nheads, headdim) tensors delimited by `cu_seqlens`.
Internally both run the packed form (a fixed-length batch is a packing whose segments all have one length).
Causal masks with seqlen_q != seqlen_k are aligned to the bottom-right (flash-attn >= 2.1): query i sees
keys j <= i + seqlen_k - seqlen_q; a query that sees no key gets a zero output.

Decoding (one new query against a KV cache) is left to torch SDPA: with a single query row these kernels
would waste almost all of their BLOCK_M rows.

The float64 reference these kernels are tested against lives beside them in reference.py.
"""

import functools

import torch
import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1, read by triton.jit when this module is imported) runs the kernels
# with numpy on the CPU; it is what the CPU tests use.
_INTERPRETED = bool(triton.knobs.runtime.interpret)
_ON_GPU = torch.cuda.is_available() and not _INTERPRETED

# The kernels use exp2 (one hardware instruction): exp(x) = exp2(x * log2(e)). Kernels may only read
# module globals that are Triton constexprs.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _sequence(CU_Q, CU_K, seq):
    """Per-sequence prologue: where sequence `seq` starts in the packed Q and K/V, and how many rows it has."""
    q_start = tl.load(CU_Q + seq)
    len_q = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    len_k = tl.load(CU_K + seq + 1) - k_start
    return q_start, len_q, k_start, len_k


@triton.jit
def _visible(rows, cols, len_k, diag, CAUSAL: tl.constexpr):
    """(rows x cols) mask of the query->key pairs that attend: keys inside the sequence and, if causal, at or
    before the query's diagonal (bottom-right aligned: query i sees keys j <= i + diag)."""
    visible = cols[None, :] < len_k
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + diag)
    return visible


@triton.jit
def _full_key_blocks(start_m, len_k, diag, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(end of the key blocks every row of query block start_m sees whole, end of the key blocks any of its rows
    sees at all). The forward and dQ loops run the first range without a mask and mask only the blocks between
    the two: the diagonal blocks when causal and the sequence's tail block (the Triton tutorial's two phases)."""
    full = len_k // BLOCK_N * BLOCK_N
    end = len_k
    if CAUSAL:  # the block's first row sees the fewest keys: j <= start_m + diag
        full = tl.minimum(full, tl.maximum(start_m + diag + 1, 0) // BLOCK_N * BLOCK_N)
        end = tl.minimum(len_k, start_m + BLOCK_M + diag)
    return full, end


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d, d_ok, len_k, diag,
                scale_log2, lo, hi, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    # Online softmax: for each row keep m = max score seen so far, l = sum of exp(score - m), and
    # acc = sum of exp(score - m) * v. When a new block raises the max to m', the old l and acc are rescaled by
    # exp(m - m'), so after the last block acc / l is exactly softmax(scores) @ V. Scores are kept in base-2
    # units (pre-multiplied by log2(e)) so that every exponential is an exp2.
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < len_k) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        if MASKED:
            s = tl.where(_visible(offs_m, cols, len_k, diag, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked keys still has max -inf; shifting by 0 instead makes its
        # exponentials exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # fp32 accumulation whatever the input dtype
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lse_h,
    head_dim, group_size, scale_log2,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    q_start, len_q, k_start, len_k = _sequence(CU_Q, CU_K, tl.program_id(2))
    if start_m >= len_q:  # the grid is sized for the longest sequence; shorter ones have nothing here
        return
    kv_head = head // group_size  # GQA: a group of query heads reads one K/V head, never copied

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim  # HEAD_DIM is padded to a power of two >= 16 for tl.dot
    rows_q = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows_q[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=(offs_m[:, None] < len_q) & d_ok[None, :], other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh

    # Key blocks past the last key any row of this query block can see are never visited (about half of all
    # blocks for square causal attention); of the rest only the diagonal and tail blocks need a mask.
    diag = len_k - len_q
    full, end = _full_key_blocks(start_m, len_k, diag, CAUSAL, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d, d_ok,
                                len_k, diag, scale_log2, 0, full, False, CAUSAL, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d, d_ok,
                                len_k, diag, scale_log2, full, end, True, CAUSAL, BLOCK_N)

    # Rows that saw no key (causal with seqlen_q > seqlen_k) have l = 0: their output is 0 and their LSE is
    # +inf, which makes the backward's P = exp(score - LSE) exactly 0 for them.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    out = acc / l_safe[:, None]
    # LSE = log(sum_j exp(scale * q.k_j)) in natural log = (m + log2(l)) * ln(2); the backward needs only this
    # one number per row to rebuild every softmax probability.
    lse = tl.where(no_key, float("inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    q_ok = offs_m < len_q
    tl.store(O + rows_q[:, None] * stride_ot + head * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + head * stride_lse_h + rows_q, lse, mask=q_ok)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h, total_q, head_dim,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # With P = softmax(S), dS_ij = P_ij * (dP_ij - D_i) where D_i = sum_j P_ij dP_ij = sum_j P_ij (dO_i . V_j)
    # = dO_i . O_i. Computing D = rowsum(dO * O) once here saves both backward kernels a pass over all keys.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (rows[:, None] < total_q) & (offs_d[None, :] < head_dim)
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * stride_delta_h + rows64, delta, mask=rows < total_q)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, len_q, head, stride_qt, stride_qh, stride_dot, stride_doh,
                 stride_lse_h, offs_m, offs_n, offs_d, d_ok, len_k, diag, scale_log2, lo, hi,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        rows_q = (q_start + rows).to(tl.int64)
        q_mask = (rows[:, None] < len_q) & d_ok[None, :]
        q = tl.load(Q + rows_q[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + rows_q[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
        # Rows past the sequence get LSE = +inf, hence P = 0 and no contribution.
        lse = tl.load(LSE + head * stride_lse_h + rows_q, mask=rows < len_q, other=float("inf"))
        delta = tl.load(DELTA + head * stride_lse_h + rows_q, mask=rows < len_q, other=0.0)
        # P rebuilt from the saved LSE: exp(scale * q.k - LSE), no running max needed any more.
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse[:, None] * LOG2E)
        if MASKED:
            p = tl.where(_visible(rows, offs_n, len_k, diag, CAUSAL), p, 0.0)
        # Key columns past the sequence need no mask: the rows of dK/dV they produce are never stored.
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h,
    head_dim, group_size, sm_scale, scale_log2,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns one block of keys of one K/V head: it is the only writer of those dK/dV rows.
    start_n = tl.program_id(0) * BLOCK_N
    kv_head = tl.program_id(1)
    q_start, len_q, k_start, len_k = _sequence(CU_Q, CU_K, tl.program_id(2))
    if start_n >= len_k:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim
    rows_k = (k_start + offs_n).to(tl.int64)
    kv_mask = (offs_n[:, None] < len_k) & d_ok[None, :]
    k = tl.load(K + rows_k[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + rows_k[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # Causal: the first query that sees key start_n is start_n - diag, so earlier query blocks are skipped, and
    # query blocks from the first whose first row sees the block's last key (start_n + BLOCK_N - 1) on need no
    # mask; only the diagonal blocks between the two do.
    diag = len_k - len_q
    first = 0
    full = 0
    if CAUSAL:
        first = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        full = tl.maximum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M, first)
    # GQA: every query head of the group reads these keys, so their gradients are summed right here.
    for g in range(group_size):
        head = kv_head * group_size + g
        dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, len_q, head, stride_qt, stride_qh,
                              stride_dot, stride_doh, stride_lse_h, offs_m, offs_n, offs_d, d_ok, len_k, diag,
                              scale_log2, first, tl.minimum(full, len_q), True, CAUSAL, BLOCK_M)
        dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, q_start, len_q, head, stride_qt, stride_qh,
                              stride_dot, stride_doh, stride_lse_h, offs_m, offs_n, offs_d, d_ok, len_k, diag,
                              scale_log2, full, len_q, False, CAUSAL, BLOCK_M)

    dk *= sm_scale  # S = scale * Q K^T, so dK = scale * dS^T Q
    tl.store(DK + rows_k[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + rows_k[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse_log2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d, d_ok, len_k,
               diag, scale_log2, lo, hi, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < len_k) & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse_log2[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, cols, len_k, diag, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lse_h,
    head_dim, group_size, sm_scale, scale_log2,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program owns one block of query rows of one head and walks the same key blocks as the forward.
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    q_start, len_q, k_start, len_k = _sequence(CU_Q, CU_K, tl.program_id(2))
    if start_m >= len_q:
        return
    kv_head = head // group_size

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < head_dim
    rows_q = (q_start + offs_m).to(tl.int64)
    q_mask = (offs_m[:, None] < len_q) & d_ok[None, :]
    q = tl.load(Q + rows_q[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + rows_q[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=q_mask, other=0.0)
    lse_log2 = tl.load(LSE + head * stride_lse_h + rows_q, mask=offs_m < len_q, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + head * stride_lse_h + rows_q, mask=offs_m < len_q, other=0.0)
    k_base = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    diag = len_k - len_q
    full, end = _full_key_blocks(start_m, len_k, diag, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse_log2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d, d_ok,
                    len_k, diag, scale_log2, 0, full, False, CAUSAL, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse_log2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n, offs_d, d_ok,
                    len_k, diag, scale_log2, full, end, True, CAUSAL, BLOCK_N)

    dq *= sm_scale  # dQ = scale * dS K
    tl.store(DQ + rows_q[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_mask)


# What the autotuner may pick from on a GPU, as (BLOCK_M, BLOCK_N, num_warps, num_stages). Forward: large query
# blocks amortise the K/V loads; backward: dK/dV keeps a block of K, V, dK and dV in registers and dQ a block of
# Q, dO and dQ, as in the Triton tutorial and FlashAttention-2. Only configurations that compile for sm_80 and
# sm_90 without register spills and within each target's shared memory are here (resources.py checks them;
# bench/RESULTS.md has the table, with the ones that spilled and were removed): dK/dV at head dim 128 fits
# 255 registers only with 8 warps on 32 x 64 blocks (and at head dim 64 on sm_80 only with 3 stages).
FWD_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 4)]
DKDV_CONFIGS = [(32, 64, 8, 3)]
DQ_CONFIGS = [(64, 32, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)]


def _tuned(kernel, block_shapes):
    """On a GPU, Triton times the configurations once per head dim, mask and dtype. Autotuning needs a GPU, so
    the CPU interpreter gets one fixed small shape instead (BLOCK_M != BLOCK_N on purpose, so that the tests
    exercise unaligned causal block boundaries)."""
    if not _ON_GPU:
        return kernel, {"BLOCK_M": 32, "BLOCK_N": 16}
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in block_shapes]
    return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL"])(kernel), {}


_fwd_kernel, _FWD_META = _tuned(_attn_fwd, FWD_CONFIGS)
_dkdv_kernel, _DKDV_META = _tuned(_attn_bwd_dkdv, DKDV_CONFIGS)
_dq_kernel, _DQ_META = _tuned(_attn_bwd_dq, DQ_CONFIGS)


def _padded_head_dim(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _attention_forward(q, k, v, cu_q, cu_k, max_q, scale, causal):
    total_q, nheads, head_dim = q.shape
    nseq = cu_q.numel() - 1
    o = torch.empty_like(q)
    lse = torch.empty((nheads, total_q), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), nheads, nseq)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, o, lse, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        lse.stride(0), head_dim, nheads // k.shape[1], scale * LOG2E.value,
        CAUSAL=causal, HEAD_DIM=_padded_head_dim(head_dim), **_FWD_META,
    )
    return o, lse


def _attention_backward(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, scale, causal):
    total_q, nheads, head_dim = q.shape
    nheads_kv = k.shape[1]
    nseq = cu_q.numel() - 1
    padded = _padded_head_dim(head_dim)
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess[(triton.cdiv(total_q, 64), nheads)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), delta.stride(0), total_q, head_dim,
        HEAD_DIM=padded, BLOCK_M=64,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(head_dim=head_dim, group_size=nheads // nheads_kv, sm_scale=scale, scale_log2=scale * LOG2E.value,
                  CAUSAL=causal, HEAD_DIM=padded)
    _dkdv_kernel[lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), nheads_kv, nseq)](
        q, k, v, do, dk, dv, lse, delta, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), **common, **_DKDV_META,
    )
    _dq_kernel[lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), nheads, nseq)](
        q, k, v, do, dq, lse, delta, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), lse.stride(0), **common, **_DQ_META,
    )
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """Packed (total_tokens, nheads, headdim) attention; saves O and the LSE, recomputes P in the backward."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
        o, lse = _attention_forward(q, k, v, cu_q, cu_k, max_q, scale, causal)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.scale, ctx.causal = max_q, max_k, scale, causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = _attention_backward(do, q, k, v, o, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None, None, None, None, None


def _check_qkv(q, k, v, layout):
    """Raise ValueError naming the offending tensor when q, k, v do not fit `layout` or each other."""
    ndim = len(layout.split(","))
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != ndim:
            raise ValueError(f"{name} must be ({layout}), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if ndim == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"nheads of q ({q.shape[-2]}) must be a multiple of nheads of k/v ({k.shape[-2]})")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} is above the supported maximum of 256")


def _last_dim_contiguous(t):
    # The kernels index tokens and heads through strides but assume the head dim is contiguous.
    return t if t.stride(-1) == 1 else t.contiguous()


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False):
    """Attention over packed sequences: q (total_q, nheads, headdim), k/v (total_k, nheads_kv, headdim).

    Sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v
    (int32 tensors of shape (nseq + 1,)); tokens of different sequences never attend to each other.
    max_seqlen_q/k are the longest lengths (Python ints, they size the launch grid). softmax_scale defaults
    to headdim ** -0.5. nheads % nheads_kv == 0 (grouped-query / multi-query attention). Differentiable in
    q, k and v; returns (total_q, nheads, headdim).
    """
    _check_qkv(q, k, v, "total_tokens, nheads, headdim")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be an int32 tensor of shape (nseq + 1,), got {cu.dtype} {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe different numbers of sequences: "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _FlashAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale,
                                 bool(causal))


@functools.lru_cache(maxsize=64)
def _uniform_cu_seqlens(batch, seqlen, device):
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
    """Attention over a batch of equal-length sequences: q (batch, seqlen_q, nheads, headdim),
    k/v (batch, seqlen_k, nheads_kv, headdim) -> (batch, seqlen_q, nheads, headdim).

    causal=True with seqlen_q != seqlen_k aligns the mask to the bottom-right (query i sees keys
    j <= i + seqlen_k - seqlen_q). For one query against a KV cache (decoding) prefer torch SDPA.
    """
    _check_qkv(q, k, v, "batch, seqlen, nheads, headdim")
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    # A fixed-length batch is a packing with equal segments: reshaping (batch, seqlen) into one token axis is
    # free for the usual layouts (including q/k/v sliced out of one fused qkv projection).
    cu_q = _uniform_cu_seqlens(batch, seqlen_q, q.device)
    cu_k = _uniform_cu_seqlens(batch, seqlen_k, q.device)
    out = flash_attn_varlen_func(q.reshape(batch * seqlen_q, nheads, head_dim),
                                 k.reshape(batch * seqlen_k, *k.shape[2:]), v.reshape(batch * seqlen_k, *v.shape[2:]),
                                 cu_q, cu_k, seqlen_q, seqlen_k, softmax_scale, causal)
    return out.view(batch, seqlen_q, nheads, head_dim)


@functools.lru_cache(maxsize=None)
def _triton_gpu_backend_error():
    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as e:  # any failure here means Triton cannot compile for this machine
        return f"Triton has no working GPU backend here ({type(e).__name__}: {e})"
    return None


def triton_attention_supported(q):
    """(True, how) when these kernels can run on tensors like q, else (False, a reason to show the user)."""
    if _INTERPRETED:
        if q.device.type != "cpu":
            return False, f"TRITON_INTERPRET=1 runs Triton on the CPU, but the tensor is on {q.device}"
        if q.dtype not in (torch.float32, torch.float16):
            return False, f"the Triton interpreter computes {q.dtype} wrongly; use float32 or float16"
        return True, "Triton interpreter on the CPU (TRITON_INTERPRET=1)"
    if q.device.type != "cuda":
        return False, (f"the tensor is on {q.device}: Triton attention needs a CUDA GPU "
                       "(or TRITON_INTERPRET=1 set before importing minillavamed.kernels)")
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"Triton attention on a GPU takes float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] > 256:
        return False, f"head dim {q.shape[-1]} is above the supported maximum of 256"
    capability = torch.cuda.get_device_capability(q.device)
    if capability < (8, 0):
        return False, f"Triton attention needs compute capability >= 8.0 (Ampere or newer), got {capability}"
    error = _triton_gpu_backend_error()
    if error is not None:
        return False, error
    return True, f"Triton kernels on {torch.cuda.get_device_name(q.device)}"
