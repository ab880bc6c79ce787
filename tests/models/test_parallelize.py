"""The model / parallelize split: a DiT without groups is a plain one-process model (no
``torch.distributed``, no global RNG), its stages compose to ``forward``, and ``parallelize``
refuses a model built for other groups. The parallel layouts themselves are compared with one
rank in ``test_parallel_torchrun``."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from step_infra.models import DiT, DiTConfig, ParallelGroups, build_dit, get_preset
from step_infra.models.layers import LocalLinear, init_parallel_linear_
from step_infra.models.parallelize import parallelize


class _Group:
    """Stands in for a process group of ``size`` ranks (only size and rank are asked)."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _inputs(c: DiTConfig, batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, 2, 4, 4, generator=g)
    t = torch.rand(batch, generator=g)
    ts = torch.randn(batch, 5, c.text_dim_short, generator=g)
    tl = torch.randn(batch, 3, c.text_dim_long, generator=g)
    return x, t, ts, torch.tensor([5, 2]), tl, torch.tensor([1, 3])


def test_without_groups_no_torch_distributed_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("torch.distributed was called")

    for name, obj in vars(dist).items():
        if callable(obj) and not inspect.isclass(obj) and not name.startswith("_"):
            monkeypatch.setattr(dist, name, refuse)
    c = get_preset("micro-dit").replace(zero_init_output=False)
    for model in (DiT(c), build_dit(c, seed=1)):
        model(*_inputs(c)).square().mean().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_build_dit_leaves_the_global_rng_alone_and_is_seeded() -> None:
    before = torch.get_rng_state()
    a, b = build_dit("micro-dit", seed=3), build_dit("micro-dit", seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    other = build_dit("micro-dit", seed=4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    differ = [
        not torch.equal(pa, po) for pa, po in zip(a.parameters(), other.parameters(), strict=True)
    ]
    assert any(differ)


def test_stages_compose_to_forward() -> None:
    # What pipeline parallelism will cut along: embed -> blocks -> head, each on its own.
    c = get_preset("micro-dit").replace(zero_init_output=False)
    model = build_dit(c, seed=2)
    x, t, ts, sl, tl, ll = _inputs(c)
    tokens, rope, grid = model.patchify(x)
    h, cond = model.embed(tokens, rope, t, ts, sl, tl, ll)
    for layer in model.layers:
        h = layer(h, cond.t_mod, cond.text, cond.text_lengths, cond.rope)
    out = model.unpatchify(model.head(h, cond.temb), grid)
    torch.testing.assert_close(out, model(x, t, ts, sl, tl, ll), rtol=0, atol=0)


def test_tensor_parallel_init_slices_the_full_draw() -> None:
    # A rank's shard is its slice of the one-rank weight drawn from the same generator state
    # (megatron-core's CPU initialization), for column (dim 0) and row (dim 1) splits alike.
    config = SimpleNamespace(params_dtype=torch.float32, perform_initialization=False)
    full = LocalLinear(6, 4, config=config, init_method=None)  # weight (4, 6)
    init_parallel_linear_(full, 0.02, torch.Generator().manual_seed(5))
    for dim, (inputs, outputs) in ((0, (6, 2)), (1, (3, 4))):
        for rank in (0, 1):
            shard = LocalLinear(inputs, outputs, config=config, init_method=None)
            shard.weight.tensor_model_parallel = True  # type: ignore[attr-defined]
            shard.weight.partition_dim = dim  # type: ignore[attr-defined]
            setattr(shard, "tp_group", _Group(2, rank))  # noqa: B010 (as megatron-core's linears)
            init_parallel_linear_(shard, 0.02, torch.Generator().manual_seed(5))
            assert torch.equal(shard.weight, full.weight.chunk(2, dim=dim)[rank])


def test_parallelize_refuses_other_groups() -> None:
    one = ParallelGroups.single()
    model = build_dit("micro-dit", groups=one)
    assert parallelize(model, ParallelGroups.single()) is model  # nothing to split: no hooks
    two = ParallelGroups(tp=one.tp, cp=_Group(2, 0), dp=one.dp, pp=one.pp)
    with pytest.raises(ValueError, match=r"built for .* \(1, 1, False, 'ulysses'\)"):
        parallelize(model, two)
