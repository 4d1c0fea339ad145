"""distill_steps: latent consistency distillation (LCD) of an LCM-LoRA, merged; the pipeline samples in 4 steps.

The LCM-LoRA recipe (Luo et al. 2023, "Latent Consistency Models" and "LCM-LoRA"), for any loaded checkpoint
instead of a published LoRA. A consistency function maps any point of the teacher's probability-flow ODE
trajectory to its origin, so a few-step sampler can jump to x0 and re-noise:

    f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)
    c_skip(t) = sigma_d^2 / ((10 t)^2 + sigma_d^2),  c_out(t) = 10 t / sqrt((10 t)^2 + sigma_d^2),  sigma_d = 0.5

where x0_hat is the U-Net output read as a clean-latent estimate (eps: (x - sqrt(1 - abar_t) eps) / sqrt(abar_t);
v: sqrt(abar_t) x - sqrt(1 - abar_t) v) and 10 is the timestep scaling (`timestep_scaling`, also written into
LCMScheduler, whose sampler uses the same f), which makes c_skip(0) = 1, c_out(0) = 0: f(x, 0) = x.

Training sample: a clean latent x0 with its prompt, a grid index i, noise, and a guidance scale w ~ U[w_min, w_max]:

    grid: s = (i + 1) k - 1, i = 0 .. N-1, k = T / N    (T = 1000 training steps, N = 50: s = 19, 39, ..., 999)
          e = max(s - k, 0)                               (s, e are the papers' t_{n+k}, t_n)
    x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) noise
    teacher at x_s (LoRA disabled):  x0_w = x0_u + w (x0_c - x0_u),  eps_w = eps_u + w (eps_c - eps_u)
    one DDIM step:  x_e = sqrt(abar_e) x0_w + sqrt(1 - abar_e) eps_w
    target = f_stopgrad(x_e, e),  prediction = f_theta(x_s, s)
    loss = mean( sqrt((prediction - target)^2 + c^2) - c ),  c = huber_c = 0.001    (pseudo-Huber)

w is in diffusers' convention (eps_u + w (eps_c - eps_u)); the LCM papers write x0_c + w' (x0_c - x0_u), so
w' = w - 1 and the default 4..16 here is LCM-LoRA's 3..15.

Teacher and target network. The teacher is the same U-Net with the LoRA disabled (one copy of the weights). As in
LCM-LoRA, the target network is the student itself under stop-gradient: no EMA copy. The student gets no guidance
embedding (LCM-LoRA conditions on nothing extra), so it cannot follow w: one output must serve every w drawn, and
since x_e is affine in w and U[w_min, w_max] is symmetric about its midpoint, the loss is minimised near the target
of the midpoint. The result is (approximately) the consistency model of the teacher guided at (w_min + w_max) / 2,
10 by default. The compiled pipeline runs with guidance 1.0 (no unconditional pass); negative prompts are ignored.

Data. No image set is available: the clean latents x0 are the teacher's own guided samples for the prompts
(`teacher_data`: `teacher_steps` steps of the checkpoint's scheduler at `teacher_guidance`, cached by content). They
only choose where on the ODE trajectories training happens; every target comes from a teacher ODE step from the
noised point, so a short, slightly imperfect sampler run biases the sampled region, not the targets.

After training the LoRA is merged (W += B A, alpha = rank) and the scheduler becomes LCMScheduler with
original_inference_steps = N through `set_scheduler`'s own code path, with call defaults of `num_inference_steps`
(4) steps and guidance 1.0.

Metrics, all on the held-out prompts:
- `nfe_per_image_before` = reference_steps x 2 (CFG) and `nfe_per_image_after` = num_inference_steps x 1;
- `sqnr_before_db` / `sqnr_after_db`: the LCD objective as a signal-to-noise ratio, f_theta(x_s, s) vs its target
  (fixed draws of x0, i, noise, w), before (the untrained student = the base model) and after training;
- `psnr_before_db` / `psnr_after_db` (`psnr_db` = after): final images of the base model with the LCM sampler
  (before) and of the distilled model (after), both at `num_inference_steps` steps and guidance 1, against the
  teacher's images from its own scheduler at `reference_steps` steps and `teacher_guidance`, same seeds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import ConfigError, PassError
from sdcompiler.passes.set_scheduler import SetScheduler, SetSchedulerConfig, build_scheduler
from sdcompiler.passes.teacher_data import HeldOutImages, NoiseSchedule, TeacherSamples, psnr_db, unconditional_inputs
from sdcompiler.passes.training import fit, lora_student, sqnr_db, teacher_data, training_metrics

ADAPTER = "lcm_distill"
SIGMA_DATA = 0.5
# LCM-LoRA's target modules: attention, feed-forward, resnet and resampling convolutions, time embedding projections.
LCM_LORA_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
HELD_OUT_DRAWS = 4  # (grid point, noise, w) draws per held-out prompt for the SQNR metric


@dataclass(frozen=True)
class DistillStepsConfig(PassConfig):
    """Latent consistency distillation settings; the defaults are a CPU budget for tiny models.

    Args:
        num_ddim_timesteps: N, the teacher's DDIM grid (skip k = T / N); LCMScheduler's original_inference_steps.
        w_min, w_max: range of the teacher's guidance scale (diffusers convention).
        huber_c: the pseudo-Huber constant c.
        timestep_scaling: t -> 10 t in the boundary conditions (as LCMScheduler's `timestep_scaling`).
        rank: LoRA rank (LCM-LoRA uses 64 on full-size models; 16 suits the tiny test models).
        target_modules: module names the LoRA attaches to.
        steps, batch_size, lr: training budget (global batch per optimizer step).
        num_prompts, held_out_prompts: prompts for training and for the metrics.
        prompts_file: a prompt list (default: the shipped one).
        resolution: pixels (default: the model's native size).
        teacher_steps: sampling steps of the teacher runs that make the clean training latents x0.
        teacher_guidance: guidance of those runs and of the reference images (the teacher as users run it).
        reference_steps: the teacher's steps for the reference images and `nfe_per_image_before`.
        num_inference_steps: the compiled pipeline's default step count.
    """

    num_ddim_timesteps: int = 50
    w_min: float = 4.0
    w_max: float = 16.0
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    rank: int = 16
    target_modules: tuple[str, ...] = LCM_LORA_MODULES
    steps: int = 30
    batch_size: int = 4
    lr: float = 1e-3
    num_prompts: int = 8
    held_out_prompts: int = 2
    prompts_file: str | None = None
    resolution: int | None = None
    teacher_steps: int = 8
    teacher_guidance: float = 7.5
    reference_steps: int = 50
    num_inference_steps: int = 4
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        where = "config of pass 'distill_steps'"
        positive = (
            "num_ddim_timesteps",
            "rank",
            "steps",
            "batch_size",
            "num_prompts",
            "held_out_prompts",
            "teacher_steps",
            "reference_steps",
            "num_inference_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: {name} must be at least 1, got {getattr(self, name)}")
        if not 1.0 <= self.w_min <= self.w_max:
            raise ConfigError(
                f"{where}: need 1 <= w_min <= w_max (a guidance range), got w_min={self.w_min}, w_max={self.w_max}"
            )
        if self.num_inference_steps > self.num_ddim_timesteps:
            raise ConfigError(
                f"{where}: num_inference_steps={self.num_inference_steps} exceeds the "
                f"num_ddim_timesteps={self.num_ddim_timesteps} grid it samples from"
            )
        for name in ("huber_c", "timestep_scaling", "lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: {name} must be positive, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"{where}: checkpoint_every must be 0 (off) or positive, got {self.checkpoint_every}")

    def scheduler_config(self) -> SetSchedulerConfig:
        """The LCM sampler of the result: LCMScheduler on the same grid and scaling, guidance 1."""
        return SetSchedulerConfig(
            scheduler="LCMScheduler",
            options={"original_inference_steps": self.num_ddim_timesteps, "timestep_scaling": self.timestep_scaling},
            num_inference_steps=self.num_inference_steps,
            guidance_scale=1.0,
        )


@dataclass
class ConsistencyParametrization:
    """The noise schedule, the teacher's DDIM grid and the LCM boundary conditions (the module docstring's f)."""

    schedule: NoiseSchedule
    num_ddim_timesteps: int
    timestep_scaling: float

    @property
    def skip(self) -> int:
        return self.schedule.num_timesteps // self.num_ddim_timesteps

    def grid(self, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, e) of grid index i: the timestep a sample starts from and the one the teacher's DDIM step reaches."""
        start = (i + 1) * self.skip - 1
        return start, (start - self.skip).clamp_min(0)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)

    def x0_and_eps(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The U-Net output read as (clean latent, noise) estimates at x, t."""
        a = self.abar(t)
        if self.schedule.v_prediction:
            return a.sqrt() * x - (1 - a).sqrt() * output, (1 - a).sqrt() * x + a.sqrt() * output
        return (x - (1 - a).sqrt() * output) / a.sqrt(), output

    def consistency(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip(t) x + c_out(t) x0_hat."""
        scaled = (self.timestep_scaling * t.float()).view(-1, 1, 1, 1)
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
        return c_skip * x + c_out * self.x0_and_eps(output, x, t)[0]

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t_end: torch.Tensor) -> torch.Tensor:
        a = self.abar(t_end)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps


@contextlib.contextmanager
def _adapters_disabled(unet):
    """The teacher: the same weights without the LoRA."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@contextlib.contextmanager
def _sampler(pipe, scheduler):
    """Sample with another scheduler for a while (the pipeline's own one comes back)."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = original


@register_pass
class DistillSteps(Pass):
    name = "distill_steps"
    text_to_image_teacher = True  # refused on inpainting U-Nets and the refiner (`PassManager`)
    runtime_loras = True
    config_class = DistillStepsConfig
    stage = "distill_merge"
    controlnet = "keeps_layout"  # a merged LoRA; trained without the nets
    description = "latent consistency distillation of an LCM-LoRA, merged; LCM scheduler, 4 steps, guidance 1"

    def requires(self, pipe, config: DistillStepsConfig, ctx: PassContext) -> None:
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise PassError(f"prediction_type {prediction!r} is not supported; LCD needs epsilon or v_prediction")
        train_steps = pipe.scheduler.config.num_train_timesteps
        if config.num_ddim_timesteps > train_steps:
            raise PassError(
                f"num_ddim_timesteps={config.num_ddim_timesteps} exceeds the model's {train_steps} training timesteps"
            )
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise PassError("this U-Net already takes a guidance embedding (time_cond_proj_dim): it is distilled")
        SetScheduler().requires(pipe, config.scheduler_config(), ctx)

    def run(self, pipe, config: DistillStepsConfig, ctx: PassContext) -> dict[str, float]:
        unet = pipe.unet
        device = next(unet.parameters()).device
        sdxl = hasattr(pipe, "text_encoder_2")
        data = teacher_data(pipe, unet, config, ctx, key=ctx.model_key)
        train, held = data.train.to(device), data.held.to(device)
        uncond = {k: v.to(device) for k, v in unconditional_inputs(pipe, 1, sdxl, train).items()}
        lcd = ConsistencyParametrization(
            NoiseSchedule.from_scheduler(pipe.scheduler), config.num_ddim_timesteps, config.timestep_scaling
        )

        def conditioning(samples: TeacherSamples, index: torch.Tensor, guided: bool) -> dict:
            """U-Net keyword arguments for the batch; with `guided`, the conditional half then the unconditional."""
            kwargs = samples.unet_kwargs(index)
            if not guided:
                return kwargs
            n = len(index)
            text = torch.cat([kwargs["encoder_hidden_states"], uncond["encoder_hidden_states"].expand(n, -1, -1)])
            out = {"encoder_hidden_states": text}
            if sdxl:
                added = kwargs["added_cond_kwargs"]
                out["added_cond_kwargs"] = {
                    "text_embeds": torch.cat([added["text_embeds"], uncond["pooled"].expand(n, -1)]),
                    "time_ids": added["time_ids"].repeat(2, 1),
                }
            return out

        def prediction_and_target(student, samples: TeacherSamples, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            index = batch["index"]
            t_start, t_end = lcd.grid(batch["grid_index"])
            x_start, _ = lcd.schedule.noisy(samples.latents[index], batch["noise"], t_start)
            kwargs = conditioning(samples, index, guided=False)
            with torch.no_grad():
                x_pair, t_pair = x_start.repeat(2, 1, 1, 1), t_start.repeat(2)
                with _adapters_disabled(unet):
                    output = unet(x_pair, t_pair, **conditioning(samples, index, guided=True)).sample
                x0, eps = lcd.x0_and_eps(output, x_pair, t_pair)
                w = batch["w"].view(-1, 1, 1, 1)
                (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
                x_end = lcd.ddim_step(x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u), t_end)
                target = lcd.consistency(unet(x_end, t_end, **kwargs).sample, x_end, t_end)  # stop-gradient target
            prediction = lcd.consistency(student(x_start, t_start, **kwargs).sample, x_start, t_start)
            return prediction, target

        def draw(indices: torch.Tensor, generator: torch.Generator) -> dict:
            n = len(indices)
            return {
                "index": indices,
                "noise": torch.randn((n, *train.latents.shape[1:]), generator=generator),
                "grid_index": torch.randint(0, config.num_ddim_timesteps, (n,), generator=generator),
                "w": config.w_min + (config.w_max - config.w_min) * torch.rand(n, generator=generator),
            }

        def loss_fn(model, batch):
            prediction, target = prediction_and_target(model, train, batch)
            c = config.huber_c
            loss = ((prediction.float() - target.float()).pow(2) + c * c).sqrt().mean() - c
            return loss, {"pseudo_huber": loss}

        held_batch = {
            k: v.to(device)
            for k, v in draw(
                torch.arange(len(held.latents)).repeat(HELD_OUT_DRAWS), torch.Generator().manual_seed(ctx.seed + 11)
            ).items()
        }

        def held_out_sqnr() -> float:
            with torch.no_grad():
                prediction, target = prediction_and_target(unet, held, held_batch)
            return sqnr_db(target, prediction)

        images = HeldOutImages(pipe, data.held_prompts, data.resolution, ctx.seed)
        reference = images.sample(config.reference_steps, config.teacher_guidance)
        lcm = build_scheduler(pipe, config.scheduler_config())
        with _sampler(pipe, lcm):
            before_images = images.sample(config.num_inference_steps, 1.0)

        with lora_student(unet, config.rank, config.target_modules, ADAPTER, ctx.seed) as lora_params:
            sqnr_before = held_out_sqnr()
            result = fit(
                "lcd",
                unet,
                lora_params,
                loss_fn,
                draw,
                len(train.latents),
                ctx,
                config,
                key=[ctx.model_key, config.to_dict()],
            )
            sqnr_after = held_out_sqnr()
            unet.fuse_lora(lora_scale=1.0)

        SetScheduler().run(pipe, config.scheduler_config(), ctx)  # LCMScheduler + call defaults (4 steps, w = 1)
        psnr_after = psnr_db(reference, images.sample(config.num_inference_steps, 1.0))
        return training_metrics(sqnr_before, sqnr_after, result) | {
            "nfe_per_image_before": config.reference_steps * (2 if config.teacher_guidance > 1 else 1),
            "nfe_per_image_after": config.num_inference_steps,
            "psnr_before_db": psnr_db(reference, before_images),
            "psnr_after_db": psnr_after,
            "psnr_db": psnr_after,
        }

    def ensures(self, pipe, config: DistillStepsConfig, ctx: PassContext) -> None:
        SetScheduler().ensures(pipe, config.scheduler_config(), ctx)
        if hasattr(pipe.unet, "peft_config"):
            raise PassError("the LCM-LoRA is still attached instead of merged")
