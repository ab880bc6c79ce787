"""Flash attention in Triton: forward and backward, with its plain-PyTorch reference.

Laid out as in Triton's fused-attention tutorial (kernel, launcher, reference), written here
for the DiT's needs: ``[batch, seq, heads, head_dim]`` tensors used in place through strides
(no transposes), any sequence length (masked tail blocks: 75,888 tokens is no multiple of
128), unequal query/key lengths, per-sample key lengths for padded text (cross-attention),
an optional causal mask, and the log-sum-exp returned for ring attention. The softmax runs
online in base 2 (``exp2``) with fp32 statistics; the backward recomputes probabilities from
the saved LSE in two kernels (dK/dV over key blocks, dQ over query blocks) so no atomics
are needed.

Ring attention needs two things from the backward: a gradient through the returned LSE
(``d lse_i / d s_ij = p_ij``, so ``ds = p * (dp - delta + dlse)``: the same kernels with
``delta - dlse``), and the backward of one K/V block against the *merged* LSE and delta of
all blocks (:func:`flash_attention_block_backward_triton`), so that no rank ever holds more
than one block's probabilities or the full K/V.

Block sizes come from a table per GPU generation (compute capability), cached per process;
they are not yet tuned with ``triton.autotune`` (no GPU has been available to tune on).
Under ``TRITON_INTERPRET=1`` (CPU tests) one small fixed config is used.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------ kernels
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    KV_LEN,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    n_heads,
    seq_q,
    seq_k,
    head_dim,
    scale_log2,
    HAS_KV_LEN: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kv_len = tl.load(KV_LEN + b) if HAS_KV_LEN else seq_k
    kv_len = tl.minimum(kv_len, seq_k)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seq_q
    mask_d = offs_d < head_dim
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_n = kv_len
    if CAUSAL:  # query i sees keys j <= i + (seq_k - seq_q) (bottom-right aligned)
        end_n = tl.minimum(end_n, (pid_m + 1) * BLOCK_M + seq_k - seq_q)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        keep = cols[None, :] < kv_len
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + seq_k - seq_q)
        k = tl.load(
            K + b * stride_kb + h * stride_kh + cols[:, None] * stride_ks + offs_d[None, :],
            mask=(cols[:, None] < kv_len) & mask_d[None, :],
            other=0.0,
        )
        v = tl.load(
            V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vs + offs_d[None, :],
            mask=(cols[:, None] < kv_len) & mask_d[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k)) * scale_log2  # (BLOCK_M, BLOCK_N), base-2 logits
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0  # every key masked: output 0, LSE -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(
        empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634
    )
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )
    tl.store(LSE + bh * seq_q + offs_m, lse, mask=mask_m)


@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    KV_LEN,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    n_heads,
    seq_q,
    seq_k,
    head_dim,
    scale,
    scale_log2,
    HAS_KV_LEN: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dK, dV of one key block, looping over query blocks. Q/DO share strides; K/V/DK/DV too."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kv_len = tl.load(KV_LEN + b) if HAS_KV_LEN else seq_k
    kv_len = tl.minimum(kv_len, seq_k)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    kv_mask = (offs_n[:, None] < kv_len) & mask_d[None, :]
    kv_off = b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start_m = 0
    if CAUSAL:  # only queries i >= j - (seq_k - seq_q) see these keys
        start_m = tl.maximum(pid_n * BLOCK_N - (seq_k - seq_q), 0) // BLOCK_M * BLOCK_M
    for m0 in range(start_m, seq_q, BLOCK_M):
        rows = m0 + offs_m
        row_mask = rows < seq_q
        q_off = b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(Q + q_off, mask=row_mask[:, None] & mask_d[None, :], other=0.0)
        do = tl.load(DO + q_off, mask=row_mask[:, None] & mask_d[None, :], other=0.0)
        lse = tl.load(LSE + bh * seq_q + rows, mask=row_mask, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
        delta = tl.load(DELTA + bh * seq_q + rows, mask=row_mask, other=0.0)
        keep = (offs_n[None, :] < kv_len) & row_mask[:, None]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= rows[:, None] + seq_k - seq_q)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    # padded keys (>= kv_len) get zero gradients written, not left uninitialized
    out_mask = (offs_n[:, None] < seq_k) & mask_d[None, :]
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    KV_LEN,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    n_heads,
    seq_q,
    seq_k,
    head_dim,
    scale,
    scale_log2,
    HAS_KV_LEN: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dQ of one query block, looping over key blocks."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    kv_len = tl.load(KV_LEN + b) if HAS_KV_LEN else seq_k
    kv_len = tl.minimum(kv_len, seq_k)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    row_mask = offs_m < seq_q
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_mask[:, None] & mask_d[None, :], other=0.0)
    do = tl.load(DO + q_off, mask=row_mask[:, None] & mask_d[None, :], other=0.0)
    lse = tl.load(LSE + bh * seq_q + offs_m, mask=row_mask, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
    delta = tl.load(DELTA + bh * seq_q + offs_m, mask=row_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_n = kv_len
    if CAUSAL:
        end_n = tl.minimum(end_n, (pid_m + 1) * BLOCK_M + seq_k - seq_q)
    for n0 in range(0, end_n, BLOCK_N):
        cols = n0 + offs_n
        kv_off = b * stride_kb + h * stride_kh + cols[:, None] * stride_ks + offs_d[None, :]
        kv_mask = (cols[:, None] < kv_len) & mask_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        keep = (cols[None, :] < kv_len) & row_mask[:, None]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + seq_k - seq_q)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(
        DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=row_mask[:, None] & mask_d[None, :]
    )


# ----------------------------------------------------------------------------------- launcher
def _interpreting() -> bool:
    return triton.knobs.runtime.interpret


@functools.lru_cache(maxsize=8)
def _block_sizes(capability: tuple[int, int] | None, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) per GPU generation; small blocks in the interpreter.

    Hopper/Blackwell (sm >= 9) have 228 KB of shared memory per SM: 128 x 64 tiles at head
    dim 128; Ampere 128 x 64 at d <= 64 else 64 x 64; older parts 64 x 32."""
    if capability is None:
        return 16, 16, 1
    major = capability[0]
    if major >= 9:
        return 128, 64, 8
    if major == 8:
        return (128, 64, 4) if head_dim <= 64 else (64, 64, 4)
    return 64, 32, 4


def _check(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lengths: torch.Tensor | None
) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim] with k.shape == v.shape; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head_dim"
        )
    if kv_lengths is not None and tuple(kv_lengths.shape) != (q.shape[0],):
        raise ValueError(
            f"kv_lengths must have shape ({q.shape[0]},), got {tuple(kv_lengths.shape)}"
        )
    if not q.is_cuda and not _interpreting():
        raise ValueError(
            "Triton flash attention needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)"
        )


def _launch_meta(q: torch.Tensor) -> tuple[int, int, int, int]:
    d = q.shape[-1]
    cap = None if _interpreting() else torch.cuda.get_device_capability(q.device)
    block_m, block_n, warps = _block_sizes(cap, d)
    return block_m, block_n, max(16, triton.next_power_of_2(d)), warps


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, kv_lengths, causal):  # type: ignore[no-untyped-def, override]
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        b, sq, h, d = q.shape
        sk = k.shape[1]
        out = torch.empty_like(q)
        lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
        block_m, block_n, block_d, warps = _launch_meta(q)
        lens = (
            kv_lengths.to(device=q.device, dtype=torch.int32) if kv_lengths is not None else lse
        )  # dummy ptr
        grid = (triton.cdiv(sq, block_m), b * h)
        _fwd_kernel[grid](
            q,
            k,
            v,
            out,
            lse,
            lens,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            h,
            sq,
            sk,
            d,
            scale * LOG2E,
            HAS_KV_LEN=kv_lengths is not None,
            CAUSAL=causal,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            num_warps=warps,
        )
        ctx.save_for_backward(q, k, v, out, lse, lens)
        ctx.scale, ctx.causal, ctx.has_len = scale, causal, kv_lengths is not None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[no-untyped-def, override]
        q, k, v, out, lse, lens = ctx.saved_tensors
        dout = dout.contiguous()
        delta = _row_dot(dout, out)  # (B, H, Sq)
        if dlse is not None:
            # d lse_i / d s_ij = p_ij, so ds = p * (dp - delta + dlse): the same kernels with
            # delta' = delta - dlse. Rows with every key masked have p = 0 and get nothing.
            delta = delta - torch.where(torch.isinf(lse), 0.0, dlse.float())
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        _launch_backward(
            q, k, v, dout, lse, delta, (dq, dk, dv), lens, ctx.scale, ctx.has_len, ctx.causal
        )
        return dq, dk, dv, None, None, None


def _row_dot(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``delta = rowsum(dO * O)`` in fp32, ``[b, s, h, d] -> [b, h, s]`` contiguous."""
    return (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()


def _launch_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lens: torch.Tensor,
    scale: float,
    has_len: bool,
    causal: bool,
) -> None:
    """Fill ``grads = (dq, dk, dv)`` (any float dtype, shaped as q, k, v) from the two kernels.

    The kernels take one stride set for Q/dO/dQ and one for K/V/dK/dV, so all are made
    contiguous here; ``lse``/``delta`` are fp32 ``[b, h, sq]``."""
    q, k, v, dout = (t.contiguous() for t in (q, k, v, dout))
    dq, dk, dv = grads
    assert all(g.is_contiguous() for g in grads) and dq.shape == q.shape and dk.shape == k.shape
    b, sq, h, d = q.shape
    sk = k.shape[1]
    block_m, block_n, block_d, warps = _launch_meta(q)
    common = (h, sq, sk, d, scale, scale * LOG2E)
    meta = {
        "HAS_KV_LEN": has_len,
        "CAUSAL": causal,
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": block_d,
        "num_warps": warps,
    }
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    _bwd_dkdv_kernel[(triton.cdiv(sk, block_n), b * h)](
        q, k, v, dout, lse, delta, dk, dv, lens, *strides, *common, **meta
    )
    _bwd_dq_kernel[(triton.cdiv(sq, block_m), b * h)](
        q, k, v, dout, lse, delta, dq, lens, *strides, *common, **meta
    )


def _check_block_backward(
    q: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor
) -> None:
    b, sq, h, _ = q.shape
    if dout.shape != q.shape:
        raise ValueError(f"dout {tuple(dout.shape)} must have q's shape {tuple(q.shape)}")
    for name, t in (("lse", lse), ("delta", delta)):
        if tuple(t.shape) != (b, h, sq):
            raise ValueError(
                f"{name} must be [batch, heads, seq_q] = {(b, h, sq)}, got {tuple(t.shape)}"
            )


def flash_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    kv_lengths: torch.Tensor | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels; ``[batch, seq, heads, head_dim]`` in, same out (+ LSE ``[b, h, sq]``)."""
    _check(q, k, v, kv_lengths)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _FlashAttention.apply(q, k, v, scale, kv_lengths, causal)
    return (out, lse) if return_lse else out


def flash_attention_block_backward_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one K/V block given the *global* ``lse`` and ``delta`` (ring attention).

    ``P = exp(q k^T * scale - lse)`` is this block's share of the softmax over all blocks,
    so summing the returned ``dq`` over blocks, and each block's ``dk``/``dv``, gives the
    gradients of the whole attention. ``delta = rowsum(dO * O)`` of the merged output, fp32
    ``[b, h, sq]`` like ``lse``. No masks: every key of the block is seen by every query.
    Returned in fp32, the dtype ring attention accumulates blocks in.
    """
    _check(q, k, v, None)
    _check_block_backward(q, dout, lse, delta)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lse, delta = (t.float().contiguous() for t in (lse, delta))
    grads = tuple(torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    dq, dk, dv = grads
    _launch_backward(q, k, v, dout, lse, delta, (dq, dk, dv), lse, scale, False, False)
    return dq, dk, dv


# ---------------------------------------------------------------------------------- reference
def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    kv_lengths: torch.Tensor | None = None,
    causal: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch attention: SDPA when no LSE is needed, an explicit softmax otherwise.
    Rows whose keys are all masked give 0 and LSE ``-inf``, as the kernel does."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    mask = _keep_mask(q.shape[1], k.shape[1], kv_lengths, causal, q.device)
    if not return_lse and mask is None:
        return F.scaled_dot_product_attention(qh, kh, vh, scale=scale).transpose(1, 2)
    scores = (qh.float() @ kh.float().transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Sq)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = (probs @ vh.float()).to(q.dtype).transpose(1, 2)
    return (out, lse) if return_lse else out


def attention_block_backward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    *,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch :func:`flash_attention_block_backward_triton`, in fp32 (or fp64 inputs'
    dtype): ``ds = P * (dO V^T - delta)``, ``dq = ds K * scale``, ``dk = ds^T Q * scale``,
    ``dv = P^T dO``."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"q, k, v must be [batch, seq, heads, head_dim] with k.shape == v.shape; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    _check_block_backward(q, dout, lse, delta)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    acc = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh, doh = (t.transpose(1, 2).to(acc) for t in (q, k, v, dout))  # (B, H, S, D)
    scores = (qh @ kh.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    probs = torch.exp(scores - lse.to(acc).unsqueeze(-1))
    ds = probs * (doh @ vh.transpose(-1, -2) - delta.to(acc).unsqueeze(-1))
    dq = (ds @ kh) * scale
    dk = (ds.transpose(-1, -2) @ qh) * scale
    dv = probs.transpose(-1, -2) @ doh
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _keep_mask(
    seq_q: int, seq_k: int, kv_lengths: torch.Tensor | None, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Boolean keep-mask broadcastable to (B, H, Sq, Sk), or None when nothing is masked."""
    mask = None
    if kv_lengths is not None:
        keys = torch.arange(seq_k, device=device)
        mask = (keys[None, :] < kv_lengths.to(device)[:, None])[:, None, None, :]  # (B, 1, 1, Sk)
    if causal:
        tri = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device).tril(seq_k - seq_q)
        mask = tri if mask is None else mask & tri
    return mask
