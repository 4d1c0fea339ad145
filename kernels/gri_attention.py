"""GRI attention: windowed self-attention plus global tokens (global-regional interactive attention).

Math. Queries, keys and values `q, k, v` are `(B, heads, N, d)` with `N = height * width` tokens in
row-major order of a `height x width` map; `k_global, v_global` are `(B, heads, G, d)` global tokens
(`G` may be 0). The map is tiled into non-overlapping `window x window` tiles from the top-left; the tiles
on the bottom and right edges are ragged (smaller) when `height` or `width` is not a multiple of `window`.
A query at `(r, c)` in tile `T(r, c)` attends to the union of its tile's keys and the `G` global keys:

    s_j = scale * <q_rc, k_j>           for j in T(r, c) or among the global tokens
    out_rc = sum_j softmax(s)_j v_j     (softmax over that union; scale defaults to d ** -0.5)

With `window >= max(height, width)` and `G == 0` this is full self-attention over the map.

Cost. A query in a `t_h x t_w` tile attends to `t_h * t_w + G` keys, so one call costs
`2 * B * heads * d * sum_q (tile_keys(q) + G)` multiply-accumulates (QK^T and PV). Summed over the tiles,
`sum_q tile_keys(q) = sum_tiles (t_h t_w)^2 = (sum_rows t_h^2) (sum_cols t_w^2)`, and along one axis of
length `n` the tile extents are `n // window` full tiles plus one of `n % window`: `gri_macs` evaluates
this in closed form (exact for ragged tiles); full attention costs `2 * B * heads * d * N^2`.

Parts (see `_common`):
- `gri_attention_reference`: torch ops on the window-partitioned map (never an `N x N` mask); exports to
  ONNX with the TorchScript exporter with dynamic `height` / `width`;
- `gri_attention_triton`: one fused flash-style kernel (online softmax, fp32 accumulation) per
  (query block, tile, batch x head); runs on CUDA, or on CPU under `TRITON_INTERPRET=1`;
- `torch.ops.sdcompiler.gri_attention` (`gri_attention`): dispatches between the two, with a fake
  implementation and a FLOP formula (`2 * gri_macs(...)`) for `FlopCounterMode`.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from sdcompiler.kernels._common import LIBRARY, cdiv, next_power_of_2, require_triton, use_triton

__all__ = ["gri_attention", "gri_attention_reference", "gri_attention_triton", "gri_macs"]


def _check_args(q, k, v, k_global, v_global, height, width, window) -> None:
    """Raise ValueError for inputs that do not describe a GRI attention call."""
    if window < 1:
        raise ValueError(f"gri_attention: window must be >= 1, got {window}")
    if torch.jit.is_tracing():
        # Under the ONNX (TorchScript) tracer the sizes are traced tensors: comparing them here would bake
        # the example's sizes into the graph (and warn), so the shape checks run in eager mode only.
        return
    if q.dim() != 4:
        raise ValueError(f"gri_attention: q must be (B, heads, N, d), got shape {tuple(q.shape)}")
    batch, heads, n, head_dim = q.shape
    if n != height * width:
        raise ValueError(
            f"gri_attention: q has N={n} tokens but height x width = {height} x {width} = {height * width}"
        )
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"gri_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have q's shape {tuple(q.shape)}"
        )
    if (
        k_global.dim() != 4
        or k_global.shape[:2] != (batch, heads)
        or k_global.shape[3] != head_dim
        or v_global.shape != k_global.shape
    ):
        raise ValueError(
            f"gri_attention: k_global {tuple(k_global.shape)} and v_global {tuple(v_global.shape)} must both be "
            f"(B, heads, G, d) = ({batch}, {heads}, G, {head_dim})"
        )


def _tile_extent(window: int, size):
    """Height (or width) of the largest tile along an axis of length `size`: min(window, size).

    A tile never reaches past the map, so tiling with min(window, size) gives the same tiles as tiling
    with window, and a huge window (= full attention) does not pad the map up to window x window.
    `size` is a Python int in eager mode and a traced 0-d tensor under the ONNX tracer, hence the two forms.
    """
    if isinstance(size, torch.Tensor):
        return torch.clamp(size, max=window)
    return min(window, size)


def _tiling(height, width, window: int) -> tuple:
    """(tile_h, tile_w, pad_h, pad_w, rows, cols) of the map's tiling; sizes may be ints or traced tensors.

    `(t - n % t) % t` rounds n up to a multiple of t in integer arithmetic that traces as graph ops
    (Python's math.ceil / int() on a traced size would freeze the example's value into the graph).
    """
    tile_h, tile_w = _tile_extent(window, height), _tile_extent(window, width)
    pad_h = (tile_h - height % tile_h) % tile_h
    pad_w = (tile_w - width % tile_w) % tile_w
    return tile_h, tile_w, pad_h, pad_w, (height + pad_h) // tile_h, (width + pad_w) // tile_w


def _partition(x: torch.Tensor, height, width, tiling: tuple) -> torch.Tensor:
    """(b, h, height * width, c) -> (b, h, rows * cols, tile_h * tile_w, c), zero-padded to whole tiles."""
    tile_h, tile_w, pad_h, pad_w, rows, cols = tiling
    b, h, c = x.shape[0], x.shape[1], x.shape[3]
    x = F.pad(x.reshape(b, h, height, width, c), (0, 0, 0, pad_w, 0, pad_h))
    x = x.reshape(b, h, rows, tile_h, cols, tile_w, c).transpose(3, 4)
    return x.reshape(b, h, rows * cols, tile_h * tile_w, c)


def _unpartition(x: torch.Tensor, height, width, tiling: tuple) -> torch.Tensor:
    """The inverse of `_partition`, cropped back to (b, h, height * width, c)."""
    tile_h, tile_w, _, _, rows, cols = tiling
    b, h, c = x.shape[0], x.shape[1], x.shape[-1]
    x = x.reshape(b, h, rows, cols, tile_h, tile_w, c).transpose(3, 4)
    x = x.reshape(b, h, rows * tile_h, cols * tile_w, c)[:, :, :height, :width]
    return x.reshape(b, h, height * width, c)


def _valid_keys(q: torch.Tensor, height, width, tiling: tuple) -> torch.Tensor:
    """Which tile slots hold real tokens, (1, 1, tiles, 1, keys): a ones column partitioned like the keys."""
    return _partition(torch.ones_like(q[:1, :1, :, :1]), height, width, tiling).transpose(-1, -2) > 0


def gri_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    height: int,
    width: int,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    """GRI attention in standard torch ops (the spec; see the module docstring for the math).

    The map is padded to whole tiles and partitioned into `(B, heads, tiles, tile_h * tile_w, d)`; per tile,
    the local scores (padded keys masked out) and the global scores are concatenated, soft-maxed in fp32 and
    applied to the tile's values and the global values; the result is un-partitioned and cropped.

    `height` and `width` may be Python ints or, when traced for ONNX export, sizes read from an input's
    `.shape` (traced tensors): every padding amount and reshape below is then computed from those traced
    sizes, so the exported graph keeps the map size dynamic.

    Args:
        q, k, v: `(B, heads, height * width, d)`, tokens in row-major order of the map.
        k_global, v_global: `(B, heads, G, d)`; `G` may be 0.
        height, width: the map's size.
        window: tile side (>= 1); edge tiles are ragged when it does not divide the map.
        scale: score scale; default `d ** -0.5`.

    Returns:
        `(B, heads, height * width, d)` in q's dtype.
    """
    _check_args(q, k, v, k_global, v_global, height, width, window)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    tiling = _tiling(height, width, window)
    q_tiles, k_tiles, v_tiles = (_partition(x, height, width, tiling) for x in (q, k, v))
    key_valid = _valid_keys(q, height, width, tiling)  # (1, 1, tiles, 1, keys)

    local = (q_tiles @ k_tiles.transpose(-1, -2)).float() * scale
    local = local.masked_fill(~key_valid, float("-inf"))  # every tile has a real key: no all -inf row
    glob = (q_tiles @ k_global.unsqueeze(2).transpose(-1, -2)).float() * scale  # (B, heads, tiles, keys, G)
    probs = torch.softmax(torch.cat([local, glob], dim=-1), dim=-1)
    num_local = local.shape[-1]
    out = probs[..., :num_local].to(v.dtype) @ v_tiles + probs[..., num_local:].to(v.dtype) @ v_global.unsqueeze(2)
    return _unpartition(out, height, width, tiling).to(q.dtype)


@functools.cache
def _kernel():
    """Define the Triton kernel on first use, so that importing this module does not import Triton.

    `tl` and the two jit functions are bound as module globals, not closure variables: Triton resolves the
    names a kernel uses in its module's globals (its interpreter requires `triton.language` there).
    """
    global tl, _attend_chunk, _gri_attention_kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _attend_chunk(acc, m_i, l_i, q, k_ptrs, v_ptrs, key_mask, d_mask, qk_scale, INPUT_PRECISION: tl.constexpr):
        """One online-softmax step of a query block over a chunk of keys (scores in log2 units)."""
        k_t = tl.load(k_ptrs, mask=d_mask[:, None] & key_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(v_ptrs, mask=key_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(q, k_t, input_precision=INPUT_PRECISION) * qk_scale
        s = tl.where(key_mask[None, :], s, float("-inf"))
        # Each chunk has at least one real key, so m_new is finite and no row turns into NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _gri_attention_kernel(
        Q,
        K,
        V,
        KG,
        VG,
        Out,
        stride_qb,
        stride_qh,
        stride_qn,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vh,
        stride_vn,
        stride_vd,
        stride_gkb,
        stride_gkh,
        stride_gkn,
        stride_gkd,
        stride_gvb,
        stride_gvh,
        stride_gvn,
        stride_gvd,
        stride_ob,
        stride_oh,
        stride_on,
        stride_od,
        heads,
        height,
        width,
        window,
        tiles_per_row,
        num_global,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_G: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """Program (query block, tile, batch x head): BLOCK_M of the tile's queries (row-major within the
        tile) against the tile's keys in BLOCK_N chunks, then the global keys in BLOCK_G chunks."""
        block = tl.program_id(0)
        tile = tl.program_id(1)
        pid_bh = tl.program_id(2)
        b = (pid_bh // heads).to(tl.int64)
        h = (pid_bh % heads).to(tl.int64)
        row0 = (tile // tiles_per_row) * window
        col0 = (tile % tiles_per_row) * window
        tile_w = tl.minimum(window, width - col0)  # ragged on the right / bottom edges
        tile_len = tl.minimum(window, height - row0) * tile_w

        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM  # d padded to a power of two
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < tile_len
        q_tok = (row0 + offs_m // tile_w) * width + col0 + offs_m % tile_w
        q_ptrs = Q + b * stride_qb + h * stride_qh + q_tok[:, None] * stride_qn + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        for start in range(0, tile_len, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            k_tok = (row0 + offs_n // tile_w) * width + col0 + offs_n % tile_w
            acc, m_i, l_i = _attend_chunk(
                acc,
                m_i,
                l_i,
                q,
                k_base + k_tok[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                v_base + k_tok[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                offs_n < tile_len,
                d_mask,
                qk_scale,
                INPUT_PRECISION,
            )
        gk_base = KG + b * stride_gkb + h * stride_gkh
        gv_base = VG + b * stride_gvb + h * stride_gvh
        for start in range(0, num_global, BLOCK_G):
            offs_n = start + tl.arange(0, BLOCK_G)
            acc, m_i, l_i = _attend_chunk(
                acc,
                m_i,
                l_i,
                q,
                gk_base + offs_n[None, :] * stride_gkn + offs_d[:, None] * stride_gkd,
                gv_base + offs_n[:, None] * stride_gvn + offs_d[None, :] * stride_gvd,
                offs_n < num_global,
                d_mask,
                qk_scale,
                INPUT_PRECISION,
            )

        out = acc / l_i[:, None]
        o_ptrs = Out + b * stride_ob + h * stride_oh + q_tok[:, None] * stride_on + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])

    return _gri_attention_kernel


def _launch_config(block_d: int, tile_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by padded head dim, shrunk to the tile's token count.

    Fixed per head dim (no autotuning): 64 covers SD's d=40 and SDXL's d=64, 128 covers d=80, 256 d=160.
    Picked from a sweep on an H200 (Triton 3.6, fp16, 16 x 16 windows, 16 global tokens): the best or within
    5% of it at each of those head dims.
    """
    if block_d <= 64:
        block_m, block_n, num_warps, num_stages = 128, 64, 8, 3
    elif block_d <= 128:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 3
    else:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 2
    fit = max(16, next_power_of_2(tile_len))  # tl.dot needs every block side >= 16
    return min(block_m, fit), min(block_n, fit), num_warps, num_stages


def gri_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    height: int,
    width: int,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    """GRI attention with the fused Triton kernel (same arguments and result as `gri_attention_reference`).

    Inputs may be non-contiguous (the kernel takes strides); the output is contiguous, in q's dtype.
    fp16 / bf16 inputs multiply in their dtype and accumulate in fp32; fp32 inputs multiply in full fp32
    precision (no TF32).
    """
    require_triton()
    _check_args(q, k, v, k_global, v_global, height, width, window)
    batch, heads, _, head_dim = q.shape
    num_global = k_global.shape[2]
    if scale is None:
        scale = head_dim**-0.5
    window = min(window, max(height, width))  # same tiles; keeps the kernel's int32 index math small
    tile_len = min(window, height) * min(window, width)
    block_d = max(16, next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _launch_config(block_d, tile_len)
    block_g = min(block_n, max(16, next_power_of_2(num_global)))  # SD's few global tokens: no wasted columns
    if num_global == 0:
        # The global loop runs zero times; point it at k / v so that no empty (possibly null) pointer is passed.
        k_global, v_global = k, v
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    tiles_per_row = cdiv(width, window)
    # Query blocks of one tile are neighbours in launch order, so they find the tile's keys in L2.
    grid = (cdiv(tile_len, block_m), cdiv(height, window) * tiles_per_row, batch * heads)
    _kernel()[grid](
        q,
        k,
        v,
        k_global,
        v_global,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *k_global.stride(),
        *v_global.stride(),
        *out.stride(),
        heads,
        height,
        width,
        window,
        tiles_per_row,
        num_global,
        scale * math.log2(math.e),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_G=block_g,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def gri_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    height: int,
    width: int,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    """The op's non-Triton implementation: the reference's tiling, attention by
    `F.scaled_dot_product_attention` over each tile's keys plus the global keys (one concatenated key
    set per tile, so PyTorch's fused CPU / CUDA attention kernels run it), padded keys masked only when a
    tile is ragged. Eager only (plain int sizes); equals `gri_attention_reference` within float rounding.
    """
    _check_args(q, k, v, k_global, v_global, height, width, window)
    tiling = _tiling(height, width, window)
    _, _, pad_h, pad_w, rows, cols = tiling
    tiles = rows * cols
    keys = torch.cat([_partition(k, height, width, tiling), k_global.unsqueeze(2).expand(-1, -1, tiles, -1, -1)], dim=3)
    values = torch.cat(
        [_partition(v, height, width, tiling), v_global.unsqueeze(2).expand(-1, -1, tiles, -1, -1)], dim=3
    )
    mask = None
    if pad_h or pad_w:  # padded key slots exist only in ragged tiles
        valid = _valid_keys(q, height, width, tiling)
        mask = torch.cat([valid, valid.new_ones(1, 1, tiles, 1, k_global.shape[2])], dim=-1)
    out = F.scaled_dot_product_attention(
        _partition(q, height, width, tiling), keys, values, attn_mask=mask, scale=scale
    )
    return _unpartition(out, height, width, tiling)


@torch.library.custom_op(f"{LIBRARY}::gri_attention", mutates_args=())
def _gri_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    height: int,
    width: int,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    if use_triton(q, k, v, k_global, v_global):
        return gri_attention_triton(q, k, v, k_global, v_global, height, width, window, scale)
    return gri_attention_sdpa(q, k, v, k_global, v_global, height, width, window, scale).contiguous()


@_gri_attention_op.register_fake
def _gri_attention_fake(q, k, v, k_global, v_global, height, width, window, scale=None):
    _check_args(q, k, v, k_global, v_global, height, width, window)
    # Contiguous like both real implementations' results (the same as empty_like(q) for a contiguous q).
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def gri_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    height: int,
    width: int,
    window: int,
    scale: float | None = None,
) -> torch.Tensor:
    """GRI attention as the op `torch.ops.sdcompiler.gri_attention` (arguments: see `gri_attention_reference`).

    Runs the Triton kernel on CUDA (or under `TRITON_INTERPRET=1` on CPU) and `gri_attention_sdpa`
    (the reference's math through PyTorch's fused attention) elsewhere. The op has no autograd formula: when
    autograd records (training through GRI, e.g. `["gri", "distill"]`) the differentiable `gri_attention_sdpa`
    runs instead, on any device.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_global, v_global)):
        return gri_attention_sdpa(q, k, v, k_global, v_global, height, width, window, scale)
    return torch.ops.sdcompiler.gri_attention(q, k, v, k_global, v_global, height, width, window, scale)


def gri_macs(batch: int, heads: int, height: int, width: int, window: int, num_global: int, head_dim: int) -> int:
    """Multiply-accumulates of one GRI attention call (QK^T plus PV), exact for ragged edge tiles.

    `2 * batch * heads * head_dim * sum_q (tile_keys(q) + num_global)`, where the sum over queries of their
    tile's key count is `(sum_rows t_h^2) * (sum_cols t_w^2)` over the tile extents of each axis.
    """
    if window < 1:
        raise ValueError(f"gri_macs: window must be >= 1, got {window}")

    def sum_sq_extents(n: int) -> int:  # n // window full tiles and one ragged tile of n % window
        return (n // window) * window * window + (n % window) ** 2

    keys_over_queries = sum_sq_extents(height) * sum_sq_extents(width) + height * width * num_global
    return 2 * batch * heads * head_dim * keys_over_queries


@register_flop_formula(torch.ops.sdcompiler.gri_attention)
def _gri_attention_flop(
    q_shape,
    k_shape,
    v_shape,
    k_global_shape,
    v_global_shape,
    height,
    width,
    window,
    scale=None,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    batch, heads, _, head_dim = q_shape
    return 2 * gri_macs(batch, heads, height, width, window, k_global_shape[2], head_dim)
