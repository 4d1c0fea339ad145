"""Fused GroupNorm (+ SiLU): the `norm -> nonlinearity` pair that opens both halves of every ResNet block.

Math. `x` has shape (N, C, *spatial), `G` groups of `C/G` consecutive channels, `P` = prod(spatial) positions.
For each sample n and group g, over the group's (C/G) x P elements, in fp32:

    mean = E[x],   var = E[(x - mean)^2]   (biased, as `torch.nn.GroupNorm`)
    y[c, p] = (x[c, p] - mean) * rsqrt(var + eps) * weight[c] + bias[c]
    y = y * sigmoid(y)                        (SiLU, when `apply_silu`)

The output has the input's dtype, shape and memory format (NCHW-contiguous in, NCHW out; channels_last in,
channels_last out); `x` may be 3-D (N, C, L) or 4-D. Channels per group need not be a power of two (SD: 320
channels / 32 groups = 10).

Triton implementation: two launches over the grid (N*G, S), where S splits the P positions of a group into
chunks so that even batch 2 x 32 groups fills the GPU:

1. `stats`: each program reads its chunk once and writes (count, mean, M2) for it. Lanes accumulate sums of
   `x - shift` (shift = the chunk's first element), so the sum-of-squares formula does not cancel
   catastrophically when |mean| >> std.
2. `apply`: each program merges the S partial statistics of its group (Chan et al.'s parallel variance:
   M2 = sum M2_s + sum n_s (mean_s - mean)^2), folds mean, rstd, weight and bias into one per-channel scale and
   shift, and writes `silu(x * scale + shift)` for its chunk.

So the tensor is read twice and written once (eager `silu(group_norm(x))` reads it three times and writes it
twice). Tiles are [BLOCK_C channels, BLOCK_P positions] addressed through the tensor's strides, so one kernel
serves both memory formats: for NCHW the block of channels is the largest power of two dividing C/G (no masked
lanes, contiguous rows of positions); for channels_last it is all C/G channels padded to a power of two
(the contiguous axis).

FLOPs: the formula registered for `FlopCounterMode` returns 0. The counter (and so
`sdcompiler.passes.accounting.count_macs`) counts only matmul-like ops; it counts eager
`F.group_norm` / `F.silu` as 0, so 0 keeps the MACs of a lowered U-Net equal to the original's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from sdcompiler.kernels._common import LIBRARY, cdiv, interpreting, next_power_of_2, require_triton, use_triton

__all__ = ["group_norm_silu", "group_norm_silu_reference", "group_norm_silu_triton"]

# Tile sizes. On a GPU: ~1024 elements per tile (8 per thread at 4 warps: one 16-byte load for fp16), and enough
# chunks per group that the grid has ~1024 programs. Under the interpreter each program and loop step costs
# Python overhead, so one program per group with the largest tile.
_GPU_TILE, _GPU_PROGRAMS, _GPU_WARPS = 1024, 1024, 4
_INTERPRETER_TILE, _INTERPRETER_PROGRAMS = 1 << 15, 1


def _check_inputs(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dim() not in (3, 4):
        raise ValueError(f"group_norm_silu expects a 3-D (N, C, L) or 4-D (N, C, H, W) tensor, got {tuple(x.shape)}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"{channels} channels do not split into {num_groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},), got {tuple(t.shape)}")


def _is_channels_last(x: torch.Tensor) -> bool:
    """True for a 4-D tensor stored channels_last (and not also NCHW-contiguous, as when C == 1 or H*W == 1)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def group_norm_silu_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    apply_silu: bool = True,
) -> torch.Tensor:
    """`silu(group_norm(x))` in pure torch, computed in fp32, returned in `x`'s dtype and memory format."""
    _check_inputs(x, num_groups, weight, bias)
    y = F.group_norm(x.float(), num_groups, weight.float(), bias.float(), eps)
    if apply_silu:
        y = F.silu(y)
    memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return y.to(dtype=x.dtype, memory_format=memory_format)


@dataclass(frozen=True)
class _Tiling:
    block_c: int  # channels per tile (power of two)
    block_p: int  # positions per tile (power of two)
    chunk: int  # positions per program (a multiple of block_p)
    num_chunks: int  # programs per (sample, group)


def _tiling(
    groups_total: int, per_group: int, positions: int, channels_last: bool, tile: int, programs: int
) -> _Tiling:
    """Tile and split sizes for `groups_total` (= N*G) groups of `per_group` channels x `positions`."""
    if channels_last:  # channels are the contiguous axis: take the whole group's channels, padded
        block_c = next_power_of_2(per_group)
    else:  # positions are contiguous: the largest power of two dividing per_group leaves no masked rows
        block_c = min(per_group & -per_group, max(1, tile // 64))
    block_p = max(1, min(next_power_of_2(positions), tile // block_c))
    blocks = cdiv(positions, block_p)
    chunks_wanted = max(1, cdiv(programs, groups_total))
    chunk = cdiv(blocks, chunks_wanted) * block_p
    return _Tiling(block_c, block_p, chunk, cdiv(positions, chunk))


@functools.cache
def _kernels():
    """Compile-on-first-use Triton kernels (Triton is imported only here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def stats_kernel(
        x_ptr,
        stats_ptr,
        G,
        P,
        stride_n,
        stride_c,
        stride_p,
        CHUNK,
        S,
        PER_GROUP: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        group = tl.program_id(0)  # n * G + g
        chunk = tl.program_id(1)
        n = group // G
        g = group % G
        base = x_ptr + n.to(tl.int64) * stride_n + (g * PER_GROUP).to(tl.int64) * stride_c
        p_begin = chunk * CHUNK
        shift = tl.load(base + p_begin * stride_p).to(tl.float32)
        acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        acc_sq = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for c0 in tl.static_range(0, PER_GROUP, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            for p0 in range(p_begin, p_begin + CHUNK, BLOCK_P):
                ps = p0 + tl.arange(0, BLOCK_P)
                mask = (cs < PER_GROUP)[:, None] & (ps < P)[None, :]
                x = tl.load(base + cs[:, None] * stride_c + ps[None, :] * stride_p, mask=mask, other=0.0)
                d = tl.where(mask, x.to(tl.float32) - shift, 0.0)
                acc += d
                acc_sq += d * d
        count = (tl.minimum(P - p_begin, CHUNK) * PER_GROUP).to(tl.float32)
        mean_shifted = tl.sum(tl.sum(acc, axis=1), axis=0) / count
        m2 = tl.sum(tl.sum(acc_sq, axis=1), axis=0) - mean_shifted * mean_shifted * count
        out = stats_ptr + (group * S + chunk) * 3
        tl.store(out, count)
        tl.store(out + 1, mean_shifted + shift)
        tl.store(out + 2, tl.maximum(m2, 0.0))

    @triton.jit
    def apply_kernel(
        x_ptr,
        y_ptr,
        w_ptr,
        b_ptr,
        stats_ptr,
        G,
        P,
        stride_n,
        stride_c,
        stride_p,
        CHUNK,
        S,
        eps,
        PER_GROUP: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_S: tl.constexpr,
        APPLY_SILU: tl.constexpr,
    ):
        group = tl.program_id(0)
        chunk = tl.program_id(1)
        n = group // G
        g = group % G
        # Merge the group's S partial statistics (Chan et al.): masked lanes have count 0 and add nothing.
        ss = tl.arange(0, BLOCK_S)
        parts = stats_ptr + (group * S + ss) * 3
        counts = tl.load(parts, mask=ss < S, other=0.0)
        means = tl.load(parts + 1, mask=ss < S, other=0.0)
        m2s = tl.load(parts + 2, mask=ss < S, other=0.0)
        total = tl.sum(counts, axis=0)
        mean = tl.sum(counts * means, axis=0) / total
        spread = means - mean
        var = (tl.sum(m2s, axis=0) + tl.sum(counts * spread * spread, axis=0)) / total
        rstd = 1.0 / tl.sqrt(var + eps)

        offset = n.to(tl.int64) * stride_n + (g * PER_GROUP).to(tl.int64) * stride_c
        p_begin = chunk * CHUNK
        for c0 in tl.static_range(0, PER_GROUP, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cmask = cs < PER_GROUP
            w = tl.load(w_ptr + g * PER_GROUP + cs, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + g * PER_GROUP + cs, mask=cmask, other=0.0).to(tl.float32)
            scale = w * rstd
            shift = b - mean * scale
            for p0 in range(p_begin, p_begin + CHUNK, BLOCK_P):
                ps = p0 + tl.arange(0, BLOCK_P)
                mask = cmask[:, None] & (ps < P)[None, :]
                offs = offset + cs[:, None] * stride_c + ps[None, :] * stride_p
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                y = x * scale[:, None] + shift[:, None]
                if APPLY_SILU:
                    y = y * tl.sigmoid(y)
                tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    return stats_kernel, apply_kernel


def group_norm_silu_triton(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    apply_silu: bool = True,
) -> torch.Tensor:
    """The Triton kernels (see the module docstring); same contract as `group_norm_silu_reference`."""
    require_triton()
    _check_inputs(x, num_groups, weight, bias)
    if not (x.is_contiguous() or _is_channels_last(x)):
        x = x.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    batch, channels = x.shape[:2]
    positions = math.prod(x.shape[2:])
    # Both formats flatten the spatial dims to one stride: NCHW (W, 1) -> 1, channels_last (W*C, C) -> C.
    stride_p = x.stride(-1)
    if x.dim() == 4 and x.shape[2] > 1 and x.stride(2) != x.shape[3] * stride_p:
        x = x.contiguous()
        stride_p = 1
    y = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    per_group = channels // num_groups
    groups_total = batch * num_groups
    on_interpreter = interpreting() and x.device.type == "cpu"
    tile, programs = (_INTERPRETER_TILE, _INTERPRETER_PROGRAMS) if on_interpreter else (_GPU_TILE, _GPU_PROGRAMS)
    t = _tiling(groups_total, per_group, positions, stride_p != 1, tile, programs)
    stats = torch.empty((groups_total, t.num_chunks, 3), dtype=torch.float32, device=x.device)
    stats_kernel, apply_kernel = _kernels()
    grid = (groups_total, t.num_chunks)
    common = (num_groups, positions, x.stride(0), x.stride(1), stride_p, t.chunk, t.num_chunks)
    stats_kernel[grid](
        x, stats, *common, PER_GROUP=per_group, BLOCK_C=t.block_c, BLOCK_P=t.block_p, num_warps=_GPU_WARPS
    )
    apply_kernel[grid](
        x,
        y,
        weight,
        bias,
        stats,
        *common,
        float(eps),
        PER_GROUP=per_group,
        BLOCK_C=t.block_c,
        BLOCK_P=t.block_p,
        BLOCK_S=next_power_of_2(t.num_chunks),
        APPLY_SILU=bool(apply_silu),
        num_warps=_GPU_WARPS,
    )
    return y


@torch.library.custom_op(f"{LIBRARY}::group_norm_silu", mutates_args=())
def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    apply_silu: bool = True,
) -> torch.Tensor:
    """`silu(group_norm(x, num_groups, weight, bias, eps))` (SiLU only when `apply_silu`), fused.

    Triton on CUDA (see `sdcompiler.kernels._common.use_triton`), the pure-torch reference elsewhere. Output in
    `x`'s dtype and memory format; statistics in fp32.
    """
    if use_triton(x, weight, bias):
        return group_norm_silu_triton(x, num_groups, weight, bias, eps, apply_silu)
    return group_norm_silu_reference(x, num_groups, weight, bias, eps, apply_silu)


@group_norm_silu.register_fake
def _(x, num_groups, weight, bias, eps=1e-5, apply_silu=True):
    _check_inputs(x, num_groups, weight, bias)
    memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    return torch.empty_like(x, memory_format=memory_format)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, apply_silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.options = (num_groups, eps, apply_silu)


def _backward(ctx, grad):
    """Gradients of the reference, recomputed: a lowered model stays trainable, at eager cost."""
    num_groups, eps, apply_silu = ctx.options
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    x, weight, bias = (t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, needs))
    with torch.enable_grad():
        out = group_norm_silu_reference(x, num_groups, weight, bias, eps, apply_silu)
    grads = iter(torch.autograd.grad(out, [t for t in (x, weight, bias) if t.requires_grad], grad))
    gx, gw, gb = (next(grads) if t.requires_grad else None for t in (x, weight, bias))
    return gx, None, gw, gb, None, None


group_norm_silu.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.sdcompiler.group_norm_silu)
def _group_norm_silu_flops(*args, out_shape=None, **kwargs) -> int:
    """0: matmul-like work only, as FlopCounterMode counts eager group_norm/silu (see the module docstring)."""
    return 0
