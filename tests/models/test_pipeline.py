"""Pipeline parallelism: how stages are cut, that each rank's chunks hold the one-rank
weights and compose to ``DiT.forward``, the pp=1 path, and real ``torchrun`` pipelines (gloo)
against one rank.

Tolerance 1e-5 relative to each tensor's largest reference value (fp32; micro-batching and
the reduction order are the only differences, measured 1e-7..7e-7), as explained in
``step_infra.models.parallel_check``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from step_infra.models import DiTConfig, ParallelGroups, build_dit, get_preset
from step_infra.models.pipeline import (
    PAYLOAD,
    DiTStage,
    HeldDiT,
    build_pipeline,
    build_stage_modules,
    layers_from_counts,
    stage_layers,
    summed_mse,
)

TOL = 1e-5


class _Group:
    """A stand-in process group (build_pipeline's checks only ask for size and rank)."""

    def __init__(self, size: int, rank: int = 0) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _counts(ranges: list[range]) -> list[int]:
    return [len(r) for r in ranges]


def test_stage_layers_even_uneven_and_fixed_ends() -> None:
    assert stage_layers(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert _counts(stage_layers(10, 4)) == [2, 3, 3, 2]  # the middle stages take the extra
    assert _counts(stage_layers(7, 2)) == [4, 3]
    assert _counts(stage_layers(3, 1)) == [3]
    assert _counts(stage_layers(10, 4, first=1, last=1)) == [1, 4, 4, 1]
    assert _counts(stage_layers(6, 3, first=0)) == [0, 3, 3]  # an embedding-only stage
    assert _counts(stage_layers(5, 2, last=1)) == [4, 1]


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((3, 4), {}, "cannot fill 4 stages"),
        ((4, 3), {"first": 2, "last": 2}, "at least one block"),
        ((4, 2), {"first": 1, "last": 1}, "must equal num_layers=4"),
        ((4, 1), {"first": 2}, "one stage holds all 4"),
        ((4, 2), {"first": -1}, "first=-1"),
        ((4, 0), {}, "stages >= 1"),
    ],
)
def test_stage_layers_errors_name_the_value(
    args: tuple[int, int], kwargs: dict[str, int], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        stage_layers(*args, **kwargs)


def test_layers_from_counts() -> None:
    assert layers_from_counts([1, 2, 1], 4) == [range(0, 1), range(1, 3), range(3, 4)]
    with pytest.raises(ValueError, match="sum to num_layers=4"):
        layers_from_counts([1, 1], 4)
    with pytest.raises(ValueError, match="middle stage"):
        layers_from_counts([2, 0, 2], 4)


def _config(**changes: object) -> DiTConfig:
    return get_preset("micro-dit").replace(num_layers=4, **changes)


def _pp_groups(pp: int, rank: int = 0) -> ParallelGroups:
    return dataclasses.replace(ParallelGroups.single(), pp=_Group(pp, rank))


def test_build_pipeline_refuses_by_name() -> None:
    c, single = _config(), ParallelGroups.single()
    kw = {"n_microbatches": 2, "loss_fn": summed_mse}
    with pytest.raises(ValueError, match="schedule '1f1b' runs one stage per rank; vpp=2"):
        build_pipeline(c, _pp_groups(2), vpp=2, schedule="1f1b", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vpp=2 needs pp > 1"):
        build_pipeline(c, single, vpp=2, schedule="interleaved_1f1b", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schedule 'zb' unknown"):
        build_pipeline(c, single, schedule="zb", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layers_per_stage has 3 entries; pp \\* vpp = 2"):
        build_pipeline(c, _pp_groups(2), layers_per_stage=[1, 2, 1], **kw)  # type: ignore[arg-type]


def test_each_rank_holds_only_its_chunks_with_the_one_rank_weights() -> None:
    c = _config()  # zero_init_output on: the adaLN-zero start must be reproduced too
    ref = dict(build_dit(c, seed=5).named_parameters())
    layout = stage_layers(c.num_layers, 4)  # pp=2 x vpp=2: rank r holds stages r, r + 2
    held_by_rank = []
    for rank in (0, 1):
        chunks = build_stage_modules(
            c, ParallelGroups.single(), layout=layout, stage_ids=[rank, rank + 2], seed=5
        )
        assert [ch.layer_ids for ch in chunks] == [[rank], [rank + 2]]
        held = dict(HeldDiT(chunks).named_parameters())
        for name, p in held.items():
            assert torch.equal(p, ref[name]), name
        held_by_rank.append(set(held))
    assert held_by_rank[0].isdisjoint(held_by_rank[1])
    assert held_by_rank[0] | held_by_rank[1] == set(ref)
    assert any(n.startswith("embed.") for n in held_by_rank[0])
    assert any(n.startswith("head.") for n in held_by_rank[1])


def _batch(c: DiTConfig, batch: int = 4, *, long_text: bool = True) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, 2, 4, 4, generator=g)
    t = torch.rand(batch, generator=g)
    ts = torch.randn(batch, 5, c.text_dim_short, generator=g)
    sl = torch.tensor([5, 2, 3, 4][:batch])
    target = torch.randn(x.shape, generator=g)
    if not long_text:
        return x, t, ts, sl, target
    tl = torch.randn(batch, 3, c.text_dim_long, generator=g)
    return x, t, ts, sl, tl, torch.tensor([1, 3, 0, 2][:batch]), target


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def test_chunks_chained_through_their_payload_equal_the_model() -> None:
    c = _config(zero_init_output=False)
    *args, target = _batch(c)
    ref = build_dit(c, seed=3)
    ref_out = ref(*args)
    torch.nn.functional.mse_loss(ref_out, target).backward()
    chunks = build_stage_modules(
        c, ParallelGroups.single(), layout=stage_layers(4, 4), stage_ids=range(4), seed=3
    )
    sent: tuple[torch.Tensor, ...] = tuple(args)
    for chunk in chunks:  # autograd runs through the chain; torchrun tests cut it with p2p
        chunk.grid = (2, 4, 4)
        out = chunk(*sent)
        if isinstance(out, tuple):
            assert len(out) == len(PAYLOAD)
        sent = out if isinstance(out, tuple) else (out,)
    assert _rel(sent[0], ref_out) < TOL
    summed_mse(sent[0], target, global_batch=4).backward()
    grads = dict(HeldDiT(chunks).named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is not None:
            assert _rel(grads[name].grad, p.grad) < TOL, name  # type: ignore[arg-type]


def test_last_stage_needs_the_grid() -> None:
    c = _config()
    (last,) = build_stage_modules(
        c, ParallelGroups.single(), layout=stage_layers(4, 2), stage_ids=[1]
    )
    assert isinstance(last, DiTStage) and last.embed is None and last.head is not None
    payload = tuple(torch.zeros(1) for _ in PAYLOAD)
    with pytest.raises(RuntimeError, match=r"needs \.grid"):
        last(*payload)


@pytest.mark.parametrize("long_text", [True, False])
def test_pp1_pipeline_is_the_plain_model_in_micro_batches(long_text: bool) -> None:
    c = _config(zero_init_output=False)
    *args, target = _batch(c, long_text=long_text)
    ref = build_dit(c, seed=3)
    ref_out = ref(*args)
    ref_loss = torch.nn.functional.mse_loss(ref_out, target)
    ref_loss.backward()
    pipe = build_pipeline(c, ParallelGroups.single(), n_microbatches=2, loss_fn=summed_mse, seed=3)
    assert pipe.stages == [] and len(pipe.modules) == 1 and pipe.has_first and pipe.has_last
    losses: list[torch.Tensor] = []
    out = pipe.step(*args, target=target, losses=losses, loss_kwargs={"global_batch": 4})
    assert out is not None and len(losses) == 2
    assert _rel(out, ref_out) < TOL and _rel(sum(losses), ref_loss) < TOL  # type: ignore[arg-type]
    held = dict(pipe.held.named_parameters())
    assert set(held) == {n for n, _ in ref.named_parameters()}
    for name, p in ref.named_parameters():
        if p.grad is not None:
            assert _rel(held[name].grad, p.grad) < TOL, name  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch of 3 does not split into n_microbatches=2"):
        pipe.step(*(a[:3] for a in args), target=target[:3])


# --- real pipelines under torchrun (gloo) -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(
    nproc: int, *args: str, timeout: float = 110
) -> tuple[int, list[dict[str, object]], str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
        *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, rows, proc.stderr[-3000:]


def _check(
    nproc: int, *layouts: str, strategy: Path | None = None, timeout: float = 110
) -> list[dict[str, object]]:
    extra = ["--strategy", str(strategy)] if strategy else []
    rc, rows, err = _torchrun(
        nproc, "-m", "step_infra.models.parallel_check", *layouts, *extra, timeout=timeout
    )
    assert rc == 0, err
    assert [r["layout"] for r in rows] == [*layouts, *(["strategy"] if strategy else [])]
    _assert_ok(rows)
    return rows


def _assert_ok(rows: list[dict[str, object]]) -> None:
    for r in rows:
        assert r["ok"] and r["share_ok"], r
        for key in ("output", "grad", "loss", "grad_norm"):
            assert float(r[f"max_rel_err_{key}"]) < TOL, (key, r)  # type: ignore[arg-type]


@pytest.mark.integration
def test_pp2_and_interleaved_pp2v2_match_one_rank_and_a_whole_model_fails() -> None:
    # One torchrun for both layouts and the negative control: process start-up is the cost.
    rc, rows, err = _torchrun(
        2, "-m", "step_infra.models.parallel_check", "pp2", "pp2v2", "--whole-model", "pp2"
    )
    assert [r["layout"] for r in rows] == ["pp2", "pp2v2", "pp2:whole-model"], err
    assert rc == 1  # the negative control fails, so the run does
    _assert_ok(rows[:2])
    assert rows[0]["schedule"] == "1f1b" and rows[1]["schedule"] == "interleaved_1f1b"
    assert rows[0]["blocks_run_per_rank"] == [[0], [1]]
    assert rows[1]["blocks_run_per_rank"] == [[0, 2], [1, 3]]  # chunk k of rank r: r + 2k
    # Negative control: the numbers match (every rank runs the full model), the cut does not.
    whole = rows[2]
    assert not whole["ok"] and not whole["share_ok"]
    assert float(whole["max_rel_err_grad"]) < TOL  # type: ignore[arg-type]
    assert whole["blocks_run_per_rank"] == [[0, 1], [0, 1]]
    assert whole["params_held_fraction_per_rank"] == [1.0, 1.0]


@pytest.mark.integration
@pytest.mark.slow
def test_every_schedule_matches_one_rank() -> None:
    _check(2, "pp2@gpipe", "pp2@zero_bubble", "pp2v2@looped_bfs", "pp2v2@zero_bubble")


@pytest.mark.integration
@pytest.mark.slow
def test_four_rank_pipelines_and_strategy_file(tmp_path: Path) -> None:
    strategy = tmp_path / "strategy.toml"
    strategy.write_text(
        '[model]\npreset = "tiny-dit"\n[strategy]\ntp = 1\npp = 2\nvpp = 2\ncp = 1\n'
        'cp_kind = "ulysses"\ndp = 2\nmicro_batch = 1\nglobal_batch = 4\n'
        'sequence_parallel = false\nrecompute = "none"\ndistributed_optimizer = false\n'
    )
    rows = _check(4, "tp2pp2", "pp2dp2", "tp2pp2@zero_bubble", strategy=strategy)
    assert rows[1]["blocks_run_per_rank"] == [[0], [1], [0], [1]]  # dp slowest, then pp
    assert rows[-1]["grid"] == {"dp": 2, "pp": 2, "cp": 1, "tp": 1}
    assert rows[-1]["vpp"] == 2 and rows[-1]["schedule"] == "interleaved_1f1b"


@pytest.mark.integration
@pytest.mark.slow
def test_eight_rank_pipelines_match_one_rank() -> None:
    rows = _check(8, "tp2pp2dp2", "tp2cp2rpp2sp", timeout=300)
    assert rows[1]["blocks_run_per_rank"] == [[0]] * 4 + [[1]] * 4


_RESHAPE = """
import json
import torch, torch.distributed as dist
from step_infra.models.config import get_preset
from step_infra.models.dit import build_dit
from step_infra.models.parallel import ParallelGroups
from step_infra.models.pipeline import build_pipeline, summed_mse
from step_infra.topology import ProcessGrid

torch.set_num_threads(1)
dist.init_process_group("gloo")
c = get_preset("micro-dit").replace(zero_init_output=False)
pipe = build_pipeline(c, ParallelGroups.create(ProcessGrid(pp=2)), n_microbatches=2,
                      loss_fn=summed_mse, seed=3)
ref = build_dit(c, seed=3)
g = torch.Generator().manual_seed(0)  # the same batches on both ranks
worst = 0.0
for b, f, hw, ls in ((4, 2, 4, 5), (2, 1, 2, 3), (4, 2, 4, 5)):
    x = torch.randn(b, c.in_channels, f, hw, hw, generator=g)
    t, ts = torch.rand(b, generator=g), torch.randn(b, ls, c.text_dim_short, generator=g)
    target = torch.randn(x.shape, generator=g)
    for p in [*pipe.held.parameters(), *ref.parameters()]:
        p.grad = None
    out = pipe.step(x, t, ts, target=target, loss_kwargs={"global_batch": b})
    r = ref(x, t, ts)
    torch.nn.functional.mse_loss(r, target).backward()
    refs = dict(ref.named_parameters())
    for n, p in pipe.held.named_parameters():
        if refs[n].grad is not None:
            worst = max(worst, float((p.grad - refs[n].grad).abs().max() / refs[n].grad.abs().max()))
    if out is not None:
        worst = max(worst, float((out - r).abs().max() / r.abs().max()))
print(json.dumps({"rank": dist.get_rank(), "worst": worst}), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.integration
@pytest.mark.slow
def test_new_batch_shapes_replan_the_pipeline(tmp_path: Path) -> None:
    script = tmp_path / "reshape.py"
    script.write_text(_RESHAPE)
    rc, rows, err = _torchrun(2, str(script))
    assert rc == 0, err
    assert len(rows) == 2 and all(float(r["worst"]) < TOL for r in rows), rows  # type: ignore[arg-type]
