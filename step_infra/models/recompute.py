"""Activation recomputation for the DiT's blocks, as the emulator prices it.

Two modes, the emulator's ``recompute`` knob (``step_infra.emulator.costmodel``):

- ``"full"`` (2): each block keeps only its inputs; its forward runs again in the backward.
  The emulator holds ``layer_input`` bytes per layer plus one layer's activations, and pays
  one more forward (``recompute = fwd``). Here: torch's non-reentrant activation checkpoint
  on each :class:`~step_infra.models.dit.DiTLayer`, applied with
  ``torch.distributed._composable.checkpoint``: it works through forward hooks, so the
  module stays a ``DiTLayer`` and parameter names keep no ``_checkpoint_wrapped_module.``
  prefix (checkpoint keys, ``parallel_check``'s name lookups and ``DiT.init_weights``'s
  type check are untouched). ``num_layers=N``: only the first N blocks (of this pipeline
  stage), Megatron's "block" partial recompute.
- ``"selective"`` (1): the emulator saves exactly one ffn-wide tensor per layer,
  ``tokens x ffn / tp`` elements (``selective_saving``), and pays only element-wise time.
  That tensor is the MLP's GELU output, which ``linear_fc2`` keeps for its weight gradient;
  the GELU input (the ``linear_fc1`` output) is kept anyway by GELU's own backward. So after
  ``linear_fc2``'s forward the GELU output's storage is freed, and when the gradient
  reaches ``linear_fc2``'s output, GELU is recomputed from its saved input into the same
  storage (megatron-core's ``CheckpointWithoutOutput`` trick). Nothing else changes: no
  matmul runs twice, and the recomputed values are bitwise the ones freed.

Both leave gradients bitwise equal to no recompute on the CPU (tested). Where the emulator's
pricing differs: its selective recompute time is the whole block's element-wise forward
(``elem``), an upper bound on the one GELU recomputed here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint

from step_infra.models.dit import DiTLayer

RecomputeMode = Literal["none", "selective", "full"]
MODES = ("none", "selective", "full")
_MARK = "_step_infra_recompute"


class _RecomputeActivation:
    """Hooks on one MLP that free its GELU output after ``linear_fc2`` saved it and
    recompute it just before ``linear_fc2``'s backward needs it."""

    def __init__(self, mlp: nn.Module, name: str) -> None:
        self.name = name
        self._fc1_out: torch.Tensor | None = None
        self._fc2_in: tuple[torch.Tensor, torch.Tensor, str] | None = None
        try:
            fc1, fc2 = mlp.get_submodule("linear_fc1"), mlp.get_submodule("linear_fc2")
        except AttributeError as e:
            raise ValueError(
                f"selective recompute of {name}: its MLP has no linear_fc1/linear_fc2 ({e})"
            ) from e
        fc1.register_forward_hook(self._after_fc1)
        fc2.register_forward_pre_hook(self._before_fc2)
        fc2.register_forward_hook(self._after_fc2)

    @staticmethod
    def _first(output: Any) -> Any:
        return output[0] if isinstance(output, tuple) else output

    def _after_fc1(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self._fc1_out = self._first(output) if torch.is_grad_enabled() else None

    def _before_fc2(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        y, self._fc1_out = self._fc1_out, None
        g = args[0] if args else None
        if y is None or not isinstance(g, torch.Tensor) or g.grad_fn is None:
            self._fc2_in = None  # no autograd graph (inference): nothing is saved
            return
        node = g.grad_fn
        if node.name() != "GeluBackward0" or node.next_functions[0][0] is not y.grad_fn:
            raise RuntimeError(
                f"selective recompute of {self.name}: linear_fc2's input is "
                f"{node.name()} of something other than linear_fc1's output; it expects "
                "linear_fc2(gelu(linear_fc1(x))) as in step_infra.models.layers.MLP"
            )
        whole = g._base is None and g.storage_offset() == 0
        if not whole or g.untyped_storage().nbytes() != g.numel() * g.element_size():
            raise RuntimeError(
                f"selective recompute of {self.name}: the GELU output shares its storage "
                f"(shape {tuple(g.shape)}, offset {g.storage_offset()}), cannot free it"
            )
        self._fc2_in = (g, y, str(node._saved_approximate))  # type: ignore[attr-defined]

    def _after_fc2(self, _module: nn.Module, _args: Any, output: Any) -> None:
        saved, self._fc2_in = self._fc2_in, None
        out = self._first(output)
        if saved is None or not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        g, y, approximate = saved
        storage = g.untyped_storage()
        nbytes = storage.nbytes()
        storage.resize_(0)

        def recompute(grad: torch.Tensor) -> None:
            if storage.nbytes() == 0:
                storage.resize_(nbytes)
                with torch.no_grad():
                    # ``.data``: a write the autograd version counter does not see, since
                    # the saved tensor gets back the very values it was saved with.
                    g.data.copy_(F.gelu(y, approximate=approximate))

        out.register_hook(recompute)


def _blocks(model_or_layers: nn.Module | Iterable[nn.Module]) -> list[DiTLayer]:
    if isinstance(model_or_layers, nn.Module):
        return [m for m in model_or_layers.modules() if isinstance(m, DiTLayer)]
    out: list[DiTLayer] = []
    for m in model_or_layers:
        out += [b for b in m.modules() if isinstance(b, DiTLayer)]
    return out


def apply_recompute(
    model_or_layers: nn.Module | Iterable[nn.Module],
    mode: RecomputeMode | str,
    *,
    num_layers: int | None = None,
) -> list[DiTLayer]:
    """Recompute activations of the DiT blocks in ``model_or_layers`` (in place).

    ``mode``: ``"none"``, ``"selective"`` (the MLP's GELU output) or ``"full"`` (whole
    blocks). ``num_layers``: only the first N blocks found (module order; on a pipeline
    stage, its own blocks), default all. Returns the blocks changed. Call it once, before
    training, on every rank alike (full recompute repeats the blocks' collectives in the
    backward, so all ranks of a group must recompute the same blocks).
    """
    if mode not in MODES:
        raise ValueError(f"recompute mode must be one of {MODES}, got {mode!r}")
    blocks = _blocks(model_or_layers)
    if num_layers is not None and not 0 <= num_layers <= len(blocks):
        raise ValueError(
            f"num_layers={num_layers!r} but the model has {len(blocks)} DiT blocks; "
            f"pass 0..{len(blocks)} or None for all"
        )
    if mode == "none":
        return []
    if not blocks:
        raise ValueError(f"recompute={mode!r} found no DiTLayer in {type(model_or_layers)}")
    chosen = blocks[: len(blocks) if num_layers is None else num_layers]
    for i, block in enumerate(chosen):
        done = getattr(block, _MARK, None)
        if done is not None:
            raise ValueError(f"block {i} already has recompute={done!r}; apply it only once")
        if mode == "full":
            composable_checkpoint(block)
        else:
            _RecomputeActivation(block.mlp, f"block {i}")
        setattr(block, _MARK, mode)
    return chosen


def saved_activation_bytes(
    forward: Callable[[], Any], *, exclude: Iterable[torch.Tensor] = ()
) -> int:
    """Bytes that autograd keeps for the backward after ``forward()`` returns.

    Every tensor saved for backward is recorded (``saved_tensors_hooks``), deduplicated by
    storage, and the storages' sizes summed once the forward is done, so storage freed after
    saving (selective recompute) counts as zero. ``exclude``: tensors not to count, e.g. the
    parameters. The output, and with it the graph, is dropped after measuring.
    """
    # Keyed by the storage object (``_cdata``), not its address: storage freed by selective
    # recompute during the forward can be handed out again at the same address, and keying
    # by address would then count a later tensor as that freed one (kept alive here, so no
    # key is reused).
    skip = {t.untyped_storage()._cdata for t in exclude}
    storages: dict[int, torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in skip:
            storages.setdefault(s._cdata, s)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    total = sum(s.nbytes() for s in storages.values())
    del out
    return total
