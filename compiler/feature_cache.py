"""Feature inheritance across timesteps (DeepCache-style): the runtime half.

Adjacent denoising steps produce nearly the same deep U-Net features. On a
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

`SplitUNet` runs a diffusers `UNet2DConditionModel` either way with its own
modules, mirroring `UNet2DConditionModel.forward` for the inputs SD/SDXL
pipelines pass (no ControlNet/adapter residuals, no attention masks); its
full path equals `unet(...)` exactly. The ONNX target exports its two paths
as the U-Net graph (with a second output, the deep features) and a
`unet_shallow` graph (with the deep features as an input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

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
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added)
        return unet.conv_in(sample), emb, encoder_hidden_states

    def _upsample_sizes(self, sample) -> bool:
        factor = 2 ** self.unet.num_upsamplers
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
            res, skips = skips[-len(block.resnets):], skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if forward_size and i < len(unet.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res,
                               encoder_hidden_states=context, upsample_size=size)
            else:
                hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res, upsample_size=size)
        return hidden, skips

    def _epilogue(self, hidden):
        unet = self.unet
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)

    def full(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        """(eps, deep features): the whole U-Net, keeping the input of up block n-1-branch."""
        unet = self.unet
        forward_size = self._upsample_sizes(sample)
        hidden, emb, context = self._prologue(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        skips = (hidden,)
        for block in unet.down_blocks:
            hidden, outputs = self._down(block, hidden, emb, context, downsample=True)
            skips += outputs
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                hidden = unet.mid_block(hidden, emb, encoder_hidden_states=context)
            else:
                hidden = unet.mid_block(hidden, emb)
        split = len(unet.up_blocks) - 1 - self.branch
        deep, skips = self._up(range(split), hidden, skips, emb, context, forward_size)
        hidden, _ = self._up(range(split, len(unet.up_blocks)), deep, skips, emb, context, forward_size)
        return self._epilogue(hidden), deep

    def shallow(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, deep=None):
        """eps from the shallow branch, reusing `deep` from the last full step."""
        forward_size = self._upsample_sizes(sample)
        hidden, emb, context = self._prologue(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
        skips = (hidden,)
        for i in range(self.branch + 1):
            hidden, outputs = self._down(self.unet.down_blocks[i], hidden, emb, context,
                                         downsample=i < self.branch)
            skips += outputs
        n = len(self.unet.up_blocks)
        hidden, _ = self._up(range(n - 1 - self.branch, n), deep, skips, emb, context, forward_size)
        return self._epilogue(hidden)


@dataclass
class FeatureCache:
    """The sampling loop's view: two U-Net callables and the step plan."""

    settings: CacheSettings
    full: Callable  # (sample, t, embeds, text_embeds, time_ids) -> (eps, deep)
    shallow: Callable  # (sample, t, embeds, text_embeds, time_ids, deep) -> eps

    def plan(self, num_steps: int) -> list[bool]:
        return full_steps(num_steps, self.settings)


def torch_feature_cache(unet, device: str, settings: CacheSettings, compile_mode: str | None = None) -> FeatureCache:
    """FeatureCache over a torch U-Net (inputs and outputs as the sampling loop passes them); `compile_mode`:
    torch.compile the full and shallow calls."""
    split = SplitUNet(unet, settings.branch)
    dtype = unet.dtype
    run_full, run_shallow = split.full, split.shallow
    if compile_mode is not None:
        from sdcompiler.cuda_graphs import compiled

        run_full, run_shallow = compiled(run_full, compile_mode), compiled(run_shallow, compile_mode)

    def prepare(sample, text_embeds, time_ids, embeds):
        cast = (lambda x: None if x is None else x.to(device, dtype))
        return cast(sample), cast(embeds), cast(text_embeds), cast(time_ids)

    def full(sample, timestep, embeds, text_embeds=None, time_ids=None):
        sample, embeds, text_embeds, time_ids = prepare(sample, text_embeds, time_ids, embeds)
        with torch.inference_mode():
            eps, deep = run_full(sample, timestep, embeds, text_embeds, time_ids)
        return eps.float().cpu(), deep

    def shallow(sample, timestep, embeds, text_embeds=None, time_ids=None, deep=None):
        sample, embeds, text_embeds, time_ids = prepare(sample, text_embeds, time_ids, embeds)
        with torch.inference_mode():
            eps = run_shallow(sample, timestep, embeds, text_embeds, time_ids, deep)
        return eps.float().cpu()

    return FeatureCache(settings, full, shallow)
