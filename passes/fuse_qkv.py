"""fuse_qkv: one GEMM for the attention input projections.

Self-attention computes q, k, v = x Wq^T, x Wk^T, x Wv^T. Stacking the
weights row-wise, W = [Wq; Wk; Wv], gives [q | k | v] = x W^T in one matmul
whose output is split along the last axis; cross-attention stacks only
[Wk; Wv] (q reads the image tokens, k and v the text). The result is exact
up to float summation order. Unlike diffusers' `fuse_qkv_projections`, the
separate projections are removed, so the parameter count is unchanged and
exported graphs carry each weight once.

Structural (the parameter layout changes), so it has a `rebuild`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import PassError


@dataclass(frozen=True)
class FuseQKVConfig(PassConfig):
    self_attention: bool = True
    cross_attention: bool = True


def _stack(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    first = linears[0]
    has_bias = first.bias is not None
    fused = torch.nn.Linear(
        first.in_features,
        sum(l.out_features for l in linears),
        bias=has_bias,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([l.weight for l in linears]))
        if has_bias:
            fused.bias.copy_(torch.cat([l.bias for l in linears]))
    return fused


def fuse_attention_projections(unet: torch.nn.Module, self_attention: bool, cross_attention: bool) -> int:
    """Fuse the input projections of every selected attention module; returns how many were fused."""
    fused = 0
    for module in unet.modules():
        if not isinstance(module, Attention) or getattr(module, "fused_projections", False):
            continue
        if module.is_cross_attention and cross_attention:
            module.to_kv = _stack([module.to_k, module.to_v])
            del module.to_k, module.to_v
        elif not module.is_cross_attention and self_attention:
            module.to_qkv = _stack([module.to_q, module.to_k, module.to_v])
            del module.to_q, module.to_k, module.to_v
        else:
            continue
        module.fused_projections = True
        if not getattr(module.processor, "handles_fused_projections", False):
            module.set_processor(FusedAttnProcessor2_0())
        fused += 1
    return fused


@register_pass
class FuseQKV(Pass):
    name = "fuse_qkv"
    controlnet = "keeps_layout"
    config_class = FuseQKVConfig
    stage = "structural"
    changes_structure = True
    description = "fuse attention q/k/v (self) and k/v (cross) projections into one linear each"

    def requires(self, pipe, config: FuseQKVConfig, ctx: PassContext) -> None:
        for name, processor in pipe.unet.attn_processors.items():
            if "Added" in type(processor).__name__:
                raise PassError(f"attention {name} has added KV projections, which fuse_qkv does not handle")

    def run(self, pipe, config: FuseQKVConfig, ctx: PassContext) -> dict[str, float]:
        count = fuse_attention_projections(pipe.unet, config.self_attention, config.cross_attention)
        return {"fused_attention_modules": count}

    def ensures(self, pipe, config: FuseQKVConfig, ctx: PassContext) -> None:
        for name, module in pipe.unet.named_modules():
            if isinstance(module, Attention) and hasattr(module, "to_k"):
                wanted = config.cross_attention if module.is_cross_attention else config.self_attention
                if wanted:
                    raise PassError(f"{name} still has separate projections")

    def rebuild(self, pipe, config: FuseQKVConfig) -> None:
        fuse_attention_projections(pipe.unet, config.self_attention, config.cross_attention)
