"""Fused adaLN modulation and gated residual, the DiT's element-wise glue, in Triton.

``adaln_modulate(x, shift, scale) = LayerNorm(x) * (1 + scale) + shift`` (no affine; shift and
scale per sample, ``[batch, hidden]`` broadcast over the sequence) and
``gated_residual(x, gate, y) = x + gate * y``. Unfused, PyTorch makes three to five passes
over the activation; each kernel here makes one pass forward and one backward. One program
handles one token row; the per-sample reductions of the backward (d shift, d scale, d gate)
are summed over the sequence by PyTorch from per-row partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _adaln_fwd_kernel(X, SHIFT, SCALE, Y, MEAN, RSTD, seq, hidden, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = row // seq
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(X + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / hidden
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / hidden + eps)
    shift = tl.load(SHIFT + b * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(Y + row * hidden + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _adaln_bwd_kernel(X, SCALE, DY, MEAN, RSTD, DX, DSCALE_ROW, seq, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = row // seq
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(X + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * (1.0 + scale)
    dx = rstd * (g - tl.sum(g, 0) / hidden - xhat * tl.sum(g * xhat, 0) / hidden)
    tl.store(DX + row * hidden + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DSCALE_ROW + row * hidden + cols, dy * xhat, mask=mask)


@triton.jit
def _gated_residual_kernel(X, GATE, Y, OUT, seq, hidden, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = row // seq
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(X + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * hidden + cols, (x + gate * y).to(OUT.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, per_sample: torch.Tensor, name: str) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, seq, hidden], got {tuple(x.shape)}")
    b, s, h = x.shape
    if tuple(per_sample.shape) not in ((b, h), (b, 1, h)):
        raise ValueError(
            f"{name} must be [batch, hidden] or [batch, 1, hidden] = ({b}, {h}), got {tuple(per_sample.shape)}"
        )
    if not x.is_cuda and not triton.knobs.runtime.interpret:
        raise ValueError(
            "Triton element-wise kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)"
        )
    return b, s, h


class _AdaLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):  # type: ignore[no-untyped-def, override]
        b, s, h = _rows(x, shift, "shift")
        _rows(x, scale, "scale")
        x, shift, scale = (
            x.contiguous(),
            shift.reshape(b, h).contiguous(),
            scale.reshape(b, h).contiguous(),
        )
        y = torch.empty_like(x)
        mean = torch.empty(b * s, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(h)
        _adaln_fwd_kernel[(b * s,)](x, shift, scale, y, mean, rstd, s, h, eps, BLOCK=block)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shape = (b, s, h)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[no-untyped-def, override]
        x, scale, mean, rstd = ctx.saved_tensors
        b, s, h = ctx.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        dscale_rows = torch.empty(b, s, h, device=x.device, dtype=torch.float32)
        _adaln_bwd_kernel[(b * s,)](
            x, scale, dy, mean, rstd, dx, dscale_rows, s, h, BLOCK=triton.next_power_of_2(h)
        )
        dshift = dy.float().sum(1).to(scale.dtype)
        dscale = dscale_rows.sum(1).to(scale.dtype)
        return dx, dshift, dscale, None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):  # type: ignore[no-untyped-def, override]
        b, s, h = _rows(x, gate, "gate")
        if y.shape != x.shape:
            raise ValueError(f"y {tuple(y.shape)} must match x {tuple(x.shape)}")
        x, y, gate = x.contiguous(), y.contiguous(), gate.reshape(b, h).contiguous()
        out = torch.empty_like(x)
        _gated_residual_kernel[(b * s,)](x, gate, y, out, s, h, BLOCK=triton.next_power_of_2(h))
        ctx.save_for_backward(gate, y)
        ctx.gate_shape = gate.shape
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[no-untyped-def, override]
        gate, y = ctx.saved_tensors
        dy = dout * gate[:, None, :]
        dgate = (dout.float() * y.float()).sum(1).to(gate.dtype)
        return dout, dgate, dy


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """Triton ``LayerNorm(x) * (1 + scale) + shift``; x ``[b, s, h]``, shift/scale ``[b, h]``."""
    out = _AdaLN.apply(x, shift, scale, eps)
    assert isinstance(out, torch.Tensor)
    return out


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Triton ``x + gate * y``; x, y ``[b, s, h]``, gate ``[b, h]``."""
    out = _GatedResidual.apply(x, gate, y)
    assert isinstance(out, torch.Tensor)
    return out


def adaln_modulate_reference(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    b, _, h = x.shape
    normed = torch.nn.functional.layer_norm(x, (h,), eps=eps)
    return normed * (1 + scale.reshape(b, 1, h)) + shift.reshape(b, 1, h)


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b, _, h = x.shape
    return x + gate.reshape(b, 1, h) * y
