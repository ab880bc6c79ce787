"""Check the emulator against a real training step on this machine (tiny DiT, CPU, gloo).

A prediction is only trusted if it is checked where we can measure. This module times a
training step (forward, backward, AdamW) of a plain-torch stand-in for the ``tiny-dit`` preset
(same shapes: patchify, timestep MLP, adaLN-single, blocks of self-attention with q/k RMSNorm,
cross-attention to text, GELU MLP, each modulated) for three layouts: one rank; DP=2 (DDP over
gloo, gradient buckets overlapped with backward); TP=2 (Megatron column/row split of every
block's matmuls with gloo all-reduces). It prices the same layouts with ``estimate`` on a
hardware profile measured by :mod:`step_infra.emulator.hwprobe` and reports predicted/measured.

The stand-in is used, not ``step_infra.models``, because the emulator stands alone (DESIGN.md):
it must not import the model packages. Distributed ranks are subprocesses of this module
(``python -m step_infra.emulator.localcheck --worker``) that we start and, on timeout, kill by PID.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Layout name -> (tp, dp): the three local layouts.
LAYOUTS: dict[str, tuple[int, int]] = {"1 rank": (1, 1), "DP=2 gloo": (1, 2), "TP=2 gloo": (2, 1)}


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckConfig:
    """Workload of the check. ``batch`` is per data-parallel rank; ``seq_len`` overrides the
    preset's latent tokens (longer sequences make compute, not Python, dominate)."""

    batch: int = 8
    seq_len: int = 256
    steps: int = 8
    warmup: int = 3
    threads: int = 1
    timeout_s: float = 240.0

    def __post_init__(self) -> None:
        if min(self.batch, self.seq_len, self.steps, self.threads) < 1 or self.warmup < 0:
            raise ValueError(f"batch, seq_len, steps, threads must be >= 1 and warmup >= 0: {self}")


def _build_model(tp: int, group: Any) -> Any:
    """The stand-in DiT with tiny-dit shapes; ``tp`` > 1 shards each block Megatron-style."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    h, heads, hd, ffn, lat, text_dim, t_ch, layers = 128, 4, 32, 512, 16, 384, 64, 4

    class _Copy(torch.autograd.Function):  # identity forward, all-reduce backward ("f")
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            return x

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            g = g.clone()
            dist.all_reduce(g, group=group)
            return g

    class _Reduce(torch.autograd.Function):  # all-reduce forward, identity backward ("g")
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            dist.all_reduce(x, group=group)
            return x

        @staticmethod
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            return g

    def f(x: torch.Tensor) -> torch.Tensor:
        return _Copy.apply(x) if tp > 1 else x  # type: ignore[no-any-return]

    def g(x: torch.Tensor) -> torch.Tensor:
        return _Reduce.apply(x) if tp > 1 else x  # type: ignore[no-any-return]

    hl = heads // tp
    a = hl * hd

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1 = nn.LayerNorm(h, elementwise_affine=False)
            self.qkv = nn.Linear(h, 3 * a, bias=False)
            self.q_norm, self.k_norm = nn.RMSNorm(hd), nn.RMSNorm(hd)
            self.proj = nn.Linear(a, h, bias=False)
            self.norm2 = nn.LayerNorm(h)
            self.cq = nn.Linear(h, a, bias=False)
            self.ckv = nn.Linear(h, 2 * a, bias=False)
            self.cq_norm, self.ck_norm = nn.RMSNorm(hd), nn.RMSNorm(hd)
            self.cproj = nn.Linear(a, h, bias=False)
            self.norm3 = nn.LayerNorm(h, elementwise_affine=False)
            self.fc1 = nn.Linear(h, ffn // tp)
            self.fc2 = nn.Linear(ffn // tp, h, bias=False)
            self.fc2_bias = nn.Parameter(torch.zeros(h))
            self.table = nn.Parameter(torch.randn(6, h) / h**0.5)

        def _heads(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            return x.view(b, s, hl, hd).transpose(1, 2)  # (B, heads, S, hd)

        def forward(self, x: torch.Tensor, text: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            sh1, sc1, g1, sh2, sc2, g2 = (mod + self.table).unbind(1)  # each (B, h)
            y = f(self.norm1(x) * (1 + sc1[:, None]) + sh1[:, None])
            q, k, v = self.qkv(y).chunk(3, dim=-1)
            q, k, v = self.q_norm(self._heads(q)), self.k_norm(self._heads(k)), self._heads(v)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, a)
            x = x + g1[:, None] * g(self.proj(o))
            y = f(self.norm2(x))
            ck, cv = self.ckv(f(text)).chunk(2, dim=-1)
            cq = self.cq_norm(self._heads(self.cq(y)))
            o = F.scaled_dot_product_attention(cq, self.ck_norm(self._heads(ck)), self._heads(cv))
            x = x + g(self.cproj(o.transpose(1, 2).reshape(b, s, a)))
            y = f(self.norm3(x) * (1 + sc2[:, None]) + sh2[:, None])
            out = g(self.fc2(F.gelu(self.fc1(y), approximate="tanh"))) + self.fc2_bias
            return x + g2[:, None] * out

    class StandIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Linear(lat, h)
            self.t_mlp = nn.Sequential(nn.Linear(t_ch, h), nn.SiLU(), nn.Linear(h, h))
            self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))
            self.text_proj = nn.Linear(text_dim, h)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.final_norm = nn.LayerNorm(h, elementwise_affine=False)
            self.out = nn.Linear(h, lat)

        def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            half = t_ch // 2
            freqs = torch.exp(-math.log(10_000.0) * torch.arange(half) / half)
            temb = self.t_mlp(
                torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
            )
            mod = self.adaln(temb).view(-1, 6, h)
            z, txt = self.patch(x), self.text_proj(text)
            for blk in self.blocks:
                z = blk(z, txt, mod)
            return self.out(self.final_norm(z))  # (B, S, latent channels)

    return StandIn()


def time_steps(*, tp: int, dp: int, rank: int, cfg: CheckConfig, text_tokens: int) -> float:
    """Median seconds of one training step on this rank (process group already set up)."""
    import torch
    import torch.distributed as dist

    torch.manual_seed(0)
    torch.set_num_threads(cfg.threads)
    distributed = tp * dp > 1
    model = _build_model(tp, dist.group.WORLD if tp > 1 else None)
    if dp > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1 + (rank if dp > 1 else 0))
    x = torch.randn(cfg.batch, cfg.seq_len, 16, generator=gen)
    text = torch.randn(cfg.batch, text_tokens, 384, generator=gen)
    t = torch.rand(cfg.batch, generator=gen)
    target = torch.randn(cfg.batch, cfg.seq_len, 16, generator=gen)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        if distributed:
            dist.barrier()
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x, t, text), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(argv: list[str]) -> None:
    import torch.distributed as dist

    rank, world, port, tp, dp = (int(v) for v in argv[:5])
    cfg = CheckConfig(**json.loads(argv[5]))
    text_tokens = int(argv[6])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        sec = time_steps(tp=tp, dp=dp, rank=rank, cfg=cfg, text_tokens=text_tokens)
        if rank == 0:
            sys.stdout.write(json.dumps({"step_s": sec}) + "\n")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_layout(tp: int, dp: int, cfg: CheckConfig, *, text_tokens: int = 24) -> float:
    """Median step seconds of the stand-in with ``tp x dp`` ranks (in-process when 1)."""
    if tp * dp == 1:
        return time_steps(tp=1, dp=1, rank=0, cfg=cfg, text_tokens=text_tokens)
    world, port = tp * dp, _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads)}
    args = [str(port), str(tp), str(dp), json.dumps(dataclasses.asdict(cfg)), str(text_tokens)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "step_infra.emulator.localcheck",
                "--worker",
                str(r),
                str(world),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=cfg.timeout_s)
            if p.returncode:
                raise RuntimeError(f"local check rank exited {p.returncode}: {err.strip()[-600:]}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return float(json.loads(outs[0].strip().splitlines()[-1])["step_s"])


def predict_layout(profile_path: str | Path, tp: int, dp: int, cfg: CheckConfig) -> dict[str, Any]:
    """``predict_step`` of the same step on the measured profile: ``tp x dp`` ranks, one node."""
    from step_infra.emulator import predict_step

    est = predict_step(
        "tiny-dit",
        profile_path,
        tp=tp,
        dp=dp,
        micro_batch=cfg.batch,
        global_batch=cfg.batch * dp,
        seq_len=cfg.seq_len,
    )
    return {"step_time_s": est.step_time_s, "breakdown": est.breakdown}


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped
    children): their difference over a window is what other processes took."""
    import resource

    import psutil

    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    return busy, own


class _OtherLoad:
    """Context manager: ``share`` is the fraction of the machine's CPU time that processes
    other than this one and its children used inside the ``with`` block."""

    share: float = 0.0

    def __enter__(self) -> _OtherLoad:
        self._busy, self._own = _cpu_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own = _cpu_seconds()
        wall = max(time.perf_counter() - self._t0, 1e-9)
        other = max(0.0, (busy - self._busy) - (own - self._own))
        self.share = min(1.0, other / (wall * (os.cpu_count() or 1)))


def run_local_check(
    profiles: dict[int, str | Path] | Callable[[int], str | Path],
    cfg: CheckConfig | None = None,
    *,
    layouts: dict[str, tuple[int, int]] | None = None,
    max_other_load: float = 1.0,
    attempts: int = 1,
) -> list[dict[str, Any]]:
    """Measure and predict every layout; one dict per layout with the ratio and error.

    ``profiles`` maps a world size to the hardware profile measured with that many ranks at once
    (``hwprobe.calibrate(..., ranks_per_node=n)``): ranks sharing a CPU get less each. A
    callable is called right before each layout is timed, so on a shared machine the profile and
    the step see the same background load.

    ``other_load`` is the share of the machine's CPU time that other processes used while the
    layout was profiled or timed (the larger of the two windows). On a shared machine a burst
    of someone else's work can take half of it; such a measurement is not of this job, and a
    profile taken under a load the step did not see (or the reverse) predicts another machine.
    A layout with ``other_load`` above
    ``max_other_load`` is profiled and timed again, up to ``attempts`` times in all; every
    attempt is kept in the row's ``attempts`` list, the row reports the last one, and
    ``contended`` says whether even that one was above the limit.
    """
    from step_infra.emulator import get_model

    if attempts < 1 or not 0.0 <= max_other_load <= 1.0:
        raise ValueError(
            f"attempts must be >= 1 and max_other_load in [0, 1], got {attempts}, {max_other_load}"
        )
    cfg = cfg or CheckConfig()
    text_tokens = get_model("tiny-dit").text_tokens
    rows = []
    for name, (tp, dp) in (layouts or LAYOUTS).items():
        world = tp * dp
        if not callable(profiles) and world not in profiles:
            raise ValueError(f"no hardware profile for {world} rank(s); have {sorted(profiles)}")
        tries: list[dict[str, Any]] = []
        while len(tries) < attempts and (not tries or tries[-1]["other_load"] > max_other_load):
            with _OtherLoad() as probe_load:
                profile = profiles(world) if callable(profiles) else profiles[world]
            with _OtherLoad() as step_load:
                measured = measure_layout(tp, dp, cfg, text_tokens=text_tokens)
            others = max(probe_load.share, step_load.share)
            pred = predict_layout(profile, tp, dp, cfg)
            used = json.loads(Path(profile).read_text())
            tries.append(
                {
                    "measured_step_s": measured,
                    "predicted_step_s": pred["step_time_s"],
                    "error": pred["step_time_s"] / measured - 1.0,
                    "other_load": others,
                    "other_load_probe": probe_load.share,
                    "other_load_step": step_load.share,
                    "breakdown": pred["breakdown"],
                    "profile": {**used["gpu"], **used["cluster"]},
                }
            )
        last = tries[-1]
        rows.append(
            {
                "layout": name,
                "tp": tp,
                "dp": dp,
                **last,
                "contended": last["other_load"] > max_other_load,
                "attempts": [
                    {k: v for k, v in t.items() if k not in ("breakdown", "profile")} for t in tries
                ],
            }
        )
    return rows


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(sys.argv[2:])
