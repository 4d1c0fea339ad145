"""swap_attention: GRI (global-regional interactive) self-attention in the high-resolution blocks.

Self-attention over an H x W feature map costs O(N^2) for N = H*W tokens;
at SD1.5's 64 x 64 level that is 4096^2 scores per head. GRI attention
(A-SDM) keeps the quadratic part local: the map is tiled into `window` x
`window` tiles, each query attends to the keys of its own tile plus G global
tokens, average-pooled (`global_pool` x `global_pool`) from the whole map's
keys and values, so every query still sees a summary of the image. Cost per
query: (window^2 + G) instead of N. The q/k/v/out projections are the
original ones (pooling commutes with the linear k/v projections, so pooled
keys are the keys of pooled features): the swap works without training, and
a `distill` after it recovers what the approximation loses (the teacher is
then the full-attention model).

Selection: `blocks` names diffusers blocks ("down_blocks.0", "up_blocks.3",
"mid_block"); empty means the highest-resolution level that has attention
(SD1.x/2.x: down_blocks.0 + up_blocks.3, 64 x 64 at 512 px; SDXL:
down_blocks.1 + up_blocks.1, 64 x 64 at 1024 px). Only self-attention (attn1)
changes; cross-attention to the text stays full.

Defaults scale with the checkpoint: `window` 0 means a quarter of the
feature-map side at the checkpoint's default resolution (16 for SD1.5 and
SDXL), `global_pool` 0 means `window` (one global token per tile), so at the
default resolution attention MACs drop from N^2 to N (window^2 + N/window^2)
per head: 64 x 64 -> 4096 * 272 vs 4096 * 4096, 15x fewer. A window larger
than a selected block's feature map at the default resolution is a config
error. At run time a smaller map (smaller images) clips the tiles to the map.

Execution: the processor calls `sdcompiler::gri_attention` (the fused Triton
kernel on CUDA, the pure-torch reference elsewhere; its FLOP formula makes
MAC accounting exact). Under ONNX export it calls the reference directly,
which traces to standard ops (pad, reshape, matmul, softmax) with the map
size taken from the traced input, so exported graphs keep dynamic H and W.

Structural (module behaviour changes though the parameter layout does not),
so the `torch` target re-applies it on load through `rebuild`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.errors import ConfigError, PassError


@dataclass(frozen=True)
class SwapAttentionConfig(PassConfig):
    kind: str = "gri"
    blocks: tuple[str, ...] = ()
    window: int = 0
    global_pool: int = 0
    global_tokens: bool = True

    def __post_init__(self):
        if self.kind != "gri":
            raise ValueError(f"kind must be 'gri', got {self.kind!r}")
        if self.window < 0 or self.global_pool < 0:
            raise ValueError("window and global_pool must be >= 0 (0 = automatic)")


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_exporting()


class GRIAttnProcessor:
    """Self-attention processor: windowed attention plus pooled global tokens.

    `feature_size` (H, W) is set before each call by a forward pre-hook on
    the enclosing `Transformer2DModel` (attention itself sees only tokens).
    """

    handles_fused_projections = True  # fuse_qkv keeps this processor (it reads `to_qkv` when present)

    def __init__(self, window: int, global_pool: int):
        self.window = window
        self.global_pool = global_pool  # 0: no global tokens
        self.feature_size: tuple | None = None

    def __call__(
        self,
        attn: Attention,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise PassError("GRI attention replaces self-attention only (no context, no mask)")
        if self.feature_size is None:
            raise PassError("GRI attention called outside a Transformer2DModel (feature map size unknown)")
        height, width = self.feature_size
        residual = hidden_states
        batch, tokens, _ = hidden_states.shape
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads(t):
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(query), heads(key), heads(value)
        key_global, value_global = self._global_tokens(key, value, height, width)
        from sdcompiler.kernels import gri_attention as kernel

        run = kernel.gri_attention_reference if _exporting() else kernel.gri_attention
        out = run(query, key, value, key_global, value_global, height, width, self.window, attn.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _global_tokens(self, key, value, height, width):
        """Average-pool keys and values over the map: (B, heads, G, d), G = ceil(H/p) * ceil(W/p)."""
        batch, nheads, _, head_dim = key.shape
        if self.global_pool == 0:
            empty = key.new_zeros(batch, nheads, 0, head_dim)
            return empty, empty

        def pool(t):
            grid = t.transpose(2, 3).reshape(batch, nheads * head_dim, height, width)
            pooled = F.avg_pool2d(grid, self.global_pool, self.global_pool, ceil_mode=True, count_include_pad=False)
            return pooled.reshape(batch, nheads, head_dim, -1).transpose(2, 3)

        return pool(key), pool(value)


def _record_feature_size(module, args, kwargs):
    """Pre-hook of a Transformer2DModel: tell its GRI processors the map size of this call."""
    hidden_states = args[0] if args else kwargs["hidden_states"]
    size = (hidden_states.shape[-2], hidden_states.shape[-1])
    for block in module.transformer_blocks:
        processor = getattr(block.attn1, "processor", None)
        if isinstance(processor, GRIAttnProcessor):
            processor.feature_size = size


def _block_level(unet, name: str) -> int:
    """Resolution level of a block (0 = the full latent map)."""
    n = len(unet.down_blocks)
    kind, _, index = name.partition(".")
    if kind == "down_blocks":
        return int(index)
    if kind == "up_blocks":
        return n - 1 - int(index)
    if kind == "mid_block":
        return n - 1
    raise ConfigError(f"swap_attention: unknown block {name!r}; use down_blocks.I, up_blocks.I or mid_block")


def _transformers(block) -> list:
    return [a for a in getattr(block, "attentions", None) or [] if hasattr(a, "transformer_blocks")]


def select_blocks(unet, config: SwapAttentionConfig) -> dict[str, int]:
    """The blocks whose self-attention is swapped, with their resolution levels."""
    if config.blocks:
        chosen = {}
        for name in config.blocks:
            block = unet.get_submodule(name) if _valid_block_name(unet, name) else None
            if block is None or not _transformers(block):
                raise ConfigError(
                    f"swap_attention: block {name!r} does not exist or has no transformer; "
                    f"blocks with attention: {', '.join(_attention_blocks(unet))}"
                )
            chosen[name] = _block_level(unet, name)
        return chosen
    levels = {name: _block_level(unet, name) for name in _attention_blocks(unet)}
    if not levels:
        raise PassError("swap_attention: this U-Net has no transformer blocks")
    top = min(levels.values())
    return {name: level for name, level in levels.items() if level == top}


def _valid_block_name(unet, name: str) -> bool:
    try:
        unet.get_submodule(name)
    except AttributeError:
        return False
    return True


def _attention_blocks(unet) -> list[str]:
    names = [f"down_blocks.{i}" for i, b in enumerate(unet.down_blocks) if _transformers(b)]
    if unet.mid_block is not None and _transformers(unet.mid_block):
        names.append("mid_block")
    names += [f"up_blocks.{i}" for i, b in enumerate(unet.up_blocks) if _transformers(b)]
    return names


def resolve_geometry(unet, config: SwapAttentionConfig) -> tuple[dict[str, int], int, int]:
    """(blocks -> level, window, global pool) with the automatic values filled in and checked."""
    blocks = select_blocks(unet, config)
    sample = unet.config.sample_size
    sample = sample if isinstance(sample, int) else min(sample)
    sides = {name: max(1, sample >> level) for name, level in blocks.items()}
    smallest = min(sides.values())
    window = config.window or max(1, max(sides.values()) // 4)
    if window > smallest:
        name = min(sides, key=sides.get)
        raise ConfigError(
            f"swap_attention: window {window} is larger than the {smallest}x{smallest} feature map of {name} "
            f"at the checkpoint's default resolution; use window <= {smallest}"
        )
    pool = (config.global_pool or window) if config.global_tokens else 0
    return blocks, window, pool


def apply_gri(unet, config: SwapAttentionConfig) -> int:
    """Swap the processors and install the size hooks; returns the number of swapped attentions."""
    blocks, window, pool = resolve_geometry(unet, config)
    swapped = 0
    for name in blocks:
        for transformer in _transformers(unet.get_submodule(name)):
            for block in transformer.transformer_blocks:
                processor = GRIAttnProcessor(window, pool)
                # the global pool needs a feature map at least `pool` wide at this block's level
                processor.min_latent_size = max(1, pool) << blocks[name]
                block.attn1.set_processor(processor)
                swapped += 1
            if not getattr(transformer, "_gri_hooked", False):
                transformer.register_forward_pre_hook(_record_feature_size, with_kwargs=True)
                transformer._gri_hooked = True
    return swapped


@register_pass
class SwapAttention(Pass):
    name = "swap_attention"
    runtime_loras = True
    config_class = SwapAttentionConfig
    stage = "structural"
    controlnet = "keeps_layout"  # self-attention processors only; the blocks and their outputs stay
    changes_structure = True
    description = "GRI attention: windowed self-attention + pooled global tokens in the high-resolution blocks"

    def requires(self, pipe, config: SwapAttentionConfig, ctx: PassContext) -> None:
        resolve_geometry(pipe.unet, config)
        for name in select_blocks(pipe.unet, config):
            for transformer in _transformers(pipe.unet.get_submodule(name)):
                for block in transformer.transformer_blocks:
                    attn = block.attn1
                    if attn.is_cross_attention or attn.norm_q is not None or attn.group_norm is not None:
                        raise PassError(f"{name}: attn1 is not plain self-attention; GRI cannot replace it")

    def run(self, pipe, config: SwapAttentionConfig, ctx: PassContext) -> dict[str, float]:
        blocks, window, pool = resolve_geometry(pipe.unet, config)
        swapped = apply_gri(pipe.unet, config)
        return {"swapped_attentions": swapped, "window": window, "global_pool": pool}

    def ensures(self, pipe, config: SwapAttentionConfig, ctx: PassContext) -> None:
        for name in select_blocks(pipe.unet, config):
            for transformer in _transformers(pipe.unet.get_submodule(name)):
                for block in transformer.transformer_blocks:
                    if not isinstance(block.attn1.processor, GRIAttnProcessor):
                        raise PassError(f"{name}: attn1 was not swapped")

    def rebuild(self, pipe, config: SwapAttentionConfig) -> None:
        apply_gri(pipe.unet, config)
