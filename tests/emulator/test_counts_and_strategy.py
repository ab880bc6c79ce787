"""Parameter counts against published sizes, FLOPs against REFERENCE.md, strategy rules."""

from __future__ import annotations

import pytest

from step_infra.emulator import Strategy, cluster_for, estimate, get_model, parameter_count
from step_infra.emulator.counts import forward_flops_per_sample
from step_infra.emulator.presets import MODELS

# Published sizes (billions) as printed: Narayanan et al. 2021 Table 1, the Megatron-LM
# README table (2024) and Llama 3. The paper prints 2-4 significant digits, so a count
# "matches" when it is within 1 % or rounds to the printed figure (gpt-1.7b: the paper's own
# formula gives 1.65 B, printed as 1.7).
PUBLISHED_B = {
    "gpt-1.7b": "1.7",
    "gpt-3.6b": "3.6",
    "gpt-7.5b": "7.5",
    "gpt-18.4b": "18.4",
    "gpt-39.1b": "39.1",
    "gpt-76.1b": "76.1",
    "gpt-145.6b": "145.6",
    "gpt-310.1b": "310.1",
    "gpt-529.6b": "529.6",
    "gpt-1008b": "1008",
    "gpt-7.1b-2024": "7.1",
    "gpt-16b-2024": "16",
    "gpt-32b-2024": "32",
    "gpt-70b-2024": "70",
    "gpt-119b-2024": "119",
    "gpt-177b-2024": "177",
    "gpt-314b-2024": "314",
    "gpt-462b-2024": "462",
    "llama3-8b": "8.0",
    "llama3-70b": "70.6",
    "llama3.1-405b": "405",
}


def _matches(count: float, printed: str) -> bool:
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    value = float(printed)
    return abs(count / value - 1) <= 0.01 or round(count, decimals) == value


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_parameter_count_matches_published_size(name: str) -> None:
    billions = parameter_count(MODELS[name]) / 1e9
    assert _matches(billions, PUBLISHED_B[name]), (
        f"{name}: {billions:.3f} B vs published {PUBLISHED_B[name]}"
    )


def test_gpt_count_follows_megatron_formula() -> None:
    """Narayanan et al. 2021: P = 12 l h^2 (1 + 13 / (12 h) + (V + s) / (12 l h))."""
    m = MODELS["gpt-18.4b"]
    n, h, v, s = m.layers, m.hidden, m.vocab, m.seq_len
    formula = 12 * n * h * h * (1 + 13 / (12 * h) + (v + s) / (12 * n * h))
    assert parameter_count(m) == pytest.approx(formula, rel=1e-6)


def test_stepvideo_matches_models_meta_build_count() -> None:
    """The emulator and step_infra.models count the same 30B DiT, to the parameter."""
    from step_infra.models.config import dit_parameter_count

    assert parameter_count(get_model("stepvideo-t2v-30b")) == dit_parameter_count(
        "stepvideo-t2v-30b"
    )


def test_stepvideo_workload_matches_reference() -> None:
    """REFERENCE.md: 204x544x992 -> 36x34x62 = 75,888 tokens; ~10.7 PFLOP forward, ~64 % self-attention."""
    m = get_model("stepvideo-t2v-30b")
    assert m.latent_shape(204, 544, 992) == (36, 34, 62)
    assert m.with_video(204, 544, 992).seq_len == 75_888
    flops = forward_flops_per_sample(m)
    total = sum(flops.values())
    assert total == pytest.approx(10.7e15, rel=0.03)
    assert flops["attention"] / total == pytest.approx(0.64, abs=0.02)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        (Strategy(tp=32, global_batch=256), "tp=32 does not divide 48 heads"),
        (Strategy(tp=16, global_batch=256), "tp=16 exceeds a node of GPUs"),
        (
            Strategy(tp=8, cp=8, global_batch=256),
            "Ulysses cp=8 does not divide the 48 heads / tp=8",
        ),
        (Strategy(pp=1, vpp=2, global_batch=256), "vpp=2 needs pp > 1"),
        (
            Strategy(tp=8, pp=4, global_batch=100),
            "global_batch=100 is not a multiple of micro_batch=1 x dp=64",
        ),
        (Strategy(tp=3, global_batch=256), "tp*pp*cp = 3 does not divide the 2048 GPUs"),
        (Strategy(sequence_parallel=True, global_batch=2048), "sequence_parallel needs tp > 1"),
        (Strategy(tp=8, recompute="some", global_batch=256), "recompute='some'; expected one of"),  # type: ignore[arg-type]
    ],
)
def test_invalid_strategy_names_the_rule(strategy: Strategy, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        estimate(get_model("stepvideo-t2v-30b"), cluster_for("h100-sxm", 2048), strategy)


def test_unknown_presets_are_named() -> None:
    with pytest.raises(ValueError, match="unknown GPU 'v100'"):
        cluster_for("v100", 8)
    with pytest.raises(ValueError, match="unknown model 'gpt-5'"):
        get_model("gpt-5")
