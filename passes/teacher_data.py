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

The sampler runs each model as it is used (`teacher_task`): a text-to-image model from noise; an inpainting
U-Net (conv_in wider than the VAE's latents: + mask + masked-image latents) through diffusers' inpainting
pipeline at strength 1, with seeded synthetic images and masks (`synthetic_images`, `synthetic_masks`: no data
set needed); the SDXL refiner image-to-image from seeded synthetic images at its pipeline's own default strength
and aesthetic scores, with enough steps that `steps` of them are denoised. With ControlNets (ptq, `compile_pipeline(controlnet=...)`) a text-to-image model samples through
diffusers' ControlNet pipeline with seeded synthetic control images (`synthetic_control_images`), so the U-Net is
calibrated on the inputs and residuals it gets when deployed with the nets, and the nets on their own inputs.
Calibration (`teacher_trajectories`) thus fits every model; the distillation passes stay refused on the last two (`Pass.text_to_image_teacher`):
their training steps feed the U-Net noised latents alone (no mask or masked-image channels) and SDXL's 6 time ids
(`TeacherSamples`), not the refiner's 5.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
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
    control: torch.Tensor | None = None  # with ControlNets: (K nets, P, 3, H, W) control images in [0, 1]


MASK_KINDS = ("rectangle", "all", "rectangle", "rectangle")  # prompt i's mask: MASK_KINDS[i % 4]; all: repaint all


def teacher_task(pipe) -> str:
    """How the teacher sampler runs this model: "inpainting" (the pipeline's U-Net's conv_in is wider than the
    VAE's latents), "refiner" (diffusers' `requires_aesthetics_score`: the SDXL refiner's img2img pipeline) or
    "text-to-image"."""
    conv_in = getattr(pipe.unet, "conv_in", None)
    if isinstance(conv_in, torch.nn.Conv2d) and conv_in.in_channels != pipe.vae.config.latent_channels:
        return "inpainting"
    if pipe.config.get("requires_aesthetics_score", False):
        return "refiner"
    return "text-to-image"


def refiner_defaults(pipe) -> dict[str, float]:
    """The refiner pipeline's own call defaults the sampler keeps: strength and the aesthetic scores."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    names = ("strength", "aesthetic_score", "negative_aesthetic_score")
    return {name: float(parameters[name].default) for name in names}


def calibration_inputs(pipe, controlnets: int = 0) -> str:
    """One line for a pass's record: what the teacher sampler feeds this model besides prompts and noise
    (`controlnets`: how many ControlNets it samples with)."""
    task = teacher_task(pipe)
    if controlnets:
        return (
            f"text-to-image with {controlnets} ControlNet(s): seeded synthetic control images (edge maps: outlined "
            "rectangles and lines, one per prompt and net), conditioning scale 1.0"
        )
    if task == "inpainting":
        return (
            f"inpainting: seeded synthetic images (upsampled noise) + masks (by prompt: {', '.join(MASK_KINDS)}, "
            "repeating; rectangles of random size and place, all: repaint everything), strength 1.0"
        )
    if task == "refiner":
        scores = refiner_defaults(pipe)
        return (
            f"refiner: image-to-image from seeded synthetic images (upsampled noise), strength {scores['strength']:g}, "
            f"aesthetic scores {scores['aesthetic_score']:g} / {scores['negative_aesthetic_score']:g} (the "
            "pipeline's defaults)"
        )
    return "text-to-image: prompts from noise"


def synthetic_images(count: int, resolution: int, rng: np.random.Generator) -> torch.Tensor:
    """(count, 3, resolution, resolution) in [0, 1]: 8x8 uniform noise upsampled bicubically (smooth colour
    fields, a stand-in for photos that needs no data set)."""
    low = torch.from_numpy(rng.random((count, 3, 8, 8), dtype=np.float32))
    size = (resolution, resolution)
    return torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def synthetic_control_images(count: int, resolution: int, rng: np.random.Generator) -> torch.Tensor:
    """(count, 3, resolution, resolution) in {0, 1}: white edges on black, as an edge detector's output (the kind
    of control image ControlNets are most often given): 3 to 6 outlined rectangles of random size and place and 2
    to 4 straight lines, 1 to 2 px wide, the same in the three channels."""
    edges = np.zeros((count, resolution, resolution), dtype=np.float32)
    for image in edges:
        for _ in range(int(rng.integers(3, 7))):
            height, width = (max(2, int(resolution * f)) for f in rng.uniform(0.15, 0.6, 2))
            top, left = int(rng.integers(0, resolution - height + 1)), int(rng.integers(0, resolution - width + 1))
            w = int(rng.integers(1, 3))
            image[top : top + w, left : left + width] = image[top + height - w : top + height, left : left + width] = 1
            image[top : top + height, left : left + w] = image[top : top + height, left + width - w : left + width] = 1
        for _ in range(int(rng.integers(2, 5))):
            (y0, x0), (y1, x1) = rng.integers(0, resolution, (2, 2))
            n = 2 * resolution
            ys, xs = np.linspace(y0, y1, n).round().astype(int), np.linspace(x0, x1, n).round().astype(int)
            image[ys, xs] = 1
            image[np.minimum(ys + 1, resolution - 1), xs] = 1
    return torch.from_numpy(edges).unsqueeze(1).repeat(1, 3, 1, 1)


def synthetic_masks(count: int, resolution: int, rng: np.random.Generator, first: int = 0) -> torch.Tensor:
    """(count, 1, resolution, resolution) in {0, 1} (1: repaint): mask i is `MASK_KINDS[(first + i) % 4]`, a
    rectangle of random size (a quarter to three quarters of each side) and place, or all ones (repaint all)."""
    masks = torch.zeros(count, 1, resolution, resolution)
    for i in range(count):
        if MASK_KINDS[(first + i) % len(MASK_KINDS)] == "all":
            masks[i] = 1.0
            continue
        height, width = (int(resolution * f) for f in rng.uniform(0.25, 0.75, 2))
        top, left = int(rng.integers(0, resolution - height + 1)), int(rng.integers(0, resolution - width + 1))
        masks[i, :, top : top + height, left : left + width] = 1.0
    return masks


def img2img_steps(steps: int, strength: float) -> int:
    """The fewest `num_inference_steps` with which an image-to-image call at `strength` denoises `steps` steps
    (diffusers runs int(num_inference_steps * strength) of them)."""
    total = max(steps, math.ceil(steps / strength))
    while int(total * strength) < steps:
        total += 1
    return total


def _task_call(
    pipe, task: str, count: int, first: int, resolution: int, steps: int, seed: int, controlnets=None
) -> tuple:
    """The pipeline that samples `task` (sharing `pipe`'s modules) and its call's arguments besides the prompts,
    guidance, generator and output type; with `controlnets` (text-to-image only), diffusers' ControlNet pipeline and
    its control images (`call["image"]`: one (count, 3, H, W) tensor per net)."""
    rng = np.random.default_rng([seed, first, 1])  # its own stream: not the generator's noise
    if controlnets:
        import diffusers

        if task != "text-to-image":
            raise PassError(f"calibration with ControlNets samples text-to-image models; this one is {task}")
        kind = (
            "StableDiffusionXLControlNetPipeline"
            if hasattr(pipe, "text_encoder_2")
            else "StableDiffusionControlNetPipeline"
        )
        nets = list(controlnets)
        runner = getattr(diffusers, kind).from_pipe(pipe, controlnet=nets[0] if len(nets) == 1 else nets)
        runner.set_progress_bar_config(disable=True)
        images = [synthetic_control_images(count, resolution, rng) for _ in nets]
        call = {"image": images[0] if len(nets) == 1 else images, "num_inference_steps": steps}
        return runner, call | {"height": resolution, "width": resolution}
    if task == "text-to-image":
        return pipe, {"num_inference_steps": steps, "height": resolution, "width": resolution}
    images = synthetic_images(count, resolution, rng)
    if task == "refiner":  # the image sets the size
        strength = refiner_defaults(pipe)["strength"]
        return pipe, {"image": images, "strength": strength, "num_inference_steps": img2img_steps(steps, strength)}
    from diffusers import AutoPipelineForInpainting

    runner = AutoPipelineForInpainting.from_pipe(pipe)  # the loaded pipeline is the text-to-image class
    runner.set_progress_bar_config(disable=True)
    masks = synthetic_masks(count, resolution, rng, first)
    call = {"image": images, "mask_image": masks, "strength": 1.0, "num_inference_steps": steps}
    return runner, call | {"height": resolution, "width": resolution}


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
    controlnets: list | None = None,
) -> TeacherRun:
    """The one teacher sampler of every training and calibration pass: the pipeline samples `prompts` (CFG at
    `guidance`, `steps` steps, the chunk starting at prompt i seeded with `seed + i`) with `teacher` in place
    of its U-Net (default: the U-Net it has), returning the final latents, the prompt embeddings and, with
    `record_inputs`, every U-Net input (a forward pre-hook). An inpainting U-Net samples with synthetic images and
    masks, the refiner image-to-image (`teacher_task`, `_task_call`); its recorded `sample` is the U-Net's whole
    input (latents + mask + masked-image latents for inpainting). With `controlnets` the ControlNet pipeline
    samples, steered by synthetic control images (returned as `control`)."""
    student = pipe.unet
    if teacher is not None:
        pipe.register_modules(unet=teacher)  # the pipeline keeps its scheduler and encoders
    sdxl = hasattr(pipe, "text_encoder_2")
    parts: dict[str, list[torch.Tensor]] = {"text_embeds": [], "latents": [], "pooled": [], "time_ids": []}
    control: list[torch.Tensor] = []
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
    task = teacher_task(pipe)
    try:
        pipe.set_progress_bar_config(disable=True)
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            generator = torch.Generator().manual_seed(seed + start)
            runner, call = _task_call(pipe, task, len(chunk), start, resolution, steps, seed, controlnets)
            if controlnets:
                control.append(torch.stack(call["image"] if len(controlnets) > 1 else [call["image"]]))
            with torch.no_grad():
                latents = runner(
                    chunk, guidance_scale=guidance, generator=generator, output_type="latent", **call
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
        **{k: torch.cat(v) for k, v in parts.items() if v},
        unet_inputs=records if record_inputs else None,
        control=torch.cat(control, dim=1) if control else None,
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

    samples: torch.Tensor  # (S, B, C, h, w): the U-Net's whole input (inpainting: latents, mask, masked image)
    timesteps: torch.Tensor  # (S,)
    context: torch.Tensor  # (B, 77, D)
    text_embeds: torch.Tensor | None = None  # SDXL (B, D_pooled)
    time_ids: torch.Tensor | None = None  # SDXL (B, 6)
    # sampled with ControlNets: (K nets, B, 3, H, W), each row's control image per net (CFG: both halves)
    control: torch.Tensor | None = None

    def inputs(self, step: torch.Tensor, rows: torch.Tensor) -> dict:
        kwargs = {
            "sample": self.samples[step, rows],
            "timestep": self.timesteps[step],
            "encoder_hidden_states": self.context[rows],
        }
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds[rows], "time_ids": self.time_ids[rows]}
        return kwargs

    def _steps(self, module, desc: str | None, only: int | None = None):
        """Per step (or step `only`), every row's inputs on `module`'s device (one batch of all rows)."""
        from tqdm.auto import tqdm

        device = next(module.parameters()).device
        rows = torch.arange(self.samples.shape[1])
        steps = range(len(self.timesteps)) if only is None else [only]
        for step in tqdm(steps, desc=desc, disable=desc is None, leave=False):
            inputs = self.inputs(torch.tensor(step), rows)
            added = inputs.pop("added_cond_kwargs", None)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            if added is not None:
                inputs["added_cond_kwargs"] = {k: v.to(device) for k, v in added.items()}
            yield inputs, device

    def _residuals(self, controlnets, inputs: dict, device, rows=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The nets' residuals for one step's `inputs` (of rows `rows`; default all), summed over the nets as
        diffusers' MultiControlNetModel does (conditioning scale 1.0, as calibration sampled)."""
        if self.control is None or len(controlnets) != self.control.shape[0]:
            have = 0 if self.control is None else self.control.shape[0]
            raise PassError(f"these trajectories were sampled with {have} ControlNet(s), not {len(controlnets)}")
        down, mid = None, None
        for net, control in zip(controlnets, self.control):
            control = control if rows is None else control[rows]
            d, m = net(**inputs, controlnet_cond=control.to(device), conditioning_scale=1.0, return_dict=False)
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return down, mid

    def step_residuals(self, controlnets, step: int) -> list[torch.Tensor]:
        """The nets' summed residuals at `step` for every row (float32, CPU): the down ones, then the mid one."""
        inputs, device = next(self._steps(controlnets[0], None, only=step))
        with torch.no_grad():
            down, mid = self._residuals(controlnets, inputs, device)
        return [r.float().cpu() for r in (*down, mid)]

    def residual_kwargs(self, controlnets, inputs: dict, rows=None) -> dict:
        """The keyword arguments that feed the U-Net the nets' summed residuals on `inputs` (`self.inputs(step,
        rows)`, on the nets' device), as `eps` does; {} without nets."""
        if not controlnets:
            return {}
        down, mid = self._residuals(controlnets, inputs, inputs["sample"].device, rows)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def eps(self, unet, desc: str | None = None, controlnets=()) -> torch.Tensor:
        """The U-Net's eps on every input (one batch of all rows per step, on the U-Net's device), float32 on
        the CPU; also a calibration forward loop. `desc`: show a progress bar with this label. `controlnets`: the
        nets the trajectories were sampled with, whose residuals the U-Net takes (as diffusers' pipeline)."""
        out = []
        with torch.no_grad():
            for inputs, device in self._steps(unet, desc):
                extra = {}
                if controlnets:
                    down, mid = self._residuals(controlnets, inputs, device)
                    extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
                out.append(unet(**inputs, **extra).sample.float().cpu())
        return torch.cat(out)

    def residuals(self, controlnets, desc: str | None = None) -> torch.Tensor:
        """The nets' summed residuals on every input, flattened per step and concatenated (float32, CPU): a
        calibration forward loop for the nets and what their SQNR is measured on."""
        out = []
        with torch.no_grad():
            for inputs, device in self._steps(controlnets[0], desc):
                down, mid = self._residuals(controlnets, inputs, device)
                out.append(torch.cat([r.float().flatten().cpu() for r in (*down, mid)]))
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
    controlnets: list | None = None,
    controlnets_key: str = "",
) -> Trajectories:
    """Every U-Net input while the (float) pipeline samples `prompts` (calibration data of quest_w4a4 and ptq),
    at `steps` timesteps spread over the trajectory; cached by content hash. An inpainting U-Net's and the
    refiner's inputs come from sampling them as they run (`sample_teacher`, `calibration_inputs`). With
    `controlnets` (named by `controlnets_key` in the cache key) the ControlNet pipeline samples with synthetic
    control images, kept as `control`."""
    task = teacher_task(pipe)
    if controlnets and not controlnets_key:
        raise PassError("trajectories sampled with ControlNets need a controlnets_key naming them (cache key)")
    key = hashlib.sha256(
        json.dumps(
            [model_key, prompts, steps, guidance, resolution, seed, type(pipe.scheduler).__name__, "trajectories-v1"]
            + ([] if task == "text-to-image" else [calibration_inputs(pipe), "synthetic-inputs-v1"])
            + ([controlnets_key, "synthetic-control-v1"] if controlnets else [])
        ).encode()
    ).hexdigest()[:24]
    file = Path(cache_dir) / "calibration" / f"{key}.safetensors"
    if file.exists():
        return Trajectories(**_load(file))
    # all prompts in one chunk (seeded `seed`): the CFG batch of every recorded call holds every prompt
    run = sample_teacher(
        pipe,
        prompts,
        resolution=resolution,
        steps=steps,
        guidance=guidance,
        seed=seed,
        batch=len(prompts),
        record_inputs=True,
        controlnets=controlnets,
    )
    records = run.unet_inputs
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
    if run.control is not None:  # the CFG batch: unconditional rows, then conditional ones, same images
        tensors["control"] = torch.cat([run.control, run.control], dim=1).float()
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
