"""Selective and full activation recompute: the same gradients as none, bitwise, and less
memory kept for the backward (none > selective > full), selective by exactly what the
emulator prices (``costmodel._memory``'s ``selective_saving``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from step_infra.elastic.checkpoint import state_dict
from step_infra.models.config import get_preset
from step_infra.models.dit import DiT, DiTLayer, build_dit
from step_infra.models.recompute import apply_recompute, saved_activation_bytes
from step_infra.train.sharding_check import launch

CONFIG = get_preset("micro-dit").replace(zero_init_output=False)
BATCH, FRAMES, SIDE = 2, 2, 4


def _inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    c = CONFIG
    return (
        torch.randn(BATCH, c.in_channels, FRAMES, SIDE, SIDE, generator=g),
        torch.rand(BATCH, generator=g),
        torch.randn(BATCH, 5, c.text_dim_short, generator=g),
        torch.tensor([5, 2]),
        torch.randn(BATCH, 3, c.text_dim_long, generator=g),
        torch.tensor([1, 3]),
    )


def _run(mode: str, num_layers: int | None = None) -> tuple[DiT, int]:
    torch.set_num_threads(1)
    model = build_dit(CONFIG, seed=3)
    apply_recompute(model, mode, num_layers=num_layers)
    inputs = _inputs()
    forward: Callable[[], torch.Tensor] = lambda: model(*inputs)  # noqa: E731
    saved = saved_activation_bytes(forward, exclude=list(model.parameters()))
    out = forward()
    (out.square().mean() + out.sum() * 1e-3).backward()
    return model, saved


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[DiT, int]]:
    return {
        "none": _run("none"),
        "selective": _run("selective"),
        "full": _run("full"),
        "full1": _run("full", num_layers=1),
    }


def test_gradients_are_those_of_no_recompute(runs: dict[str, tuple[DiT, int]]) -> None:
    ref = dict(runs["none"][0].named_parameters())
    for mode in ("selective", "full", "full1"):
        for name, p in runs[mode][0].named_parameters():
            assert torch.equal(p.grad, ref[name].grad), (mode, name)  # type: ignore[arg-type]


def test_saved_bytes_fall_as_the_emulator_prices(runs: dict[str, tuple[DiT, int]]) -> None:
    saved = {mode: b for mode, (_, b) in runs.items()}
    assert saved["none"] > saved["selective"] > saved["full1"] > saved["full"] > 0
    # selective frees one ffn-wide tensor per layer: tokens x ffn x dtype bytes (tp = 1)
    tokens = BATCH * FRAMES * (SIDE // CONFIG.patch_size) ** 2
    per_layer = tokens * CONFIG.ffn_hidden_size * 4
    assert saved["none"] - saved["selective"] == CONFIG.num_layers * per_layer


def test_names_types_and_checkpoint_keys_are_unchanged(runs: dict[str, tuple[DiT, int]]) -> None:
    plain = runs["none"][0]
    opt = torch.optim.AdamW(plain.parameters())
    keys = set(state_dict(plain, opt, 0, tp_rank=0, tp_size=1))
    for mode in ("selective", "full"):
        model = runs[mode][0]
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
        assert list(model.state_dict()) == list(plain.state_dict())
        assert all(isinstance(layer, DiTLayer) for layer in model.layers)
        model.init_weights(torch.Generator().manual_seed(1))  # asserts the blocks' type
        opt = torch.optim.AdamW(model.parameters())
        assert set(state_dict(model, opt, 0, tp_rank=0, tp_size=1)) == keys


def test_inference_and_repeated_forwards() -> None:
    model = build_dit(CONFIG, seed=3)
    apply_recompute(model, "selective")
    inputs = _inputs()
    with torch.no_grad():
        a = model(*inputs)
    b = model(*inputs)  # a graph that is never used for a backward
    del b
    c = model(*inputs)
    c.sum().backward()
    assert torch.equal(a, c.detach())


def test_bad_arguments_are_named() -> None:
    model = build_dit(CONFIG, seed=3)
    with pytest.raises(ValueError, match="recompute mode must be one of"):
        apply_recompute(model, "some")
    with pytest.raises(ValueError, match="num_layers=3 but the model has 2"):
        apply_recompute(model, "full", num_layers=3)
    with pytest.raises(ValueError, match="found no DiTLayer"):
        apply_recompute(torch.nn.Linear(2, 2), "full")
    apply_recompute(model, "selective", num_layers=1)
    with pytest.raises(ValueError, match="already has recompute='selective'"):
        apply_recompute(model, "full")
    assert apply_recompute(model, "none") == []


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tp", "2", "--sp"], ["--cp", "2"]])
def test_recompute_on_parallel_layouts(layout: list[str]) -> None:
    # megatron-core's parallel linears save their inputs with save_for_backward; the freed
    # and recomputed GELU output must reach their backward intact (bitwise)
    rc, rows, err = launch(2, "recompute", *layout)
    assert rc == 0 and rows, err
    assert rows[0]["grad_err"] == {"selective": 0.0, "full": 0.0}, rows[0]
