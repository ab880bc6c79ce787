"""The job's config tree: saved as config.toml and read back, plans applied or refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from step_infra.cli import app
from step_infra.data.servers import ServerConfig
from step_infra.emulator import cluster_for, get_model
from step_infra.emulator.plan import EncoderSplit, ModelRef, Plan
from step_infra.emulator.planner import make_plan, write_plan
from step_infra.train.job.config import JobConfig, apply_plan, job_strategy, micro_t2v, tiny_t2v


def test_config_toml_round_trip_and_servers_read_their_tables(tmp_path: Path) -> None:
    cfg = tiny_t2v()
    path = cfg.save(tmp_path)
    assert path.name == "config.toml"
    assert JobConfig.load(tmp_path) == cfg
    server = ServerConfig.from_run_config(
        path, registry="127.0.0.1:1", start_id=16, end_id=32, vae_queue_items=8
    )
    assert server.servers == cfg.servers and server.data == cfg.data and server.vae == cfg.vae
    assert server.vae_checkpoint == str(tmp_path / "assets" / "vae.pt")


def test_config_toml_unknown_key_and_wrong_type_are_named(tmp_path: Path) -> None:
    path = micro_t2v().save(tmp_path)
    text = path.read_text()
    path.write_text(text.replace("[servers]\n", "[servers]\nvae_gpus = 3\n"))
    with pytest.raises(ValueError, match=r"unknown key 'vae_gpus' in \[servers\]"):
        JobConfig.load(tmp_path)
    path.write_text(text.replace("steps = 24", 'steps = "many"'))
    with pytest.raises(ValueError, match=r"Expected `int`, got `str` - at `\$.steps`"):
        JobConfig.load(tmp_path)


def test_plan_sets_layout_batch_and_encoder_split() -> None:
    plan = Plan(
        model=ModelRef(preset="tiny-dit"),
        strategy=job_strategy(tp=1, dp=4, micro_batch=2, global_batch=32),
        allocation=EncoderSplit(vae_gpus=3, text_gpus=2, trainer_gpus=4),
    )
    cfg = apply_plan(tiny_t2v(), Plan.loads(plan.dumps()))
    assert (cfg.grid.tp, cfg.grid.dp, cfg.global_batch) == (1, 4, 32)
    assert (cfg.servers.vae_servers, cfg.servers.text_servers) == (3, 2)


def test_plan_the_trainer_cannot_run_is_refused_by_name() -> None:
    base = Plan(model=ModelRef(preset="tiny-dit"), strategy=job_strategy(tp=2))
    refused = dataclasses.replace(
        base.strategy, pp=2, sequence_parallel=True, precision="fp8", overlap_tp_comm=True
    )
    with pytest.raises(ValueError, match=r"overlap_tp_comm=True .*precision='fp8'"):
        apply_plan(tiny_t2v(), base.replace(strategy=refused))
    with pytest.raises(ValueError, match=r"overlap_param_gather=True"):
        apply_plan(
            tiny_t2v(),
            base.replace(strategy=dataclasses.replace(base.strategy, overlap_param_gather=True)),
        )
    with pytest.raises(ValueError, match=r"pp=4 x vpp=2 virtual stages exceed the 4 blocks"):
        apply_plan(
            tiny_t2v(), base.replace(strategy=dataclasses.replace(base.strategy, pp=4, vpp=2))
        )
    # what the trainer runs is accepted: pipeline, ring CP, SP, recompute, ZeRO, overlap
    runs = dataclasses.replace(
        base.strategy, tp=1, pp=2, vpp=2, cp=2, cp_kind="ring", recompute="full",
        distributed_optimizer=True, overlap_grad_reduce=True,
    )  # fmt: skip
    cfg = apply_plan(tiny_t2v(), base.replace(strategy=runs))
    assert (cfg.grid.pp, cfg.grid.cp, cfg.grid.dp) == (2, 2, 1)
    with pytest.raises(ValueError, match="ranks, but the job has 4"):
        apply_plan(tiny_t2v(), base.replace(strategy=dataclasses.replace(base.strategy, dp=4)))
    with pytest.raises(ValueError, match="the plan is for 'micro-dit'"):
        apply_plan(tiny_t2v(), base.replace(model=ModelRef(preset="micro-dit")))


def test_train_cli_refuses_the_planners_30b_plan_before_starting_anything(tmp_path: Path) -> None:
    big = make_plan(get_model("stepvideo-t2v-30b"), cluster_for("h100-sxm", 2048), global_batch=256)
    path = write_plan(big, tmp_path / "plan.toml")
    result = CliRunner().invoke(
        app, ["train", "--plan", str(path), "--run-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 2, result.output
    assert "the plan is for 'stepvideo-t2v-30b'" in result.output
    assert not (tmp_path / "run").exists()
    tiny_plan = Plan.load(path).replace(model=ModelRef(preset="tiny-dit"))
    with pytest.raises(ValueError, match=r"virtual stages exceed the 4 blocks|ranks, but the job"):
        apply_plan(tiny_t2v(), tiny_plan)


def test_gpu_recipe_runs_one_rank_per_gpu_and_a_cpu_host_says_so() -> None:
    from step_infra.train.job.config import gpu_t2v
    from step_infra.train.job.worker import job_device

    for gpus, tp in ((1, 1), (2, 2), (4, 2), (3, 1)):
        cfg = gpu_t2v(gpus)
        assert (cfg.device, cfg.world_size, cfg.grid.tp) == ("cuda", gpus, tp)
        assert cfg.grid.dp * cfg.grid.tp == gpus
    with pytest.raises(ValueError, match="device='tpu'; expected 'cpu' or 'cuda'"):
        tiny_t2v().replace(device="tpu")
    assert job_device(tiny_t2v()).type == "cpu"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="sees no CUDA device"):
            job_device(gpu_t2v(1))
