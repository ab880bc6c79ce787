"""``predict_step``: the emulator's prediction for a job on a measured hardware profile.

A training job that runs here (the demo's trainers, the local check) wants one number before
it starts: the step time of its layout on this machine. That is ``estimate`` on the cluster a
profile from ``step-infra calibrate`` describes, with the job's ranks spread over its nodes;
this module does that wiring once so each caller does not repeat it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from step_infra.emulator.estimate import Estimate, estimate
from step_infra.emulator.presets import get_model
from step_infra.emulator.specs import ClusterSpec, ModelSpec
from step_infra.emulator.strategy import Strategy


def predict_step(
    model: ModelSpec | str,
    profile: str | Path,
    *,
    micro_batch: int,
    global_batch: int,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    dp: int = 1,
    nodes: int = 1,
    seq_len: int | None = None,
    text_tokens: int | None = None,
    distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = True,
    strategy: Strategy | None = None,
) -> Estimate:
    """Predicted training step of ``tp x pp x cp x dp`` ranks on ``profile``'s machine.

    ``model`` is a ``ModelSpec`` or a preset name (``tiny-dit``, ``micro-dit``: fp32 like the
    CPU trainer); ``seq_len`` (latent tokens per sample) and ``text_tokens`` override the
    preset's. The ranks are spread evenly over ``nodes`` (a multi-"node" job on one host is
    priced with the host's loopback between its nodes, as the profile measured it). Profile
    the machine with as many ranks at once as the job runs (``calibrate(...,
    ranks_per_node=world)``): ranks that share cores get less each. ``overlap_grad_reduce``
    False prices a trainer that reduces gradients once, after the backward. The returned
    ``Estimate`` has ``step_time_s`` and the breakdown. Raises ``ValueError`` naming a bad
    layout or profile. ``strategy`` (with ``dp`` set) replaces the layout keywords: every
    setting of a job's layout priced (vpp, ring or Ulysses CP, SP, recompute, ...).
    """
    if strategy is not None:
        if strategy.dp is None:
            raise ValueError("predict_step(strategy=...) needs strategy.dp set")
        tp, pp, cp, dp = strategy.tp, strategy.pp, strategy.cp, strategy.dp
    spec = get_model(model) if isinstance(model, str) else model
    changes: dict[str, int] = {}
    if seq_len is not None:
        changes["seq_len"] = seq_len
    if text_tokens is not None:
        changes["text_tokens"] = text_tokens
    spec = dataclasses.replace(spec, **changes)  # type: ignore[arg-type]
    world = tp * pp * cp * dp
    if nodes < 1 or world % nodes:
        raise ValueError(
            f"{world} ranks (tp*pp*cp*dp) do not spread evenly over nodes={nodes}; "
            "give a node count that divides them"
        )
    base = ClusterSpec.from_profile(profile, nodes=nodes)
    cluster = dataclasses.replace(base, gpus_per_node=world // nodes)
    if strategy is None:
        strategy = Strategy(
            tp=tp,
            pp=pp,
            cp=cp,
            dp=dp,
            micro_batch=micro_batch,
            global_batch=global_batch,
            distributed_optimizer=distributed_optimizer,
            overlap_grad_reduce=overlap_grad_reduce,
        )
    return estimate(spec, cluster, strategy)
