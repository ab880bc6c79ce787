"""Sequence parallelism (megatron's all-gather in, reduce-scatter out) against one rank.

- the whole DiT at ``tp2sp`` (and ``tp2cp2usp``, slow) matches the one-rank DiT within 1e-5
  relative (``step_infra.models.parallel_check``, real ``torchrun`` processes on gloo; fp32,
  only the order of the sums differs, measured errors ~5e-8 outputs and ~5e-7 gradients);
- what one block saves for backward: the sequence-parallel column linears keep only their
  local 1/tp sequence shard, and everything outside the tensor-parallel region is 1/tp;
- the collectives and the two linears on their own, on gloo, against unsharded references.

The whole-DiT checks launch ``parallel_check --tol 1e-5``; the block and layer checks run as
this file's own ``__main__`` under ``torchrun``, in one launch (a launch is ~18 s of imports
on two loaded cores; a second process group in the same processes is not an option: gloo's
rendezvous keys from the first session collide in the store).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from step_infra.models.parallel import SingleRankGroup
from step_infra.models.sequence_parallel import (
    SequenceParallelColumnLinear,
    SequenceParallelRowLinear,
    all_gather,
    native_reduce_scatter,
    reduce_scatter,
)

TP = 2
GRID = (4, 4, 4)  # 64 tokens, 32 per TP rank
BATCH = 2
FFN = 128  # ffn / tp = 64 and heads_local * head_dim = 16, neither equal to hidden (32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(nproc: int, *args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
        *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _rows(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _mcore_config() -> ModelParallelConfig:
    return ModelParallelConfig(
        use_cpu_initialization=True, perform_initialization=True, params_dtype=torch.float32
    )


# --------------------------------------------------------------------------- one process
def test_native_reduce_scatter_by_backend() -> None:
    assert native_reduce_scatter("nccl", "cuda")
    assert not native_reduce_scatter("gloo", "cpu")
    assert native_reduce_scatter("cpu:gloo,cuda:nccl", "cuda")
    assert not native_reduce_scatter("cpu:gloo,cuda:nccl", "cpu")


def test_single_rank_collectives_are_identity() -> None:
    one, x = SingleRankGroup(), torch.randn(4, 3)
    assert all_gather(x, one) is x and reduce_scatter(x, one) is x
    assert reduce_scatter(x, one, async_op=True).wait() is x


def test_linears_are_drop_ins_for_megatrons() -> None:
    """Same parameter names, shapes, TP attributes, state-dict keys and initial weights."""
    one, config = SingleRankGroup(), _mcore_config()

    def init(w: torch.Tensor) -> None:
        torch.nn.init.normal_(w, generator=torch.Generator().manual_seed(3))

    pairs = [
        (
            ColumnParallelLinear(8, 6, config=config, init_method=init, tp_group=one),
            SequenceParallelColumnLinear(8, 6, config=config, init_method=init, tp_group=one),
        ),
        (
            RowParallelLinear(
                6, 8, config=config, init_method=init, bias=True, input_is_parallel=True,
                skip_bias_add=False, tp_group=one,
            ),
            SequenceParallelRowLinear(
                6, 8, config=config, init_method=init, bias=True, input_is_parallel=True,
                skip_bias_add=False, tp_group=one,
            ),
        ),
    ]  # fmt: skip
    for theirs, ours in pairs:
        assert list(theirs.state_dict()) == list(ours.state_dict())
        ours.load_state_dict(theirs.state_dict())  # megatron's keys load as they are
        for (name, p), (name2, q) in zip(
            theirs.named_parameters(), ours.named_parameters(), strict=True
        ):
            assert name == name2 and p.shape == q.shape
            torch.testing.assert_close(p, q, rtol=0, atol=0)
            for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                assert getattr(p, attr, None) == getattr(q, attr, None), (name, attr)
        # (megatron's row linear cannot run forward on a one-rank stand-in group)
        x = torch.randn(5, 2, ours.input_size)
        torch.testing.assert_close(
            ours(x)[0], torch.nn.functional.linear(x, _weight(theirs), theirs.bias)
        )
    assert getattr(pairs[1][1].bias, "tp_partial_grad", False)


def _weight(linear: torch.nn.Module) -> torch.Tensor:
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def test_wrong_options_are_refused() -> None:
    one, config = SingleRankGroup(), _mcore_config()
    with pytest.raises(ValueError, match="gather_output"):
        SequenceParallelColumnLinear(
            4, 4, config=config, init_method=torch.nn.init.zeros_, gather_output=True,
            tp_group=one,
        )  # fmt: skip
    with pytest.raises(ValueError, match="input_is_parallel"):
        SequenceParallelRowLinear(
            4, 4, config=config, init_method=torch.nn.init.zeros_, bias=False,
            input_is_parallel=False, skip_bias_add=False, tp_group=one,
        )  # fmt: skip
    with pytest.raises(ValueError, match="tp_group"):
        SequenceParallelColumnLinear(4, 4, config=config, init_method=torch.nn.init.zeros_)


# ------------------------------------------------------------------------ real processes
@pytest.mark.integration
@pytest.mark.slow  # the default suite runs tp2sp in test_parallel_torchrun (same tolerance)
def test_tp2sp_matches_one_rank() -> None:
    proc = _torchrun(2, "-m", "step_infra.models.parallel_check", "tp2sp", "--tol", "1e-5")
    rows = _rows(proc)
    assert proc.returncode == 0, (rows, proc.stderr[-3000:])
    assert [r["layout"] for r in rows] == ["tp2sp"] and rows[0]["ok"], rows


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tp2cp2usp_matches_one_rank() -> None:
    args = ("-m", "step_infra.models.parallel_check", "tp2cp2usp", "--tol", "1e-5")
    proc = _torchrun(4, *args, timeout=280)
    rows = _rows(proc)
    assert proc.returncode == 0, (rows, proc.stderr[-3000:])
    assert [r["layout"] for r in rows] == ["tp2cp2usp"] and rows[0]["ok"], rows


@pytest.fixture(scope="module")
def worker() -> dict[str, Any]:
    proc = _torchrun(2, str(Path(__file__).resolve()), "--worker")
    rows = _rows(proc)
    assert proc.returncode == 0 and rows, proc.stderr[-3000:]
    return rows[0]


@pytest.mark.integration
def test_sp_block_saves_only_local_shards(worker: dict[str, Any]) -> None:
    for rank in worker["saved"]:
        plain, sp = rank["tp"], rank["tp_sp"]
        seq = GRID[0] * GRID[1] * GRID[2]
        # The column linears' inputs: the whole sequence without SP, 1/tp of it with SP, in
        # a storage of its own (not a view into the gathered sequence).
        assert len(plain["column_inputs"]) == len(sp["column_inputs"]) == 3
        for name, (shape, _) in plain["column_inputs"].items():
            assert shape[0] == seq, name
        for name, (shape, nbytes) in sp["column_inputs"].items():
            assert shape[0] == seq // TP and nbytes == 4 * shape[0] * shape[1] * shape[2], name
        # Everything outside the TP region ((S, B, h) hidden states and the LayerNorms'
        # (S, B, 1) statistics) shrinks by tp; everything inside (heads, MLP columns, the
        # replicated text) stays: the totals then differ by exactly that.
        expected = plain["bytes"] - (1 - 1 / TP) * plain["sequence_region_bytes"]
        assert sp["bytes"] == expected, (sp, plain)


@pytest.mark.integration
def test_collectives_and_linears_on_gloo(worker: dict[str, Any]) -> None:
    c = worker["collectives"]
    assert c["reduce_scatter_ok"] and c["all_gather_ok"] and c["owns_storage"]
    assert c["input_untouched"] and c["async_ok"]
    if c["native_gloo_ok"] is not None:  # recent torch has gloo's own: the same numbers
        assert c["native_gloo_ok"]
    # fp32; the only difference to the unsharded reference is the split of the sums.
    assert c["linears_max_rel_err"] < 1e-6, c


# ----------------------------------------------------------------- the torchrun worker
def _saved_by_block(sequence_parallel: bool) -> dict[str, Any]:
    """Bytes one DiT block saves for backward on this rank (storages deduplicated, parameters
    left out), and what its column linears save of their inputs."""
    import torch.distributed as dist

    from step_infra.models.config import get_preset
    from step_infra.models.dit import build_dit
    from step_infra.models.parallel import ParallelGroups
    from step_infra.models.rope import rope_angles, rope_cos_sin

    c = get_preset("micro-dit").replace(zero_init_output=False, ffn_hidden_size=FFN)
    one = SingleRankGroup()  # the world is the TP group
    groups = ParallelGroups(
        tp=dist.group.WORLD, cp=one, dp=one, pp=one, sequence_parallel=sequence_parallel
    )
    layer = build_dit(c, groups=groups, seed=3).layers[0]
    g = torch.Generator().manual_seed(5)
    seq, h = GRID[0] * GRID[1] * GRID[2], c.hidden_size
    x = torch.randn(seq, BATCH, h, generator=g)
    if sequence_parallel:
        x = x.chunk(TP)[groups.tp_rank].clone()
    x.requires_grad_(True)
    t_mod = torch.randn(BATCH, 6, h, generator=g)
    text = torch.randn(5, BATCH, h, generator=g)
    rope = rope_cos_sin(rope_angles(GRID, c.rope_split))

    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: dict[int, tuple[int, tuple[int, ...]]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved.setdefault(st.data_ptr(), (st.nbytes(), tuple(t.shape)))
        return t

    inputs: dict[str, int] = {}
    for name in ("self_attention.linear_qkv", "cross_attention.linear_q", "mlp.linear_fc1"):
        layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, name=name: inputs.__setitem__(
                name, args[0].untyped_storage().data_ptr()
            )
        )
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x, t_mod, text, torch.tensor([5, 3]), rope)
    out.square().sum().backward()  # the saved tensors are the ones backward needs
    tokens = seq // TP if sequence_parallel else seq
    region = sum(
        n
        for n, shape in saved.values()
        if len(shape) == 3 and shape[0] == tokens and shape[1:] in ((BATCH, h), (BATCH, 1))
    )
    return {
        "bytes": sum(n for n, _ in saved.values()),
        "sequence_region_bytes": region,
        "column_inputs": {k: (saved[p][1], saved[p][0]) for k, p in inputs.items() if p in saved},
    }


def _collective_checks() -> dict[str, Any]:
    import torch.distributed as dist

    world = dist.group.WORLD
    rank, n = dist.get_rank(), dist.get_world_size()
    x = torch.arange(24.0).view(4, 2, 3) * (rank + 1)
    before = x.clone()
    rs = reduce_scatter(x, world)
    want = (torch.arange(24.0).view(4, 2, 3) * sum(range(1, n + 1))).chunk(n)[rank]
    native = None
    try:  # gloo's own reduce-scatter (recent torch), as a cross-check
        out = torch.empty_like(rs)
        dist.reduce_scatter_tensor(out, x.clone(), group=world)
        native = bool(torch.equal(out, want))
    except (RuntimeError, ValueError):
        pass
    gathered = all_gather(x, world)
    result: dict[str, Any] = {
        "reduce_scatter_ok": bool(torch.equal(rs, want)),
        "owns_storage": rs.untyped_storage().nbytes() == rs.numel() * rs.element_size(),
        "input_untouched": bool(torch.equal(x, before)),
        "async_ok": bool(torch.equal(reduce_scatter(x, world, async_op=True).wait(), want)),
        "native_gloo_ok": native,
        "all_gather_ok": bool(
            torch.equal(
                gathered, torch.cat([torch.arange(24.0).view(4, 2, 3) * (r + 1) for r in range(n)])
            )
        ),
    }
    result["linears_max_rel_err"] = _linears_against_reference(world)
    return result


def _linears_against_reference(group: Any) -> float:
    """Column -> GELU -> row on sequence shards vs the unsharded MLP: outputs and gradients."""
    import torch.distributed as dist
    import torch.nn.functional as F

    rank, n = dist.get_rank(), dist.get_world_size()
    config = _mcore_config()
    draws = torch.Generator().manual_seed(11)
    w1, w2 = torch.randn(12, 6, generator=draws), torch.randn(6, 12, generator=draws)
    b1, b2 = torch.randn(12, generator=draws), torch.randn(6, generator=draws)
    x, g = torch.randn(8, 3, 6, generator=draws), torch.randn(8, 3, 6, generator=draws)

    ref = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    y = F.linear(F.gelu(F.linear(ref[0], ref[1], ref[2])), ref[3], ref[4])
    (y * g).sum().backward()

    col = SequenceParallelColumnLinear(
        6, 12, config=config, init_method=lambda w: w.copy_(w1), tp_group=group
    )
    row = SequenceParallelRowLinear(
        12, 6, config=config, init_method=lambda w: w.copy_(w2), bias=True,
        input_is_parallel=True, skip_bias_add=False, tp_group=group,
    )  # fmt: skip
    assert col.bias is not None and row.bias is not None
    with torch.no_grad():
        col.bias.copy_(b1.chunk(n)[rank])
        row.bias.copy_(b2)
    xs = x.chunk(n)[rank].clone().requires_grad_(True)
    hidden, _ = col(xs)
    out, _ = row(F.gelu(hidden))
    (out * g.chunk(n)[rank]).sum().backward()

    def grad(t: torch.Tensor) -> torch.Tensor:
        assert t.grad is not None
        return t.grad

    dist.all_reduce(grad(row.bias), group=group)  # partial per rank (tp_partial_grad)
    pairs = [
        (out.detach(), y.detach().chunk(n)[rank]),
        (grad(xs), grad(ref[0]).chunk(n)[rank]),
        (grad(col.weight), grad(ref[1]).chunk(n, 0)[rank]),
        (grad(col.bias), grad(ref[2]).chunk(n)[rank]),
        (grad(row.weight), grad(ref[3]).chunk(n, 1)[rank]),
        (grad(row.bias), grad(ref[4])),
    ]
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)


def _worker() -> int:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    saved = {"tp": _saved_by_block(False), "tp_sp": _saved_by_block(True)}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, saved)
    collectives = _collective_checks()
    if dist.get_rank() == 0:
        print(json.dumps({"saved": every, "collectives": collectives}), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.exit(_worker())
