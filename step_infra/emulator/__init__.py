"""Step Emulator: predict memory and step time of parallel layouts before booking a cluster.

``estimate(model, cluster, strategy)`` prices one layout with a breakdown; ``search`` prices
every valid layout at once (vectorized) and ranks them; ``allocate`` splits GPUs between
encoder servers and trainers; ``predict_step`` prices a local job on a profile measured by
``step-infra calibrate``. Efficiencies are fitted on the published runs in
shared/calibration (``calibration.fit``; ``benchmarks/emulator_validation.py`` reports the fit).
A :class:`Plan` is what ``step-infra plan`` writes and the trainer runs.

Names are imported eagerly here (elsewhere lazily): ``estimate`` and ``search`` are both
functions and submodules, and a lazily loaded submodule would replace the function.
"""

from step_infra.emulator import presets
from step_infra.emulator.allocation import Allocation, allocate_gpus
from step_infra.emulator.counts import parameter_count, training_flops_per_sample
from step_infra.emulator.estimate import Estimate, estimate
from step_infra.emulator.plan import Plan, load_plan, save_plan
from step_infra.emulator.predict import predict_step
from step_infra.emulator.presets import cluster_for, get_gpu, get_model
from step_infra.emulator.search import pareto, row_strategy, search
from step_infra.emulator.specs import ClusterSpec, GPUSpec, ModelSpec
from step_infra.emulator.strategy import Strategy

__all__ = [
    "Allocation",
    "ClusterSpec",
    "Estimate",
    "GPUSpec",
    "ModelSpec",
    "Plan",
    "Strategy",
    "allocate_gpus",
    "cluster_for",
    "estimate",
    "get_gpu",
    "get_model",
    "load_plan",
    "parameter_count",
    "pareto",
    "predict_step",
    "presets",
    "row_strategy",
    "save_plan",
    "search",
    "training_flops_per_sample",
]
