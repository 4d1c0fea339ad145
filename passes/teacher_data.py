"""Training and calibration data made by the teacher itself, cached on disk by content hash.

No image data set is available (or needed): prompts -> the teacher's text
embeddings and the latents its own sampler produces for them (classifier-free
guidance, a few steps). Those latents stand in for the training images of
BK-SDM / KOALA; noise and timesteps are drawn per training step. The cache key
hashes the teacher's identity (source checkpoint hash + the passes before it),
the prompts and every sampling setting, so a changed input never reuses data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from sdcompiler.passes.errors import PassError


def load_prompts(path: str | None = None) -> list[str]:
    """The shipped list of 320 diverse prompts, or a user file (one prompt per line, `#` comments)."""
    if path is None:
        text = (resources.files("sdcompiler.passes") / "data" / "prompts.txt").read_text()
    else:
        file = Path(path)
        if not file.is_file():
            raise PassError(f"prompts file {file} does not exist; pass a text file with one prompt per line")
        text = file.read_text()
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise PassError(f"prompts file {path} holds no prompts")
    return prompts


@dataclass
class TeacherSamples:
    text_embeds: torch.Tensor  # (P, 77, D)
    latents: torch.Tensor  # (P, C, h, w): the teacher's final latents
    pooled: torch.Tensor | None = None  # SDXL (P, D_pooled)
    time_ids: torch.Tensor | None = None  # SDXL (P, 6)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def to(self, device) -> "TeacherSamples":
        return TeacherSamples(**{k: v.to(device) for k, v in self.tensors().items()})

    def split(self, n: int) -> tuple["TeacherSamples", "TeacherSamples"]:
        """The first n prompts (training) and the rest (held out)."""
        tensors = self.tensors()
        return (TeacherSamples(**{k: v[:n] for k, v in tensors.items()}),
                TeacherSamples(**{k: v[n:] for k, v in tensors.items()}))

    def unet_kwargs(self, index: torch.Tensor | slice) -> dict:
        kwargs = {"encoder_hidden_states": self.text_embeds[index]}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled[index], "time_ids": self.time_ids[index]}
        return kwargs


@dataclass
class NoiseSchedule:
    """Forward diffusion for training: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, and the target the
    model predicts (the noise, or v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 for v-prediction)."""

    alphas_cumprod: torch.Tensor
    v_prediction: bool = False

    @classmethod
    def from_scheduler(cls, scheduler) -> "NoiseSchedule":
        return cls(scheduler.alphas_cumprod.float(),
                   scheduler.config.get("prediction_type", "epsilon") == "v_prediction")

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if self.v_prediction else noise
        return x_t, target

    def draw(self, latents: torch.Tensor):
        """The trainer's draw function: sample indices plus per-sample noise and uniform timesteps."""
        def draw(indices: torch.Tensor, generator: torch.Generator) -> dict:
            return {"index": indices, "noise": torch.randn(latents[indices].shape, generator=generator),
                    "t": torch.randint(0, self.num_timesteps, (len(indices),), generator=generator)}
        return draw

    def held_out(self, latents: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed noise and evenly spread timesteps for before/after comparisons."""
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        return noise, torch.linspace(50, self.num_timesteps - 50, len(latents)).long()


@dataclass
class TeacherRun:
    """What one pass of the teacher's own sampler gives: per prompt its final latents and embeddings, and (when
    recorded) every U-Net input along the way, one dict per U-Net call (CFG batch: uncond half, then cond)."""

    latents: torch.Tensor  # (P, C, h, w)
    text_embeds: torch.Tensor  # (P, 77, D): the conditional prompt embeddings
    pooled: torch.Tensor | None = None  # SDXL (P, D_pooled)
    time_ids: torch.Tensor | None = None  # SDXL (P, 6)
    unet_inputs: list[dict] | None = None


def sample_teacher(pipe, prompts: list[str], *, resolution: int, steps: int, guidance: float, seed: int,
                   teacher: torch.nn.Module | None = None, batch: int = 4, record_inputs: bool = False) -> TeacherRun:
    """The one teacher sampler of every training and calibration pass: the pipeline samples `prompts` (CFG at
    `guidance`, `steps` steps, the chunk starting at prompt i seeded with `seed + i`) with `teacher` in place
    of its U-Net (default: the U-Net it has), returning the final latents, the prompt embeddings and, with
    `record_inputs`, every U-Net input (a forward pre-hook)."""
    student = pipe.unet
    if teacher is not None:
        pipe.register_modules(unet=teacher)  # the pipeline keeps its scheduler and encoders
    sdxl = hasattr(pipe, "text_encoder_2")
    parts: dict[str, list[torch.Tensor]] = {"text_embeds": [], "latents": [], "pooled": [], "time_ids": []}
    records: list[dict] = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        records.append({"sample": args[0].detach().float().cpu(), "timestep": args[1],
                        "context": kwargs["encoder_hidden_states"].detach().float().cpu(),
                        "text_embeds": added.get("text_embeds"), "time_ids": added.get("time_ids")})

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True) if record_inputs else None
    try:
        pipe.set_progress_bar_config(disable=True)
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            generator = torch.Generator().manual_seed(seed + start)
            with torch.no_grad():
                latents = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                               width=resolution, generator=generator, output_type="latent").images
                encoded = pipe.encode_prompt(chunk, device=latents.device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=False)
            parts["latents"].append(latents.float().cpu())
            parts["text_embeds"].append(encoded[0].float().cpu())
            if sdxl:
                parts["pooled"].append(encoded[2].float().cpu())
                parts["time_ids"].append(torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                                                      dtype=torch.float32).repeat(len(chunk), 1))
    finally:
        if handle is not None:
            handle.remove()
        if teacher is not None:
            pipe.register_modules(unet=student)
    return TeacherRun(**{k: torch.cat(v) for k, v in parts.items() if v}, unet_inputs=records if record_inputs else None)


def teacher_samples(pipe, teacher: torch.nn.Module, prompts: list[str], *, resolution: int, steps: int,
                    guidance: float, seed: int, cache_dir: Path, teacher_key: str,
                    batch: int = 4) -> TeacherSamples:
    """Text embeddings and teacher-sampled latents for `prompts` (distillation data), from the cache when
    possible."""
    key = hashlib.sha256(json.dumps([teacher_key, prompts, resolution, steps, guidance, seed,
                                     type(pipe.scheduler).__name__]).encode()).hexdigest()[:24]
    file = Path(cache_dir) / "teacher-data" / f"{key}.safetensors"
    if file.exists():
        return TeacherSamples(**_load(file))
    run = sample_teacher(pipe, prompts, resolution=resolution, steps=steps, guidance=guidance, seed=seed,
                         teacher=teacher, batch=batch)
    samples = TeacherSamples(run.text_embeds, run.latents, run.pooled, run.time_ids)
    _save(file, samples.tensors())
    return samples


def _load(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file))


def _save(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write atomically: several training processes may write the same cache file at once."""
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_suffix(f".{os.getpid()}.partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    partial.rename(file)


def unconditional_inputs(pipe, count: int, sdxl: bool, like: TeacherSamples) -> dict:
    """The unconditional inputs the runtime would use: "" for SD, zeros for SDXL (force_zeros_for_empty_prompt)."""
    if sdxl and pipe.config.get("force_zeros_for_empty_prompt", True):
        return {"encoder_hidden_states": torch.zeros_like(like.text_embeds[:1]).expand(count, -1, -1),
                "pooled": torch.zeros_like(like.pooled[:1]).expand(count, -1)}
    with torch.no_grad():
        encoded = pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    out = {"encoder_hidden_states": encoded[0].float().expand(count, -1, -1)}
    if sdxl:
        out["pooled"] = encoded[2].float().expand(count, -1)
    return out


def psnr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    """PSNR (dB) of images in [0, 1], over all images together."""
    mse = float(np.mean((reference.astype(np.float64) - estimate.astype(np.float64)) ** 2))
    return float(10 * np.log10(1.0 / max(mse, 1e-20)))


@dataclass
class HeldOutImages:
    """Final images for the held-out prompts, one fixed seed each, so every sampler sees the same noise."""

    pipe: object
    prompts: list[str]
    resolution: int
    seed: int

    def sample(self, steps: int, guidance: float) -> np.ndarray:
        generators = [torch.Generator().manual_seed(self.seed + 7919 + i) for i in range(len(self.prompts))]
        self.pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return self.pipe(self.prompts, num_inference_steps=steps, guidance_scale=guidance,
                             height=self.resolution, width=self.resolution, generator=generators,
                             output_type="np").images
