"""Named GPUs and models.

GPU figures: dense (no sparsity) peaks from NVIDIA's datasheets, as collected in
shared/REFERENCE.md for A100/H100/H200/H20; B200 from NVIDIA's HGX B200 datasheet (not in
REFERENCE.md). Efficiencies (``gemm_eff_max``, ``gemm_half_dim``, ``attn_eff``,
``fp8_gemm_eff_max``, ``comm_eff``) are the values ``calibration.fit`` finds on
shared/calibration; Hopper-class parts share the H100 fit, the B200 reuses it too (no
published B200 runs in the calibration set: treat its predictions as unvalidated).
Model shapes come from the papers named in each group.
"""

from __future__ import annotations

from typing import Any

from step_infra.emulator.specs import ClusterSpec, GPUSpec, ModelSpec

# Fitted on shared/calibration by `python benchmarks/emulator_validation.py --fit`.
_AMPERE_FIT: dict[str, Any] = {
    "gemm_eff_max": 0.7589,
    "gemm_half_dim": 133.3,
    "attn_eff": 0.30,
    "comm_eff": 0.90,
}
_HOPPER_FIT: dict[str, Any] = {
    "gemm_eff_max": 0.7429,
    "gemm_half_dim": 119.5,
    "attn_eff": 0.4041,
    "fp8_gemm_eff_max": 0.5861,
    "comm_eff": 0.90,
}

GPUS: dict[str, GPUSpec] = {
    "a100-80g": GPUSpec(
        name="a100-80g",
        peak_tflops_bf16=312,
        peak_tflops_fp8=312,
        hbm_gb=80,
        hbm_gb_s=2039,
        nvlink_gb_s=300,
        source="NVIDIA A100 datasheet (SXM 80GB); no FP8 units",
        **_AMPERE_FIT,
    ),
    "h100-sxm": GPUSpec(
        name="h100-sxm",
        peak_tflops_bf16=989,
        peak_tflops_fp8=1979,
        hbm_gb=80,
        hbm_gb_s=3350,
        nvlink_gb_s=450,
        source="NVIDIA H100 datasheet (SXM5)",
        **_HOPPER_FIT,
    ),
    "h200": GPUSpec(
        name="h200",
        peak_tflops_bf16=989,
        peak_tflops_fp8=1979,
        hbm_gb=141,
        hbm_gb_s=4800,
        nvlink_gb_s=450,
        source="NVIDIA H200 datasheet (SXM)",
        **_HOPPER_FIT,
    ),
    "h20": GPUSpec(
        name="h20",
        peak_tflops_bf16=148,
        peak_tflops_fp8=296,
        hbm_gb=96,
        hbm_gb_s=4000,
        nvlink_gb_s=450,
        source="NVIDIA H20 product brief",
        **_HOPPER_FIT,
    ),
    "b200": GPUSpec(
        name="b200",
        peak_tflops_bf16=2250,
        peak_tflops_fp8=4500,
        hbm_gb=180,
        hbm_gb_s=8000,
        nvlink_gb_s=900,
        source="NVIDIA HGX B200 datasheet (dense figures); efficiencies unvalidated",
        **_HOPPER_FIT,
    ),
}
# Inter-node bandwidth per GPU: DGX A100 has 8 x 200 Gb/s HDR (25 GB/s per GPU); Hopper and
# Blackwell nodes 8 x 400 Gb/s (50 GB/s per GPU) (REFERENCE.md).
NIC_GB_S = {"a100-80g": 25.0, "h100-sxm": 50.0, "h200": 50.0, "h20": 50.0, "b200": 50.0}


def get_gpu(name: str) -> GPUSpec:
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; expected one of {sorted(GPUS)}")
    return GPUS[name]


def cluster_for(gpu: str | GPUSpec, num_gpus: int, *, gpus_per_node: int = 8) -> ClusterSpec:
    """A cluster of ``num_gpus`` of a preset GPU with that generation's NICs."""
    spec = get_gpu(gpu) if isinstance(gpu, str) else gpu
    return ClusterSpec.for_gpus(
        spec, num_gpus, gpus_per_node=gpus_per_node, nic_gb_s=NIC_GB_S.get(spec.name, 50.0)
    )


def _gpt2021(params: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    """GPT of Narayanan et al. 2021 Table 1 (vocab 51,200, sequence 2,048, learned positions)."""
    return ModelSpec(
        name=f"gpt-{params}",
        layers=layers,
        hidden=hidden,
        heads=heads,
        vocab=51200,
        seq_len=2048,
        learned_positions=True,
    )


def _gpt2024(params: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    """GPT of the Megatron-LM README weak-scaling table (2024): vocab 131,072, sequence 4,096,
    rotary positions, untied output layer."""
    return ModelSpec(
        name=f"gpt-{params}-2024",
        layers=layers,
        hidden=hidden,
        heads=heads,
        vocab=131072,
        seq_len=4096,
        tied_embeddings=False,
        learned_positions=True,
    )


def _llama3(name: str, layers: int, hidden: int, heads: int, ffn: int) -> ModelSpec:
    """Llama 3 (Dubey et al. 2024, Table 3): GQA with 8 KV heads, SwiGLU, vocab 128,256."""
    return ModelSpec(
        name=name,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=8,
        ffn=ffn,
        gated_mlp=True,
        vocab=128256,
        seq_len=8192,
        tied_embeddings=False,
    )


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        _gpt2021("1.7b", 24, 2304, 24),
        _gpt2021("3.6b", 30, 3072, 32),
        _gpt2021("7.5b", 36, 4096, 32),
        _gpt2021("18.4b", 40, 6144, 48),
        _gpt2021("39.1b", 48, 8192, 64),
        _gpt2021("76.1b", 60, 10240, 80),
        _gpt2021("145.6b", 80, 12288, 96),
        _gpt2021("310.1b", 96, 16384, 128),
        _gpt2021("529.6b", 105, 20480, 128),
        _gpt2021("1008b", 128, 25600, 160),
        _gpt2024("1.7b", 24, 2048, 16),
        _gpt2024("7.1b", 30, 4096, 32),
        _gpt2024("16b", 32, 6144, 48),
        _gpt2024("32b", 48, 7168, 56),
        _gpt2024("70b", 84, 8192, 64),
        _gpt2024("119b", 92, 10240, 80),
        _gpt2024("177b", 96, 12288, 96),
        _gpt2024("314b", 96, 16384, 128),
        _gpt2024("462b", 112, 18432, 144),
        _llama3("llama3-8b", 32, 4096, 32, 14336),
        _llama3("llama3-70b", 80, 8192, 64, 28672),
        _llama3("llama3.1-405b", 126, 16384, 128, 53248),
        # Step-Video-T2V (REFERENCE.md): 48 x 6144, 48 heads x 128, CLIP 77 + Step-LLM 320 text
        # tokens; seq_len below is one 204x544x992 clip (36 x 34 x 62 latent tokens).
        ModelSpec(
            name="stepvideo-t2v-30b",
            kind="dit",
            layers=48,
            hidden=6144,
            heads=48,
            head_dim=128,
            ffn=24576,
            seq_len=75888,
            text_tokens=397,
            text_dim=1024,
            latent_channels=64,
        ),
        # The project's CPU models (same shapes as step_infra.models' `tiny-dit` and
        # `micro-dit`, trained in fp32 there): 9-frame 16x16 clips -> 3 x 4 x 4 latent tokens
        # with the tiny VAE (4x time, 4x space, 9-frame chunks); 24 text tokens by default.
        ModelSpec(
            name="tiny-dit",
            kind="dit",
            layers=4,
            hidden=128,
            heads=4,
            head_dim=32,
            ffn=512,
            seq_len=48,
            dtype="fp32",
            text_tokens=24,
            text_dim=384,
            text_dim_long=128,
            timestep_channels=64,
            latent_channels=16,
            vae_time=4,
            vae_space=4,
        ),
        ModelSpec(
            name="micro-dit",
            kind="dit",
            layers=2,
            hidden=32,
            heads=4,
            head_dim=8,
            ffn=64,
            seq_len=48,
            dtype="fp32",
            text_tokens=24,
            text_dim=24,
            text_dim_long=16,
            timestep_channels=16,
            latent_channels=4,
            vae_time=4,
            vae_space=4,
        ),
    ]
}
ALIASES = {"llama3-405b": "llama3.1-405b"}


def get_model(name: str) -> ModelSpec:
    key = ALIASES.get(name, name)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[key]
