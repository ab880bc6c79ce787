"""Encoder servers: text encoders and the Video-VAE, streaming to the DiT trainers over StepRPC.

As in the Step-Video report, encoding runs on its own GPUs, apart from the DiT trainers. Two
stages, each a process that the launcher starts:

* a **text server** walks the sample stream (ids ``start_id + index``, then every ``count``-th),
  encodes each caption with both text encoders and sprays ``{text_short, text_long}`` into
  pipe ``text`` (one item per sample, to whichever VAE server has credit);
* a **VAE server** takes text items, renders the clip of the same sample id, encodes it with the
  Video-VAE and sprays the joined item ``{latent, text_short, text_long}`` into pipe
  ``latents``, where the trainers' replicas take them.

Chaining the stages keeps a sample's latent and its text embedding in one item, so spraying
to data-parallel replicas never splits a pair. Each server stands for one encoder GPU and is
paced to ``rate`` samples/s (its real work runs inside that budget, and how busy it was is
written to ``servers/<name>.json``), so the encoder/trainer split behaves as on a cluster even
on a shared CPU. Everything a sample contains is a function of its id: a restarted server
produces the same item again.

    python -m step_infra.data.servers --config RUN/config.toml --role vae --index 0 \\
        --registry HOST:PORT --start-id 0 --end-id 9600 --queue-items 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from step_infra.data.synthetic import SyntheticClips, SyntheticConfig, clip_spec
from step_infra.models.vae import VAEConfig
from step_infra.rpc.auth import TOKEN_ENV  # re-exported: the launcher and worker set and read it

log = logging.getLogger(__name__)

TEXT_PIPE = "text"
LATENT_PIPE = "latents"
VAE_BATCH = 8  # clips a VAE server encodes at once when that many are waiting


@dataclass(frozen=True, slots=True, kw_only=True)
class EncoderServers:
    """How many encoder servers a job runs and how fast each one is (a job config's
    ``[servers]`` table). Each server stands for one encoder GPU."""

    text_servers: int = 1
    vae_servers: int = 1
    text_rate: float = 200.0  # samples/s per text-encoder server
    vae_rate: float = 16.0  # samples/s per VAE server
    lease_s: float = 5.0  # a trainer silent this long loses its unacknowledged items
    # Address the servers bind and advertise in the registry: loopback on one host, the
    # host's routable address when trainers elsewhere read from them.
    host: str = "127.0.0.1"
    max_inflight_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if min(self.text_servers, self.vae_servers) < 1:
            raise ValueError(
                f"servers.text_servers={self.text_servers}, vae_servers={self.vae_servers}; "
                "a job needs at least one of each"
            )
        if min(self.text_rate, self.vae_rate) <= 0:
            raise ValueError(
                f"encoder rates must be > 0, got text_rate={self.text_rate}, "
                f"vae_rate={self.vae_rate}"
            )
        if self.lease_s <= 0:
            raise ValueError(f"servers.lease_s={self.lease_s}; expected > 0 seconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """What every encoder server of one launch shares: the job's data, VAE and server
    settings (tables of the run's ``config.toml``) and where this launch stands."""

    run_dir: str
    registry: str
    data: SyntheticConfig
    vae: VAEConfig
    servers: EncoderServers = field(default_factory=EncoderServers)
    vae_checkpoint: str
    start_id: int = 0
    end_id: int = 1 << 40  # exclusive: the text servers stop producing there
    # latents a VAE server encodes ahead of its consumers' credit: the pipe is full when the
    # trainers start and while they restart, and the server never blocks with its own text
    # lease running out (the launcher sets one global batch)
    vae_queue_items: int = 16
    seed: int = 0

    @classmethod
    def from_run_config(
        cls, path: Path, *, registry: str, start_id: int, end_id: int, vae_queue_items: int
    ) -> ServerConfig:
        """The ``data``, ``vae``, ``servers`` and ``seed`` of a run's ``config.toml`` (the
        job's other tables are the trainers' business), plus this launch's values."""
        from step_infra import config_io

        tables = config_io.load_tables(
            path,
            {"data": SyntheticConfig, "vae": VAEConfig, "servers": EncoderServers, "seed": int},
        )
        return cls(
            run_dir=str(Path(path).parent),
            registry=registry,
            vae_checkpoint=str(Path(path).parent / "assets" / "vae.pt"),
            start_id=start_id,
            end_id=end_id,
            vae_queue_items=vae_queue_items,
            **tables,
        )


def caption_language(sample_id: int) -> str:
    """Half the samples are captioned in Chinese, half in English, fixed by the id."""
    return "zh" if (sample_id * 2654435761) >> 7 & 1 else "en"


def caption_of(clips: SyntheticClips, sample_id: int) -> str:
    """The caption of sample ``sample_id`` (clip ``id mod len``, language by id)."""
    spec = clip_spec(clips.config, sample_id % len(clips))
    return spec.caption(caption_language(sample_id))


class _Pacer:
    """Holds a server to ``rate`` items/s and accounts busy vs idle time."""

    def __init__(self, rate: float) -> None:
        self.budget_s = 1.0 / rate
        self.busy_s = 0.0
        self.paced_s = 0.0
        self.items = 0
        self.batches = 0
        self.t0 = time.monotonic()
        self.cpu0 = time.process_time()

    def done(self, started: float, encoded: float, n: int = 1) -> None:
        """``n`` items begun at ``started``, encoded by ``encoded`` (then sent, which may
        wait for the consumers' credit): sleep out the rest of their device budget."""
        self.busy_s += encoded - started
        self.items += n
        self.batches += 1
        rest = n * self.budget_s - (time.monotonic() - started)
        if rest > 0:
            self.paced_s += rest
            time.sleep(rest)


class _Stopping:
    """SIGTERM/SIGINT, or the launcher dying (we get re-parented), end the serving loop: the
    loops finish their item and exit cleanly, and no server outlives its job."""

    def __init__(self) -> None:
        self._signalled = False
        self._parent = os.getppid()
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: object) -> None:
        self._signalled = True

    @property
    def flag(self) -> bool:
        return self._signalled or os.getppid() != self._parent


def _write_stats(cfg: ServerConfig, name: str, pacer: _Pacer, **extra: Any) -> None:
    directory = Path(cfg.run_dir) / "servers"
    directory.mkdir(parents=True, exist_ok=True)
    wall = time.monotonic() - pacer.t0
    doc = {
        "name": name,
        "pid": os.getpid(),
        "items": pacer.items,
        "rate_cap": 1.0 / pacer.budget_s,
        "mean_batch": round(pacer.items / pacer.batches, 2) if pacer.batches else 0.0,
        "wall_s": round(wall, 3),
        "busy_s": round(pacer.busy_s, 3),  # real encoding work (not waiting to send)
        "paced_s": round(pacer.paced_s, 3),  # the rest of each item's device budget
        # CPU the whole process used while serving (encode, pipes, threads): what it takes
        # from trainers that share this host's cores
        "cpu_s": round(time.process_time() - pacer.cpu0, 3),
        "utilization": round((pacer.busy_s + pacer.paced_s) / wall, 4) if wall > 0 else 0.0,
        "t_unix_s": time.time(),
        **extra,
    }
    tmp = directory / f".{name}.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(directory / f"{name}.json")


def _registry(cfg: ServerConfig) -> Any:
    from step_infra.rpc.registry import RegistryClient

    return RegistryClient(cfg.registry, os.environ.get(TOKEN_ENV, ""))


def _producer(
    cfg: ServerConfig, pipe: str, name: str, registry: Any, *, queue_items: int = 0
) -> Any:
    from step_infra.rpc.producer import Producer, ProducerConfig

    pcfg = ProducerConfig(
        host=cfg.servers.host,
        lease_s=cfg.servers.lease_s,
        max_inflight_bytes=cfg.servers.max_inflight_bytes,
        send_timeout_s=None,
        queue_items=queue_items,
    )
    return Producer(pipe, name=name, config=pcfg, registry=registry)


def wait_for_producers(registry: Any, pipe: str, count: int, timeout_s: float = 120.0) -> list[str]:
    """Addresses of ``count`` producers of ``pipe`` once all registered (a consumer must
    connect to every producer, so it must not start with the first one alone)."""
    deadline = time.monotonic() + timeout_s
    addresses: list[str] = []
    while time.monotonic() < deadline:
        try:
            addresses = registry.producer_addresses(pipe)
        except Exception as exc:  # NOT_FOUND until the first producer created the pipe
            log.debug("pipe %s not there yet: %s", pipe, exc)
        if len(addresses) >= count:
            return addresses
        time.sleep(0.1)
    raise TimeoutError(
        f"pipe {pipe!r}: {len(addresses)} of {count} producers registered within {timeout_s} s"
    )


def run_text_server(cfg: ServerConfig, index: int) -> None:
    """Encode captions of ids ``start_id + index + k * text_servers`` into pipe ``text``."""
    from step_infra.models.text import TextEncoders

    stopping = _Stopping()
    name = f"text{index}"
    torch.manual_seed(cfg.seed)  # the ALiBi encoder's weights: the same in every process
    encoders = TextEncoders()
    clips = SyntheticClips(cfg.data)
    registry = _registry(cfg)
    pacer = _Pacer(cfg.servers.text_rate)
    with _producer(cfg, TEXT_PIPE, name, registry) as prod:
        ids = iter(range(cfg.start_id + index, cfg.end_id, cfg.servers.text_servers))
        batch = 8
        # Captions repeat (the synthetic set has a few dozen): encode each once, as a
        # production pipeline precomputes text embeddings of a fixed caption set.
        cache: dict[str, dict[str, torch.Tensor]] = {}
        last_stats = 0.0
        while not stopping.flag:
            chunk = [i for _, i in zip(range(batch), ids, strict=False)]
            if not chunk:  # the stream is finished: keep leases until told to stop
                prod.poll(200)
                continue
            started = time.monotonic()
            captions = [caption_of(clips, i) for i in chunk]
            new = sorted({c for c in captions if c not in cache})
            if new:
                feats = encoders(new)
                for row, cap in enumerate(new):
                    ls, ll = int(feats["short_lengths"][row]), int(feats["long_lengths"][row])
                    cache[cap] = {
                        "text_short": feats["text_short"][row, :ls].clone(),
                        "text_long": feats["text_long"][row, :ll].clone(),
                    }
            encoded = time.monotonic()
            for sid, cap in zip(chunk, captions, strict=True):
                prod.send(cache[cap], {"id": sid, "caption": cap})
            pacer.done(started, encoded, len(chunk))
            if time.monotonic() - last_stats > 1.0:
                last_stats = time.monotonic()
                _write_stats(cfg, name, pacer, next_id=chunk[-1] + cfg.servers.text_servers)
        _write_stats(cfg, name, pacer)
    registry.close()


def load_vae(cfg: ServerConfig) -> tuple[Any, float]:
    """The pre-trained VAE and the scale that gives its latents unit variance."""
    from step_infra.models.vae import VideoVAE

    vae = VideoVAE(cfg.vae)
    state = torch.load(cfg.vae_checkpoint, weights_only=True)
    scale = float(state.pop("latent_scale"))
    vae.load_state_dict(state)
    vae.eval().requires_grad_(False)
    return vae, scale


def run_vae_server(cfg: ServerConfig, index: int) -> None:
    """Join each text item with its clip's VAE latent; spray the pair into ``latents``."""
    from step_infra.rpc.consumer import Consumer, ConsumerConfig

    stopping = _Stopping()
    name = f"vae{index}"
    vae, scale = load_vae(cfg)
    clips = SyntheticClips(cfg.data)
    registry = _registry(cfg)
    pacer = _Pacer(cfg.servers.vae_rate)
    text_addresses = wait_for_producers(registry, TEXT_PIPE, cfg.servers.text_servers)
    with (
        _producer(  # room for a whole batch beyond the queue: sends never block on it
            cfg, LATENT_PIPE, name, registry, queue_items=cfg.vae_queue_items + VAE_BATCH
        ) as prod,
        Consumer(
            TEXT_PIPE,
            text_addresses,
            group=name,
            member="0",
            config=ConsumerConfig(prefetch=2 * VAE_BATCH),
            registry=registry,
        ) as text,
    ):
        last_stats = 0.0
        while not stopping.flag:
            if prod.queued >= cfg.vae_queue_items:  # ahead enough: wait for trainers' credit
                prod.poll(100)
                text.keep_alive()
                continue
            item = text.get(timeout_s=0.1)
            if item is None:
                prod.poll(0)
                continue
            started = time.monotonic()
            # Encode what is waiting as one batch (up to `vae_batch`): a device's throughput.
            taken = [(int(item.metadata["id"]), item.metadata["caption"],
                      {k: v.clone() for k, v in item.tensors.items()})]  # fmt: skip
            while len(taken) < VAE_BATCH:
                more = text.get(timeout_s=0)
                if more is None:
                    break
                taken.append((int(more.metadata["id"]), more.metadata["caption"],
                              {k: v.clone() for k, v in more.tensors.items()}))  # fmt: skip
            videos = [clips[sid % len(clips)]["video"] for sid, _, _ in taken]
            with torch.no_grad():
                latents = vae.encode(torch.stack(videos))[0] * scale  # type: ignore[arg-type]
            encoded = time.monotonic()
            for (sid, caption, text_tensors), latent in zip(taken, latents, strict=True):
                prod.send({"latent": latent, **text_tensors}, {"id": sid, "caption": caption})
            pacer.done(started, encoded, len(taken))
            if time.monotonic() - last_stats > 1.0:
                last_stats = time.monotonic()
                _write_stats(cfg, name, pacer, last_id=taken[-1][0], unacked=prod.unacked)
        _write_stats(cfg, name, pacer)
    registry.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a StepRPC encoder server")
    parser.add_argument("--config", type=Path, required=True, help="the run's config.toml")
    parser.add_argument("--role", choices=("text", "vae"), required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--registry", required=True, help="host:port of the StepRPC registry")
    parser.add_argument("--start-id", type=int, default=0, help="first sample id to produce")
    parser.add_argument("--end-id", type=int, default=1 << 40, help="stop before this id")
    parser.add_argument("--queue-items", type=int, default=16, help="latents encoded ahead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    cfg = ServerConfig.from_run_config(
        args.config,
        registry=args.registry,
        start_id=args.start_id,
        end_id=args.end_id,
        vae_queue_items=args.queue_items,
    )
    if args.role == "text":
        run_text_server(cfg, args.index)
    else:
        run_vae_server(cfg, args.index)


if __name__ == "__main__":
    main()
