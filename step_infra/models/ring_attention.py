"""Ring context-parallel attention: K/V blocks travel rank to rank, memory O(local K/V).

Each context-parallel rank holds a contiguous chunk of the token sequence. Queries stay where
they are; the K/V chunks go round the ring (rank r sends to r + 1, receives from r - 1), so
after ``cp`` steps every rank has attended its queries to every chunk. While one block is
attended the next is already on the wire (point-to-point ``batch_isend_irecv``, which gloo
and NCCL both run), and block outputs are merged online by their log-sum-exp in fp32, so the
result is exact softmax attention over the whole sequence.

Why an ``autograd.Function`` of its own: autograd through the loop would save every block's
K/V and probabilities (memory O(full K/V)). This one saves only q, the local k and v, the
merged output and the merged LSE. Its backward sends the K/V blocks round the ring again and
recomputes each block's share with the *global* LSE and ``delta = rowsum(dO * O)``
(:func:`step_infra.kernels.dispatch.flash_attention_block_backward`); dQ is summed locally,
while the dK/dV of a block are summed in an fp32 buffer that travels one step behind its
block, so after ``cp`` steps (one more hop than the blocks) each rank holds the gradient of
its own chunk. This is the schedule of torch's private templated ring backward
(``torch.distributed.tensor.experimental._attention``), written here because that one is
private, has no CPU backward in its public API and all-gathers by default.

Restrictions, as the DiT uses it: no key masks (self-attention over video tokens never pads),
no causal mask, every rank holds as many tokens (``parallelize`` checks that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from step_infra.kernels.dispatch import Backend, flash_attention, flash_attention_block_backward
from step_infra.models.parallel import ParallelGroups

_KV_TAG = 0  # the K/V blocks
_GRAD_TAG = 1  # the dK/dV buffers travelling behind them (gloo matches messages by tag)


@dataclass(slots=True)
class _InFlight:
    """One posted exchange: the buffer being received, and the sent one kept alive."""

    received: torch.Tensor
    sent: torch.Tensor
    works: list[Any]

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.received


class _Ring:
    """This rank's place in a context-parallel group: it sends to ``rank + 1`` and receives
    from ``rank - 1`` (global ranks, as point-to-point ops address peers)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.size = int(group.size())
        rank = int(group.rank())
        if self.size > 1:
            self.next = dist.get_global_rank(group, (rank + 1) % self.size)
            self.prev = dist.get_global_rank(group, (rank - 1) % self.size)

    def shift(self, tensor: torch.Tensor, tag: int) -> _InFlight:
        """Start sending ``tensor`` on and receiving the previous rank's into a new buffer."""
        received = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, self.next, self.group, tag),
            dist.P2POp(dist.irecv, received, self.prev, self.group, tag),
        ]
        return _InFlight(received, tensor, dist.batch_isend_irecv(ops))


def _pack(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """K and V ``[s, b, h, d]`` as the one buffer that travels, ``(2, B, S, H, D)``: one
    message per step, and each half already in the kernels' contiguous layout."""
    return torch.stack((k.transpose(0, 1), v.transpose(0, 1)))


def _block_forward(
    qb: torch.Tensor, kv: torch.Tensor, backend: Backend
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the queries ``(B, Sq, H, D)`` to one block ``kv = (2, B, Sk, H, D)``."""
    out, lse = flash_attention(qb, kv[0], kv[1], return_lse=True, backend=backend)
    return out, lse  # (B, Sq, H, D), (B, H, Sq) fp32


def _merge(
    acc: torch.Tensor | None, acc_lse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one block's normalized output into the running fp32 output by log-sum-exp:
    ``O = O_a * exp(lse_a - lse) + O_b * exp(lse_b - lse)``, ``lse = logaddexp(lse_a, lse_b)``.
    """
    if acc is None or acc_lse is None:
        return out.float(), lse.float()
    new_lse = torch.logaddexp(acc_lse, lse)
    keep = torch.exp(acc_lse - new_lse).transpose(1, 2).unsqueeze(-1)  # (B, Sq, H, 1)
    take = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)
    return acc.mul_(keep).add_(out.float() * take), new_lse


def _ring_forward(
    ring: _Ring, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Backend
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged output ``(Sq, B, H, D)`` in q's dtype and its LSE ``(B, H, Sq)`` in fp32."""
    qb = q.transpose(0, 1)  # (B, Sq, H, D), a view: the kernels take strides
    kv = _pack(k, v)
    acc: torch.Tensor | None = None
    acc_lse: torch.Tensor | None = None
    for step in range(ring.size):
        incoming = ring.shift(kv, _KV_TAG) if step + 1 < ring.size else None
        acc, acc_lse = _merge(acc, acc_lse, *_block_forward(qb, kv, backend))
        if incoming is not None:
            kv = incoming.wait()
    assert acc is not None and acc_lse is not None
    return acc.to(q.dtype).transpose(0, 1).contiguous(), acc_lse


def _ring_backward(
    ring: _Ring,
    saved: tuple[torch.Tensor, ...],
    dout: torch.Tensor,
    backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (``[s, b, h, d]``, inputs' dtypes) of this rank's chunk."""
    q, k, v, out, lse = saved
    qb, dob = (t.transpose(0, 1).contiguous() for t in (q, dout))  # (B, Sq, H, D), once
    delta = (dout.float() * out.float()).sum(-1).permute(1, 2, 0).contiguous()  # (B, H, Sq)
    dq = torch.zeros(qb.shape, dtype=torch.float32, device=q.device)
    kv = _pack(k, v)
    grads: torch.Tensor | None = None  # (2, B, Sk, H, D) fp32: dK/dV of the block in `kv`
    behind: _InFlight | None = None  # the previous rank's buffer for the block now held
    for step in range(ring.size):
        incoming = ring.shift(kv, _KV_TAG) if step + 1 < ring.size else None
        dq_i, dk_i, dv_i = flash_attention_block_backward(
            qb, kv[0], kv[1], dob, lse, delta, backend=backend
        )
        dq += dq_i
        if behind is None:
            grads = torch.stack((dk_i, dv_i))
        else:
            grads = behind.wait()
            grads[0].add_(dk_i)
            grads[1].add_(dv_i)
        if ring.size > 1:  # pass it on to the rank that attends this block next
            behind = ring.shift(grads, _GRAD_TAG)
        if incoming is not None:
            kv = incoming.wait()
    if behind is not None:  # the last hop brings each chunk's gradient home
        grads = behind.wait()
    assert grads is not None
    dk, dv = grads.to(k.dtype).transpose(1, 2).unbind(0)  # back to [s, b, h, d]
    return dq.to(q.dtype).transpose(0, 1), dk, dv


class _RingAttentionFunction(torch.autograd.Function):
    """Ring attention over ``group``; saves q, k, v, out, lse only (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any, backend: Backend
    ) -> torch.Tensor:
        ring = _Ring(group)
        out, lse = _ring_forward(ring, q, k, v, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.backend = ring, backend
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dq, dk, dv = _ring_backward(ctx.ring, ctx.saved_tensors, dout, ctx.backend)
        return dq, dk, dv, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            "ring attention takes q, k, v as [seq, batch, heads, head_dim] with "
            f"k.shape == v.shape; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head_dim"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must share dtype and device; got {q.dtype}/{q.device}, "
            f"{k.dtype}/{k.device}, {v.dtype}/{v.device}"
        )


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: Any, *, backend: Backend = "auto"
) -> torch.Tensor:
    """Softmax attention of this rank's queries to the keys of every rank in ``group``.

    q, k, v are this rank's chunks, ``[seq_local, batch, heads, head_dim]`` (megatron layout);
    returns ``[seq_local, batch, heads, head_dim]``; differentiable. Every rank of ``group``
    must call it with chunks of the same shape.
    """
    _check_inputs(q, k, v)
    out = _RingAttentionFunction.apply(q, k, v, group, backend)
    assert isinstance(out, torch.Tensor)
    return out


class RingAttention(nn.Module):
    """Core attention with ring context parallelism over ``groups.cp``:
    ``[s_local, b, heads, d] -> [s_local, b, heads * d]``, as ``LocalAttention``."""

    def __init__(self, *, groups: ParallelGroups, backend: Backend = "auto") -> None:
        super().__init__()
        self.groups = groups
        self.backend: Backend = backend

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if kv_lengths is not None:
            raise ValueError(
                f"ring attention has no key mask, got kv_lengths={kv_lengths.tolist()}; use it "
                "for self-attention over unpadded tokens (cross-attention uses LocalAttention)"
            )
        return ring_attention(q, k, v, self.groups.cp, backend=self.backend).flatten(2)
