"""A stand-in for the part of a diffusers pipeline that structural passes touch, and running one structural
preset on a bare U-Net with it (tests only)."""

from __future__ import annotations

from pathlib import Path


class UNetHolder:
    """`.unet` and `register_modules`: enough to run a structural pass on a bare U-Net."""

    def __init__(self, unet):
        self.unet = unet

    def register_modules(self, **modules):
        for name, module in modules.items():
            setattr(self, name, module)


def apply_preset(holder: UNetHolder, preset: str, arch: str) -> dict:
    """Check and run a one-pass preset on `holder.unet` in place; returns the pass's metrics."""
    from sdcompiler.passes import PassContext
    from sdcompiler.recipe import resolve_recipe

    (step,) = resolve_recipe(preset)
    ctx = PassContext(arch=arch, macs_resolution=(512, 512), cache_dir=Path("."))
    step.pass_.requires(holder, step.config, ctx)
    return step.pass_.run(holder, step.config, ctx)


def pruned_student(teacher, arch: str, preset: str):
    """A copy of the U-Net `teacher` with a structural preset applied (the teacher stays untouched)."""
    from diffusers import UNet2DConditionModel

    holder = UNetHolder(UNet2DConditionModel.from_config(teacher.config))
    holder.unet.load_state_dict(teacher.state_dict())
    apply_preset(holder, preset, arch)
    return holder.unet
