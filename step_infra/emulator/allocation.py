"""Split a GPU budget between encoder servers (VAE, text encoder) and DiT trainers.

Step-Video-T2V runs its VAE and text encoders on their own GPUs and streams latents and
embeddings to the trainers (StepRPC). Too few encoder GPUs and the trainers stall waiting for
data; too many and training throughput is lost. Given what one encoder GPU produces (samples/s,
measured or estimated) and what the trainers consume at a given size (from the time model, or a
measured samples/s per GPU), :func:`allocate_gpus` scores every trainer size at once with numpy
and keeps the one with the highest training throughput whose encoders keep up.

Nothing here depends on the rest of the emulator: the trainers' consumption is a number per GPU
or a vectorized callable, so the caller can plug in ``estimate``/``search`` results.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

TrainerRate = float | Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True, kw_only=True)
class Allocation:
    """The chosen split and what it delivers (rates in samples per second)."""

    total_gpus: int
    trainer_gpus: int
    vae_gpus: int
    text_gpus: int
    trainer_samples_per_s: float
    vae_samples_per_s: float
    text_samples_per_s: float

    @property
    def spare_gpus(self) -> int:
        return self.total_gpus - self.trainer_gpus - self.vae_gpus - self.text_gpus

    @property
    def supplied_samples_per_s(self) -> float:
        """What the encoders deliver together: the slower of the two pipelines."""
        return min(self.vae_samples_per_s, self.text_samples_per_s)

    @property
    def training_samples_per_s(self) -> float:
        """Samples the trainers actually process: their rate, or less if the data stalls."""
        return min(self.trainer_samples_per_s, self.supplied_samples_per_s)

    @property
    def stalls(self) -> bool:
        return self.supplied_samples_per_s < self.trainer_samples_per_s * (1 - 1e-9)

    @property
    def headroom(self) -> float:
        """Fraction by which encoder supply exceeds trainer demand (0.1 = 10 % spare)."""
        return self.supplied_samples_per_s / self.trainer_samples_per_s - 1.0

    def to_dict(self) -> dict[str, float | int | bool]:
        return {
            "total_gpus": self.total_gpus,
            "trainer_gpus": self.trainer_gpus,
            "vae_gpus": self.vae_gpus,
            "text_gpus": self.text_gpus,
            "spare_gpus": self.spare_gpus,
            "trainer_samples_per_s": self.trainer_samples_per_s,
            "supplied_samples_per_s": self.supplied_samples_per_s,
            "training_samples_per_s": self.training_samples_per_s,
            "headroom": self.headroom,
            "stalls": self.stalls,
        }


def encoder_samples_per_s_per_gpu(
    flops_per_sample: float, *, peak_tflops: float, efficiency: float
) -> float:
    """Samples/s one encoder GPU produces when the encoder is compute-bound.

    ``flops_per_sample / (peak * efficiency)`` seconds a sample: use it when no measured rate is
    available (a measured one from the data servers is always better).
    """
    if flops_per_sample <= 0 or peak_tflops <= 0 or not 0 < efficiency <= 1:
        raise ValueError(
            f"need flops_per_sample > 0, peak_tflops > 0 and 0 < efficiency <= 1; got "
            f"{flops_per_sample}, {peak_tflops}, {efficiency}"
        )
    return peak_tflops * 1e12 * efficiency / flops_per_sample


def _trainer_rates(rate: TrainerRate, sizes: np.ndarray) -> np.ndarray:
    if callable(rate):
        out = np.asarray(rate(sizes), dtype=float)
        if out.shape != sizes.shape:
            raise ValueError(
                f"trainer rate callable must return one rate per size (shape {sizes.shape}), "
                f"got shape {out.shape}"
            )
        return out
    if rate <= 0:
        raise ValueError(f"trainer samples/s per GPU must be > 0, got {rate}")
    return sizes * float(rate)


def allocation_table(
    total_gpus: int,
    *,
    trainer_samples_per_s: TrainerRate,
    vae_samples_per_s_per_gpu: float,
    text_samples_per_s_per_gpu: float,
    trainer_unit: int = 1,
    encoder_unit: int = 1,
) -> pd.DataFrame:
    """Every trainer size (a multiple of ``trainer_unit``, e.g. the model-parallel size) with the
    encoder GPUs it needs to never stall, rounded up to ``encoder_unit``; one row per size.

    ``trainer_samples_per_s`` is samples/s per trainer GPU (linear scaling) or a callable that
    maps an array of trainer GPU counts to samples/s (use it for measured or modelled scaling).
    Rows where the needed encoders do not fit are kept with ``feasible=False`` and the best
    throughput the leftover GPUs can feed (``training_samples_per_s``).
    """
    if total_gpus < 2:
        raise ValueError(f"need at least 2 GPUs (one trainer, one encoder), got {total_gpus}")
    if trainer_unit < 1 or encoder_unit < 1:
        raise ValueError(
            f"trainer_unit and encoder_unit must be >= 1, got {trainer_unit}, {encoder_unit}"
        )
    if vae_samples_per_s_per_gpu <= 0 or text_samples_per_s_per_gpu <= 0:
        raise ValueError(
            "encoder rates must be > 0 samples/s per GPU, got "
            f"vae={vae_samples_per_s_per_gpu}, text={text_samples_per_s_per_gpu}"
        )
    sizes = np.arange(trainer_unit, total_gpus, trainer_unit, dtype=np.int64)
    if sizes.size == 0:
        raise ValueError(
            f"trainer_unit {trainer_unit} leaves no GPU for encoders out of {total_gpus}"
        )
    import pandas as pd  # lazily: the CLI imports this package at start-up

    rv, rt = float(vae_samples_per_s_per_gpu), float(text_samples_per_s_per_gpu)
    demand = _trainer_rates(trainer_samples_per_s, sizes)
    left = total_gpus - sizes
    vae = np.ceil(demand / rv / encoder_unit) * encoder_unit
    text = np.ceil(demand / rt / encoder_unit) * encoder_unit
    feasible = vae + text <= left
    # Where encoders do not fit, split the leftover so both pipelines deliver about the same
    # rate (v rv = x rt), in whole encoder units; the trainers then run at that supply.
    units = left // encoder_unit
    v_units = np.clip(np.round(units * rt / (rv + rt)), 0, units)
    v_starved = v_units * encoder_unit
    t_starved = (units - v_units) * encoder_unit
    vae = np.where(feasible, vae, v_starved)
    text = np.where(feasible, text, t_starved)
    supply = np.minimum(vae * rv, text * rt)

    return pd.DataFrame(
        {
            "trainer_gpus": sizes,
            "vae_gpus": vae.astype(np.int64),
            "text_gpus": text.astype(np.int64),
            "spare_gpus": (left - vae - text).astype(np.int64),
            "trainer_samples_per_s": demand,
            "supplied_samples_per_s": supply,
            "training_samples_per_s": np.minimum(demand, supply),
            "feasible": feasible,
        }
    )


def allocate_gpus(
    total_gpus: int,
    *,
    trainer_samples_per_s: TrainerRate,
    vae_samples_per_s_per_gpu: float,
    text_samples_per_s_per_gpu: float,
    trainer_unit: int = 1,
    encoder_unit: int = 1,
) -> Allocation:
    """The split with the highest training throughput and no data stall.

    Ties go to fewer trainer GPUs. GPUs left over once trainers and encoders are sized are
    given to the encoders (in ``encoder_unit`` steps, to the pipeline with less headroom) as
    margin against encoder jitter. Raises ``ValueError`` if even the smallest trainer cannot be
    fed, naming the rates.
    """
    table = allocation_table(
        total_gpus,
        trainer_samples_per_s=trainer_samples_per_s,
        vae_samples_per_s_per_gpu=vae_samples_per_s_per_gpu,
        text_samples_per_s_per_gpu=text_samples_per_s_per_gpu,
        trainer_unit=trainer_unit,
        encoder_unit=encoder_unit,
    )
    ok = table[table["feasible"]]
    if ok.empty:
        first = table.iloc[0]
        raise ValueError(
            f"no split of {total_gpus} GPUs feeds even {int(first['trainer_gpus'])} trainer GPU(s) "
            f"({first['trainer_samples_per_s']:.3g} samples/s) with encoders at "
            f"vae={vae_samples_per_s_per_gpu}, text={text_samples_per_s_per_gpu} samples/s/GPU; "
            "add GPUs or use faster encoders"
        )
    best = ok.loc[ok["training_samples_per_s"].idxmax()]
    return _with_spare_to_encoders(
        total_gpus,
        int(best["trainer_gpus"]),
        float(best["trainer_samples_per_s"]),
        int(best["vae_gpus"]),
        int(best["text_gpus"]),
        vae_samples_per_s_per_gpu,
        text_samples_per_s_per_gpu,
        encoder_unit,
    )


def _with_spare_to_encoders(
    total: int,
    trainers: int,
    demand: float,
    vae: int,
    text: int,
    rv: float,
    rt: float,
    encoder_unit: int,
) -> Allocation:
    """The split, with GPUs left over given to the encoders (to the pipeline with less
    headroom, in ``encoder_unit`` steps) as margin against encoder jitter."""
    for _ in range((total - trainers - vae - text) // encoder_unit):
        if vae * rv <= text * rt:
            vae += encoder_unit
        else:
            text += encoder_unit
    return Allocation(
        total_gpus=total,
        trainer_gpus=trainers,
        vae_gpus=vae,
        text_gpus=text,
        trainer_samples_per_s=demand,
        vae_samples_per_s=vae * rv,
        text_samples_per_s=text * rt,
    )


def split_for_trainers(
    total_gpus: int,
    trainer_gpus: int,
    *,
    trainer_samples_per_s: float,
    vae_samples_per_s_per_gpu: float,
    text_samples_per_s_per_gpu: float,
    encoder_unit: int = 1,
) -> Allocation:
    """The split for a fixed trainer size whose total consumption (samples/s of all
    ``trainer_gpus`` together, e.g. from ``estimate`` of the layout searched on them) is known:
    the fewest encoder GPUs that keep up, plus the leftover. Raises ``ValueError`` if the
    encoders that feed them do not fit in the rest of the budget."""
    if not 0 < trainer_gpus < total_gpus:
        raise ValueError(
            f"trainer_gpus must leave room for encoders: 0 < {trainer_gpus} < {total_gpus}"
        )
    if min(trainer_samples_per_s, vae_samples_per_s_per_gpu, text_samples_per_s_per_gpu) <= 0:
        raise ValueError(
            "rates must be > 0 samples/s, got trainers "
            f"{trainer_samples_per_s}, vae {vae_samples_per_s_per_gpu}/GPU, "
            f"text {text_samples_per_s_per_gpu}/GPU"
        )

    def need(rate: float) -> int:
        units = math.ceil(trainer_samples_per_s / rate / encoder_unit - 1e-12)
        return max(1, units) * encoder_unit

    vae, text = need(vae_samples_per_s_per_gpu), need(text_samples_per_s_per_gpu)
    if trainer_gpus + vae + text > total_gpus:
        raise ValueError(
            f"{trainer_gpus} trainer GPUs consume {trainer_samples_per_s:.3g} samples/s: they "
            f"need {vae} VAE + {text} text-encoder GPUs, more than the {total_gpus - trainer_gpus} "
            "left; use fewer trainers or faster encoders"
        )
    return _with_spare_to_encoders(
        total_gpus,
        trainer_gpus,
        trainer_samples_per_s,
        vae,
        text,
        vae_samples_per_s_per_gpu,
        text_samples_per_s_per_gpu,
        encoder_unit,
    )


def min_encoder_gpus(demand_samples_per_s: float, samples_per_s_per_gpu: float) -> int:
    """Encoder GPUs that keep up with ``demand`` samples/s (ceil of the ratio)."""
    if samples_per_s_per_gpu <= 0:
        raise ValueError(f"encoder samples/s per GPU must be > 0, got {samples_per_s_per_gpu}")
    return max(1, math.ceil(demand_samples_per_s / samples_per_s_per_gpu - 1e-12))
