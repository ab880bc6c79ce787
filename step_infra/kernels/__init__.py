"""Fused kernels for the DiT, each with the plain-PyTorch reference it is tested against.

``flash_attention`` is the one attention entry point the models use; it dispatches to Triton
on CUDA and to the PyTorch reference on the CPU (see ``dispatch``). ``adaln_modulate``,
``gated_residual`` and ``qk_norm_rope`` are the fused element-wise ops of a DiT block
(Triton; CUDA or the interpreter).

The one package whose names are imported eagerly: ``flash_attention`` is both a function
and a submodule, and a lazily loaded submodule would replace the function on the package.
"""

from step_infra.kernels.adaln import adaln_modulate, gated_residual
from step_infra.kernels.dispatch import flash_attention
from step_infra.kernels.qk_norm_rope import qk_norm_rope

__all__ = ["adaln_modulate", "flash_attention", "gated_residual", "qk_norm_rope"]
