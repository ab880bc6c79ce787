"""Pipeline parallelism for the DiT, interleaved stages included, on torch.distributed.pipelining.

Why on torch's pipelining: its schedules (GPipe, 1F1B, interleaved 1F1B, looped BFS,
interleaved zero bubble) run on CPU/gloo and matched a one-rank reference here (DESIGN,
"Verified on this machine"), while megatron-core's schedules allocate on CUDA. This file only
cuts the DiT into stage modules, builds each rank's chunks and hands them to torch.

- **Cut.** :func:`stage_layers` spreads the blocks over the ``pp * vpp`` virtual stages;
  virtual stage ``v`` runs on pp rank ``v % pp`` (torch's layout), so chunk ``k`` of rank
  ``r`` is stage ``r + k * pp``. Stage 0 also runs patchify and ``DiT.embed``, the last stage
  ``DiT.head`` and unpatchify: its output has the latents' shape, like ``DiT.forward``, so the
  target and the loss are the ones of the unpipelined model.
- **What crosses a stage boundary** (:data:`PAYLOAD`): the hidden states and every
  conditioning tensor the blocks and the head need, ``(h, t_mod, temb, text, text_lengths,
  cos, sin)``. ``t_mod``, ``temb`` and ``text`` are passed, not recomputed, because their
  gradients from every stage must flow back to the embedding on stage 0; each stage hands
  them on unchanged, so the gradient it sends back is its own plus the later stages'. The
  RoPE angles are passed too (constants, no gradient; ``2 * S * head_dim`` floats, less than
  ``h``'s ``S * B * hidden``): the CP/SP hooks of :mod:`~step_infra.models.parallelize` decide
  on stage 0 which tokens and angles this rank holds, and passing the angles keeps that
  decision in one place.
- **Composition.** The stage modules hold the very ``embed``, block and ``head`` modules of a
  ``build_dit(..., groups=groups)`` model, so the CP/SP hooks on ``embed``/``head`` and the
  megatron-core TP linears in the blocks work unchanged; every pp rank of a (tp, cp) group
  runs the same stage, as the non-pipelined model runs the whole.
- **Only this rank's chunks.** The DiT is built on the meta device; each module is then
  materialized on the CPU and drawn from one generator in ``DiT.init_weights``' order, and
  the modules of other stages are sent back to the meta device right after their draw (the
  generator must advance past them so that every layout gets the weights of one rank with
  the same seed). Cost, acceptable for now: every rank draws every weight (time of the full
  model's RNG, memory of its own chunks plus one block).
- **Loss and gradients.** Schedules run with ``scale_grads=False``: ``loss_fn(pred, target,
  **loss_kwargs)`` returns each micro-batch's share of the step loss (e.g.
  :func:`summed_mse`: per-sample MSE summed, divided by the global batch), so the gradients
  are those of the sum, as in the streaming trainer.
- **Shapes.** Stages run torch's dynamic metadata inference on the first step; when the
  batch's shapes change the stages and schedule are re-planned. So every rank of a pipeline
  calls :meth:`DiTPipeline.step` with the same batch shapes: stage 0 reads the tensors, the
  last stage the target, the others only their shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
)

from step_infra.models.config import DiTConfig, get_preset
from step_infra.models.dit import (
    Conditioning,
    DiT,
    DiTEmbedding,
    DiTHead,
    _materialize,
    _patchify,
    _unpatchify,
    build_dit,
)
from step_infra.models.parallel import ParallelGroups
from step_infra.models.rope import rope_angles, rope_cos_sin

Grid = tuple[int, int, int]  # latent frames, patch rows, patch columns
LossFn = Callable[..., torch.Tensor]  # (pred, target, **loss_kwargs) -> this micro-batch's loss

SCHEDULES: dict[str, Any] = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "looped_bfs": ScheduleLoopedBFS,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")  # one stage per rank: no vpp
PAYLOAD = ("h", "t_mod", "temb", "text", "text_lengths", "cos", "sin")


def stage_layers(
    num_layers: int, stages: int, *, first: int | None = None, last: int | None = None
) -> list[range]:
    """The blocks each (virtual) stage holds, in order.

    Even by default; the remainder of an uneven split goes to the middle stages first, since
    the first and last also run the embedding and the head (10 blocks over 4 stages:
    2, 3, 3, 2). ``first`` / ``last`` fix the first and last stage's share (0 allowed: an
    embedding-only or head-only stage); the other stages share the rest evenly, at least one
    block each.
    """
    if stages < 1 or num_layers < 1:
        raise ValueError(f"need stages >= 1 and num_layers >= 1, got {stages} and {num_layers}")
    for name, value in (("first", first), ("last", last)):
        if value is not None and not 0 <= value <= num_layers:
            raise ValueError(f"{name}={value} must lie in 0..num_layers={num_layers}")
    if stages == 1:
        if {first, last} - {None, num_layers}:
            raise ValueError(
                f"one stage holds all {num_layers} blocks; got first={first}, last={last}"
            )
        return [range(num_layers)]
    counts: list[int | None] = [first, *([None] * (stages - 2)), last]
    free = [i for i, c in enumerate(counts) if c is None]
    rest = num_layers - sum(c for c in counts if c is not None)
    if not free and rest != 0:
        raise ValueError(
            f"first={first} + last={last} must equal num_layers={num_layers} with 2 stages"
        )
    if free and rest < len(free):
        raise ValueError(
            f"{num_layers} blocks cannot fill {stages} stages (first={first}, last={last}): "
            f"the other {len(free)} stages need at least one block each; use fewer stages "
            "(pp * vpp) or a deeper model"
        )
    if free:
        share, extra = divmod(rest, len(free))
        by_preference = sorted(free, key=lambda i: (i in (0, stages - 1), i))
        for i in free:
            counts[i] = share + (i in by_preference[:extra])
    return _ranges([c for c in counts if c is not None])


def layers_from_counts(counts: Sequence[int], num_layers: int) -> list[range]:
    """Stage ranges from explicit block counts per virtual stage (``layers_per_stage``)."""
    counts = list(counts)
    if sum(counts) != num_layers or any(c < 0 for c in counts):
        raise ValueError(
            f"layers_per_stage={counts} must be non-negative and sum to num_layers={num_layers}"
        )
    if any(c == 0 for c in counts[1:-1]):
        raise ValueError(f"layers_per_stage={counts}: a middle stage must hold a block")
    return _ranges(counts)


def _ranges(counts: Sequence[int]) -> list[range]:
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(s, s + c) for s, c in zip(starts, counts, strict=True)]


def summed_mse(pred: torch.Tensor, target: torch.Tensor, *, global_batch: int) -> torch.Tensor:
    """The streaming trainer's loss for one micro-batch: per-sample MSE, summed over its
    samples and divided by the global batch (so the micro-batches' losses add up to the
    step's mean). Pass ``loss_kwargs={"global_batch": n}`` to :meth:`DiTPipeline.step`."""
    per_sample = (pred - target).square().flatten(1).mean(1)
    return per_sample.sum() / global_batch


def latent_grid(config: DiTConfig, shape: Sequence[int]) -> Grid:
    """The token grid of latents of ``shape`` ``(B, C, F, H, W)``."""
    p = config.patch_size
    if len(shape) != 5 or shape[1] != config.in_channels or shape[3] % p or shape[4] % p:
        raise ValueError(
            f"latents {tuple(shape)} must be (B, C, F, H, W) with C = {config.in_channels} "
            f"and H, W divisible by the patch size {p}"
        )
    return (shape[2], shape[3] // p, shape[4] // p)


def patchify(config: DiTConfig, x: torch.Tensor) -> tuple[torch.Tensor, tuple[Any, Any], Grid]:
    """``DiT.patchify``: latents ``(B, C, F, H, W)`` -> tokens, their RoPE and the grid."""
    grid = latent_grid(config, x.shape)
    rope = rope_cos_sin(rope_angles(grid, config.rope_split, config.rope_base).to(x.device))
    return _patchify(x, config.patch_size), rope, grid


def pack_payload(h: torch.Tensor, cond: Conditioning) -> tuple[torch.Tensor, ...]:
    """What one stage sends the next, in :data:`PAYLOAD` order (contiguous for p2p)."""
    cos, sin = cond.rope
    parts = (h, cond.t_mod, cond.temb, cond.text, cond.text_lengths, cos, sin)
    return tuple(t.contiguous() for t in parts)


def unpack_payload(payload: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Conditioning]:
    if len(payload) != len(PAYLOAD):
        raise ValueError(f"a stage receives {PAYLOAD}, got {len(payload)} tensors")
    h, t_mod, temb, text, text_lengths, cos, sin = payload
    cond = Conditioning(
        t_mod=t_mod, temb=temb, text=text, text_lengths=text_lengths, rope=(cos, sin)
    )
    return h, cond


class DiTStage(nn.Module):
    """One model chunk (virtual stage ``index`` of ``num_stages``).

    Parameters keep the full DiT's names (``embed.*``, ``layers.<i>.*``, ``head.*``), so a
    rank's chunks map one to one onto a one-rank model's ``state_dict``. Inputs: the DiT's
    (``x, t, text_short, short_lengths[, text_long, long_lengths]``) on stage 0, the
    :data:`PAYLOAD` elsewhere. Output: the payload, or on the last stage the prediction in
    the latents' shape; ``grid`` tells a last stage that did not patchify the latents how to
    fold its tokens back (:meth:`DiTPipeline.step` sets it).
    """

    def __init__(
        self,
        config: DiTConfig,
        *,
        index: int,
        num_stages: int,
        embed: DiTEmbedding | None,
        layers: Mapping[int, nn.Module],
        head: DiTHead | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.index, self.num_stages = index, num_stages
        self.embed = embed
        self.layers = nn.ModuleDict({str(i): layers[i] for i in sorted(layers)})
        self.head = head
        self.grid: Grid | None = None

    @property
    def layer_ids(self) -> list[int]:
        return [int(k) for k in self.layers]

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        grid = self.grid
        if self.embed is not None:
            tokens, rope, grid = patchify(self.config, inputs[0])  # (B, S, C p p)
            h, cond = self.embed(tokens, rope, *inputs[1:])  # h: (S, B, hidden)
        else:
            h, cond = unpack_payload(inputs)
        if self.head is not None and grid is None:
            raise RuntimeError(f"last stage {self.index} needs .grid set (DiTPipeline.step does)")
        for layer in self.layers.values():  # the loop of DiT.forward
            h = layer(h, cond.t_mod, cond.text, cond.text_lengths, cond.rope)
        if self.head is None or grid is None:
            return pack_payload(h, cond)
        out = self.head(h, cond.temb)  # (S, B, C p p)
        c = self.config
        return _unpatchify(out.transpose(0, 1), grid, c.patch_size, c.out_channels)


class HeldDiT(nn.Module):
    """The parts of the DiT this rank holds, under the full model's parameter names: the
    one module to give ``finalize_grads``, ``clip_grad_norm``, an optimizer or
    ``state_dict`` (it shares the chunks' parameters; it has no forward)."""

    def __init__(self, chunks: Sequence[DiTStage]) -> None:
        super().__init__()
        self.embed = next((c.embed for c in chunks if c.embed is not None), None)
        layers = {int(k): m for c in chunks for k, m in c.layers.items()}
        self.layers = nn.ModuleDict({str(i): layers[i] for i in sorted(layers)})
        self.head = next((c.head for c in chunks if c.head is not None), None)


def build_stage_modules(
    preset_or_config: str | DiTConfig,
    groups: ParallelGroups,
    *,
    layout: Sequence[range],
    stage_ids: Sequence[int],
    seed: int = 0,
    device: str | torch.device | None = None,
) -> list[DiTStage]:
    """The chunks ``stage_ids`` of the DiT cut as ``layout``, with the weights of
    ``build_dit(config, seed=seed)``; nothing of the other stages is kept. Needs no pipeline
    group (a single process can build any rank's chunks)."""
    config = get_preset(preset_or_config)
    if [i for r in layout for i in r] != list(range(config.num_layers)):
        raise ValueError(
            f"layout {list(layout)} must cover blocks 0..{config.num_layers - 1} in order"
        )
    if not stage_ids or any(not 0 <= v < len(layout) for v in stage_ids):
        raise ValueError(f"stage_ids {list(stage_ids)} must be among 0..{len(layout) - 1}")
    meta = build_dit(config, groups=groups, device="meta")  # CP/SP hooks go on embed/head
    last = len(layout) - 1
    held = {i for v in stage_ids for i in layout[v]}
    _draw_weights(meta, held, embed=0 in stage_ids, head=last in stage_ids, seed=seed)
    chunks = [
        DiTStage(
            config,
            index=v,
            num_stages=len(layout),
            embed=meta.embed if v == 0 else None,
            layers={i: meta.layers[i] for i in layout[v]},
            head=meta.head if v == last else None,
        )
        for v in stage_ids
    ]
    if device is not None:
        for chunk in chunks:
            chunk.to(device)
    return chunks  # the meta DiT, and every block not listed, is dropped here


def _draw_weights(model: DiT, held: set[int], *, embed: bool, head: bool, seed: int) -> None:
    """``DiT.init_weights``' draws in its order; modules not held go back to meta after."""
    generator = torch.Generator().manual_seed(seed)
    std, out_std = model.config.init_std, model.output_init_std
    _materialize(model.embed, "cpu")
    model.embed.init_weights(generator)
    _keep_or_drop(model.embed, embed)
    for i, layer in enumerate(model.layers):
        _materialize(layer, "cpu")
        layer.init_weights(generator, std=std, out_std=out_std)  # type: ignore[operator]
        _keep_or_drop(layer, i in held)
    _materialize(model.head, "cpu")
    model.head.init_weights(generator)
    _keep_or_drop(model.head, head)
    if model.config.zero_init_output:  # DiT._zero_init, on the parts held
        zeroed = [*(model.embed.adaln.parameters() if embed else ())]
        zeroed += [*(model.head.final_linear.parameters() if head else ())]
        for p in zeroed:
            nn.init.zeros_(p)


def _keep_or_drop(module: nn.Module, keep: bool) -> None:
    if not keep:
        module.to_empty(device="meta")  # frees the draw; only the generator had to advance


class DiTPipeline:
    """This rank's chunks of a pipelined DiT and the schedule that runs them.

    ``stages``: the ``PipelineStage`` objects (chunk ``k`` is virtual stage
    ``pp_rank + k * pp``; empty without pipelining); ``modules``: the :class:`DiTStage`
    chunks; ``held``: all of them as one :class:`HeldDiT` under the full model's names.
    """

    def __init__(
        self,
        modules: Sequence[DiTStage],
        *,
        layout: Sequence[range],
        groups: ParallelGroups,
        schedule: str,
        n_microbatches: int,
        loss_fn: LossFn,
        device: torch.device,
    ) -> None:
        self.modules = list(modules)
        self.held = HeldDiT(self.modules)
        self.layout = list(layout)
        self.groups = groups
        self.schedule_name = schedule
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.device = device
        self.stages: list[PipelineStage] = []
        self._schedule: Any = None
        self._shapes: tuple[Any, ...] | None = None
        if groups.pp_size > 1:
            self._plan()  # raises here, not at the first step, if torch refuses the schedule

    @property
    def has_first(self) -> bool:
        return any(m.index == 0 for m in self.modules)

    @property
    def has_last(self) -> bool:
        return any(m.index == len(self.layout) - 1 for m in self.modules)

    def set_microbatches(self, n: int) -> None:
        """Run the next steps in ``n`` micro-batches (a new schedule when ``n`` changes: a
        streaming replica's share of a step varies)."""
        if n < 1:
            raise ValueError(f"n_microbatches must be >= 1, got {n}")
        if n != self.n_microbatches:
            self.n_microbatches = n
            if self.groups.pp_size > 1:
                self._plan()
                self._shapes = None

    def step(
        self,
        x: torch.Tensor,  # (B, C, F, H, W) latents
        t: torch.Tensor,  # (B,)
        text_short: torch.Tensor,  # (B, Ls, text_dim_short)
        short_lengths: torch.Tensor | None = None,  # (B,)
        text_long: torch.Tensor | None = None,  # (B, Ll, text_dim_long)
        long_lengths: torch.Tensor | None = None,
        *,
        target: torch.Tensor | None = None,  # (B, C, F, H, W), needed on the last stage
        losses: list[torch.Tensor] | None = None,
        loss_kwargs: dict[str, Any] | None = None,
        return_outputs: bool = True,
    ) -> torch.Tensor | None:
        """Forward and backward of this rank's batch in ``n_microbatches`` micro-batches.

        Gradients accumulate into the chunks' ``.grad`` (reduce them with
        ``finalize_grads(pipeline.held, groups, ...)``). On the rank holding the last stage,
        ``losses`` receives one loss per micro-batch and the merged prediction is returned;
        elsewhere ``losses`` is left empty and ``None`` is returned.
        """
        args = _model_inputs(x, t, text_short, short_lengths, text_long, long_lengths)
        if x.shape[0] % self.n_microbatches:
            raise ValueError(
                f"this rank's batch of {x.shape[0]} does not split into "
                f"n_microbatches={self.n_microbatches} equal micro-batches"
            )
        if self.has_last and target is None:
            raise ValueError("this rank holds the last stage: step needs target=")
        grid = latent_grid(self.modules[0].config, x.shape)
        for m in self.modules:
            m.grid = grid
        if self.groups.pp_size == 1:
            return self._step_local(args, target, losses, loss_kwargs, return_outputs)
        shapes = tuple((a.shape, a.dtype) for a in args)
        if self._shapes is not None and shapes != self._shapes:
            self._plan()  # torch sized its p2p buffers for the previous shapes
        self._shapes = shapes
        out: torch.Tensor | None = self._schedule.step(
            *(args if self.has_first else ()),
            target=target if self.has_last else None,
            losses=losses,
            loss_kwargs=loss_kwargs,
            return_outputs=return_outputs,
        )
        return out

    def _step_local(
        self,
        args: tuple[torch.Tensor, ...],
        target: torch.Tensor | None,
        losses: list[torch.Tensor] | None,
        loss_kwargs: dict[str, Any] | None,
        return_outputs: bool,
    ) -> torch.Tensor | None:
        """No pipeline: the micro-batches one after the other through the one chunk."""
        assert target is not None and len(self.modules) == 1
        n, model = self.n_microbatches, self.modules[0]
        chunks = [a.tensor_split(n) for a in args]
        targets = target.tensor_split(n)
        if losses is not None:
            losses.clear()
        outs = []
        for i in range(n):
            out = model(*(c[i] for c in chunks))
            loss = self.loss_fn(out, targets[i], **(loss_kwargs or {}))
            loss.backward()
            if losses is not None:
                losses.append(loss.detach())
            outs.append(out.detach())
        return torch.cat(outs) if return_outputs else None

    def _plan(self) -> None:
        """New stages and schedule (torch infers the p2p shapes on their first step)."""
        pp = self.groups.pp
        self.stages = [
            PipelineStage(m, m.index, len(self.layout), self.device, group=pp) for m in self.modules
        ]
        cls = SCHEDULES[self.schedule_name]
        stages: Any = (
            self.stages[0] if self.schedule_name in SINGLE_STAGE_SCHEDULES else self.stages
        )
        self._schedule = cls(
            stages, n_microbatches=self.n_microbatches, loss_fn=self.loss_fn, scale_grads=False
        )


def _model_inputs(
    x: torch.Tensor,
    t: torch.Tensor,
    text_short: torch.Tensor,
    short_lengths: torch.Tensor | None,
    text_long: torch.Tensor | None,
    long_lengths: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """The DiT's inputs as a tuple of tensors (torch splits them into micro-batches): missing
    lengths are full lengths, as ``DiT.embed`` fills them; no long caption, no long tensors."""
    b = x.shape[0]
    if short_lengths is None:
        short_lengths = torch.full((b,), text_short.shape[1], device=x.device)
    if text_long is None:
        return x, t, text_short, short_lengths
    if long_lengths is None:
        long_lengths = torch.full((b,), text_long.shape[1], device=x.device)
    return x, t, text_short, short_lengths, text_long, long_lengths


def build_pipeline(
    preset_or_config: str | DiTConfig,
    groups: ParallelGroups,
    *,
    n_microbatches: int,
    loss_fn: LossFn,
    seed: int = 0,
    vpp: int = 1,
    schedule: str = "1f1b",
    layers_per_stage: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> DiTPipeline:
    """This rank's chunks of the DiT over ``groups.pp`` (``vpp`` chunks each), and a schedule.

    With a pp group of one rank there is no pipeline: one chunk holds the whole model and
    ``step`` runs the micro-batches through it in turn, so callers keep one code path.
    ``layers_per_stage`` (block counts per virtual stage) overrides :func:`stage_layers`.
    """
    config = get_preset(preset_or_config)
    pp = groups.pp_size
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} unknown; choose one of {sorted(SCHEDULES)}")
    if vpp < 1 or n_microbatches < 1:
        raise ValueError(f"vpp={vpp} and n_microbatches={n_microbatches} must be >= 1")
    if vpp > 1 and pp == 1:
        raise ValueError(f"vpp={vpp} needs pp > 1 (virtual stages interleave pipeline ranks)")
    if vpp > 1 and schedule in SINGLE_STAGE_SCHEDULES:
        multi = sorted(set(SCHEDULES) - set(SINGLE_STAGE_SCHEDULES))
        raise ValueError(
            f"schedule {schedule!r} runs one stage per rank; vpp={vpp} needs one of {multi}"
        )
    stages = pp * vpp
    if layers_per_stage is not None:
        if len(layers_per_stage) != stages:
            raise ValueError(
                f"layers_per_stage has {len(layers_per_stage)} entries; pp * vpp = {stages}"
            )
        layout = layers_from_counts(layers_per_stage, config.num_layers)
    else:
        layout = stage_layers(config.num_layers, stages)
    stage_ids = [groups.pp_rank + k * pp for k in range(vpp)]
    modules = build_stage_modules(
        config, groups, layout=layout, stage_ids=stage_ids, seed=seed, device=device
    )
    return DiTPipeline(
        modules,
        layout=layout,
        groups=groups,
        schedule=schedule,
        n_microbatches=n_microbatches,
        loss_fn=loss_fn,
        device=torch.device(device),
    )
