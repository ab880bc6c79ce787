"""The bucketed, overlapped gradient reducer: unit behaviour in one process, and under
``torchrun`` against ``finalize_grads`` (see ``step_infra.train.sharding_check`` for the
tolerance: with dp=2 the sums are the same additions, so the result is bitwise; with tp or
cp, ~1e-7)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from step_infra.models.parallel import ParallelGroups, SingleRankGroup
from step_infra.topology import ProcessGrid
from step_infra.train.grad_sync import GradReducer, dp_cp_ranks, make_dp_cp_group
from step_infra.train.sharding_check import launch


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _reducer(model: nn.Module, bucket_mb: float = 1e-4) -> GradReducer:
    return GradReducer(model, ParallelGroups.single(), SingleRankGroup(), bucket_mb=bucket_mb)


def test_buckets_follow_reverse_registration_order_and_cap() -> None:
    model = _model()
    # 1e-4 MiB = 104 bytes: each weight fills a bucket, the biases share one with it
    reducer = _reducer(model)
    names = {id(p): n for n, p in model.named_parameters()}
    layout = [[names[id(p)] for p in b.params] for b in reducer.buckets]
    assert layout == [["2.bias", "2.weight"], ["0.bias", "0.weight"]]
    assert len(_reducer(model, bucket_mb=25.0).buckets) == 1


def test_buckets_split_by_dtype() -> None:
    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    reducer = GradReducer(params, ParallelGroups.single(), SingleRankGroup(), bucket_mb=25.0)
    assert [b.buffer.dtype for b in reducer.buckets] == [torch.float64, torch.float32]


def test_accumulation_needs_no_sync_and_finish_fills_zeros() -> None:
    model = _model()
    reducer = _reducer(model)
    x = torch.randn(5, 8)
    with reducer.no_sync():
        model(x).sum().backward()
    model(x).sum().backward()  # the last micro-batch: buckets complete in the backward
    reducer.finish()
    assert reducer.stats.launched_in_backward == len(reducer.buckets)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]

    ref = _model()
    for _ in range(2):
        ref(x).sum().backward()
    for n, p in ref.named_parameters():
        assert torch.equal(p.grad, expected[n]), n  # type: ignore[arg-type]

    # a second backward outside no_sync before finish() would lose its contribution
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="became ready twice"):
        model(x).sum().backward()
    reducer.finish()

    # a rank without samples: finish() gives zeros, all buckets start in finish
    model.zero_grad(set_to_none=True)
    reducer.finish()
    assert reducer.stats.launched_in_finish == len(reducer.buckets)
    assert sorted(reducer.stats.zero_filled) == sorted(n for n, _ in model.named_parameters())
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())  # type: ignore[union-attr]


def test_pipeline_accumulations_start_buckets_after_the_last_micro_batch() -> None:
    """A pipeline schedule runs every micro-batch's backward itself: with
    expect_accumulations(n) a bucket starts only after its n-th accumulation."""
    model = _model()
    reducer = _reducer(model)
    x = torch.randn(5, 8)
    reducer.expect_accumulations(3)
    for _ in range(2):
        model(x).sum().backward()
    assert reducer._next == 0  # nothing complete yet
    model(x).sum().backward()
    reducer.finish()
    assert reducer.stats.launched_in_backward == len(reducer.buckets)
    ref = _model()
    for _ in range(3):
        ref(x).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n  # type: ignore[arg-type]
    # finish() resets to one backward per step
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="became ready twice"):
        model(x).sum().backward()
    reducer.finish()
    with pytest.raises(ValueError, match="n >= 1"):
        reducer.expect_accumulations(0)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="bucket_mb"):
        _reducer(_model(), bucket_mb=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradReducer(
            nn.Linear(2, 2).requires_grad_(False), ParallelGroups.single(), SingleRankGroup()
        )

    class Two(SingleRankGroup):
        def size(self) -> int:
            return 2

    with pytest.raises(ValueError, match="dp_cp_group has 2 ranks"):
        GradReducer(_model(), ParallelGroups.single(), Two())


def test_dp_cp_groups_of_a_grid() -> None:
    grid = ProcessGrid(dp=2, cp=2, tp=2)  # ranks = ((dp * 2) + cp) * 2 + tp
    assert dp_cp_ranks(grid) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert isinstance(make_dp_cp_group(ProcessGrid(tp=2)), SingleRankGroup)


@pytest.mark.integration
def test_reducer_matches_finalize_grads_and_overlaps_backward() -> None:
    rc, rows, err = launch(2, "grad_sync")
    assert rc == 0 and rows, err
    r = rows[0]
    assert r["ok"] and r["max_err"] == 0.0, r  # dp=2: the same additions, bitwise
    for step in ("step0", "step1"):
        assert r[step]["loss_err"] == 0.0
        assert r[step]["buckets"] > 1
    # the first bucket's all-reduce started before the backward produced its last gradient
    assert r["step0"]["first_launch_before_last_grad"]
    assert r["step0"]["launched_in_backward_per_rank"] == [r["step0"]["buckets"]] * 2
    # the replica without samples launched everything from finish(), with zeros
    assert r["step1"]["samples_per_replica"] == [3, 0]
    assert r["step1"]["launched_in_backward_per_rank"][1] == 0


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tp", "2", "--sp"], ["--cp", "2"]])
def test_reducer_with_tensor_and_context_parallel(layout: list[str]) -> None:
    rc, rows, err = launch(4, "grad_sync", *layout)
    assert rc == 0 and rows, err
    assert rows[0]["ok"] and rows[0]["max_err"] < 1e-6, rows[0]
