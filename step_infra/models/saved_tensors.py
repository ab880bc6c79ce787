"""Count what a forward keeps for the backward: bytes per DiT block and per kind of tensor.

The emulator prices activation memory with coefficients (``step_infra.emulator.counts.
dit_activation_terms``); this module measures the same thing on the model itself, so the two
can be compared term by term (``tests/emulator/test_saved_tensors_vs_emulator.py``).

How it counts:

- **Saved tensors** are seen through ``torch.autograd.graph.saved_tensors_hooks`` during one
  forward, and deduplicated by storage (``UntypedStorage._cdata``, the address of the
  storage object: it identifies storages on the meta device too, where every ``data_ptr`` is
  0). Views saved by several ops (``v`` of the fused QKV, the attention output that the output
  projection saves again) count once. A storage's size is read when the forward is done, so
  storage freed after saving (selective recompute's GELU output) counts as 0. The counter
  holds the storages, not the tensors, so none is freed and its address reused meanwhile;
  a storage counts only while the graph still holds one of its saved tensors.
- **Activation checkpointing** (``torch.distributed._composable.checkpoint``, what
  :func:`~step_infra.models.recompute.apply_recompute` uses): the checkpoint's own
  saved-tensor hooks are innermost inside the block, so the tensors it would recompute never
  reach this counter. What it does keep are its inputs (captured for the recompute, not
  saved through hooks): they are recorded from a forward pre-hook, kind
  ``checkpoint_input``.
- **Attribution.** Each storage belongs to the innermost block whose forward saved it first;
  the block's conditioning inputs (modulation, text, RoPE tables: every argument but the
  hidden states) belong to ``"shared"`` since all blocks save the same tensors; everything
  outside the blocks to ``"outside"``. The kind (:data:`KINDS`) is read from the saving
  module's path inside the block and the module that produced the storage.
- **Attention as the GPU runs it.** On the CPU and the meta device the project's attention
  dispatches to a PyTorch reference whose masked path (cross-attention) and meta SDPA keep
  ``seq x seq`` scores; the Triton kernel that runs on GPUs keeps only ``q, k, v, out, lse``.
  With ``attention="flash"`` (the default) the models' core attention calls
  :class:`FlashSaves` instead: the kernel's forward contract (``_FlashAttention``) without its
  launch, saving exactly what the kernel saves (a test compares the two under
  ``TRITON_INTERPRET=1``); ``attention="triton"`` calls the kernel itself (CUDA, or the
  interpreter: slow) and ``attention="as_run"`` counts whatever the device runs.

``state_bytes`` counts parameters, gradients and optimizer state per rank, as the trainer holds
them (plain AdamW, or ZeRO-1's local shard).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed._composable.contract import _get_registry
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from step_infra.kernels.flash_attention import attention_reference

# The kinds of saved tensor a DiT block keeps, and who keeps them (the emulator's
# ``dit_activation_terms`` has one term per kind, under the same name).
KINDS: dict[str, str] = {
    "norm_input": "LayerNorm (norm1-3) inputs: the residual stream, 3 x h per token",
    "norm_stats": "LayerNorm mean and rstd, 2 per norm per token",
    "modulation_input": "norm1/norm3 outputs, kept by the adaLN multiply norm(x) * (1 + scale)",
    "linear_input": "inputs of linear_qkv, cross-attention linear_q and linear_fc1",
    "gate_input": "self-attention and MLP outputs, kept by the gated residual gate * y",
    "qkv": "the fused QKV output (q/k RMSNorm inputs and attention's v are views of it)",
    "qk_norm": "per-head RMSNorm (self q, k; cross q): fp32 input and normalized value",
    "qk_norm_stats": "per-head RMSNorm rstd, fp32",
    "attention_qk": "q and k given to the attention kernel (RoPE outputs, normalized cross q)",
    "attention_out": "attention outputs (kernel and output projection save the same tensor)",
    "attention_out_copy": "F.linear's contiguous copy of a transposed attention output (mb > 1)",
    "attention_lse": "attention log-sum-exp, fp32, per head per query",
    "mlp_fc1_output": "linear_fc1 output, kept by GELU",
    "mlp_gelu_output": "GELU output, kept by linear_fc2 (freed by selective recompute)",
    "text_kv": "cross-attention K/V of the text tokens and their k RMSNorm",
    "modulation_vectors": "per-sample adaLN vectors: (1 + scale) x 2 and the 6 x h table sum",
    "kv_lengths": "int32 text lengths given to the attention kernel",
    "checkpoint_input": "the block input a full-recompute checkpoint keeps",
}
Attention = Literal["flash", "triton", "as_run"]


@dataclass(frozen=True, slots=True)
class Saved:
    """One storage kept for the backward."""

    scope: str  # "layers.3", "shared" or "outside"
    kind: str  # in a block a key of KINDS; shared: the block argument; outside: the module
    module: str  # module path of the first op that saved it
    op: str  # that op (torch function name; "" for an autograd Function's ctx)
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # storage bytes when the forward was done (0: freed or released)


@dataclass(slots=True)
class SavedTensorCount:
    """The storages one forward kept; sums by scope and kind."""

    saved: list[Saved]

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved)

    def scopes(self) -> dict[str, int]:
        """Bytes per scope (each block, ``shared``, ``outside``)."""
        out: dict[str, int] = {}
        for s in self.saved:
            out[s.scope] = out.get(s.scope, 0) + s.nbytes
        return out

    def kinds(self, scope: str | None = None) -> dict[str, int]:
        """Bytes per kind in ``scope`` (all scopes when ``None``); kinds with 0 bytes kept."""
        out: dict[str, int] = {}
        for s in self.saved:
            if scope is None or s.scope == scope:
                out[s.kind] = out.get(s.kind, 0) + s.nbytes
        return out


class FlashSaves(torch.autograd.Function):
    """The Triton kernel's autograd contract without the kernel: returns ``(out, lse)`` of
    ``[batch, seq, heads, head_dim]`` attention and saves what ``_FlashAttention.forward``
    saves: ``q, k, v`` (a copy only if the last dim is strided), ``out``, the fp32 LSE
    ``[batch, heads, seq_q]`` and the int32 key lengths (the LSE itself when there are
    none). Values come from the PyTorch reference (nothing is computed on the meta device);
    the backward recomputes through the reference, so gradients are right too."""

    @staticmethod
    def forward(ctx: Any, q: Any, k: Any, v: Any, scale: Any, kv_lengths: Any) -> Any:
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        b, sq, h, _ = q.shape
        if q.device.type == "meta":
            out = torch.empty_like(q)
            lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
        else:
            out, lse = attention_reference(  # type: ignore[misc]
                q, k, v, softmax_scale=scale, kv_lengths=kv_lengths, return_lse=True
            )
            out = out.contiguous()
        lens = kv_lengths.to(device=q.device, dtype=torch.int32) if kv_lengths is not None else lse
        ctx.save_for_backward(q, k, v, out, lse, lens)
        ctx.scale, ctx.has_len = scale, kv_lengths is not None
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: Any, dlse: Any) -> Any:
        q, k, v, _, _, lens = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = attention_reference(
                *leaves, softmax_scale=ctx.scale, kv_lengths=lens if ctx.has_len else None
            )
            grads = torch.autograd.grad(out, leaves, dout)
        return (*grads, None, None)


def flash_saves(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    kv_lengths: torch.Tensor | None = None,
    return_lse: bool = False,
    **_backend: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``step_infra.kernels.flash_attention``'s signature on :class:`FlashSaves`."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = FlashSaves.apply(q, k, v, scale, kv_lengths)
    return (out, lse) if return_lse else out


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: Any) -> Any:
    from step_infra.kernels.dispatch import flash_attention

    return flash_attention(q, k, v, **{**kwargs, "backend": "triton"})


@contextlib.contextmanager
def _route_attention(attention: Attention) -> Iterator[None]:
    """Route the DiT's core attention (``step_infra.models.attention``) to :func:`flash_saves`
    (``"flash"``) or to the Triton kernel (``"triton"``: CUDA, or ``TRITON_INTERPRET=1``)."""
    from step_infra.models import attention as module

    original = getattr(module, "flash_attention", None)
    if original is None:
        raise RuntimeError(
            "step_infra.models.attention no longer calls a module-level flash_attention; "
            "update saved_tensors._route_attention or count with attention='as_run'"
        )
    module.flash_attention = flash_saves if attention == "flash" else _triton  # type: ignore[assignment]
    try:
        yield
    finally:
        module.flash_attention = original  # type: ignore[assignment]


class _CurrentOp(TorchFunctionMode):
    """Remembers the outermost torch function running (the op whose backward saves)."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        outer, self.name = self.name, getattr(func, "__name__", str(func))
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.name = outer


@dataclass(slots=True)
class _Record:
    storage: torch.UntypedStorage
    module: str
    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    scope: str
    alive: list[weakref.ref[torch.Tensor]] = field(default_factory=list)
    forced: str | None = None  # kind fixed at record time (checkpoint inputs)


def _key(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)]


def _is_checkpointed(module: nn.Module) -> bool:
    return "checkpoint" in (_get_registry(module) or {})


def count_saved_tensors(
    model: nn.Module,
    forward: Callable[[], Any],
    *,
    blocks: Iterable[nn.Module] | None = None,
    attention: Attention = "flash",
) -> SavedTensorCount:
    """Run ``forward()`` once (it must call ``model``) and count what autograd keeps.

    ``blocks``: the modules to attribute per block (default: every ``DiTLayer`` in ``model``).
    Parameters of ``model`` are not activations and are left out. ``attention``: see the
    module docstring. The forward's output, and with it the graph, is dropped afterwards.
    """
    if attention not in ("flash", "triton", "as_run"):
        raise ValueError(f"attention={attention!r}; expected 'flash', 'triton' or 'as_run'")
    from step_infra.models.dit import DiTLayer

    names = {m: n for n, m in model.named_modules()}
    block_list = (
        list(blocks)
        if blocks is not None
        else [m for m in model.modules() if isinstance(m, DiTLayer)]
    )
    block_names = {names[b] for b in block_list}
    params = {_key(p) for p in model.parameters()}
    stack: list[str] = []
    records: dict[int, _Record] = {}
    produced: dict[int, tuple[str, torch.UntypedStorage]] = {}  # storage -> first module
    shared: dict[int, str] = {}  # conditioning tensors handed to the blocks -> argument
    op = _CurrentOp()

    def scope_of() -> str:
        for name in reversed(stack):
            if name in block_names:
                return name
        return "outside"

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        if key in params:
            return t
        rec = records.get(key)
        if rec is None:
            module = stack[-1] if stack else ""
            scope = "shared" if key in shared else scope_of()
            rec = _Record(t.untyped_storage(), module, op.name, tuple(t.shape), t.dtype, scope)
            rec.forced = shared.get(key)
            records[key] = rec
        elif not rec.op and not rec.alive:  # pre-created from a block's arguments
            rec.module, rec.op = stack[-1] if stack else "", op.name
        rec.alive.append(weakref.ref(t))
        return t

    def pre_hook(name: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        # Runs before any other pre-hook (``prepend``): a checkpoint's pre-hook saves the
        # block's inputs (torch's ``_NoopSaveInputs``), and they must be seen in the block.
        stack.append(name)
        if name not in block_names:
            return
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        for i, (arg, value) in enumerate(bound.items()):
            for t in _tensors(value):
                key = _key(t)
                if i > 0:
                    shared[key] = arg
                if key not in records and key not in params:
                    scope = name if i == 0 else "shared"
                    kind = "checkpoint_input" if i == 0 and _is_checkpointed(module) else None
                    records[key] = _Record(
                        t.untyped_storage(), name, "", tuple(t.shape), t.dtype, scope, [], kind
                    )
                    if i > 0:
                        records[key].forced = arg
                if key in records and _is_checkpointed(module):
                    # held by the checkpoint's recompute closure (tuples such as the RoPE
                    # tables are not saved through hooks): alive while the graph is
                    records[key].alive.append(weakref.ref(t))

    def post_hook(name: str, module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        stack.pop()
        for t in _tensors(out):
            produced.setdefault(_key(t), (name, t.untyped_storage()))

    handles = []
    for module, name in names.items():
        handles.append(
            module.register_forward_pre_hook(
                lambda m, a, k, n=name: pre_hook(n, m, a, k), with_kwargs=True, prepend=True
            )
        )
        handles.append(
            module.register_forward_hook(
                lambda m, a, k, o, n=name: post_hook(n, m, a, k, o), with_kwargs=True
            )
        )
    patch = _route_attention(attention) if attention != "as_run" else contextlib.nullcontext()
    try:
        with patch, op, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        saved = [_finish(rec, produced, block_names) for rec in records.values()]
    finally:
        for handle in handles:
            handle.remove()
    del out
    return SavedTensorCount(saved)


def _finish(
    rec: _Record, produced: dict[int, tuple[str, torch.UntypedStorage]], blocks: set[str]
) -> Saved:
    held = any(ref() is not None for ref in rec.alive)
    nbytes = rec.storage.nbytes() if held else 0
    key = int(rec.storage._cdata)
    producer = produced[key][0] if key in produced else ""
    if rec.forced is not None:
        kind = rec.forced
    elif rec.scope in blocks:
        kind = _block_kind(rec, _relative(producer, rec.scope))
    else:
        kind = rec.module
    return Saved(rec.scope, kind, rec.module, rec.op, rec.shape, rec.dtype, nbytes)


def _relative(path: str, block: str) -> str | None:
    """``path`` inside ``block`` ("" for the block itself), None if outside it."""
    if path == block:
        return ""
    if block == "":  # the block is the root module counted
        return path
    return path[len(block) + 1 :] if path.startswith(block + ".") else None


def _block_kind(rec: _Record, producer: str | None) -> str:
    """The :data:`KINDS` entry of a storage saved inside a DiT block, from the saving
    module's path ``where`` (relative to the block) and the module that produced it."""
    where = _relative(rec.module, rec.scope) or ""
    last = rec.shape[-1] if rec.shape else 0
    if where in ("norm1", "norm2", "norm3"):
        return "norm_stats" if last == 1 else "norm_input"
    if where == "":  # the block's own multiplies: adaLN modulation and gates
        if producer in ("norm1", "norm3"):
            return "modulation_input"
        if producer is not None and producer.startswith(("self_attention", "mlp")):
            return "gate_input"
        return "modulation_vectors"
    if producer == "self_attention.linear_qkv":
        return "qkv"
    if producer in ("cross_attention.linear_kv", "cross_attention.k_norm"):
        return "text_kv"
    if where == "cross_attention.k_norm":
        return "text_kv"
    if where == "cross_attention.linear_kv":  # F.linear's copy of a strided text (mb > 1)
        return "text_kv"
    if where.endswith(("linear_qkv", "linear_q", "linear_fc1")):
        return "linear_input"
    if where.endswith(("q_norm", "k_norm")):
        return "qk_norm_stats" if last == 1 else "qk_norm"
    if where.endswith("core_attention"):
        if not rec.dtype.is_floating_point:
            return "kv_lengths"
        if len(rec.shape) == 3:
            return "attention_lse"
        if producer is not None and producer.endswith("core_attention"):
            return "attention_out"
        return "attention_qk"
    if where.endswith("linear_proj"):
        if producer is not None and producer.endswith("core_attention"):
            return "attention_out"
        return "attention_out_copy"
    if where == "mlp":
        return "mlp_fc1_output"
    if where == "mlp.linear_fc2":
        return "mlp_gelu_output"
    return f"other:{where}"


@dataclass(frozen=True, slots=True)
class StateBytes:
    """Bytes one rank holds for training besides activations."""

    params: int
    grads: int
    optimizer: int


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> StateBytes:
    """Parameters and gradients of ``model`` (gradients as they are now: run a backward
    first) and the optimizer state this rank holds: every tensor in ``optimizer.state``, or
    for ``ZeroRedundancyOptimizer`` its local optimizer's (this rank's shard)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(
        p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
    )
    held = 0
    if optimizer is not None:
        local = getattr(optimizer, "optim", optimizer)  # ZeRO keeps its shard's optimizer there
        for state in local.state.values():
            held += sum(
                v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor)
            )
    return StateBytes(params, grads, held)
