"""Training and calibration data made by the teacher itself, cached on disk by content hash.

No image data set is available (or needed): prompts -> the teacher's own
sampler (`sample_teacher`, the one sampling loop of every training and
calibration pass; classifier-free guidance, a few steps). Distillation takes
its text embeddings and final latents (`teacher_samples`), which stand in for
the training images of BK-SDM / KOALA (noise and timesteps are drawn per
training step); calibration (QuEST, ptq) takes every U-Net input along the
trajectory (`teacher_trajectories`). The cache key
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


def take_prompts(config, count_key: str) -> list[str]:
    """The first `config.<count_key> + config.held_out_prompts` prompts of `config.prompts_file` (default: the
    shipped list): the prompts a pass trains or calibrates on, then its held-out ones. A list that is too short
    is refused, naming the keys that ask for them."""
    count, held_out = getattr(config, count_key), config.held_out_prompts
    prompts = load_prompts(config.prompts_file)
    if len(prompts) < count + held_out:
        raise PassError(
            f"{count + held_out} prompts needed ({count_key}={count} + held_out_prompts={held_out}), the prompt "
            f"list has {len(prompts)}; give a longer prompts_file"
        )
    return prompts[: count + held_out]


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
        return (
            TeacherSamples(**{k: v[:n] for k, v in tensors.items()}),
            TeacherSamples(**{k: v[n:] for k, v in tensors.items()}),
        )

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
        return cls(
            scheduler.alphas_cumprod.float(), scheduler.config.get("prediction_type", "epsilon") == "v_prediction"
        )

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
            return {
                "index": indices,
                "noise": torch.randn(latents[indices].shape, generator=generator),
                "t": torch.randint(0, self.num_timesteps, (len(indices),), generator=generator),
            }

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


def sample_teacher(
    pipe,
    prompts: list[str],
    *,
    resolution: int,
    steps: int,
    guidance: float,
    seed: int,
    teacher: torch.nn.Module | None = None,
    batch: int = 4,
    record_inputs: bool = False,
) -> TeacherRun:
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
        records.append(
            {
                "sample": args[0].detach().float().cpu(),
                "timestep": args[1],
                "context": kwargs["encoder_hidden_states"].detach().float().cpu(),
                "text_embeds": added.get("text_embeds"),
                "time_ids": added.get("time_ids"),
            }
        )

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True) if record_inputs else None
    try:
        pipe.set_progress_bar_config(disable=True)
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            generator = torch.Generator().manual_seed(seed + start)
            with torch.no_grad():
                latents = pipe(
                    chunk,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=resolution,
                    width=resolution,
                    generator=generator,
                    output_type="latent",
                ).images
                encoded = pipe.encode_prompt(
                    chunk, device=latents.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
            parts["latents"].append(latents.float().cpu())
            parts["text_embeds"].append(encoded[0].float().cpu())
            if sdxl:
                parts["pooled"].append(encoded[2].float().cpu())
                parts["time_ids"].append(
                    torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32).repeat(
                        len(chunk), 1
                    )
                )
    finally:
        if handle is not None:
            handle.remove()
        if teacher is not None:
            pipe.register_modules(unet=student)
    return TeacherRun(
        **{k: torch.cat(v) for k, v in parts.items() if v}, unet_inputs=records if record_inputs else None
    )


def teacher_samples(
    pipe,
    teacher: torch.nn.Module,
    prompts: list[str],
    *,
    resolution: int,
    steps: int,
    guidance: float,
    seed: int,
    cache_dir: Path,
    teacher_key: str,
    batch: int = 4,
) -> TeacherSamples:
    """Text embeddings and teacher-sampled latents for `prompts` (distillation data), from the cache when
    possible."""
    key = hashlib.sha256(
        json.dumps([teacher_key, prompts, resolution, steps, guidance, seed, type(pipe.scheduler).__name__]).encode()
    ).hexdigest()[:24]
    file = Path(cache_dir) / "teacher-data" / f"{key}.safetensors"
    if file.exists():
        return TeacherSamples(**_load(file))
    run = sample_teacher(
        pipe, prompts, resolution=resolution, steps=steps, guidance=guidance, seed=seed, teacher=teacher, batch=batch
    )
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


@dataclass
class Trajectories:
    """U-Net inputs along the teacher's sampling trajectories (CFG batch: uncond half, then cond half)."""

    samples: torch.Tensor  # (S, B, C, h, w)
    timesteps: torch.Tensor  # (S,)
    context: torch.Tensor  # (B, 77, D)
    text_embeds: torch.Tensor | None = None  # SDXL (B, D_pooled)
    time_ids: torch.Tensor | None = None  # SDXL (B, 6)

    def inputs(self, step: torch.Tensor, rows: torch.Tensor) -> dict:
        kwargs = {
            "sample": self.samples[step, rows],
            "timestep": self.timesteps[step],
            "encoder_hidden_states": self.context[rows],
        }
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds[rows], "time_ids": self.time_ids[rows]}
        return kwargs

    def eps(self, unet, desc: str | None = None) -> torch.Tensor:
        """The U-Net's eps on every input (one batch of all rows per step, on the U-Net's device), float32 on
        the CPU; also a calibration forward loop. `desc`: show a progress bar with this label."""
        from tqdm.auto import tqdm

        device = next(unet.parameters()).device
        rows = torch.arange(self.samples.shape[1])
        out = []
        with torch.no_grad():
            for step in tqdm(range(len(self.timesteps)), desc=desc, disable=desc is None, leave=False):
                inputs = self.inputs(torch.tensor(step), rows)
                added = inputs.pop("added_cond_kwargs", None)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                if added is not None:
                    inputs["added_cond_kwargs"] = {k: v.to(device) for k, v in added.items()}
                out.append(unet(**inputs).sample.float().cpu())
        return torch.cat(out)


def teacher_trajectories(
    pipe,
    prompts: list[str],
    *,
    steps: int,
    guidance: float,
    resolution: int,
    seed: int,
    cache_dir: Path,
    model_key: str,
) -> Trajectories:
    """Every U-Net input while the (float) pipeline samples `prompts` (calibration data of quest_w4a4 and ptq),
    at `steps` timesteps spread over the trajectory; cached by content hash."""
    key = hashlib.sha256(
        json.dumps(
            [model_key, prompts, steps, guidance, resolution, seed, type(pipe.scheduler).__name__, "trajectories-v1"]
        ).encode()
    ).hexdigest()[:24]
    file = Path(cache_dir) / "calibration" / f"{key}.safetensors"
    if file.exists():
        return Trajectories(**_load(file))
    # all prompts in one chunk (seeded `seed`): the CFG batch of every recorded call holds every prompt
    records = sample_teacher(
        pipe,
        prompts,
        resolution=resolution,
        steps=steps,
        guidance=guidance,
        seed=seed,
        batch=len(prompts),
        record_inputs=True,
    ).unet_inputs
    if not records or records[0]["sample"].shape[0] != 2 * len(prompts):
        raise PassError("calibration needs classifier-free guidance sampling (guidance_scale > 1)")
    unique: dict[float, dict] = {}  # PNDM, e.g., visits one timestep twice: keep its first visit
    for record in records:
        unique.setdefault(float(torch.as_tensor(record["timestep"]).reshape(-1)[0]), record)
    if len(unique) < steps:
        raise PassError(f"the scheduler visited {len(unique)} distinct timesteps for {steps} steps; lower calib_steps")
    visited = list(unique.items())
    chosen = [visited[i] for i in torch.linspace(0, len(visited) - 1, steps).round().long().tolist()]
    first = chosen[0][1]
    tensors = {
        "samples": torch.stack([record["sample"] for _, record in chosen]),
        "timesteps": torch.tensor([timestep for timestep, _ in chosen]),
        "context": first["context"],
    }
    if first["text_embeds"] is not None:
        tensors["text_embeds"] = first["text_embeds"].detach().float().cpu()
        tensors["time_ids"] = first["time_ids"].detach().float().cpu()
    _save(file, tensors)
    return Trajectories(**tensors)


def unconditional_inputs(pipe, count: int, sdxl: bool, like: TeacherSamples) -> dict:
    """The unconditional inputs the runtime would use: "" for SD, zeros for SDXL (force_zeros_for_empty_prompt)."""
    if sdxl and pipe.config.get("force_zeros_for_empty_prompt", True):
        return {
            "encoder_hidden_states": torch.zeros_like(like.text_embeds[:1]).expand(count, -1, -1),
            "pooled": torch.zeros_like(like.pooled[:1]).expand(count, -1),
        }
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
            return self.pipe(
                self.prompts,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=self.resolution,
                width=self.resolution,
                generator=generators,
                output_type="np",
            ).images
