"""step-infra: training infrastructure for large video diffusion transformers.

Sub-packages, one per system (see shared/DESIGN.md): ``emulator`` (Step Emulator),
``rpc`` (StepRPC), ``telemetry`` (StepTelemetry), ``kernels`` (Triton), ``models``,
``data``, ``train`` and ``recipes``. Importing this package does no work: every heavy
dependency (torch, megatron-core, triton) is imported by the sub-package that needs it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("step-infra")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
