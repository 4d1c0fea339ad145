"""Fused GEGLU gate: the split + GELU + multiply that follows the projection in diffusers' `GEGLU`.

Math. diffusers' `GEGLU(x)` is `hidden * gelu(gate)` with `hidden, gate = proj(x).chunk(2, dim=-1)` and the
exact (erf) GELU. The projection stays a matmul; this op takes its output `h` of shape (..., 2 * inner):

    geglu(h)[..., i] = h[..., i] * gelu(h[..., inner + i]),   gelu(g) = g / 2 * (1 + erf(g / sqrt(2)))

returning (..., inner) in `h`'s dtype. The Triton kernel computes in fp32 and rounds once; it reads `h` once and
writes the result once: 3 passes over (rows x inner) elements, where eager makes 5 (read the gate, write its
GELU, read both back for the product, write the product). Tiles are [BLOCK_M rows, BLOCK_I columns] of the
flattened (rows, 2 * inner) matrix; `inner` need not be a power of two (masked).

FLOPs: the formula registered for `FlopCounterMode` returns 0. The counter (and so
`sdcompiler.passes.accounting.count_macs`) counts only matmul-like ops; it counts eager `F.gelu` and the
product as 0, so 0 keeps the MACs of a lowered U-Net equal to the original's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from sdcompiler.kernels._common import LIBRARY, cdiv, interpreting, next_power_of_2, require_triton, use_triton

__all__ = ["geglu", "geglu_reference", "geglu_triton"]

# Tiles: on a GPU 2048 elements (16 per thread at 4 warps), at most 256 columns wide; under the interpreter, as
# large as possible (each program costs Python overhead).
_GPU_TILE, _GPU_BLOCK_I, _GPU_WARPS = 2048, 256, 4
_INTERPRETER_TILE, _INTERPRETER_BLOCK_I = 1 << 16, 1 << 16


def _check_input(h: torch.Tensor) -> None:
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"geglu expects an even last dimension (hidden and gate halves), got {tuple(h.shape)}")


def geglu_reference(h: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU after the projection: `hidden * gelu(gate)` with `hidden, gate = h.chunk(2, -1)`."""
    _check_input(h)
    hidden, gate = h.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


@functools.cache
def _kernel():
    """Compile-on-first-use Triton kernel (Triton is imported only here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def geglu_kernel(h_ptr, out_ptr, M, INNER, stride_hm, stride_om, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        mask = (rows < M)[:, None] & (cols < INNER)[None, :]
        rows = rows.to(tl.int64)
        hidden_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :]
        hidden = tl.load(hidden_ptrs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(hidden_ptrs + INNER, mask=mask, other=0.0).to(tl.float32)
        y = hidden * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)

    return geglu_kernel


def geglu_triton(h: torch.Tensor) -> torch.Tensor:
    """The Triton kernel (see the module docstring); same contract as `geglu_reference`."""
    require_triton()
    _check_input(h)
    inner = h.shape[-1] // 2
    out = torch.empty((*h.shape[:-1], inner), dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    rows = h.reshape(-1, 2 * inner)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    on_interpreter = interpreting() and h.device.type == "cpu"
    tile, max_block_i = (_INTERPRETER_TILE, _INTERPRETER_BLOCK_I) if on_interpreter else (_GPU_TILE, _GPU_BLOCK_I)
    block_i = min(next_power_of_2(inner), max_block_i)
    block_m = max(1, min(next_power_of_2(m), tile // block_i))
    grid = (cdiv(m, block_m), cdiv(inner, block_i))
    _kernel()[grid](rows, out, m, inner, rows.stride(0), inner, BLOCK_M=block_m, BLOCK_I=block_i, num_warps=_GPU_WARPS)
    return out


@torch.library.custom_op(f"{LIBRARY}::geglu", mutates_args=())
def geglu(h: torch.Tensor) -> torch.Tensor:
    """`hidden * gelu(gate)` for `hidden, gate = h.chunk(2, dim=-1)`, fused (exact erf GELU).

    Triton on CUDA (see `sdcompiler.kernels._common.use_triton`), the pure-torch reference elsewhere.
    """
    if use_triton(h):
        return geglu_triton(h)
    return geglu_reference(h)


@geglu.register_fake
def _(h):
    _check_input(h)
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    """Gradient of the reference, recomputed: a lowered model stays trainable, at eager cost."""
    (h,) = ctx.saved_tensors
    h = h.detach().requires_grad_(True)
    with torch.enable_grad():
        out = geglu_reference(h)
    return torch.autograd.grad(out, h, grad)[0]


geglu.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.sdcompiler.geglu)
def _geglu_flops(*args, out_shape=None, **kwargs) -> int:
    """0: matmul-like work only, as FlopCounterMode counts eager gelu/mul (see the module docstring)."""
    return 0
