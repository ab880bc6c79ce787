"""The strategy TOML that ``step-infra plan`` writes and the trainer reads.

Tables: ``[model]`` (preset), ``[strategy]`` (the layout, Megatron vocabulary),
``[allocation]`` (encoder / trainer GPU split) and ``[prediction]`` (what the emulator
expects, so a run can be compared with its plan). ``step_infra.topology.load_strategy_toml``
reads the first two on the trainer side.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from step_infra.emulator.allocation import Allocation
from step_infra.emulator.estimate import Estimate
from step_infra.emulator.strategy import Strategy

_KEYS = (
    "tp",
    "pp",
    "vpp",
    "cp",
    "cp_kind",
    "dp",
    "micro_batch",
    "global_batch",
    "sequence_parallel",
    "recompute",
    "distributed_optimizer",
    "overlap_grad_reduce",
    "overlap_param_gather",
    "overlap_tp_comm",
    "precision",
)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)


def dumps_plan(model_name: str, estimate: Estimate, allocation: Allocation | None = None) -> str:
    """The plan as TOML text (written by hand: tomllib reads, the stdlib has no writer)."""
    lines = [
        "# written by step-infra plan",
        "[model]",
        f"preset = {_toml_value(model_name)}",
        "",
        "[strategy]",
    ]
    lines += [f"{k} = {_toml_value(getattr(estimate.strategy, k))}" for k in _KEYS]
    if allocation is not None:
        lines += [
            "",
            "[allocation]",
            f"vae_gpus = {allocation.vae_gpus}",
            f"text_gpus = {allocation.text_gpus}",
            f"trainer_gpus = {allocation.trainer_gpus}",
        ]
    lines += [
        "",
        "[prediction]",
        f"step_time_s = {_toml_value(estimate.step_time_s)}",
        f"tflops_per_gpu = {_toml_value(estimate.tflops_per_gpu)}",
        f"memory_gb_per_gpu = {_toml_value(estimate.memory_gb_per_gpu)}",
    ]
    return "\n".join(lines) + "\n"


def save_plan(
    path: str | Path, model_name: str, estimate: Estimate, allocation: Allocation | None = None
) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps_plan(model_name, estimate, allocation))
    return out


def load_plan(path: str | Path) -> tuple[str, Strategy]:
    """(model preset, strategy) from a plan TOML; unknown strategy keys are an error."""
    data = tomllib.loads(Path(path).read_text())
    try:
        model = str(data["model"]["preset"])
        table = dict(data["strategy"])
    except KeyError as exc:
        raise ValueError(
            f"{path}: missing {exc} (expected [model] preset and a [strategy] table)"
        ) from exc
    unknown = sorted(set(table) - set(_KEYS))
    if unknown:
        raise ValueError(
            f"{path}: unknown [strategy] keys {unknown}; expected a subset of {list(_KEYS)}"
        )
    return model, Strategy(**table)
