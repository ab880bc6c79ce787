"""Run a staged recipe end to end on the synthetic data and measure it.

Order: train the Video-VAE (report PSNR) -> encode clips, frames and low-resolution clips to
latents once -> each stage in turn, starting from the last one's weights -> motion-check
accuracy of generated clips (decoded by the VAE) after the base stages, after DPO and after
averaging. Everything lands in the run directory: ``config.toml``, ``checkpoints/``,
``preference/`` (samples and pairs), ``samples/*.gif`` and ``results.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from step_infra import config_io
from step_infra.data.media import write_gif
from step_infra.data.motion import motion_accuracy
from step_infra.data.synthetic import SyntheticClips, eval_captions
from step_infra.models.config import conditioned_preset
from step_infra.models.dit import DiT, build_dit
from step_infra.models.text import TextEncoders
from step_infra.models.vae import VideoVAE, psnr
from step_infra.recipes.averaging import average_checkpoints
from step_infra.recipes.preference import build_preference_pairs
from step_infra.recipes.stages import RecipeConfig, StageConfig, TurboConfig
from step_infra.train.dpo import diffusion_dpo_loss
from step_infra.train.flow import euler_sample, flow_matching_loss
from step_infra.train.loop import TextBatch, TextCache, infinite, loss_drop, train
from step_infra.train.turbo import reflow_loss
from step_infra.train.vae_pretrain import pretrain_vae

log = logging.getLogger(__name__)


class Pipeline:
    """State of one run: VAE, text features, latents, the current DiT."""

    def __init__(
        self, recipe: RecipeConfig, run_dir: str | Path, *, text: TextEncoders | None = None
    ) -> None:
        self.recipe = recipe
        self.dir = Path(run_dir)
        (self.dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        torch.manual_seed(recipe.seed)
        self.vae = VideoVAE(recipe.vae)
        encoders = text or TextEncoders()
        self.text = TextCache(encoders)
        config = conditioned_preset(
            recipe.dit_preset, latent_channels=recipe.vae.latent_channels, text_dims=encoders.dims
        )
        self.model: DiT = build_dit(config, seed=recipe.seed)
        self.latent_scale = 1.0
        self._latents: dict[tuple[int, int], tuple[torch.Tensor, list[str], list[str]]] = {}
        self.checkpoints: dict[str, list[Path]] = {}
        self.gen = torch.Generator().manual_seed(recipe.seed + 1)

    # ---- VAE -------------------------------------------------------------------------------
    def train_vae(self) -> dict[str, Any]:
        data = SyntheticClips(self.recipe.data)
        losses = pretrain_vae(self.vae, data, self.recipe.vae_optim, seed=self.recipe.seed)
        torch.save(self.vae.state_dict(), self.dir / "checkpoints" / "vae.pt")
        held_out = SyntheticClips(
            dataclasses.replace(self.recipe.data, seed=self.recipe.seed + 99, num_clips=64)
        )
        video = held_out.batch(list(range(64)))["video"]
        assert isinstance(video, torch.Tensor)
        with torch.no_grad():
            recon = self.vae.decode(self.vae.encode(video)[0])
        self.vae.requires_grad_(False)
        first, last = loss_drop(losses)
        return {"loss_first": first, "loss_last": last, "psnr_db": psnr(recon, video),
                "recon_motion_accuracy": motion_accuracy(recon, held_out.batch(list(range(64)))["caption_en"])}  # type: ignore[arg-type]  # fmt: skip

    def latents(self, size: int, frames: int) -> tuple[torch.Tensor, list[str], list[str]]:
        """Normalized latents of the data set at ``size`` (``frames == 1``: random frames)."""
        key = (size, frames)
        if key in self._latents:
            return self._latents[key]
        cfg = self.recipe.data
        if size != cfg.height:
            shrink = size / cfg.height
            lo, hi = cfg.radius_range
            cfg = dataclasses.replace(
                cfg, height=size, width=size, radius_range=(lo * shrink, hi * shrink)
            )
        data = SyntheticClips(cfg)
        g = torch.Generator().manual_seed(self.recipe.seed + size + frames)
        chunks: list[torch.Tensor] = []
        en: list[str] = []
        zh: list[str] = []
        with torch.no_grad():
            for start in range(0, len(data), 128):
                b = data.batch(list(range(start, min(len(data), start + 128))))
                video = b["video"]
                assert isinstance(video, torch.Tensor)
                if frames == 1:
                    pick = torch.randint(video.shape[2], (video.shape[0],), generator=g)
                    video = video[torch.arange(video.shape[0]), :, pick][:, :, None]
                chunks.append(self.vae.encode(video)[0])
                en += b["caption_en"]  # type: ignore[arg-type]
                zh += b["caption_zh"]  # type: ignore[arg-type]
        z = torch.cat(chunks)
        if key == (self.recipe.data.height, self.recipe.data.frames):
            self.latent_scale = float(1.0 / z.std())
        self._latents[key] = (z, en, zh)
        return self._latents[key]

    def scaled(self, size: int, frames: int) -> tuple[torch.Tensor, list[str], list[str]]:
        self.latents(self.recipe.data.height, self.recipe.data.frames)  # fixes the scale
        z, en, zh = self.latents(size, frames)
        return z * self.latent_scale, en, zh

    # ---- DiT -------------------------------------------------------------------------------
    @staticmethod
    def velocity(model: DiT, x: torch.Tensor, t: torch.Tensor, text: TextBatch) -> torch.Tensor:
        return model(x, t, **text)

    def _captions(self, idx: list[int], en: list[str], zh: list[str]) -> list[str]:
        lang = torch.rand(len(idx), generator=self.gen) < 0.5
        return [zh[i] if bool(z) else en[i] for i, z in zip(idx, lang, strict=True)]

    def flow_stage(self, stage: StageConfig) -> dict[str, Any]:
        video = self.scaled(stage.size, stage.frames)
        image = self.scaled(stage.size, 1) if stage.image_fraction > 0 else video
        batches = infinite(
            video[0].shape[0],
            stage.batch,
            self.recipe.seed + zlib.crc32(stage.name.encode()) % 1000,
        )

        def loss_fn(step: int) -> torch.Tensor:
            use_image = float(torch.rand((), generator=self.gen)) < stage.image_fraction
            z, en, zh = image if use_image else video
            idx = next(batches)
            drop = torch.rand(len(idx), generator=self.gen) < stage.caption_dropout
            text = self.text.batch(self._captions(idx, en, zh), drop)
            return flow_matching_loss(
                lambda x, t: self.velocity(self.model, x, t, text),
                z[idx],
                config=stage.flow,
                generator=self.gen,
            )

        losses = train(self.model, loss_fn, stage.optim, on_checkpoint=self._saver(stage.name))
        first, last = loss_drop(losses)
        return {"loss_first": first, "loss_last": last, "steps": len(losses)}

    def _saver(self, name: str) -> Any:
        def save(step: int) -> None:
            path = self.dir / "checkpoints" / f"{name}-{step:05d}.pt"
            torch.save(self.model.state_dict(), path)
            self.checkpoints.setdefault(name, []).append(path)

        return save

    @torch.no_grad()
    def sample(
        self,
        model: DiT,
        captions: list[str],
        seed: int,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        return_noise: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Latents (unscaled, ready for the VAE) for ``captions``."""
        s = self.recipe.sampling
        g = s.guidance if guidance is None else guidance
        cfg = self.recipe.data
        shape = (len(captions), self.recipe.vae.latent_channels, self.recipe.vae.latent_frames(cfg.frames),
                 cfg.height // self.recipe.vae.spatial, cfg.width // self.recipe.vae.spatial)  # fmt: skip
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        text, null = self.text.batch(captions), self.text.null(len(captions))
        z = euler_sample(
            lambda x, t: self.velocity(model, x, t, text), noise, steps=steps or s.steps, shift=s.shift,
            uncond=lambda x, t: self.velocity(model, x, t, null), guidance=g,
        )  # fmt: skip
        return (z / self.latent_scale, noise) if return_noise else z / self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.vae.decode(c) for c in latents.split(64)]).clamp(-1, 1)

    def evaluate(
        self,
        model: DiT,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 12345,
        label: str = "",
    ) -> dict[str, float]:
        """Motion-check accuracy of generated clips, English and Chinese prompts."""
        out = {}
        for lang in ("en", "zh"):
            caps = eval_captions(self.recipe.eval_prompts, lang)
            z = self.sample(model, caps, seed, steps=steps, guidance=guidance)
            assert isinstance(z, torch.Tensor)
            videos = self.decode(z)
            if label:
                for i in range(min(4, len(caps))):
                    write_gif(videos[i], self.dir / "samples" / f"{label}-{lang}-{i}.gif")
            out[f"motion_acc_{lang}"] = motion_accuracy(videos, caps)
        out["motion_acc"] = (out["motion_acc_en"] + out["motion_acc_zh"]) / 2
        return out

    def _latent(self, model: DiT, prompts: list[str], seed: int, steps: int) -> torch.Tensor:
        z = self.sample(model, prompts, seed, steps=steps)
        assert isinstance(z, torch.Tensor)
        return z * self.latent_scale

    def turbo(self, config: TurboConfig) -> dict[str, Any]:
        """Distil the current model into an 8-step student; compare with the 50-step teacher."""
        teacher = copy.deepcopy(self.model).requires_grad_(False)
        caps = [eval_captions(config.pairs, lang)[i] for i, lang in
                zip(range(config.pairs), ["en", "zh"] * config.pairs, strict=False)]  # fmt: skip
        x0s, noises = [], []
        for start in range(0, len(caps), 64):
            x0, noise = self.sample(teacher, caps[start : start + 64], 5000 + start,
                                    steps=config.teacher_steps, return_noise=True)  # type: ignore[misc]  # fmt: skip
            x0s.append(x0 * self.latent_scale)
            noises.append(noise)
        x0_all, noise_all = torch.cat(x0s), torch.cat(noises)
        batches = infinite(len(caps), 32, self.recipe.seed)

        def loss_fn(step: int) -> torch.Tensor:
            idx = next(batches)
            text = self.text.batch([caps[i] for i in idx])
            return reflow_loss(lambda x, t: self.velocity(self.model, x, t, text), x0_all[idx],
                               noise_all[idx], flow=config.flow, generator=self.gen)  # fmt: skip

        losses = train(self.model, loss_fn, config.optim)
        first, last = loss_drop(losses)
        # Distance to the 50-step teacher from the same noise (held-out seed), in latent RMS.
        caps_eval = eval_captions(self.recipe.eval_prompts, "en")
        ref = self.sample(teacher, caps_eval, 777, steps=config.teacher_steps)
        few = self.sample(teacher, caps_eval, 777, steps=config.student_steps)
        student = self.sample(self.model, caps_eval, 777, steps=config.student_steps, guidance=1.0)
        assert isinstance(ref, torch.Tensor) and isinstance(few, torch.Tensor)
        assert isinstance(student, torch.Tensor)
        scale = float(ref.square().mean().sqrt())

        def rel_rmse(z: torch.Tensor) -> float:
            return float((z - ref).square().mean().sqrt()) / scale

        return {
            "rel_rmse_vs_teacher_50": {
                "teacher_8_steps_cfg": rel_rmse(few),
                "student_8_steps_no_cfg": rel_rmse(student),
            },
            "loss_first": first, "loss_last": last,
            "teacher_50_steps_cfg": self.evaluate(teacher, steps=config.teacher_steps),
            "teacher_8_steps_cfg": self.evaluate(teacher, steps=config.student_steps),
            "student_8_steps_no_cfg": self.evaluate(self.model, steps=config.student_steps, guidance=1.0),
        }  # fmt: skip

    def dpo_stage(self, stage: StageConfig) -> dict[str, Any]:
        reference = copy.deepcopy(self.model).requires_grad_(False)
        prompts = [
            c for i, c in enumerate(eval_captions(stage.dpo_prompts, "en"))
        ]  # balanced over directions; DPO uses its own seeds, never the evaluation seed
        pairs, samples = build_preference_pairs(
            prompts,
            generate=lambda p, seed: self._latent(
                reference, p, 1000 + seed, stage.dpo_sample_steps
            ),
            decode=lambda z: self.decode(z / self.latent_scale),
            out_dir=self.dir / "preference",
            candidates=stage.dpo_candidates,
            seed=self.recipe.seed,
        )
        if not pairs:
            raise ValueError(
                "the preference tool found no pair with distinct scores; raise dpo_candidates"
            )
        w = torch.stack([samples[p.preferred] for p in pairs])
        lo = torch.stack([samples[p.rejected] for p in pairs])
        caps = [p.prompt for p in pairs]
        batches = infinite(len(pairs), min(stage.batch, len(pairs)), self.recipe.seed)
        rewards: list[float] = []

        def loss_fn(step: int) -> torch.Tensor:
            idx = next(batches)
            text = self.text.batch([caps[i] for i in idx])
            loss, info = diffusion_dpo_loss(
                lambda x, t, tx: self.velocity(self.model, x, t, tx),
                lambda x, t, tx: self.velocity(reference, x, t, tx),
                w[idx], lo[idx], text, beta=stage.dpo_beta, flow=stage.flow, generator=self.gen,
            )  # fmt: skip
            rewards.append(info["reward_accuracy"])
            return loss

        losses = train(self.model, loss_fn, stage.optim, on_checkpoint=self._saver(stage.name))
        first, last = loss_drop(losses)
        return {"loss_first": first, "loss_last": last, "pairs": len(pairs), "steps": len(losses),
                "reward_accuracy_last": sum(rewards[-10:]) / max(1, len(rewards[-10:]))}  # fmt: skip

    def average_stage(self, stage: StageConfig, previous: str) -> dict[str, Any]:
        paths = self.checkpoints.get(previous, [])[-stage.average_last :]
        if not paths:
            raise ValueError(f"stage {previous!r} saved no checkpoints to average")
        state = average_checkpoints(paths, self.dir / "checkpoints" / "average.pt")
        self.model.load_state_dict(state)
        return {"averaged": [p.name for p in paths]}


def run_recipe(
    recipe: RecipeConfig, run_dir: str | Path, *, text: TextEncoders | None = None
) -> dict[str, Any]:
    """Run every stage of ``recipe``; return (and write to ``results.json``) what was measured."""
    t0 = time.perf_counter()
    pipe = Pipeline(recipe, run_dir, text=text)
    write_config_toml(recipe, pipe.dir / "config.toml")
    results: dict[str, Any] = {"recipe": recipe.name, "vae": pipe.train_vae(), "stages": {}}
    log.info("VAE: %s", results["vae"])
    previous = ""
    for stage in recipe.stages:
        ts = time.perf_counter()
        if stage.kind == "flow":
            r = pipe.flow_stage(stage)
        elif stage.kind == "dpo":
            results["before_dpo"] = pipe.evaluate(pipe.model, label="before_dpo")
            log.info("motion check before_dpo: %s", results["before_dpo"])
            r = pipe.dpo_stage(stage)
            results["after_dpo"] = pipe.evaluate(pipe.model, label="after_dpo")
            log.info("motion check after_dpo: %s", results["after_dpo"])
        else:
            r = pipe.average_stage(stage, previous)
            results["after_average"] = pipe.evaluate(pipe.model, label="after_average")
            log.info("motion check after_average: %s", results["after_average"])
        r["seconds"] = round(time.perf_counter() - ts, 1)
        results["stages"][stage.name] = r
        log.info("stage %s: %s", stage.name, r)
        previous = stage.name
    if "before_dpo" not in results:
        results["final"] = pipe.evaluate(pipe.model, label="final")
        log.info("motion check final: %s", results["final"])
    if recipe.turbo is not None:
        ts = time.perf_counter()
        results["turbo"] = pipe.turbo(recipe.turbo)
        results["turbo"]["seconds"] = round(time.perf_counter() - ts, 1)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    (pipe.dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def write_config_toml(recipe: RecipeConfig, path: Path) -> None:
    """The recipe as the run directory's ``config.toml`` (tables for nested configs)."""
    config_io.save(recipe, path, header=f"step-infra recipe {recipe.name}")
