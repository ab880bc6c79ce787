"""Element-wise traffic by hand, fp32 vs bf16 training, DP overlap, the CPU presets' shapes."""

from __future__ import annotations

import dataclasses

import pytest

from step_infra.emulator import ModelSpec, Strategy, cluster_for, estimate, get_model
from step_infra.emulator.counts import elementwise_elements_per_token, parameter_count

GB = 1e9
GPT = ModelSpec(name="gpt-hand", layers=4, hidden=1024, heads=8, vocab=0, seq_len=2048)
DIT = ModelSpec(
    name="dit-hand",
    kind="dit",
    layers=4,
    hidden=1024,
    heads=8,
    seq_len=2048,
    text_tokens=64,
    text_dim=256,
    latent_channels=16,
)


def test_elementwise_elements_by_hand() -> None:
    """GPT: 2 norms (2h) + 2 residual adds (3h) replicated, GELU over 4h (2f) split by TP.
    DiT (a = h, f = 4h): 29h replicated; q/k norms 6a + head layout 4a + GELU 2f split."""
    h = 1024
    assert elementwise_elements_per_token(GPT) == (10 * h, 8 * h)
    assert elementwise_elements_per_token(DIT) == (29 * h, 10 * h + 8 * h)
    swiglu = dataclasses.replace(GPT, gated_mlp=True, ffn=2816)
    assert elementwise_elements_per_token(swiglu)[1] == 3 * 2816


def test_elementwise_time_splits_by_tp_and_scales_with_dtype() -> None:
    cluster = cluster_for("h100-sxm", 8)
    one = estimate(DIT, cluster, Strategy(global_batch=8)).breakdown["t_compute_elementwise_s"]
    two = estimate(DIT, cluster, Strategy(tp=2, global_batch=4)).breakdown
    rep, split = elementwise_elements_per_token(DIT)
    # one micro-batch per GPU in both; without SP the replicated part stays whole on each rank
    expected = one * (rep + split / 2) / (rep + split)
    assert two["t_compute_elementwise_s"] == pytest.approx(expected, rel=1e-9)
    fp32 = dataclasses.replace(DIT, dtype="fp32")
    assert estimate(fp32, cluster, Strategy(global_batch=8)).breakdown[
        "t_compute_elementwise_s"
    ] == pytest.approx(2 * one, rel=1e-9)


def test_fp32_training_state_and_activations() -> None:
    """fp32: weights 4 + grads 4 + Adam m, v 8 bytes a parameter; activations twice bf16's."""
    cluster = cluster_for("h100-sxm", 8)
    fp32 = dataclasses.replace(GPT, dtype="fp32")
    params = 4 * (12 * 1024**2 + 2 * 1024) + 2 * 1024
    e = estimate(fp32, cluster, Strategy(global_batch=8, distributed_optimizer=False)).breakdown
    assert e["mem_params_gb"] == pytest.approx(4 * params / GB)
    assert e["mem_grads_gb"] == pytest.approx(4 * params / GB)
    assert e["mem_optimizer_gb"] == pytest.approx(8 * params / GB)
    bf16 = estimate(GPT, cluster, Strategy(global_batch=8)).breakdown
    assert e["mem_activations_gb"] == pytest.approx(2 * bf16["mem_activations_gb"])
    with pytest.raises(ValueError, match="dtype='fp16'; expected 'bf16' or 'fp32'"):
        dataclasses.replace(GPT, dtype="fp16")  # type: ignore[arg-type]


def test_dp_overlap_follows_comm_overlap() -> None:
    """A collective hides under at most ``comm_overlap`` of the backward: 0 (a CPU whose cores
    do both) leaves all of it exposed."""
    base = cluster_for("h100-sxm", 16)
    strategy = Strategy(tp=8, global_batch=16)
    gpu_hides = estimate(DIT, base, strategy).breakdown
    cpu_like = dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, comm_overlap=0.0))
    no_hide = estimate(DIT, cpu_like, strategy).breakdown
    total = gpu_hides["t_dp_comm_exposed_s"] + gpu_hides["t_dp_comm_hidden_s"]
    assert no_hide["t_dp_comm_hidden_s"] == 0.0
    assert no_hide["t_dp_comm_exposed_s"] == pytest.approx(total)
    assert gpu_hides["t_dp_comm_hidden_s"] > 0


def test_dit_tp_backward_reduces_the_text_gradient() -> None:
    cluster = cluster_for("h100-sxm", 8)
    with_text = estimate(DIT, cluster, Strategy(tp=2, global_batch=4)).breakdown
    no_text = estimate(
        dataclasses.replace(DIT, text_tokens=0), cluster, Strategy(tp=2, global_batch=4)
    )
    assert with_text["t_tp_comm_exposed_s"] > no_text.breakdown["t_tp_comm_exposed_s"]


@pytest.mark.parametrize("name", ["tiny-dit", "micro-dit"])
def test_cpu_presets_match_models_configs(name: str) -> None:
    """The emulator's CPU presets count the same parameters as step_infra.models builds, and
    train in fp32 as it does on a CPU."""
    from step_infra.models.config import dit_parameter_count

    model = get_model(name)
    assert parameter_count(model) == dit_parameter_count(name)
    assert model.dtype == "fp32" and model.latent_shape(9, 16, 16) == (3, 4, 4)
