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

Metrics: eps SQNR (dB) of the guided teacher target vs the single conditional
forward before training (`sqnr_before_db`: what dropping CFG alone gives) and
after (`sqnr_after_db`), on held-out prompts; PSNR (dB) of final images
(`image_steps` steps, same seeds) of the unguided base model (`psnr_before_db`)
and of the merged student (`psnr_after_db` = `psnr_db`) against the guided
teacher's; U-Net evaluations per step and per image before and after.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.distill import sqnr_db
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.teacher_data import (
    HeldOutImages, NoiseSchedule, TeacherSamples, load_prompts, psnr_db, teacher_samples, unconditional_inputs,
)
from sdcompiler.passes.trainer import Trainer, TrainerSettings

ADAPTER = "cfg_distill"


@dataclass(frozen=True)
class DistillCFGConfig(PassConfig):
    guidance_scale: float = 5.0  # the w baked into the weights
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


@register_pass
class DistillCFG(Pass):
    name = "distill_cfg"
    config_class = DistillCFGConfig
    stage = "distill_merge"
    description = "train a LoRA so one conditional U-Net call gives the guided eps, then merge it (guidance 1)"

    def requires(self, pipe, config: DistillCFGConfig, ctx: PassContext) -> None:
        if config.guidance_scale <= 1.0:
            raise PassError(f"guidance_scale={config.guidance_scale}: there is no guidance to distill at w <= 1")
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise PassError("this U-Net already takes a guidance embedding (time_cond_proj_dim)")

    def run(self, pipe, config: DistillCFGConfig, ctx: PassContext) -> dict[str, float]:
        from peft import LoraConfig

        unet, scheduler = pipe.unet, pipe.scheduler
        sdxl = hasattr(pipe, "text_encoder_2")
        resolution = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
        wanted = config.num_prompts + config.held_out_prompts
        prompts = load_prompts(config.prompts_file)[:wanted]
        data = teacher_samples(pipe, unet, prompts, resolution=resolution, steps=config.teacher_steps,
                               guidance=config.guidance_scale, seed=ctx.seed, cache_dir=ctx.cache_dir,
                               teacher_key=ctx.model_key)
        uncond = unconditional_inputs(pipe, 1, sdxl, data)
        schedule = NoiseSchedule.from_scheduler(scheduler)
        w = config.guidance_scale

        def unet_kwargs(samples: TeacherSamples, index, conditional: bool, n: int) -> dict:
            kwargs = samples.unet_kwargs(index)
            if not conditional:
                kwargs["encoder_hidden_states"] = uncond["encoder_hidden_states"].expand(n, -1, -1)
                if sdxl:
                    kwargs["added_cond_kwargs"] = dict(kwargs["added_cond_kwargs"],
                                                       text_embeds=uncond["pooled"].expand(n, -1))
            return kwargs

        def guided_target(samples, index, x_t, t):
            n = len(x_t)
            with torch.no_grad():
                unet.disable_adapters()
                try:
                    eps_c = unet(x_t, t, **unet_kwargs(samples, index, True, n)).sample
                    eps_u = unet(x_t, t, **unet_kwargs(samples, index, False, n)).sample
                finally:
                    unet.enable_adapters()
            return eps_u + w * (eps_c - eps_u), eps_c

        train, held = data.split(config.num_prompts)

        def loss_fn(model, batch):
            index = batch["index"].cpu()
            x_t, _ = schedule.noisy(train.latents[index], batch["noise"].cpu(), batch["t"].cpu())
            target, _ = guided_target(train, index, x_t, batch["t"].cpu())
            eps = model(x_t, batch["t"].cpu(), **unet_kwargs(train, index, True, len(index))).sample
            loss = F.mse_loss(eps, target)
            return loss, {"mse": loss}

        def held_out(after: bool) -> float:
            noise, t = schedule.held_out(held.latents, ctx.seed + 11)
            x_t, _ = schedule.noisy(held.latents, noise, t)
            target, eps_c = guided_target(held, slice(None), x_t, t)
            if not after:
                return sqnr_db(target, eps_c)
            with torch.no_grad():
                return sqnr_db(target, unet(x_t, t, **unet_kwargs(held, slice(None), True, len(x_t))).sample)

        images = HeldOutImages(pipe, prompts[config.num_prompts:], resolution, ctx.seed)
        reference = images.sample(config.image_steps, w)  # the guided teacher
        psnr_before = psnr_db(reference, images.sample(config.image_steps, 1.0))  # dropping CFG alone
        unet.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # peft draws A from the global generator: seed it (resumable)
            torch.manual_seed(ctx.seed)
            unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank,
                                        target_modules=list(config.target_modules), init_lora_weights=True),
                             adapter_name=ADAPTER)  # B = 0: starts as the teacher
        try:
            before = held_out(after=False)
            settings = TrainerSettings(steps=config.steps, batch_size=config.batch_size, lr=config.lr, seed=ctx.seed,
                                       mixed_precision=config.mixed_precision,
                                       checkpoint_every=config.checkpoint_every)
            key = hashlib.sha256(json.dumps([ctx.model_key, config.to_dict()]).encode()).hexdigest()[:20]
            lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
            trainer = Trainer(unet, lora_params, loss_fn, schedule.draw(train.latents), len(train.latents), settings,
                              checkpoint_dir=ctx.cache_dir / "train" / f"cfg-{key}", show_progress=ctx.show_progress,
                              cpu=next(unet.parameters()).device.type == "cpu")
            result = trainer.fit()
            after = held_out(after=True)
            unet.fuse_lora(lora_scale=1.0)
        finally:
            unet.unload_lora()
            unet.requires_grad_(False)
            unet.eval()
        psnr_after = psnr_db(reference, images.sample(config.image_steps, 1.0))  # the merged student
        ctx.pipeline_defaults["guidance_scale"] = 1.0
        steps = int(ctx.pipeline_defaults.get("num_inference_steps", 50))
        return {"sqnr_before_db": before, "sqnr_after_db": after, "loss_first": result.losses[0],
                "loss_last": result.losses[-1], "guidance_scale": w, "nfe_per_step_before": 2.0,
                "nfe_per_step_after": 1.0, "nfe_per_image_before": 2.0 * steps, "nfe_per_image_after": 1.0 * steps,
                "psnr_before_db": psnr_before, "psnr_after_db": psnr_after, "psnr_db": psnr_after,
                "resumed_from_step": result.resumed_from}
