"""step-infra: training infrastructure for large video diffusion transformers.

Sub-packages, one per system (see shared/DESIGN.md): ``emulator`` (Step Emulator),
``rpc`` (StepRPC), ``telemetry`` (StepTelemetry), ``kernels`` (Triton), ``models``,
``data``, ``train`` and ``recipes``. Importing this package does no work: every heavy
dependency (torch, megatron-core, triton) is imported by the sub-package that needs it.
"""

import warnings
from importlib.metadata import PackageNotFoundError, version

# megatron-core warns at import, several times per process, that it falls back to PyTorch's
# optimizers and kernels without Transformer Engine or Apex: expected on CPU, and `step-infra
# doctor` says once what it means. A filter is no work, so this package still imports nothing.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

try:
    __version__ = version("step-infra")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
