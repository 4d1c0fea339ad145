"""Swap diffusers modules for versions that run the fused kernels, in place, without touching a parameter.

`lower_unet(unet)` changes the `__class__` of eligible modules to a subclass whose `forward` calls the fused
ops; the instances keep every attribute, so the state_dict (keys, tensors, their identity) and hooks are
unchanged and weights load and save as before. `unlower_unet(unet)` switches them back. Kinds:

- `"group_norm_silu"`: `diffusers.models.resnet.ResnetBlock2D` -> `FusedResnetBlock2D`: `norm1 -> SiLU` and
  `norm2 -> SiLU` become `sdcompiler::group_norm_silu`. Only the variant SD / SDXL use is lowered (its forward
  is diffusers 0.39's, replicated): `time_embedding_norm == "default"`, no up/down resampling inside the block,
  SiLU nonlinearity, affine GroupNorms. Other blocks keep their class and are not counted.
- `"geglu"`: `diffusers.models.activations.GEGLU` -> `FusedGEGLU`: the projection stays a matmul, the
  split + GELU + multiply becomes `sdcompiler::geglu`.

Only modules of exactly these classes are lowered (a subclass may have changed `forward`). The ops run Triton on
CUDA and the pure-torch reference elsewhere, so a lowered U-Net runs anywhere; their FLOP formulas count 0,
as eager counts GroupNorm, SiLU and GELU, so MAC accounting is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils import deprecate

from sdcompiler.kernels.geglu import geglu
from sdcompiler.kernels.groupnorm_silu import group_norm_silu

__all__ = ["KINDS", "FusedGEGLU", "FusedResnetBlock2D", "lower_unet", "unlower_unet"]

_SCALE_DEPRECATION = (
    "The `scale` argument is deprecated and will be ignored. Please remove it, as passing it will raise an error "
    "in the future. `scale` should directly be passed while calling the underlying pipeline component i.e., via "
    "`cross_attention_kwargs`."
)


def _norm_silu(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)


class FusedResnetBlock2D(ResnetBlock2D):
    """`ResnetBlock2D` (default time-embedding norm, no resampling, SiLU) with GroupNorm + SiLU fused."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate("scale", "1.0.0", _SCALE_DEPRECATION)

        hidden_states = _norm_silu(self.norm1, input_tensor)
        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if temb is not None:
            hidden_states = hidden_states + temb

        hidden_states = _norm_silu(self.norm2, hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)

        if self.conv_shortcut is not None:
            if self.training:  # as diffusers: avoids a DDP gradient-stride warning
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)

        return (input_tensor + hidden_states) / self.output_scale_factor


class FusedGEGLU(GEGLU):
    """`GEGLU` with the split + GELU + multiply after the projection fused."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(args) > 0 or kwargs.get("scale", None) is not None:
            deprecate("scale", "1.0.0", _SCALE_DEPRECATION)
        return geglu(self.proj(hidden_states))


def _affine_group_norm(module) -> bool:
    return type(module) is torch.nn.GroupNorm and module.affine


def _resnet_block_is_lowerable(block: ResnetBlock2D) -> bool:
    """The variant `FusedResnetBlock2D.forward` replicates."""
    return (
        block.time_embedding_norm == "default"
        and block.upsample is None
        and block.downsample is None
        and type(block.nonlinearity) is torch.nn.SiLU
        and _affine_group_norm(block.norm1)
        and _affine_group_norm(block.norm2)
    )


@dataclass(frozen=True)
class _Lowering:
    original: type[torch.nn.Module]
    fused: type[torch.nn.Module]
    applies_to: Callable[[torch.nn.Module], bool]


_LOWERINGS: dict[str, _Lowering] = {
    "group_norm_silu": _Lowering(ResnetBlock2D, FusedResnetBlock2D, _resnet_block_is_lowerable),
    "geglu": _Lowering(GEGLU, FusedGEGLU, lambda module: True),
}
KINDS: tuple[str, ...] = tuple(_LOWERINGS)


def lower_unet(unet: torch.nn.Module, *, kinds: Iterable[str] = KINDS) -> dict[str, int]:
    """Make the eligible modules of `unet` (any module tree) run the fused ops, in place.

    Args:
        unet: typically a diffusers `UNet2DConditionModel`; parameters, buffers and hooks are left as they are.
        kinds: which lowerings to apply, from `KINDS` ("group_norm_silu", "geglu").

    Returns:
        For each requested kind, how many modules run the fused op after the call (`"group_norm_silu"`:
        ResnetBlock2D modules, two fused norms each; `"geglu"`: GEGLU modules). Modules lowered by an earlier
        call are included, so lowering twice changes nothing and returns the same counts.

    Raises:
        ValueError: for an unknown kind.
    """
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in _LOWERINGS]
    if unknown:
        raise ValueError(f"unknown lowering kind(s) {unknown}; choose from {list(KINDS)}")
    counts = dict.fromkeys(kinds, 0)
    for module in unet.modules():
        for kind in kinds:
            lowering = _LOWERINGS[kind]
            if type(module) is lowering.original and lowering.applies_to(module):
                module.__class__ = lowering.fused
            if type(module) is lowering.fused:
                counts[kind] += 1
    return counts


def unlower_unet(unet: torch.nn.Module) -> dict[str, int]:
    """Undo `lower_unet`, in place: every fused module gets its diffusers class back.

    Returns:
        For each kind in `KINDS`, how many modules were restored.
    """
    counts = dict.fromkeys(KINDS, 0)
    for module in unet.modules():
        for kind, lowering in _LOWERINGS.items():
            if type(module) is lowering.fused:
                module.__class__ = lowering.original
                counts[kind] += 1
    return counts
