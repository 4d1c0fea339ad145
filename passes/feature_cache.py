"""feature_cache: reuse deep U-Net features across timesteps (preset `deepcache`; A-SDM feature inheritance).

Tuning-free: no weight changes. The pass records the cache settings in the
artifact (manifest `defaults.feature_cache`); the compiled pipeline then runs
the whole U-Net only on the plan's full steps and the shallow branch on the
others (the runtime's `FeatureCache`, in `sdcompiler.targets.components`).
Both targets do it: `torch` with the U-Net module's own blocks, `onnx` with
two more graphs: `unet/refresh.onnx`, the U-Net returning the deep features as
a second output (sharing the weights file of the plain `unet/model.onnx`,
which optimum runs), and `unet_shallow/model.onnx`, whose inputs include the
deep features. Callers turn it off per call with `pipe(..., feature_cache=False)`.

Metrics: U-Net MACs per image at the default resolution, step count (the
scheduler's timesteps at the recorded `num_inference_steps`) and guidance (`macs_per_image_before` / `_after`: full-U-Net MACs x steps x CFG
factor vs the plan's mix of full and shallow calls), and the full/shallow
call counts of that plan. The U-Net's only: ControlNets are not counted.

How: adjacent denoising steps produce nearly the same deep U-Net features. On a
"full" step the U-Net runs whole and the input of up-block `n-1-branch` (the
output of everything deeper: the deep features) is kept; on the steps in
between only the shallow branch runs: `conv_in`, down blocks `0..branch`
(without the last one's downsampler, whose output only deeper blocks read),
then up blocks `n-1-branch..n-1` starting from the kept deep features, with
fresh skip connections from the shallow down blocks. `branch` 0 recomputes
only the highest-resolution down and up blocks.

Which steps are full (`full_steps`):
- "uniform": every `interval`-th step, starting with the first;
- "nonuniform": the same number of full steps, ceil(steps / interval),
  clustered around the fraction `center` of the trajectory with strength
  `power` (> 1 clusters; DeepCache's non-uniform schedule spends its full
  steps where features change fastest). The first step is always full.

With ControlNets (`compile_pipeline(controlnet=...)`) the nets run on every
step, cached or not (on a cached step the torch target runs each net only up
to the down block that makes the residuals the step takes:
`shallow_controlnet_residuals`; the onnx target a view of each net's graph with
just those outputs, `<folder>/shallow.onnx`). A full step adds their residuals as
`UNet2DConditionModel.forward` does: one per down-block skip, after all down
blocks, and the mid one to the mid block's output (so the cached deep features
carry them). A shallow step adds only the residuals of the skips the shallow
branch makes and consumes: the first `SplitUNet.shallow_skips()` down
residuals (conv_in's, then down blocks `0..branch`'s); the deeper ones and
the mid residual live in the cached deep features.

`SplitUNet` runs a diffusers `UNet2DConditionModel` either way with its own
modules, mirroring `UNet2DConditionModel.forward` for the inputs SD/SDXL
pipelines pass (ControlNet residuals included; no T2I-adapter residuals, no
attention masks); its full path equals `unet(...)` exactly. The ONNX target exports its two paths
as the refresh graph (with a second output, the deep features) and a
`unet_shallow` graph (with the deep features as an input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from sdcompiler.passes.accounting import count_macs
from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError

SCHEDULES = ("uniform", "nonuniform")


@dataclass(frozen=True)
class CacheSettings:
    """What the artifact records (manifest `defaults.feature_cache`)."""

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    center: float = 0.3
    power: float = 1.4

    @classmethod
    def from_dict(cls, data: dict) -> "CacheSettings":
        return cls(**{k: data[k] for k in ("interval", "branch", "schedule", "center", "power") if k in data})


def full_steps(num_steps: int, settings: CacheSettings) -> list[bool]:
    """For each step, True when the whole U-Net runs (and refreshes the cache)."""
    if settings.interval <= 1:
        return [True] * num_steps
    if settings.schedule == "uniform":
        return [i % settings.interval == 0 for i in range(num_steps)]
    count = math.ceil(num_steps / settings.interval)
    chosen = {0}
    for k in range(count):
        u = -1.0 + 2.0 * k / max(1, count - 1)  # evenly spaced in [-1, 1], then bent toward 0
        bent = math.copysign(abs(u) ** settings.power, u)
        span = settings.center if bent < 0 else 1.0 - settings.center
        chosen.add(round((settings.center + bent * span) * (num_steps - 1)))
    while len(chosen) < min(count, num_steps):  # rounding merged some: split the largest gap
        ordered = sorted(chosen | {num_steps})
        width, start = max((b - a, a) for a, b in zip(ordered, ordered[1:]))
        chosen.add(start + width // 2)
    return [i in chosen for i in range(num_steps)]


class SplitUNet(torch.nn.Module):
    """A U-Net that can return its deep features (full path) or start from them (shallow path)."""

    def __init__(self, unet, branch: int):
        super().__init__()
        deepest = len(unet.down_blocks) - 2
        if not 0 <= branch <= deepest:
            raise ValueError(f"feature cache branch must be in 0..{deepest} for this U-Net, got {branch}")
        self.unet, self.branch = unet, branch

    def _prologue(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        unet = self.unet
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
        )
        return unet.conv_in(sample), emb, encoder_hidden_states

    def _upsample_sizes(self, sample) -> bool:
        factor = 2**self.unet.num_upsamplers
        return any(dim % factor != 0 for dim in sample.shape[-2:])

    @staticmethod
    def _down(block, hidden, emb, context, downsample: bool):
        outputs = ()
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attn in zip(block.resnets, attentions):
            hidden = resnet(hidden, emb)
            if attn is not None:
                hidden = attn(hidden, encoder_hidden_states=context, return_dict=False)[0]
            outputs += (hidden,)
        if downsample and block.downsamplers is not None:
            for downsampler in block.downsamplers:
                hidden = downsampler(hidden)
            outputs += (hidden,)
        return hidden, outputs

    def _up(self, indices, hidden, skips, emb, context, forward_size: bool):
        """Run up blocks `indices` in order; returns (hidden, the skips not yet consumed)."""
        unet = self.unet
        for i in indices:
            block = unet.up_blocks[i]
            res, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if forward_size and i < len(unet.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                hidden = block(
                    hidden_states=hidden,
                    temb=emb,
                    res_hidden_states_tuple=res,
                    encoder_hidden_states=context,
                    upsample_size=size,
                )
            else:
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
        return hidden, skips

    def _epilogue(self, hidden):
        unet = self.unet
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)

    def shallow_skips(self) -> int:
        """How many skip connections the shallow branch makes (and consumes): conv_in's, then down blocks
        `0..branch`'s without the last one's downsampler; as many ControlNet down residuals it takes."""
        blocks = self.unet.down_blocks
        count = 1 + sum(len(blocks[i].resnets) for i in range(self.branch + 1))
        return count + sum(blocks[i].downsamplers is not None for i in range(self.branch))

    @staticmethod
    def _add_residuals(skips, down_residuals):
        """diffusers' `down_block_additional_residuals`: one residual per skip, in order."""
        if down_residuals is None:
            return skips
        if len(down_residuals) != len(skips):
            raise ValueError(f"{len(down_residuals)} ControlNet down residuals for {len(skips)} U-Net skips")
        return tuple(skip + residual for skip, residual in zip(skips, down_residuals))

    def full(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        text_embeds=None,
        time_ids=None,
        down_residuals=None,
        mid_residual=None,
    ):
        """(eps, deep features): the whole U-Net, keeping the input of up block n-1-branch; ControlNet
        residuals (all down ones and the mid one) as `unet(...)` adds them."""
        unet = self.unet
        forward_size = self._upsample_sizes(sample)
        hidden, emb, context = self._prologue(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        skips = (hidden,)
        for block in unet.down_blocks:
            hidden, outputs = self._down(block, hidden, emb, context, downsample=True)
            skips += outputs
        skips = self._add_residuals(skips, down_residuals)
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                hidden = unet.mid_block(hidden, emb, encoder_hidden_states=context)
            else:
                hidden = unet.mid_block(hidden, emb)
        if mid_residual is not None:
            hidden = hidden + mid_residual
        split = len(unet.up_blocks) - 1 - self.branch
        deep, skips = self._up(range(split), hidden, skips, emb, context, forward_size)
        hidden, _ = self._up(range(split, len(unet.up_blocks)), deep, skips, emb, context, forward_size)
        return self._epilogue(hidden), deep

    def shallow(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        text_embeds=None,
        time_ids=None,
        deep=None,
        down_residuals=None,
    ):
        """eps from the shallow branch, reusing `deep` from the last full step; `down_residuals`: the ControlNet
        residuals of the shallow skips (the first `shallow_skips()`; more are ignored: the deeper skips and the
        mid block live in `deep`)."""
        forward_size = self._upsample_sizes(sample)
        hidden, emb, context = self._prologue(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        skips = (hidden,)
        for i in range(self.branch + 1):
            hidden, outputs = self._down(self.unet.down_blocks[i], hidden, emb, context, downsample=i < self.branch)
            skips += outputs
        if down_residuals is not None:
            skips = self._add_residuals(skips, down_residuals[: len(skips)])
        n = len(self.unet.up_blocks)
        hidden, _ = self._up(range(n - 1 - self.branch, n), deep, skips, emb, context, forward_size)
        return self._epilogue(hidden)


class _ShallowResidualsDone(Exception):
    """Raised by a hook once the ControlNet's down blocks have made the skips a shallow step needs."""


def shallow_controlnet_residuals(
    controlnet,
    skips: int,
    sample,
    timestep,
    encoder_hidden_states,
    controlnet_cond,
    conditioning_scale: float,
    guess_mode: bool = False,
    added_cond_kwargs=None,
) -> list[torch.Tensor]:
    """The first `skips` down residuals of a diffusers `ControlNetModel`, equal to those of `controlnet(...)`, from
    its own forward stopped after the down block that makes them: the deeper down blocks, the mid block and their
    zero convolutions do not run (what a cached DeepCache step needs: `SplitUNet.shallow_skips()` residuals).
    Scaling as the model's own: `conditioning_scale`, or guess mode's `logspace(-1, 0, n + 1)` per-block scales,
    then the spatial mean where `global_pool_conditions`."""
    made: list[torch.Tensor] = []

    def first(module, args, kwargs):
        made.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])  # conv_in + condition

    def after(module, args, output):
        made.extend(output[1])
        if len(made) >= skips:
            raise _ShallowResidualsDone

    hooks = [controlnet.down_blocks[0].register_forward_pre_hook(first, with_kwargs=True)]
    hooks += [block.register_forward_hook(after) for block in controlnet.down_blocks]
    try:
        controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=conditioning_scale,
            guess_mode=guess_mode,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        raise RuntimeError("the ControlNet's down blocks made fewer skips than the shallow branch takes")
    except _ShallowResidualsDone:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    residuals = [block(skip) for skip, block in zip(made[:skips], controlnet.controlnet_down_blocks)]
    pooled = bool(controlnet.config.global_pool_conditions)
    if guess_mode and not pooled:
        count = len(controlnet.controlnet_down_blocks)
        scales = torch.logspace(-1, 0, count + 1, device=residuals[0].device) * conditioning_scale
        residuals = [r * s for r, s in zip(residuals, scales)]
    else:
        residuals = [r * conditioning_scale for r in residuals]
    if pooled:
        residuals = [torch.mean(r, dim=(2, 3), keepdim=True) for r in residuals]
    return residuals


@dataclass(frozen=True)
class FeatureCacheConfig(PassConfig):
    interval: int = 3
    branch: int = 0
    schedule: Literal["uniform", "nonuniform"] = "uniform"
    center: float = 0.3  # nonuniform: where full steps cluster, as a fraction of the trajectory
    power: float = 1.4  # nonuniform: clustering strength (1 = uniform spacing)

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.branch < 0:
            raise ValueError(f"branch must be >= 0, got {self.branch}")
        if not 0.0 <= self.center <= 1.0 or self.power < 1.0:
            raise ValueError("center must be in [0, 1] and power >= 1")

    def settings(self) -> CacheSettings:
        return CacheSettings(self.interval, self.branch, self.schedule, self.center, self.power)


def _shallow_only(branch: int):
    def forward(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs=None):
        added = added_cond_kwargs or {}
        split = SplitUNet(unet, branch)
        args = (sample, timestep, encoder_hidden_states, added.get("text_embeds"), added.get("time_ids"))
        _, deep = split.full(*args)
        return split.shallow(*args, deep=deep)

    return forward


def _timestep_count(scheduler, defaults: dict) -> int:
    """U-Net calls per image at the recorded defaults (PNDM, e.g., adds a warm-up step)."""
    if defaults.get("timesteps"):
        return len(defaults["timesteps"])
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(int(defaults.get("num_inference_steps", 50)))
    return len(fresh.timesteps)


@register_pass
class FeatureCache(Pass):
    name = "feature_cache"
    runtime_loras = True
    # the U-Net is untouched; the nets run on every step and a shallow step adds the shallow skips' residuals
    controlnet = "keeps_layout"
    config_class = FeatureCacheConfig
    stage = "scheduler"
    description = "reuse deep U-Net features across timesteps; recompute only the shallow branch (DeepCache)"

    def requires(self, pipe, config: FeatureCacheConfig, ctx: PassContext) -> None:
        deepest = len(pipe.unet.down_blocks) - 2
        if config.branch > deepest:
            raise PassError(f"feature_cache: branch {config.branch} is too deep for this U-Net; use 0..{deepest}")
        if len(pipe.unet.up_blocks) != len(pipe.unet.down_blocks):
            raise PassError("feature_cache needs a U-Net with as many up as down blocks")
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise PassError(
                "feature_cache: the split U-Net does not pass a guidance embedding (timestep_cond), "
                "which this U-Net takes (time_cond_proj_dim); drop deepcache for this model"
            )

    def run(self, pipe, config: FeatureCacheConfig, ctx: PassContext) -> dict[str, float]:
        ctx.pipeline_defaults["feature_cache"] = config.to_dict()
        steps = _timestep_count(pipe.scheduler, ctx.pipeline_defaults)
        guidance = float(ctx.pipeline_defaults.get("guidance_scale", ctx.spec.default_guidance_scale))
        cfg = 2 if guidance > 1.0 else 1
        unet = pipe.unet
        full = count_macs(unet, ctx.macs_resolution)  # SplitUNet.full runs the same ops as unet()
        shallow = count_macs(unet, ctx.macs_resolution, forward=_shallow_only(config.branch)) - full
        plan = full_steps(steps, config.settings())
        n_full = sum(plan)
        return {
            "steps": steps,
            "full_calls_per_image": n_full * cfg,
            "shallow_calls_per_image": (steps - n_full) * cfg,
            "unet_macs_full": full,
            "unet_macs_shallow": shallow,
            "macs_per_image_before": full * steps * cfg,
            "macs_per_image_after": (full * n_full + shallow * (steps - n_full)) * cfg,
        }
