"""feature_cache: reuse deep U-Net features across timesteps (preset `deepcache`; A-SDM feature inheritance).

Tuning-free: no weight changes. The pass records the cache settings in the
artifact (manifest `defaults.feature_cache`); the compiled pipeline then runs
the whole U-Net only on the plan's full steps and the shallow branch on the
others (`sdcompiler.feature_cache` has the mechanics and the step plans).
Both targets do it: `torch` with the U-Net module's own blocks, `onnx` with a
second graph, `unet_shallow/model.onnx`, whose inputs include the deep
features the main U-Net graph returns as its second output. Callers turn it
off per call with `pipe(..., feature_cache=False)`.

Metrics: U-Net MACs per image at the default resolution, step count (the
scheduler's timesteps at the recorded `num_inference_steps`) and guidance (`macs_per_image_before` / `_after`: full-U-Net MACs x steps x CFG
factor vs the plan's mix of full and shallow calls), and the full/shallow
call counts of that plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sdcompiler.feature_cache import CacheSettings, SplitUNet, full_steps
from sdcompiler.passes.accounting import count_macs
from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError


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
            raise PassError("feature_cache: the split U-Net does not pass a guidance embedding (timestep_cond), "
                            "which this U-Net takes (time_cond_proj_dim); drop deepcache for this model")

    def run(self, pipe, config: FeatureCacheConfig, ctx: PassContext) -> dict[str, float]:
        from sdcompiler.archs import get_arch

        ctx.pipeline_defaults["feature_cache"] = config.to_dict()
        steps = _timestep_count(pipe.scheduler, ctx.pipeline_defaults)
        guidance = float(ctx.pipeline_defaults.get("guidance_scale", get_arch(ctx.arch).default_guidance_scale))
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
