"""A parallel layout and its rules (``Strategy``), in the Megatron vocabulary.

Ranks are laid out ``dp x pp x cp x tp`` with tp fastest: :meth:`Strategy.grid` is the
:class:`~step_infra.topology.ProcessGrid` the trainer builds its groups from, so a TP group is
``tp`` neighbouring GPUs, inside one node when ``tp <= gpus_per_node``.
``validate`` names the rule a layout breaks; the vectorized search applies the same rules as
boolean masks (``strategy_rules``), so both always agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from step_infra.emulator.specs import ClusterSpec, ModelSpec
from step_infra.topology import ProcessGrid

RECOMPUTE = ("none", "selective", "full")
CP_KINDS = ("ulysses", "ring")
Recompute = Literal["none", "selective", "full"]
CpKind = Literal["ulysses", "ring"]
Precision = Literal["bf16", "fp8"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Strategy:
    """One layout. ``dp`` is derived from the GPU count when not given."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    cp_kind: CpKind = "ulysses"
    dp: int | None = None
    micro_batch: int = 1
    global_batch: int = 1
    sequence_parallel: bool = False
    recompute: Recompute = "none"
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    overlap_tp_comm: bool = False
    precision: Precision = "bf16"

    def check(self) -> Strategy:
        """Raise ``ValueError`` for a setting no layout can have (any model, any cluster)."""
        for name in ("tp", "pp", "vpp", "cp", "micro_batch", "global_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"strategy.{name}={value!r}; expected a positive integer")
        if self.dp is not None and (isinstance(self.dp, bool) or self.dp < 1):
            raise ValueError(f"strategy.dp={self.dp!r}; expected a positive integer or none")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r}; expected one of {RECOMPUTE}")
        if self.cp_kind not in CP_KINDS:
            raise ValueError(f"cp_kind={self.cp_kind!r}; expected one of {CP_KINDS}")
        if self.precision not in ("bf16", "fp8"):
            raise ValueError(f"precision={self.precision!r}; expected 'bf16' or 'fp8'")
        return self

    def refuse(self, supported: Mapping[str, Any], *, by: str) -> None:
        """Raise ``ValueError`` naming every setting ``by`` cannot honour; ``supported`` maps a
        field to the value (or a tuple of the values) ``by`` runs. Unnamed fields are free."""
        bad = []
        for key, allowed in supported.items():
            value = getattr(self, key)
            ok = value in allowed if isinstance(allowed, tuple) else value == allowed
            if not ok:
                bad.append(f"{key}={value!r} (runs: {allowed!r})")
        if bad:
            raise ValueError(f"{by} cannot run " + ", ".join(bad))

    def grid(self, world_size: int | None = None) -> ProcessGrid:
        """The process grid of this layout; ``world_size`` fills ``dp`` when it is ``None``
        (and must agree with it when it is not)."""
        if world_size is None:
            if self.dp is None:
                raise ValueError("strategy.dp is not set: give the world size to derive it")
            return ProcessGrid(dp=self.dp, pp=self.pp, cp=self.cp, tp=self.tp)
        grid = ProcessGrid.for_world(world_size, tp=self.tp, pp=self.pp, cp=self.cp)
        if self.dp is not None and self.dp != grid.dp:
            raise ValueError(
                f"strategy dp={self.dp} x tp*pp*cp={self.tp * self.pp * self.cp} is "
                f"{self.dp * self.tp * self.pp * self.cp} ranks, but the job has {world_size}"
            )
        return grid

    def resolved(self, cluster: ClusterSpec) -> Strategy:
        """This strategy with ``dp`` filled in from the cluster size."""
        per_replica = self.tp * self.pp * self.cp
        if per_replica < 1:
            raise ValueError(f"tp, pp, cp must be >= 1, got tp={self.tp} pp={self.pp} cp={self.cp}")
        if cluster.num_gpus % per_replica:
            raise ValueError(
                f"tp*pp*cp = {per_replica} does not divide the {cluster.num_gpus} GPUs of the cluster"
            )
        dp = cluster.num_gpus // per_replica
        if self.dp is not None and self.dp != dp:
            raise ValueError(
                f"dp={self.dp} but {cluster.num_gpus} GPUs / (tp*pp*cp={per_replica}) = {dp}"
            )
        return dataclasses.replace(self, dp=dp)

    def validate(self, model: ModelSpec, cluster: ClusterSpec) -> Strategy:
        """Raise ``ValueError`` naming the first broken rule; return the resolved strategy."""
        s = self.resolved(cluster).check()
        arrays = {k: np.array([v]) for k, v in _numeric(s).items()}
        for rule, ok in strategy_rules(model, cluster, arrays).items():
            if not bool(ok[0]):
                raise ValueError(rule.format(**_fields(s), **_model_fields(model)))
        return s


def _fields(s: Strategy) -> dict[str, object]:
    return {name: getattr(s, name) for name in Strategy.__slots__}  # type: ignore[attr-defined]


def _model_fields(m: ModelSpec) -> dict[str, object]:
    return {"heads": m.heads, "kv_heads": m.kv_heads, "layers": m.layers, "seq_len": m.seq_len}


def _numeric(s: Strategy) -> dict[str, int]:
    """The strategy as the integer columns the vectorized model reads."""
    assert s.dp is not None
    return {
        "tp": s.tp,
        "pp": s.pp,
        "vpp": s.vpp,
        "cp": s.cp,
        "dp": s.dp,
        "ring": int(s.cp_kind == "ring"),
        "mb": s.micro_batch,
        "gb": s.global_batch,
        "sp": int(s.sequence_parallel),
        "recompute": RECOMPUTE.index(s.recompute),
        "dist_opt": int(s.distributed_optimizer),
        "overlap_grad": int(s.overlap_grad_reduce),
        "overlap_param": int(s.overlap_param_gather),
        "overlap_tp": int(s.overlap_tp_comm),
        "fp8": int(s.precision == "fp8"),
    }


def strategy_rules(
    model: ModelSpec, cluster: ClusterSpec, c: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Each rule's message (a format string) -> boolean array, True where the layout obeys it."""
    assert model.kv_heads is not None
    tp, pp, vpp, cp, dp = c["tp"], c["pp"], c["vpp"], c["cp"], c["dp"]
    heads_per_tp = model.heads // np.maximum(tp, 1)
    return {
        "tp={tp} does not divide {heads} heads": model.heads % tp == 0,
        "tp={tp} does not divide {kv_heads} key/value heads": (model.kv_heads % tp == 0)
        | (tp % model.kv_heads == 0),
        "pp={pp} x vpp={vpp} virtual stages exceed the {layers} layers": model.layers >= pp * vpp,
        "vpp={vpp} needs pp > 1 (the interleaved schedule splits pipeline stages)": (vpp == 1)
        | (pp > 1),
        "cp={cp} does not divide the {seq_len}-token sequence into equal chunks": model.seq_len % cp
        == 0,
        "Ulysses cp={cp} does not divide the {heads} heads / tp={tp} on each rank": (c["ring"] == 1)
        | (heads_per_tp % cp == 0),
        "sequence_parallel needs tp > 1": (c["sp"] == 0) | (tp > 1),
        "sequence parallel splits the {seq_len}-token sequence over cp={cp} x tp={tp} ranks "
        "unevenly": (c["sp"] == 0) | (model.seq_len % np.maximum(cp * tp, 1) == 0),
        "global_batch={global_batch} is not a multiple of micro_batch={micro_batch} x dp={dp}": (
            dp > 0
        )
        & (c["gb"] % np.maximum(c["mb"] * dp, 1) == 0),
        "tp={tp} exceeds a node of GPUs (tensor parallel across nodes is not modelled)": tp
        <= cluster.gpus_per_node,
    }
