"""Low-precision 2-D convolution: int8 or fp8 (e4m3) codes in, implicit GEMM on int8 / fp8 tensor cores.

The quantized U-Net stores a conv's input and weight as codes of one format (int8, or `torch.float8_e4m3fn`) and
one float32 dequantisation scale per output channel, `scale[n] = input_scale * weight_scale[n]`. The op is::

    acc[b, n, oh, ow] = sum_{c, r, s} xq[b, c, oh*sh - ph + r*dh, ow*sw - pw + s*dw] * wq[n, c, r, s]
    y[b, n, oh, ow]   = out_dtype(float32(acc) * scale[n] + float32(bias[n]))

with zero padding (input positions outside the image contribute 0: a padded 0 is the code of 0 in both formats,
so padding commutes with quantisation). `acc` is exact: int32 for int8 (each product is at most 2^14 in magnitude,
so no overflow while K = C*kh*kw < 2^17), float32 for fp8 (each product of two e4m3 values has at most 8
significant bits and is exact in fp32; only the sum rounds). The epilogue multiplies, then adds, in fp32 without
FMA contraction (`enable_fp_fusion=False`), so for int8 the kernel's output equals the reference's bit for bit.

As a GEMM: M = B * H_out * W_out output pixels, N = N_out, K = C_in * kh * kw in the `F.unfold` order
(k = (c * kh + r) * kw + s, i.e. the weight viewed as `(N, K)`). The Triton kernel never materialises im2col: each
program owns a BLOCK_M x BLOCK_N tile of y, walks K in BLOCK_K steps, computes each A element's input address from
(b, oh, ow) and (c, r, s), masks the padding border, ragged M / N / K, loads the code tiles and `tl.dot`s them
into an int32 (int8) or fp32 (fp8) accumulator; the epilogue applies scale and bias, casts, and stores NCHW. The
weight is read in place as the `(N, K)` view of `wq` (strides passed to the kernel), whose tiles are K-major, the
operand order int8 / fp8 tensor cores take; no prepared copy is needed.

fp8 on Hopper: Triton's default for fp8 x fp8 -> fp32 `tl.dot` on sm_90 accumulates in the tensor core's reduced
precision all the way along K (`max_num_imprecise_acc = 2^30`); the kernel passes `max_num_imprecise_acc =
min(32, BLOCK_K)` so partial sums are promoted into the fp32 accumulator every 32 products (as
`torch._scaled_mm(..., use_fast_accum=False)` does).

Under `TRITON_INTERPRET=1` (Triton 3.9) both dots run as they are written: int8 x int8 via `np.matmul(...,
dtype=int32)` (exact), fp8 via an exact fp16 upcast then `np.matmul(..., dtype=float32)`, so no interpreter-only
kernel code path exists here. One launcher-side workaround: the interpreter casts fp32 -> bf16 by truncation (the
GPU rounds to nearest even), so under it a bf16 output is stored as fp32 and rounded by torch.

Status: checked against the reference under the interpreter, and compiled ahead of time for sm_90 (the tests find
`wgmma ... s32.s8.s8` / `f32.e4m3.e4m3` in its PTX); not yet run or timed on a GPU, so the CUDA tiles in
`conv_blocks` are a starting point. The input is read NCHW (the op's contract); a channels-last input would make
the A tile's K axis contiguous and is the first thing to try for speed.

Functions: `conv2d_lowp_reference` (pure torch, the spec) and `conv2d_lowp_triton` (the kernel; CUDA tensors, or
CPU tensors under the interpreter), same signature.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import cdiv, interpreting, require_triton

CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)
OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- validation ------------------------------------------------------------------------------------------------


def _check_pair(name: str, value: tuple[int, int], minimum: int) -> tuple[int, int]:
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or any(v < minimum for v in pair):
        raise ValueError(f"{name} must be two ints >= {minimum}, got {value}")
    return pair


def _check_conv(
    xq: torch.Tensor,
    wq: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_dtype: torch.dtype,
) -> tuple[int, int]:
    """Validate the arguments; return the output size (H_out, W_out)."""
    if xq.dtype not in CODE_DTYPES or xq.dim() != 4:
        raise ValueError(f"xq must be a 4-D (NCHW) int8 or float8_e4m3fn tensor, got {xq.dtype} {tuple(xq.shape)}")
    if wq.dtype != xq.dtype or wq.dim() != 4 or wq.shape[1] != xq.shape[1]:
        raise ValueError(
            f"wq must be a {xq.dtype} (N_out, {xq.shape[1]}, kh, kw) tensor (groups=1), got {wq.dtype} "
            f"{tuple(wq.shape)}"
        )
    n = wq.shape[0]
    if scale.dtype != torch.float32 or scale.shape != (n,):
        raise ValueError(f"scale must be a float32 ({n},) tensor, got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float ({n},) tensor or None, got {bias.dtype} {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    sh, sw = _check_pair("stride", stride, 1)
    ph, pw = _check_pair("padding", padding, 0)
    dh, dw = _check_pair("dilation", dilation, 1)
    kh, kw = wq.shape[2:]
    ho = (xq.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh
    wo = (xq.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw
    if ho < 0 or wo < 0:
        raise ValueError(
            f"the {kh}x{kw} kernel (dilation {dilation}) does not fit the padded {tuple(xq.shape[2:])} input"
        )
    return ho + 1, wo + 1


# --- reference (pure torch): the spec ---------------------------------------------------------------------------


def _int_mm_exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> int32, exactly, through `torch._int_mm`. CUDA's needs M > 16 and K, N multiples
    of 8: zero rows / columns padded on (they add 0) and cut off again."""
    m, n = a.shape[0], b.shape[1]
    if a.is_cuda:
        pad_k = -a.shape[1] % 8
        a = F.pad(a, (0, pad_k, 0, max(0, 17 - m)))
        b = F.pad(b, (0, -n % 8, 0, pad_k))
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


def conv2d_lowp_reference(
    xq: torch.Tensor,
    wq: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The op in pure torch, via im2col (`F.unfold`; zero padding is exact for both code formats).

    int8: the patches are unfolded on a float32 copy (int8 codes are exact in fp32) and cast back to int8, then
    `torch._int_mm` gives the exact int32 accumulator. fp8: patches unfolded in float32 (e4m3 values are exact
    there) and multiplied in float64, which gives the exact sum: every e4m3 value is a multiple of 2^-9 below 2^9,
    so each product is a multiple of 2^-18 below 2^18 and any sum of K < 2^17 of them fits fp64's 53-bit
    significand; it is rounded to fp32 once. The kernel's fp32 accumulation differs from it only by fp32 rounding.

    Args:
        xq: NCHW codes, int8 or float8_e4m3fn.
        wq: (N_out, C_in, kh, kw) codes of the same dtype (groups=1).
        scale: float32 (N_out,) dequantisation scale per output channel.
        bias: (N_out,) float, or None.
        stride, padding, dilation: (h, w) pairs as in `F.conv2d`.
        out_dtype: float32, float16 or bfloat16.

    Returns:
        (B, N_out, H_out, W_out) in `out_dtype`: `float32(acc) * scale[n] + bias[n]`, cast.
    """
    ho, wo = _check_conv(xq, wq, scale, bias, stride, padding, dilation, out_dtype)
    b, n = xq.shape[0], wq.shape[0]
    kh, kw = wq.shape[2:]
    cols = F.unfold(xq.float(), (kh, kw), dilation=tuple(dilation), padding=tuple(padding), stride=tuple(stride))
    a = cols.transpose(1, 2).reshape(b * ho * wo, -1)  # (M, K), rows = output pixels in (b, oh, ow) order
    w2 = wq.reshape(n, -1)
    if xq.dtype == torch.int8:
        acc = _int_mm_exact(a.to(torch.int8), w2.t()).float()
    else:
        acc = (a.double() @ w2.double().t()).float()
    y = acc * scale[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype).reshape(b, ho, wo, n).permute(0, 3, 1, 2).contiguous()


# --- Triton kernel ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvBlocks:
    """Tile sizes and launch settings of the implicit-GEMM kernel (on GPU: block_k >= 32, block_m/n >= 16)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


INTERPRETER_BLOCKS = ConvBlocks(32, 32, 32, num_stages=1)


def conv_blocks(n: int, k: int, device: torch.device) -> ConvBlocks:
    """One fixed configuration per device. Interpreter / CPU: 32 x 32 x 32. CUDA: 128 x 128 tiles (64 wide when
    N_out <= 64) with a 64- or 128-deep K step, 128 only when it divides K (SD's 3x3 convs have K = 9 * C, a
    multiple of 64 but rarely of 128). Not yet tuned on a GPU: a starting point, like w4a4's first configs."""
    if device.type != "cuda":
        return INTERPRETER_BLOCKS
    block_n = 64 if n <= 64 else 128
    block_k = 128 if k % 128 == 0 else 64
    return ConvBlocks(128, block_n, block_k, num_warps=8 if block_n == 128 else 4, num_stages=3)


@functools.cache
def _kernel():
    """The Triton kernel, defined on first use so importing this module does not import Triton. `tl` is bound as a
    module global (older Triton resolves a kernel's names in its module globals only)."""
    global tl
    require_triton()
    import triton
    import triton.language as tl

    @triton.jit
    def _conv2d_lowp_kernel(
        x_ptr,
        w_ptr,
        scale_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        C,
        H,
        W,
        HO,
        WO,
        stride_wn,
        stride_wk,
        KH: tl.constexpr,
        KW: tl.constexpr,
        STRIDE_H: tl.constexpr,
        STRIDE_W: tl.constexpr,
        PAD_H: tl.constexpr,
        PAD_W: tl.constexpr,
        DIL_H: tl.constexpr,
        DIL_W: tl.constexpr,
        IS_INT: tl.constexpr,
        ZERO: tl.constexpr,
        FP8_PROMOTE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Grouped program order: GROUP_M pixel blocks share each weight column block while it is in L2.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_pid_n
        first_m = (pid // group) * GROUP_M
        group_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_m
        pid_n = (pid % group) // group_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        # output pixel m = (b, oh, ow); its receptive field starts at (oh * sh - ph, ow * sw - pw)
        hw_out = HO * WO
        batch = (offs_m // hw_out).to(tl.int64)  # batch offsets in int64: B * C * H * W may pass 2^31
        pix = offs_m % hw_out
        ih0 = (pix // WO) * STRIDE_H - PAD_H
        iw0 = (pix % WO) * STRIDE_W - PAD_W
        x_rows = x_ptr + batch * C * H * W
        offs_k = tl.arange(0, BLOCK_K)
        if IS_INT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < K
            # k = (c * KH + r) * KW + s, the F.unfold order (KH, KW constexpr: divisions by constants)
            c = kk // (KH * KW)
            r = (kk // KW) % KH
            s = kk % KW
            ih = ih0[:, None] + (r * DIL_H)[None, :]
            iw = iw0[:, None] + (s * DIL_W)[None, :]
            # the padding border, ragged M and ragged K all read as code 0 (which is exact zero)
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(
                x_rows[:, None] + (c * H * W)[None, :] + ih * W + iw,
                mask=m_ok[:, None] & k_ok[None, :] & inside,
                other=ZERO,
            )
            # weight tile (BLOCK_K, BLOCK_N) of the (N, K) view: K-major, as int8 / fp8 tensor cores take it
            w = tl.load(
                w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                mask=k_ok[:, None] & n_ok[None, :],
                other=ZERO,
            )
            if IS_INT:
                acc = tl.dot(a, w, acc, out_dtype=tl.int32)
            else:
                # promote the tensor core's partial sums into fp32 every FP8_PROMOTE products (sm_90 only)
                acc = tl.dot(a, w, acc, max_num_imprecise_acc=FP8_PROMOTE)

        out = acc.to(tl.float32) * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        # NCHW: y[b, n, oh, ow] sits at (b * N + n) * HO * WO + pix
        tl.store(
            out_ptr + (batch * N * hw_out + pix)[:, None] + offs_n[None, :] * hw_out,
            out.to(out_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )

    return _conv2d_lowp_kernel


def _launch(
    xq: torch.Tensor,
    wq: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_dtype: torch.dtype,
    blocks: ConvBlocks | None = None,
) -> torch.Tensor:
    """`conv2d_lowp_triton` with the tile configuration as an argument (tests use it to vary the tiles)."""
    ho, wo = _check_conv(xq, wq, scale, bias, stride, padding, dilation, out_dtype)
    tensors = (xq, wq, scale) + (() if bias is None else (bias,))
    if not (all(t.is_cuda for t in tensors) or (interpreting() and all(t.device.type == "cpu" for t in tensors))):
        raise ValueError("conv2d_lowp_triton needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)")
    kernel = _kernel()
    b, c, h, w = xq.shape
    n, _, kh, kw = wq.shape
    m, k = b * ho * wo, c * kh * kw
    # The interpreter (Triton 3.9) casts fp32 -> bf16 by truncation, the GPU rounds to nearest even
    # (cvt.rn.bf16.f32): under it the kernel stores fp32 and torch rounds, as the GPU would.
    store_dtype = torch.float32 if interpreting() and out_dtype == torch.bfloat16 else out_dtype
    out = torch.empty((b, n, ho, wo), dtype=store_dtype, device=xq.device)
    if m == 0 or n == 0:
        return out.to(out_dtype)
    xq = xq.contiguous()
    w2 = wq.reshape(n, k)  # a view when wq is contiguous; any strides work (passed below)
    blocks = blocks or conv_blocks(n, k, xq.device)
    grid = (cdiv(m, blocks.block_m) * cdiv(n, blocks.block_n),)
    kernel[grid](
        xq,
        w2,
        scale.contiguous(),
        out if bias is None else bias.contiguous(),  # `out` stands in for a pointer HAS_BIAS leaves unread
        out,
        m,
        n,
        k,
        c,
        h,
        w,
        ho,
        wo,
        w2.stride(0),
        w2.stride(1),
        KH=kh,
        KW=kw,
        STRIDE_H=int(stride[0]),
        STRIDE_W=int(stride[1]),
        PAD_H=int(padding[0]),
        PAD_W=int(padding[1]),
        DIL_H=int(dilation[0]),
        DIL_W=int(dilation[1]),
        IS_INT=xq.dtype == torch.int8,
        ZERO=0 if xq.dtype == torch.int8 else 0.0,  # the fill of masked loads: Triton casts no int to fp8
        FP8_PROMOTE=min(32, blocks.block_k),  # must not exceed the dot's K
        HAS_BIAS=bias is not None,
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k,
        GROUP_M=blocks.group_m,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        enable_fp_fusion=False,
    )
    return out.to(out_dtype)


def conv2d_lowp_triton(
    xq: torch.Tensor,
    wq: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The implicit-GEMM Triton kernel for `conv2d_lowp_reference` (same arguments, same result: bit-exact for
    int8, within fp32 summation rounding for fp8). Takes `wq` as it is (no prepared layout); CUDA tensors, or CPU
    tensors under `TRITON_INTERPRET=1`."""
    return _launch(xq, wq, scale, bias, stride, padding, dilation, out_dtype)
