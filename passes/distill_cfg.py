"""distill_cfg: classifier-free guidance distilled into the weights with a LoRA, then merged.

A guided step needs two U-Net evaluations, eps_u (empty prompt) and eps_c:

    eps_w = eps_u + w (eps_c - eps_u)

The student is the same U-Net plus a LoRA on its attention projections,
trained so that ONE conditional forward reproduces eps_w at a fixed w. The
teacher is the same weights with the LoRA disabled, so no second copy of the
model is held. Data: the teacher's own sampled latents for the prompts
(`teacher_data`), noised at uniform timesteps. After training the LoRA is
merged and the compiled pipeline's default guidance becomes 1.0: one batch-1
U-Net call per step per prompt instead of two. Negative prompts are not
supported by the distilled model (its unconditional branch is baked in as the
empty prompt); with the default guidance of 1.0 the runtime never encodes them.

With `guidance_range: [w_min, w_max]` the student learns every w in the range:
the U-Net gets diffusers' guidance-embedding input (`time_embedding.cond_proj`,
zero-initialised, `time_cond_proj_dim` in its config: the mechanism of LCM
checkpoints), each training example draws w uniformly from the range and feeds
its sinusoidal embedding (of w - 1, diffusers' convention) as `timestep_cond`;
the embedding is trained with the LoRA and kept after the merge. The compiled
pipeline keeps `guidance_scale` as a call argument (default: this config's
`guidance_scale`) and still runs one conditional call per step; every target
passes `timestep_cond` (the onnx and tensorrt U-Net graphs take it as an input).

Metrics: eps SQNR (dB) of the guided teacher target vs the single conditional
forward before training (`sqnr_before_db`: what dropping CFG alone gives) and
after (`sqnr_after_db`), on held-out prompts; PSNR (dB) of final images
(`image_steps` steps, same seeds) of the unguided base model (`psnr_before_db`)
and of the merged student (`psnr_after_db` = `psnr_db`) against the guided
teacher's; U-Net evaluations per step and per image before and after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.teacher_data import HeldOutImages, NoiseSchedule, TeacherSamples, psnr_db, unconditional_inputs
from sdcompiler.passes.training import fit, lora_student, sqnr_db, teacher_data, training_metrics

ADAPTER = "cfg_distill"


@dataclass(frozen=True)
class DistillCFGConfig(PassConfig):
    guidance_scale: float = 5.0  # the w baked into the weights (with guidance_range: the default w of the artifact)
    # [w_min, w_max]: learn every w in the range through a guidance embedding (the U-Net's `time_cond_proj_dim`,
    # LCM's mechanism) instead of one fixed w; the compiled pipeline then takes guidance_scale as usual
    guidance_range: tuple[float, ...] | None = None
    embedding_dim: int = 256  # width of the guidance embedding (LCM checkpoints use 256)
    rank: int = 8
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    steps: int = 40
    batch_size: int = 4
    lr: float = 5e-4
    num_prompts: int = 8
    held_out_prompts: int = 2
    prompts_file: str | None = None
    resolution: int | None = None
    teacher_steps: int = 4
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 10
    image_steps: int = 8  # sampling steps of the held-out image comparison (psnr_*_db)

    def __post_init__(self):
        if self.guidance_range is not None:
            if len(self.guidance_range) != 2 or not 1.0 <= self.guidance_range[0] < self.guidance_range[1]:
                raise ValueError(
                    f"guidance_range must be [w_min, w_max] with 1 <= w_min < w_max, got {list(self.guidance_range)}"
                )
            if not self.guidance_range[0] <= self.guidance_scale <= self.guidance_range[1]:
                raise ValueError(
                    f"guidance_scale={self.guidance_scale} (the artifact's default w) must lie in "
                    f"guidance_range {list(self.guidance_range)}"
                )
        if self.embedding_dim < 2:
            raise ValueError(f"embedding_dim must be >= 2, got {self.embedding_dim}")


@register_pass
class DistillCFG(Pass):
    name = "distill_cfg"
    text_to_image_teacher = True  # refused on inpainting U-Nets and the refiner (`PassManager`)
    runtime_loras = True
    config_class = DistillCFGConfig
    stage = "distill_merge"
    controlnet = "keeps_layout"  # a merged LoRA (and a guidance embedding); trained without the nets
    changes_structure = True  # with guidance_range it adds the guidance embedding, which rebuild() re-adds
    description = "train a LoRA so one conditional U-Net call gives the guided eps, then merge it (guidance 1)"

    def rebuild(self, pipe, config: DistillCFGConfig) -> None:
        if config.guidance_range is not None and getattr(pipe.unet.time_embedding, "cond_proj", None) is None:
            add_guidance_embedding(pipe.unet, config.embedding_dim)

    def requires(self, pipe, config: DistillCFGConfig, ctx: PassContext) -> None:
        if config.guidance_scale <= 1.0:
            raise PassError(f"guidance_scale={config.guidance_scale}: there is no guidance to distill at w <= 1")
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise PassError("this U-Net already takes a guidance embedding (time_cond_proj_dim)")
        if config.guidance_range is not None and ctx.pipeline_defaults.get("feature_cache"):
            # the other order is refused by feature_cache itself; both before any training or export
            raise PassError(
                "guidance_range adds a guidance embedding (timestep_cond), which the feature cache's "
                "split U-Net does not pass; drop deepcache or the range"
            )

    def run(self, pipe, config: DistillCFGConfig, ctx: PassContext) -> dict[str, float]:
        unet, scheduler = pipe.unet, pipe.scheduler
        sdxl = hasattr(pipe, "text_encoder_2")
        data = teacher_data(pipe, unet, config, ctx, key=ctx.model_key, guidance=config.guidance_scale)
        train, held = data.train, data.held
        uncond = unconditional_inputs(pipe, 1, sdxl, train)
        schedule = NoiseSchedule.from_scheduler(scheduler)
        w = config.guidance_scale
        embedded = config.guidance_range is not None
        low, high = config.guidance_range or (w, w)

        def guidance(ws: torch.Tensor) -> dict:
            """The student's extra input for per-example guidance scales `ws` (none at a fixed w)."""
            return {"timestep_cond": guidance_embedding(ws, config.embedding_dim)} if embedded else {}

        def unet_kwargs(samples: TeacherSamples, index, conditional: bool, n: int) -> dict:
            kwargs = samples.unet_kwargs(index)
            if not conditional:
                kwargs["encoder_hidden_states"] = uncond["encoder_hidden_states"].expand(n, -1, -1)
                if sdxl:
                    kwargs["added_cond_kwargs"] = dict(
                        kwargs["added_cond_kwargs"], text_embeds=uncond["pooled"].expand(n, -1)
                    )
            return kwargs

        def guided_target(samples, index, x_t, t, ws):
            n = len(x_t)
            with torch.no_grad():  # the teacher: LoRA off and no guidance embedding, i.e. the base weights
                unet.disable_adapters()
                try:
                    eps_c = unet(x_t, t, **unet_kwargs(samples, index, True, n)).sample
                    eps_u = unet(x_t, t, **unet_kwargs(samples, index, False, n)).sample
                finally:
                    unet.enable_adapters()
            return eps_u + ws.view(-1, 1, 1, 1) * (eps_c - eps_u), eps_c

        draw = schedule.draw(train.latents)

        def draw_with_w(indices: torch.Tensor, generator: torch.Generator) -> dict:
            batch = draw(indices, generator)
            batch["w"] = low + (high - low) * torch.rand(len(indices), generator=generator)  # w per example
            return batch

        def loss_fn(model, batch):
            index, ws = batch["index"].cpu(), batch["w"].cpu()
            x_t, _ = schedule.noisy(train.latents[index], batch["noise"].cpu(), batch["t"].cpu())
            target, _ = guided_target(train, index, x_t, batch["t"].cpu(), ws)
            eps = model(x_t, batch["t"].cpu(), **unet_kwargs(train, index, True, len(index)), **guidance(ws)).sample
            loss = F.mse_loss(eps, target)
            return loss, {"mse": loss}

        def held_out(after: bool) -> float:
            noise, t = schedule.held_out(held.latents, ctx.seed + 11)
            x_t, _ = schedule.noisy(held.latents, noise, t)
            ws = torch.linspace(low, high, len(x_t))  # the range's ends and between, one per held-out example
            target, eps_c = guided_target(held, slice(None), x_t, t, ws)
            if not after:
                return sqnr_db(target, eps_c)
            with torch.no_grad():
                kwargs = unet_kwargs(held, slice(None), True, len(x_t))
                return sqnr_db(target, unet(x_t, t, **kwargs, **guidance(ws)).sample)

        images = HeldOutImages(pipe, data.held_prompts, data.resolution, ctx.seed)
        reference = images.sample(config.image_steps, w)  # the guided teacher
        psnr_before = psnr_db(reference, images.sample(config.image_steps, 1.0))  # dropping CFG alone
        done = False
        try:
            with lora_student(unet, config.rank, config.target_modules, ADAPTER, ctx.seed) as trained:
                if embedded:  # zero-initialised, like the LoRA's B: the student starts as the teacher
                    add_guidance_embedding(unet, config.embedding_dim)
                    trained.append(unet.time_embedding.cond_proj.weight.requires_grad_(True))
                before = held_out(after=False)
                result = fit(
                    "cfg",
                    unet,
                    trained,
                    loss_fn,
                    draw_with_w,
                    len(train.latents),
                    ctx,
                    config,
                    key=[ctx.model_key, config.to_dict()],
                )
                after = held_out(after=True)
                unet.fuse_lora(lora_scale=1.0)
                done = True
        finally:
            if embedded and not done:
                remove_guidance_embedding(unet)
        # the merged student: one conditional call per step (diffusers' pipeline feeds an embedded w itself)
        psnr_after = psnr_db(reference, images.sample(config.image_steps, w if embedded else 1.0))
        ctx.pipeline_defaults["guidance_scale"] = w if embedded else 1.0  # embedded: w is an input, no CFG pass
        steps = int(ctx.pipeline_defaults.get("num_inference_steps", 50))
        extra = {"guidance_min": low, "guidance_max": high} if embedded else {}
        return (
            training_metrics(before, after, result)
            | extra
            | {
                "guidance_scale": w,
                "nfe_per_step_before": 2.0,
                "nfe_per_step_after": 1.0,
                "nfe_per_image_before": 2.0 * steps,
                "nfe_per_image_after": 1.0 * steps,
                "psnr_before_db": psnr_before,
                "psnr_after_db": psnr_after,
                "psnr_db": psnr_after,
            }
        )


def guidance_embedding(guidance_scales: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`timestep_cond` for a U-Net with a guidance embedding, one row per guidance scale: diffusers' sinusoidal
    embedding of w - 1 (the convention of its SD / SDXL / LCM pipelines, so a model behaves the same there and
    in a compiled pipeline; the pass trains with it and the runtime feeds it)."""
    from diffusers import StableDiffusionPipeline

    w = guidance_scales.float() - 1.0
    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim, dtype=dtype)


def add_guidance_embedding(unet, dim: int) -> None:
    """Give `unet` diffusers' guidance-embedding input: `time_embedding.cond_proj` (zero, so the output is
    unchanged until trained) and `time_cond_proj_dim` in its config, as LCM checkpoints have them."""
    embedding = unet.time_embedding
    param = next(embedding.parameters())
    embedding.cond_proj = torch.nn.Linear(dim, embedding.linear_1.in_features, bias=False).to(param.device, param.dtype)
    torch.nn.init.zeros_(embedding.cond_proj.weight)
    unet.register_to_config(time_cond_proj_dim=dim)


def remove_guidance_embedding(unet) -> None:
    unet.time_embedding.cond_proj = None
    unet.register_to_config(time_cond_proj_dim=None)
