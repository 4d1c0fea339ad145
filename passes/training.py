"""The training scaffold every training pass builds on: teacher data, a LoRA student, `fit`, held-out metrics.

A training pass (recovery distillation, CFG distillation, latent consistency distillation, QuEST's
finetuning) keeps only its own loss and schedule; the rest is here:

    data = teacher_data(pipe, teacher, config, ctx, key=ctx.model_key)   # prompts -> samples -> train / held out
    with lora_student(unet, rank, targets, adapter, ctx.seed) as params:  # seeded LoRA, unloaded on exit
        before = held_out_metric()
        result = fit("cfg", unet, params, loss_fn, draw, len(data.train.latents), ctx, config, key=[...])
        after = held_out_metric()
        unet.fuse_lora()
    metrics = training_metrics(before, after, result)

`fit` builds the `Trainer` from the pass config's training fields (steps, batch size, learning rate, ...)
and derives the checkpoint folder from a hash of the run's identity, `<cache>/train/<kind>-<key>`, so an
interrupted compile resumes exactly and two different runs never resume each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence

import torch

from sdcompiler.passes.base import PassContext
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.teacher_data import TeacherSamples, take_prompts, teacher_samples
from sdcompiler.passes.trainer import DrawFn, LossFn, Trainer, TrainerSettings, TrainResult

# the TrainerSettings a pass config may set under the same name (the steps come separately: a pass may run
# several stages, each with its own step count)
_CONFIG_SETTINGS = ("batch_size", "grad_accum", "lr", "weight_decay", "mixed_precision", "checkpoint_every")


def sqnr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio (dB) of `estimate` against `reference`."""
    noise = (reference - estimate).float().pow(2).sum()
    return float(10 * torch.log10(reference.float().pow(2).sum() / noise.clamp_min(1e-20)))


@dataclass
class TeacherData:
    """The teacher's samples for the training prompts and for the held-out ones."""

    train: TeacherSamples
    held: TeacherSamples
    prompts: list[str]  # training prompts, then held-out prompts
    num_train: int
    resolution: int  # pixels the teacher sampled at

    @property
    def held_prompts(self) -> list[str]:
        return self.prompts[self.num_train :]


def teacher_data(
    pipe, teacher: torch.nn.Module, config: PassConfig, ctx: PassContext, *, key: str, guidance: float | None = None
) -> TeacherData:
    """Prompts -> the teacher's own samples (cached by content hash) -> training / held-out split.

    Reads from `config`: `num_prompts`, `held_out_prompts`, `prompts_file`, `resolution` (default: the
    model's native size), `teacher_steps` and `teacher_guidance` (or `guidance`, when the pass samples at
    another scale). `key` names the teacher in the data cache (`ctx.teacher_key` or `ctx.model_key`).
    """
    prompts = take_prompts(config, "num_prompts")
    resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    samples = teacher_samples(
        pipe,
        teacher,
        prompts,
        resolution=resolution,
        steps=config.teacher_steps,
        guidance=config.teacher_guidance if guidance is None else guidance,
        seed=ctx.seed,
        cache_dir=ctx.cache_dir,
        teacher_key=key,
    )
    train, held = samples.split(config.num_prompts)
    return TeacherData(train, held, prompts, config.num_prompts, resolution)


@contextlib.contextmanager
def lora_student(
    unet, rank: int, target_modules: Sequence[str], adapter_name: str, seed: int
) -> Iterator[list[torch.nn.Parameter]]:
    """A LoRA on `unet` (B = 0: the student starts as the base model) whose parameters are yielded for
    training; fuse it with `unet.fuse_lora()` inside the block to keep it. On exit the adapter is unloaded
    and the U-Net is frozen in eval mode, whatever happened.

    peft draws the A matrices from torch's global generator: it is seeded with `seed` in a forked RNG
    state, so the same compile gives the same student (and a resumed run the same starting point).
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet.add_adapter(
                LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=True),
                adapter_name=adapter_name,
            )
    except ValueError as exc:
        raise PassError(
            f"the LoRA attaches to none of target_modules {list(target_modules)} in this U-Net "
            f"({str(exc).splitlines()[0][:200]})"
        ) from None
    try:
        yield [p for n, p in unet.named_parameters() if "lora_" in n]
    finally:
        unet.unload_lora()
        unet.requires_grad_(False)
        unet.eval()


def fit(
    kind: str,
    model: torch.nn.Module,
    params,
    loss_fn: LossFn,
    draw: DrawFn,
    num_samples: int,
    ctx: PassContext,
    config: PassConfig,
    *,
    key: Sequence[Any],
    steps: int | None = None,
    **settings: Any,
) -> TrainResult:
    """Train `params` of `model` (in place) with the shared trainer; returns its `TrainResult`, whose `model`
    is the trained module unwrapped from any distributed wrapper.

    Args:
        kind: names the run's checkpoint folder, `<cache>/train/<kind>-<hash of key>`.
        params: parameters, or optimizer parameter groups (dicts with their own "lr").
        config: the pass config; its fields named like `TrainerSettings`' (`batch_size`, `grad_accum`, `lr`,
            `weight_decay`, `mixed_precision`, `checkpoint_every`) set the trainer.
        key: what identifies this run (the model's key, the config, the stage, ...): JSON-serialisable.
        steps: optimizer steps (default: `config.steps`).
        settings: other `TrainerSettings` (e.g. `max_grad_norm=None`).
    """
    names = {f.name for f in fields(config)}
    from_config = {name: getattr(config, name) for name in _CONFIG_SETTINGS if name in names}
    trainer_settings = TrainerSettings(
        steps=config.steps if steps is None else steps, seed=ctx.seed, **from_config | settings
    )
    run_key = hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:20]
    device = next(model.parameters()).device
    trainer = Trainer(
        model,
        params,
        loss_fn,
        draw,
        num_samples,
        trainer_settings,
        checkpoint_dir=ctx.cache_dir / "train" / f"{kind}-{run_key}",
        show_progress=ctx.show_progress,
        cpu=device.type == "cpu",
    )
    result = trainer.fit()
    result.model = trainer.accelerator.unwrap_model(trainer.model)
    return result


def training_metrics(before: float, after: float, result: TrainResult) -> dict[str, float]:
    """The metrics every training pass records: held-out SQNR before and after, the loss curve's ends, the
    steps run, and the step a resumed run started from."""
    return {
        "sqnr_before_db": before,
        "sqnr_after_db": after,
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "train_steps": len(result.losses),
        "resumed_from_step": result.resumed_from,
    }
