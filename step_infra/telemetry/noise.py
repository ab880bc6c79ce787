"""A noise model of per-rank step times shaped like a real cluster's, for testing detectors.

Independent log-normal jitter is the easy case: a detector tuned on it evicts healthy nodes on
a real cluster, where step times also carry (each a switch of :class:`ClusterNoise`):

* per-node shared jitter (the ranks of a host share its CPU, PCIe and NIC);
* step-to-step correlated jitter per rank (AR(1): thermal and clock drift, background load);
* rare single-step spikes of 2-5x (page faults, a slow allocation, a retransmit);
* unsynchronized GC-like pauses, each rank on its own period and phase;
* whole-node one-step hiccups (a daemon wakes up on the host);
* job-wide slow phases (a data stall, a checkpoint, a busy file system) that slow every rank.

And the faults a detector must find (:class:`Fault`): a slow rank, a slow node, a drifting
rank, an intermittent rank (slow bursts), each from an onset step. ``benchmarks/
telemetry_detection.py`` and the detector's tests draw from it with fixed seeds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterNoise:
    """Magnitudes of each noise kind (log sigmas, probabilities per step, factors)."""

    base_s: float = 0.1  # healthy compute time of one step
    iid_sigma: float = 0.03
    node_sigma: float = 0.02  # shared by a node's ranks, per step
    ar_sigma: float = 0.03  # stationary sigma of the correlated part
    ar_phi: float = 0.9  # step-to-step correlation of it
    spike_p: float = 0.01  # per rank and step
    spike_factor: tuple[float, float] = (2.0, 5.0)
    gc_period: tuple[int, int] = (20, 60)  # steps between a rank's pauses
    gc_pause: tuple[float, float] = (0.5, 1.5)  # pause length in healthy steps
    hiccup_p: float = 0.005  # per node and step
    hiccup_factor: tuple[float, float] = (1.3, 2.0)
    phase_p: float = 0.01  # per step: a job-wide slow phase starts
    phase_steps: tuple[int, int] = (5, 30)
    phase_factor: tuple[float, float] = (1.2, 2.0)

    @classmethod
    def iid(cls, sigma: float = 0.05) -> ClusterNoise:
        """Independent log-normal jitter only (the easy case)."""
        return cls(
            iid_sigma=sigma, node_sigma=0.0, ar_sigma=0.0, spike_p=0.0, gc_period=(0, 0),
            hiccup_p=0.0, phase_p=0.0,
        )  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """A slowdown to find: ``kind`` is rank, node, drift or intermittent."""

    kind: str
    target: int  # rank index (rank, drift, intermittent) or node index (node)
    factor: float  # slowdown (drift: the factor reached after ``ramp_steps``)
    onset: int = 0
    ramp_steps: int = 200  # drift
    burst_steps: tuple[int, int] = (8, 15)  # intermittent: slow bursts this long ...
    gap_steps: tuple[int, int] = (15, 30)  # ... separated by this many healthy steps

    def __post_init__(self) -> None:
        if self.kind not in ("rank", "node", "drift", "intermittent"):
            raise ValueError(
                f"fault kind must be rank, node, drift or intermittent, got {self.kind!r}"
            )
        if self.factor < 1.0:
            raise ValueError(f"fault factor is a slowdown (>= 1), got {self.factor}")


def simulate_steps(
    rng: np.random.Generator,
    *,
    nodes: int,
    ranks_per_node: int,
    steps: int,
    noise: ClusterNoise,
    fault: Fault | None = None,
) -> Iterator[np.ndarray]:
    """Yield one vector of per-rank step times (seconds) per step."""
    ranks = nodes * ranks_per_node
    node_of = np.arange(ranks) // ranks_per_node
    ar = rng.normal(0.0, noise.ar_sigma, ranks) if noise.ar_sigma else np.zeros(ranks)
    innov = noise.ar_sigma * np.sqrt(1.0 - noise.ar_phi**2)
    gc_on = noise.gc_period[1] > 0
    period = rng.integers(noise.gc_period[0], noise.gc_period[1] + 1, ranks) if gc_on else None
    phase = rng.integers(0, 10_000, ranks)
    slow_phase_left, slow_phase_factor = 0, 1.0
    burst_left, gap_left = 0, 0
    for step in range(steps):
        log_t = rng.normal(0.0, noise.iid_sigma, ranks) if noise.iid_sigma else np.zeros(ranks)
        if noise.node_sigma:
            log_t += rng.normal(0.0, noise.node_sigma, nodes)[node_of]
        if noise.ar_sigma:
            ar = noise.ar_phi * ar + rng.normal(0.0, innov, ranks)
            log_t += ar
        t = noise.base_s * np.exp(log_t)
        if noise.spike_p:
            hit = rng.random(ranks) < noise.spike_p
            t[hit] *= rng.uniform(*noise.spike_factor, int(hit.sum()))
        if period is not None:
            pause = (step + phase) % period == 0
            t[pause] += noise.base_s * rng.uniform(*noise.gc_pause, int(pause.sum()))
        if noise.hiccup_p:
            hit_nodes = np.flatnonzero(rng.random(nodes) < noise.hiccup_p)
            for n in hit_nodes:
                t[node_of == n] *= rng.uniform(*noise.hiccup_factor)
        if slow_phase_left == 0 and noise.phase_p and rng.random() < noise.phase_p:
            slow_phase_left = int(rng.integers(noise.phase_steps[0], noise.phase_steps[1] + 1))
            slow_phase_factor = float(rng.uniform(*noise.phase_factor))
        if slow_phase_left:
            t *= slow_phase_factor
            slow_phase_left -= 1
        if fault is not None and step >= fault.onset:
            if fault.kind == "rank":
                t[fault.target] *= fault.factor
            elif fault.kind == "node":
                t[node_of == fault.target] *= fault.factor
            elif fault.kind == "drift":
                ramp = min(1.0, (step - fault.onset) / max(fault.ramp_steps, 1))
                t[fault.target] *= 1.0 + (fault.factor - 1.0) * ramp
            else:  # intermittent
                if burst_left == 0 and gap_left == 0:
                    burst_left = int(rng.integers(fault.burst_steps[0], fault.burst_steps[1] + 1))
                    gap_left = int(rng.integers(fault.gap_steps[0], fault.gap_steps[1] + 1))
                if burst_left:
                    t[fault.target] *= fault.factor
                    burst_left -= 1
                else:
                    gap_left -= 1
        yield t
