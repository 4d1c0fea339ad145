"""PassManager: check a resolved recipe's ordering, run its passes, record each one.

Ordering rules are data (`ORDERING_RULES`): `(earlier, later, why)` says a
pass of stage `earlier` may not follow a pass of stage `later`. A violating
recipe is rejected before any pass runs, naming both passes.

A structural pass that leaves the U-Net's parameters (the same names, shapes and sums) and MACs as they
were (bk-base on a U-Net that already has one pair per stage) changed nothing: the manager logs a warning
naming it, and when every pass of the recipe is such a no-op it stops with a one-line `PassError` before
anything is lowered.

On an inpainting U-Net (conv_in wider than the latents: + mask + masked-image latents) and on the SDXL refiner
the manager refuses passes that sample their teacher as a text-to-image model (`Pass.text_to_image_teacher`:
the distillation passes) before any pass runs; calibration passes (ptq, quest_w4a4) run, their teacher sampled
as the model runs (`teacher_data.teacher_task`). On an inpainting U-Net it checks after each pass that conv_in
still takes every input channel, and records `unet_in_channels` in each pass's metrics. A pass's string
metrics go to its record's `notes`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sdcompiler.passes.accounting import count_macs, count_params, parameter_layout
from sdcompiler.passes.base import Pass, PassContext, PassRecord, check_structure_unchanged, get_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError, RecipeError

logger = logging.getLogger(__name__)

ORDERING_RULES: tuple[tuple[str, str, str], ...] = (
    ("merge", "structural", "LoRA merges need their target modules, which structural passes may remove"),
    ("merge", "quantize", "LoRA weights cannot be fused into quantized weights"),
    ("structural", "quantize", "quantization scales are calibrated for one architecture"),
    ("training", "quantize", "recovery training must see the final float architecture before quantization"),
    ("distill_merge", "quantize", "CFG/step distillation merges change the weights quantization calibrates"),
)


@dataclass(frozen=True)
class PassStep:
    """One resolved recipe item: a pass and its validated config."""

    name: str
    config: PassConfig

    @property
    def pass_(self) -> Pass:
        return get_pass(self.name)


def check_order(steps: Sequence[PassStep]) -> None:
    """Reject a recipe whose passes break an ordering rule."""
    for j, later in enumerate(steps):
        for earlier in steps[:j]:
            for must_be_first, must_be_second, why in ORDERING_RULES:
                if later.pass_.stage == must_be_first and earlier.pass_.stage == must_be_second:
                    raise RecipeError(
                        f"pass {later.name!r} ({must_be_first}) must come before pass {earlier.name!r} "
                        f"({must_be_second}): {why}; reorder the recipe"
                    )


class PassManager:
    """Runs resolved passes over a pipeline in order and returns their records."""

    def __init__(self, steps: Sequence[PassStep], *, count_cost: bool = True):
        self.steps = list(steps)
        self.count_cost = count_cost
        check_order(self.steps)

    def run(self, pipe, ctx: PassContext, on_step: Callable[[PassStep], None] | None = None) -> list[PassRecord]:
        records: list[PassRecord] = []
        unchanged: list[str] = []  # structural passes that left the parameters as they were
        in_channels = _inpainting_channels(pipe)
        unfit = _teacher_unfit(ctx.arch, in_channels)
        for step in self.steps:
            if unfit is not None and step.pass_.text_to_image_teacher:
                how, model, also = unfit
                raise PassError(
                    f"pass {step.name!r} samples the teacher as a text-to-image model{how}, which {model} is not; "
                    f"drop {step.name!r} (structural passes, fuse_qkv, merge_lora, {also} run on it)"
                )
        params, macs = self._cost(pipe, ctx)
        for index, step in enumerate(self.steps):
            pass_ = step.pass_
            if on_step:
                on_step(step)
            ctx.model_key = _model_key(ctx.source_hash, self.steps[:index])
            if pass_.stage == "structural" and ctx.teacher is None and self._teacher_needed_after(index):
                ctx.teacher = copy.deepcopy(pipe.unet).eval().requires_grad_(False)
                ctx.teacher_key = ctx.model_key
            history = ", ".join(s.name for s in self.steps[:index]) or "nothing"
            try:
                pass_.requires(pipe, step.config, ctx)
            except PassError as exc:
                raise PassError(f"pass {step.name!r} (after {history}) cannot run: {exc}") from None
            layout = parameter_layout(pipe.unet)
            before = _fingerprint(pipe.unet) if pass_.changes_structure else None
            start = time.perf_counter()
            metrics = pass_.run(pipe, step.config, ctx) or {}
            seconds = time.perf_counter() - start
            check_structure_unchanged(pass_, layout, parameter_layout(pipe.unet))
            try:
                pass_.ensures(pipe, step.config, ctx)
            except PassError as exc:
                raise PassError(f"pass {step.name!r} (after {history}) broke its guarantee: {exc}") from None
            if in_channels is not None:
                if _inpainting_channels(pipe) != in_channels:
                    raise PassError(
                        f"pass {step.name!r} (after {history}) changed the inpainting U-Net's input channels "
                        f"(conv_in took {in_channels}); fix the pass to keep conv_in's input width"
                    )
                metrics = {**metrics, "unet_in_channels": in_channels}  # conv_in kept the mask / masked inputs
            params_after, macs_after = self._cost(pipe, ctx)
            if before is not None and macs_after == macs and _fingerprint(pipe.unet) == before:
                unchanged.append(step.name)
                logger.warning(
                    "pass %r changed nothing: the U-Net's parameters (%s) and MACs are as before; its config "
                    "asks for what this model already is",
                    step.name,
                    f"{params_after:,}",
                )
            records.append(
                PassRecord(
                    name=step.name,
                    config=step.config.to_dict(),
                    params_before=params,
                    params_after=params_after,
                    macs_before=macs,
                    macs_after=macs_after,
                    seconds=round(seconds, 4),
                    metrics={k: float(v) for k, v in metrics.items() if not isinstance(v, str)},
                    notes={k: v for k, v in metrics.items() if isinstance(v, str)},
                )
            )
            params, macs = params_after, macs_after
            if pass_.needs_teacher:  # the next structural pass starts a new teacher
                ctx.teacher, ctx.teacher_key = None, ""
        if self.steps and len(unchanged) == len(self.steps):
            raise PassError(
                f"the recipe changes nothing: {', '.join(map(repr, unchanged))} left this U-Net as it was "
                f"({params:,} parameters); pick a preset that applies to this model (koala-* for SDXL, bk-* for "
                "SD 1.x/2.x) or compile with recipe 'none'"
            )
        return records

    def _teacher_needed_after(self, index: int) -> bool:
        """A later pass needs a teacher, and no training pass in between takes this one."""
        for step in self.steps[index + 1 :]:
            if step.pass_.needs_teacher:
                return True
        return False

    def _cost(self, pipe, ctx: PassContext) -> tuple[int, int]:
        if not self.count_cost:
            return count_params(pipe.unet), 0
        return count_params(pipe.unet), count_macs(pipe.unet, ctx.macs_resolution, pipe.vae_scale_factor)


def _teacher_unfit(arch: str, in_channels: int | None) -> tuple[str, str, str] | None:
    """For a model no text-to-image teacher can be sampled from: (how that teacher would be sampled, what the
    model is, passes that do run on it), for the refusal; None for a text-to-image model."""
    if arch == "sdxl-refiner":
        refiner = "the SDXL refiner (aesthetic-score time ids, image-to-image)"
        return " from noise with the base's time ids", refiner, "ptq, quest_w4a4, set_scheduler"
    if in_channels is not None:
        model = f"an inpainting U-Net ({in_channels} input channels: latents, mask, masked image)"
        return "", model, "ptq, quest_w4a4, feature_cache"
    return None


def _inpainting_channels(pipe) -> int | None:
    """conv_in's input width where it is wider than the VAE's latents (an inpainting U-Net), else None."""
    conv_in = getattr(getattr(pipe, "unet", None), "conv_in", None)
    vae = getattr(pipe, "vae", None)
    if not isinstance(conv_in, torch.nn.Conv2d) or vae is None:
        return None
    latent_channels = vae.config.latent_channels
    width = conv_in.in_channels
    return width if width != latent_channels else None


def _fingerprint(unet) -> dict[str, tuple]:
    """Name -> (shape, sum, sum of squares) of every parameter: equal before and after a pass that changed
    nothing (a rebuilt U-Net with the same weights included), different when it moved or merged weights."""
    with torch.no_grad():
        return {
            name: (tuple(p.shape), torch.sum(p, dtype=torch.float64).item(), torch.sum(p.double() ** 2).item())
            for name, p in unet.named_parameters()
            if not p.is_meta
        }


def _model_key(source_hash: str, before: Sequence[PassStep]) -> str:
    text = json.dumps([source_hash, [(s.name, s.config.to_dict()) for s in before]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def rebuild(pipe, steps: Sequence[PassStep]) -> None:
    """Re-apply the structure of every structural pass, in recipe order (no weights, no training)."""
    for step in steps:
        pass_ = step.pass_
        if pass_.changes_structure or pass_.deploys_modules:
            pass_.rebuild(pipe, step.config)
