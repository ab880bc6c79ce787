"""Host and device gauges sampled once per window on the exporter thread (never per step).

Memory is CUDA's allocator view when torch is already imported and CUDA is initialised,
the process RSS otherwise; host CPU is psutil's system-wide utilisation since the last call.
Telemetry never imports torch itself: it only looks at it if the trainer already did.
"""

from __future__ import annotations

import logging
import sys

import psutil

log = logging.getLogger(__name__)


class SystemSampler:
    """Reads memory and CPU gauges; cheap enough to call once per window."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)  # prime: the next call reports since now

    def sample(self) -> dict[str, float]:
        out = {
            "host_cpu_percent": float(psutil.cpu_percent(interval=None)),
            "rss_bytes": float(self._process.memory_info().rss),
        }
        torch = sys.modules.get("torch")
        try:
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                out["cuda_allocated_bytes"] = float(torch.cuda.memory_allocated())
                out["cuda_max_allocated_bytes"] = float(torch.cuda.max_memory_allocated())
        except Exception:  # a broken or stubbed CUDA runtime must not break the exporter
            log.debug("CUDA memory gauges unavailable", exc_info=True)
        return out
