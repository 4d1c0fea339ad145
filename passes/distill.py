"""distill: recovery training of a structurally compressed U-Net against its uncompressed teacher.

Loss (BK-SDM's three terms; weights configurable, task weight 0 by default, see DistillConfig):

    L = w_task |eps_s - target|^2 + w_out |eps_s - eps_t|^2 + w_feat sum_l |F_s^l - F_t^l|^2

with x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, x_0 the teacher's own
sampled latents for the prompt (`teacher_data`), target = noise (or the
velocity for v-prediction models), t uniform over the training timesteps,
and F^l either the outputs of the down and up stages (`feature_kd: stages`,
BK-SDM; paired by position, down stages from the input side, up stages from the
output side, so BK-tiny's shifted up stages pair with the teacher's) or the
self-attention outputs (`feature_kd: attn1`, KOALA's finding: each student attn1
with the teacher attn1 it inherited). A pair is used only when the two outputs
have the same shape. Teacher and student see
the same noise and timestep.

Progressive incubation (`incubation_steps` > 0): before the whole-model run,
each changed unit (down stage i with its mirrored up stage n-1-i, which reads
exactly the skips that down stage writes; the mid-block on its own) trains
inside the frozen teacher (a hybrid that shares the student's modules; the
units trained so far stay in), with output KD against the teacher. Needs the
teacher's stage count (not bk-tiny). `sqnr_incubated_db` records the student
after incubation.

The teacher is the model as it was before the first structural pass since the
previous training pass (the PassManager keeps that copy). The record's metrics
are the student/teacher eps SQNR (dB) on held-out prompts, fixed noise and
timesteps, before and after training: `sqnr_before_db`, `sqnr_after_db`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.teacher_data import NoiseSchedule
from sdcompiler.passes.training import fit, sqnr_db, teacher_data, training_metrics


@dataclass(frozen=True)
class DistillConfig(PassConfig):
    steps: int = 40
    batch_size: int = 4  # global batch per optimizer step
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    num_prompts: int = 8
    held_out_prompts: int = 2
    prompts_file: str | None = None
    resolution: int | None = None  # pixels; default: the model's native size
    teacher_steps: int = 4
    teacher_guidance: float = 5.0
    # The task loss trains on the teacher's own samples (no image data set here); for those the teacher's eps
    # is the better target, and with random-weight stand-in models the two targets disagree entirely. BK-SDM
    # weighs all three 1.0 on real images: set task_weight 1.0 with a real checkpoint and a large budget.
    task_weight: float = 0.0
    output_kd_weight: float = 1.0
    feature_kd_weight: float = 1.0
    # "stages": BK-SDM's down/up stage outputs; "attn1": KOALA's self-attention outputs (student layer <- the
    # teacher layer it inherited from, by prune_blocks / slim_unet's mapping)
    feature_kd: Literal["stages", "attn1"] = "stages"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 10
    # Progressive incubation: before the whole-model run, each changed stage (down stage i with its
    # mirrored up stage, and the mid-block) trains for this many steps inside the frozen teacher. 0: off.
    incubation_steps: int = 0


class FeaturePairs:
    """Forward hooks on paired student/teacher modules; `pairs()` gives their latest outputs (same shapes only).

    `stages`: down stages paired from the input side, up stages from the output side. `attn1`: every student
    self-attention module with the teacher module its weights were inherited from (`student_unet.teacher_key_map`,
    stage offset inferred from the number of up stages).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, kind: str = "stages"):
        if kind == "stages":
            s_down, t_down = list(student.down_blocks), list(teacher.down_blocks)
            s_up, t_up = list(student.up_blocks)[::-1], list(teacher.up_blocks)[::-1]
            modules = list(zip(s_down, t_down)) + list(zip(s_up, t_up))
        else:
            from sdcompiler.passes.student_unet import teacher_key_map

            offset = len(teacher.up_blocks) - len(student.up_blocks)
            keys = teacher_key_map(teacher, student, offset)
            modules = []
            for name, module in student.named_modules():
                if name.endswith(".attn1") and f"{name}.to_out.0.weight" in keys:
                    source = keys[f"{name}.to_out.0.weight"].removesuffix(".to_out.0.weight")
                    modules.append((module, teacher.get_submodule(source)))
        self.outputs: list[list[torch.Tensor | None]] = [[None, None] for _ in modules]
        self.handles = []
        for index, pair in enumerate(modules):
            for side, module in enumerate(pair):
                self.handles.append(module.register_forward_hook(self._hook(index, side)))

    def _hook(self, index: int, side: int):
        def hook(module, args, output):
            self.outputs[index][side] = output[0] if isinstance(output, tuple) else output

        return hook

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(s, t) for s, t in self.outputs if s is not None and t is not None and s.shape == t.shape]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@register_pass
class Distill(Pass):
    name = "distill"
    text_to_image_teacher = True  # refused on inpainting U-Nets and the refiner (`PassManager`)
    runtime_loras = True
    config_class = DistillConfig
    stage = "training"
    needs_teacher = True
    description = "recovery distillation of a pruned/slimmed U-Net (task + output KD + stage-feature KD)"

    def requires(self, pipe, config: DistillConfig, ctx: PassContext) -> None:
        if ctx.teacher is None:
            raise PassError(
                "distill needs a structural pass before it (bk-*, koala-*): there is no teacher to "
                "distill from; put distill after the pass it should recover from"
            )
        if config.held_out_prompts < 1 or config.num_prompts < 1:
            raise PassError("num_prompts and held_out_prompts must be at least 1")

    def run(self, pipe, config: DistillConfig, ctx: PassContext) -> dict[str, float]:
        student, teacher = pipe.unet, ctx.teacher
        data = teacher_data(pipe, teacher, config, ctx, key=ctx.teacher_key)
        train, held = data.train, data.held
        schedule = NoiseSchedule.from_scheduler(pipe.scheduler)

        features = FeaturePairs(student, teacher, config.feature_kd)

        def loss_fn(model: torch.nn.Module, batch: dict):
            index, noise, t = batch["index"].cpu(), batch["noise"], batch["t"]
            device = noise.device
            x0 = train.latents[index].to(device)
            x_t, target = schedule.noisy(x0, noise, t)
            kwargs = _to(train.unet_kwargs(index), device)
            with torch.no_grad():
                eps_t = teacher(x_t, t, **kwargs).sample
            eps_s = model(x_t, t, **kwargs).sample
            task = F.mse_loss(eps_s, target)
            output_kd = F.mse_loss(eps_s, eps_t)
            pairs = features.pairs()
            feature_kd = sum((F.mse_loss(s, t_.detach()) for s, t_ in pairs), torch.zeros((), device=device))
            loss = (
                config.task_weight * task + config.output_kd_weight * output_kd + config.feature_kd_weight * feature_kd
            )
            return loss, {"task": task, "output_kd": output_kd, "feature_kd": feature_kd}

        def held_out_sqnr() -> float:
            noise, t = schedule.held_out(held.latents, ctx.seed + 7)
            x_t, _ = schedule.noisy(held.latents, noise, t)
            kwargs = held.unet_kwargs(slice(None))
            with torch.no_grad():
                return sqnr_db(teacher(x_t, t, **kwargs).sample, student(x_t, t, **kwargs).sample)

        device = next(student.parameters()).device
        teacher.to(device)
        units = incubation_units(student, teacher) if config.incubation_steps else []
        student.requires_grad_(True)
        try:
            before = held_out_sqnr()
            if units:
                teacher.requires_grad_(False)
                self._incubate(units, teacher, train, schedule, config, ctx)
                incubated = held_out_sqnr()
            # The student's structure is part of the key: two recipes with the same teacher and distill config
            # (bk-small vs bk-small-condconv) must not resume each other's checkpoints.
            layout = sorted((name, list(p.shape)) for name, p in student.state_dict().items())
            result = fit(
                "distill",
                student,
                list(student.parameters()),
                loss_fn,
                schedule.draw(train.latents),
                len(train.latents),
                ctx,
                config,
                key=[ctx.teacher_key, config.to_dict(), len(train.latents), layout],
            )
            pipe.register_modules(unet=result.model)
            student = pipe.unet
            after = held_out_sqnr()
        finally:
            features.remove()
            student.requires_grad_(False)
            student.eval()
        metrics = training_metrics(before, after, result) | {"feature_pairs": len(features.pairs())}
        if units:
            metrics |= {"incubation_units": sum(1 for _, _, p in units if p), "sqnr_incubated_db": incubated}
        return metrics

    def _incubate(self, units, teacher, train, schedule, config: DistillConfig, ctx: PassContext) -> None:
        """Train each unit, in order, inside the frozen teacher (output KD against the teacher)."""
        replaced: dict = {}
        for name, replacements, params in units:
            replaced |= replacements
            if not params:
                continue
            hybrid = hybrid_unet(teacher, replaced)  # earlier units stay in: they were trained for this context

            def loss_fn(model, batch):
                index, noise, t = batch["index"].cpu(), batch["noise"], batch["t"]
                x_t, _ = schedule.noisy(train.latents[index].to(noise.device), noise, t)
                kwargs = _to(train.unet_kwargs(index), noise.device)
                with torch.no_grad():
                    eps_t = teacher(x_t, t, **kwargs).sample
                output_kd = F.mse_loss(model(x_t, t, **kwargs).sample, eps_t)
                return output_kd, {"output_kd": output_kd}

            fit(
                "incubate",
                hybrid,
                params,
                loss_fn,
                schedule.draw(train.latents),
                len(train.latents),
                ctx,
                config,
                key=[ctx.teacher_key, config.to_dict(), name, sorted(str(k) for k in replaced)],
                steps=config.incubation_steps,
            )


def incubation_units(student, teacher) -> list[tuple[str, dict, list]]:
    """The student's stages that differ from the teacher's, as (name, replacements, parameters).

    A unit pairs down stage i with its mirror, up stage n-1-i (the down stage produces exactly the
    skips that up stage reads, so the pair drops into the teacher as a whole); the mid-block is its own
    unit. Units without parameters (a removed mid-block) are not trained but stay replaced in later
    hybrids.
    """
    n = len(teacher.down_blocks)
    if len(student.down_blocks) != n or len(student.up_blocks) != len(teacher.up_blocks):
        raise PassError(
            "progressive incubation needs the teacher's number of stages (bk-tiny drops one); set incubation_steps: 0"
        )

    def same(a, b) -> bool:
        if (a is None) != (b is None):
            return False
        return a is None or [tuple(p.shape) for p in a.state_dict().values()] == [
            tuple(p.shape) for p in b.state_dict().values()
        ]

    units = []
    for i in range(n):
        j = n - 1 - i
        if same(student.down_blocks[i], teacher.down_blocks[i]) and same(student.up_blocks[j], teacher.up_blocks[j]):
            continue
        params = list(student.down_blocks[i].parameters()) + list(student.up_blocks[j].parameters())
        units.append(
            (f"stage {i}", {("down_blocks", i): student.down_blocks[i], ("up_blocks", j): student.up_blocks[j]}, params)
        )
    if not same(student.mid_block, teacher.mid_block):
        params = [] if student.mid_block is None else list(student.mid_block.parameters())
        units.append(("mid_block", {("mid_block", None): student.mid_block}, params))
    return units


def hybrid_unet(teacher, replacements: dict):
    """The teacher with some blocks swapped for the student's (shared modules, teacher left untouched)."""
    hybrid = copy.copy(teacher)
    hybrid._modules = dict(teacher._modules)
    for name in ("down_blocks", "up_blocks"):
        hybrid._modules[name] = torch.nn.ModuleList(list(teacher._modules[name]))
    for (name, index), module in replacements.items():
        if index is None:
            hybrid._modules[name] = module
        else:
            hybrid._modules[name][index] = module
    return hybrid


def _to(kwargs: dict, device) -> dict:
    return {k: (_to(v, device) if isinstance(v, dict) else v.to(device)) for k, v in kwargs.items()}
