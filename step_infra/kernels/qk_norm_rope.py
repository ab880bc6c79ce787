"""Fused per-head RMSNorm and 3D rotary embedding of q or k, in Triton.

The DiT normalizes q and k per head (RMSNorm with a learned gain) and then rotates them by 3D
RoPE (the head dim split over frame, height and width, see ``step_infra.models.rope``). Done
apart, that is four passes over q and k; here it is one per tensor forward and one backward.
Layout and convention are the models' own: ``[seq, batch, heads, head_dim]`` and
"rotate half" pairs (channel ``i`` with ``i + d/2``), angles ``[seq, head_dim / 2]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fwd_kernel(X, W, ANG, Y, RSTD, rows_per_pos, half, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    pos = row // rows_per_pos
    i = tl.arange(0, BLOCK)
    m = i < half
    base = X + row * 2 * half
    x1 = tl.load(base + i, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base + half + i, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * half) + eps)
    y1 = x1 * rstd * tl.load(W + i, mask=m, other=0.0).to(tl.float32)
    y2 = x2 * rstd * tl.load(W + half + i, mask=m, other=0.0).to(tl.float32)
    a = tl.load(ANG + pos * half + i, mask=m, other=0.0)
    c, s = tl.cos(a), tl.sin(a)
    out = Y + row * 2 * half
    tl.store(out + i, (y1 * c - y2 * s).to(Y.dtype.element_ty), mask=m)
    tl.store(out + half + i, (y2 * c + y1 * s).to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + row, rstd)


@triton.jit
def _bwd_kernel(X, W, ANG, DOUT, RSTD, DX, DW_ROW, rows_per_pos, half, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    pos = row // rows_per_pos
    i = tl.arange(0, BLOCK)
    m = i < half
    base = row * 2 * half
    x1 = tl.load(X + base + i, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + half + i, mask=m, other=0.0).to(tl.float32)
    do1 = tl.load(DOUT + base + i, mask=m, other=0.0).to(tl.float32)
    do2 = tl.load(DOUT + base + half + i, mask=m, other=0.0).to(tl.float32)
    w1 = tl.load(W + i, mask=m, other=0.0).to(tl.float32)
    w2 = tl.load(W + half + i, mask=m, other=0.0).to(tl.float32)
    a = tl.load(ANG + pos * half + i, mask=m, other=0.0)
    c, s = tl.cos(a), tl.sin(a)
    rstd = tl.load(RSTD + row)
    dy1 = do1 * c + do2 * s  # rotation transposed
    dy2 = do2 * c - do1 * s
    tl.store(DW_ROW + base + i, dy1 * x1 * rstd, mask=m)
    tl.store(DW_ROW + base + half + i, dy2 * x2 * rstd, mask=m)
    g1, g2 = dy1 * w1, dy2 * w2
    dot = (tl.sum(g1 * x1, 0) + tl.sum(g2 * x2, 0)) / (2 * half)
    tl.store(
        DX + base + i, (rstd * g1 - x1 * rstd * rstd * rstd * dot).to(DX.dtype.element_ty), mask=m
    )
    tl.store(
        DX + base + half + i,
        (rstd * g2 - x2 * rstd * rstd * rstd * dot).to(DX.dtype.element_ty),
        mask=m,
    )


class _QKNormRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, angles, eps):  # type: ignore[no-untyped-def, override]
        s, b, h, d = x.shape
        x = x.contiguous()
        angles = angles.to(device=x.device, dtype=torch.float32).contiguous()
        y = torch.empty_like(x)
        rstd = torch.empty(s * b * h, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(d // 2)
        _fwd_kernel[(s * b * h,)](x, weight, angles, y, rstd, b * h, d // 2, eps, BLOCK=block)
        ctx.save_for_backward(x, weight, angles, rstd)
        return y

    @staticmethod
    def backward(ctx, dout):  # type: ignore[no-untyped-def, override]
        x, weight, angles, rstd = ctx.saved_tensors
        s, b, h, d = x.shape
        dx = torch.empty_like(x)
        dw_rows = torch.empty(s * b * h, d, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(d // 2)
        _bwd_kernel[(s * b * h,)](
            x, weight, angles, dout.contiguous(), rstd, dx, dw_rows, b * h, d // 2, BLOCK=block
        )
        return dx, dw_rows.sum(0).to(weight.dtype), None, None


def qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, angles: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """RMSNorm over the head dim (gain ``weight [head_dim]``) then rotary embedding by
    ``angles [seq, head_dim / 2]``; ``x`` is ``[seq, batch, heads, head_dim]``."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(
            f"x must be [seq, batch, heads, head_dim] with an even head_dim, got {tuple(x.shape)}"
        )
    if tuple(weight.shape) != (x.shape[-1],) or tuple(angles.shape) != (
        x.shape[0],
        x.shape[-1] // 2,
    ):
        raise ValueError(
            f"weight must be ({x.shape[-1]},) and angles ({x.shape[0]}, {x.shape[-1] // 2}); "
            f"got {tuple(weight.shape)} and {tuple(angles.shape)}"
        )
    if not x.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(
            "Triton qk_norm_rope needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)"
        )
    out = _QKNormRope.apply(x, weight, angles, eps)
    assert isinstance(out, torch.Tensor)
    return out


def qk_norm_rope_reference(
    x: torch.Tensor, weight: torch.Tensor, angles: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """RMSNorm then rotate-half RoPE in plain PyTorch (as ``step_infra.models``)."""
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    full = torch.cat([angles, angles], dim=-1)[:, None, None, :].to(x.dtype)
    x1, x2 = normed.chunk(2, dim=-1)
    return normed * full.cos() + torch.cat([-x2, x1], dim=-1) * full.sin()
