"""What the emulator prices: the model (``ModelSpec``) and the machine (``ClusterSpec``).

Both are small frozen dataclasses so a search can hold one of each and vary only the
``Strategy``. Video DiTs carry the VAE compression so a workload is given in frames x height x
width and turned into latent tokens here, the way the trainer will see it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# Framework operations (dispatched aten ops, views included) that one DiT block issues for one
# micro-batch, forward + backward, and those outside the blocks (patchify, timestep and caption
# embeddings, final layer, loss, the trainer's inputs). Counted with a TorchDispatchMode on the
# training job's eager step (``tests/job/test_op_counts.py`` keeps them honest); a fused
# implementation (Transformer-Engine, torch.compile) issues fewer, which matters only where
# dispatch is exposed.
EAGER_DIT_OPS_PER_LAYER = 390
EAGER_DIT_OPS_OUTSIDE_LAYERS = 335
# Ops of one parameter update by the job's eager trainer, per rank: zero the gradients, the
# global grad-norm clip, and a per-tensor AdamW step (16 parameter tensors a block; ~10 ops
# each for Adam, 5 for the clip). A fused multi-tensor optimizer (megatron-core's, apex or TE
# FusedAdam) issues a handful of launches for all of them: ``ModelSpec`` defaults to 0.
EAGER_UPDATE_OPS_PER_LAYER = 256
EAGER_UPDATE_OPS_OUTSIDE_LAYERS = 313


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """A transformer LM (``kind="lm"``) or a video DiT (``kind="dit"``).

    For a DiT, ``seq_len`` is the number of latent tokens of one sample (see
    :meth:`with_video`) and ``text_tokens`` the length of the text it cross-attends to.

    ``dtype`` is what the model trains in: ``"bf16"`` is mixed precision (bf16 weights and
    activations, fp32 gradients and Adam master weights, as Megatron runs on GPUs);
    ``"fp32"`` is plain fp32 training (the CPU demo models). It sets the bytes of every
    activation, element-wise pass and activation message; the GEMM rate is the profile's (a CPU
    profile measures fp32 matmuls, a GPU preset's peak is bf16).

    ``state_precision`` says how a bf16 model's weights, gradients and Adam state are held:
    ``"mixed"`` as Megatron's mixed precision (bf16 weights, fp32 main gradients, fp32 master
    weights and m, v in the optimizer); ``"fp32"`` fp32 weights, gradients and m, v (bf16
    compute only); ``"activation"`` everything in bf16 (a model cast to bf16 and torch's
    AdamW, whose state takes the parameters' dtype). fp32 training holds all in fp32.
    """

    name: str
    kind: Literal["lm", "dit"] = "lm"
    layers: int
    hidden: int
    heads: int
    head_dim: int | None = None
    kv_heads: int | None = None
    ffn: int | None = None
    gated_mlp: bool = False
    vocab: int = 0
    seq_len: int
    tied_embeddings: bool = True
    learned_positions: bool = False
    dtype: Literal["bf16", "fp32"] = "bf16"
    # how a bf16 model's training state is held (``costmodel.state_bytes_per_param``)
    state_precision: Literal["mixed", "fp32", "activation"] = "mixed"
    # DiT-only fields
    text_tokens: int = 0
    text_dim: int = 0
    text_dim_long: int | None = None  # width of the long (LLM) text encoder; None: hidden
    timestep_channels: int = 256
    latent_channels: int = 0
    vae_time: int = 8
    vae_space: int = 16
    patch: int = 1
    # framework ops per micro-batch (forward + backward): see EAGER_DIT_OPS_PER_LAYER
    ops_per_layer: int = EAGER_DIT_OPS_PER_LAYER
    ops_outside_layers: int = EAGER_DIT_OPS_OUTSIDE_LAYERS
    # framework ops of one parameter update per rank (0: a fused optimizer); an eager
    # per-tensor trainer sets EAGER_UPDATE_OPS_PER_LAYER / ..._OUTSIDE_LAYERS
    update_ops_per_layer: int = 0
    update_ops_outside_layers: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.name}: {name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "ops_per_layer", "ops_outside_layers", "update_ops_per_layer",
            "update_ops_outside_layers",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{self.name}: {name} must be >= 0, got {getattr(self, name)}")
        if self.head_dim is None:
            if self.hidden % self.heads:
                raise ValueError(
                    f"{self.name}: hidden {self.hidden} is not a multiple of heads {self.heads}; "
                    "give head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.ffn is None:
            object.__setattr__(self, "ffn", 4 * self.hidden)
        assert self.kv_heads is not None
        if self.heads % self.kv_heads:
            raise ValueError(
                f"{self.name}: heads {self.heads} not a multiple of kv_heads {self.kv_heads}"
            )
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"{self.name}: dtype={self.dtype!r}; expected 'bf16' or 'fp32'")
        if self.state_precision not in ("mixed", "fp32", "activation"):
            raise ValueError(
                f"{self.name}: state_precision={self.state_precision!r}; expected 'mixed', "
                "'fp32' or 'activation'"
            )
        if self.text_dim_long is None:
            object.__setattr__(self, "text_dim_long", self.hidden)
        if self.kind == "dit" and self.latent_channels < 1:
            raise ValueError(f"{self.name}: a DiT needs latent_channels >= 1")

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one activation element (and of a weight in the forward pass)."""
        return 4 if self.dtype == "fp32" else 2

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated heads (``heads x head_dim``)."""
        assert self.head_dim is not None
        return self.heads * self.head_dim

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (frames, height, width) after the causal VAE (REFERENCE.md): video is cut into
        chunks of ``2 * vae_time + 1`` frames (17), each giving ``3`` latent frames (first frame
        kept, then ``vae_time``x); ``vae_space``x in space. 204x544x992 -> 36x34x62."""
        if min(frames, height, width) < 1:
            raise ValueError(f"video must be at least 1x1x1, got {frames}x{height}x{width}")
        chunk = 2 * self.vae_time + 1
        whole, rest = divmod(frames, chunk)
        lat_f = 3 * whole + (1 + math.ceil((rest - 1) / self.vae_time) if rest else 0)
        step = self.vae_space * self.patch
        return lat_f, math.ceil(height / step), math.ceil(width / step)

    def with_video(self, frames: int, height: int, width: int) -> ModelSpec:
        """The same DiT with ``seq_len`` set to the latent tokens of one such video."""
        if self.kind != "dit":
            raise ValueError(f"{self.name} is a {self.kind}, not a video DiT")
        f, h, w = self.latent_shape(frames, height, width)
        return dataclasses.replace(self, seq_len=f * h * w)


@dataclass(frozen=True, slots=True, kw_only=True)
class GPUSpec:
    """One accelerator: datasheet peaks plus the few fitted efficiencies of the time model.

    ``gemm_eff_max`` and ``gemm_half_dim`` shape the achievable matmul rate
    (``peak * eff_max * costmodel.gemm_fill(d, tokens, half_dim)`` for a GEMM of per-GPU
    width ``d`` over ``tokens`` rows);
    ``attn_eff`` is the fraction of peak reached by fused attention; ``comm_eff`` the fraction
    of link bandwidth a ring collective reaches. They are fitted on shared/calibration.
    ``comm_overlap`` is the share of the compute time under which an overlapped collective can
    run hidden: 0.9 on a GPU, whose NICs and copy engines move data beside the SMs (NCCL's
    kernels take a few of them); on a CPU the collective's threads need the cores the compute
    uses, and ``step-infra calibrate`` measures it.

    ``op_overhead_us`` is the host time to issue one framework op (eager dispatch, autograd
    bookkeeping, kernel launch). With ``async_dispatch`` (a GPU) the host queues ops ahead of
    the device, so dispatch costs time only where it outruns the device's work; without it (a
    CPU, which runs each op itself) every op pays it. A model of small matmuls is bound by it.
    The GPU default is the order of PyTorch's eager per-op cost; a CPU profile measures it.
    """

    name: str
    peak_tflops_bf16: float
    peak_tflops_fp8: float
    hbm_gb: float
    hbm_gb_s: float
    nvlink_gb_s: float
    source: str
    gemm_eff_max: float = 0.80
    gemm_half_dim: float = 256.0
    attn_eff: float = 0.55
    fp8_gemm_eff_max: float = 0.55
    comm_eff: float = 0.75
    comm_overlap: float = 0.9
    op_overhead_us: float = 5.0
    async_dispatch: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSpec:
    """A homogeneous cluster: ``nodes`` x ``gpus_per_node`` GPUs, NVLink inside a node,
    ``nic_gb_s`` per GPU between nodes."""

    gpu: GPUSpec
    nodes: int
    gpus_per_node: int = 8
    nic_gb_s: float = 50.0
    nvlink_latency_us: float = 5.0
    nic_latency_us: float = 10.0
    buffers_gb: float = 3.0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"cluster needs >= 1 node of >= 1 GPU, got {self.nodes} x {self.gpus_per_node}"
            )

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @classmethod
    def for_gpus(
        cls, gpu: GPUSpec, num_gpus: int, *, gpus_per_node: int = 8, **kw: float
    ) -> ClusterSpec:
        """A cluster of ``num_gpus`` (a multiple of ``gpus_per_node`` unless it fits in one node)."""
        if num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
        per_node = min(gpus_per_node, num_gpus)
        if num_gpus % per_node:
            raise ValueError(f"{num_gpus} GPUs is not a whole number of {per_node}-GPU nodes")
        return cls(gpu=gpu, nodes=num_gpus // per_node, gpus_per_node=per_node, **kw)

    @classmethod
    def from_profile(cls, path: str | Path, *, nodes: int = 1) -> ClusterSpec:
        """Load a hardware profile written by ``step-infra calibrate``."""
        data = json.loads(Path(path).read_text())
        try:
            gpu = GPUSpec(**data["gpu"])
            return cls(gpu=gpu, nodes=nodes, **data["cluster"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a step-infra hardware profile: {exc}") from exc

    def to_profile(self) -> dict[str, object]:
        cluster = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("gpu", "nodes")
        }
        return {"gpu": dataclasses.asdict(self.gpu), "cluster": cluster}
