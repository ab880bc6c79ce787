"""Fused kernels for the DiT, each with the plain-PyTorch reference it is tested against.

``flash_attention`` is the one entry point the models use; it dispatches to Triton on CUDA
and to the PyTorch reference on the CPU (see ``dispatch``).
"""

from step_infra.kernels.dispatch import flash_attention

__all__ = ["flash_attention"]
