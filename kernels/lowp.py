"""INT8 and FP8 (E4M3) GEMMs and convolutions for statically quantized layers, on torch's own low-precision ops.

A quantized layer holds its weight as int8 (symmetric, one scale per output channel) or float8_e4m3fn (one scale
per tensor) and a static activation scale. At run time the input is quantized with that scale, the products are
accumulated exactly (int32 for int8 through `torch._int_mm`, fp32 for fp8 through `torch._scaled_mm`), and the
accumulator is dequantized by one scale per output channel (`scale` = activation step x weight step) plus bias:

    y[m, n] = scale[n] * sum_k xq[m, k] * wq[n, k] + bias[n]

Quantization follows nvidia-modelopt's fake quantizers (what the ptq pass calibrates), so a module built from a
calibrated modelopt layer reproduces its simulation up to float summation order:

    int8: xq = clamp(round(x * mult), -128, 127)            mult = 127 / amax (per input channel when a SmoothQuant
    fp8:  xq = float8_e4m3fn(clamp(x * mult, -448, 448))    pre-scale is folded in: mult = pre_scale * 127 / amax)

Both ops run on CPU and CUDA (torch 2.13), so the tests here run the deployed arithmetic. On CUDA, `_int_mm` needs
M > 16 and K, N multiples of 8, `_scaled_mm` K and N multiples of 16: `linear_lowp` pads to those (zero rows and
columns change no sum) and crops the result. Convolutions run as im2col + the same GEMM here; on CUDA with Triton,
`conv2d_lowp` runs `kernels.lowp_conv`'s implicit-GEMM kernel when present (no materialized im2col).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import triton_available, use_triton

INT8 = torch.int8
FP8 = torch.float8_e4m3fn
QMAX = {INT8: 127.0, FP8: 448.0}  # amax maps to this code
ALIGN = 16  # K and N padded to a multiple of this (covers _int_mm's 8 and _scaled_mm's 16)
MIN_ROWS = 17  # _int_mm on CUDA needs M > 16


def multiplier(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / step for `amax` in fp32, computed as modelopt computes it, so that codes agree at rounding ties: int8
    divides `tensor(127) / amax`; fp8 writes `448.0 / amax`, which torch evaluates as `448 * (1 / amax)`.
    A zero amax gives multiplier 0 (every code 0), as modelopt's zero-range handling does."""
    amax = amax.float()
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    mult = torch.full_like(safe, QMAX[dtype]) / safe if dtype == INT8 else QMAX[dtype] / safe
    return torch.where(amax > 0, mult, torch.zeros_like(mult))


def quantize(x: torch.Tensor, mult: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` codes: int8 round-half-even and clamp to [-128, 127], or fp8 E4M3 after clamping to +-448.
    `mult` (scalar, or per last-dim channel) is 1 / step, multiplied in fp32 as modelopt does."""
    scaled = x.float() * mult
    if dtype == INT8:
        return torch.clamp(torch.round(scaled), -128.0, 127.0).to(INT8)
    if dtype == FP8:
        return scaled.clamp(-448.0, 448.0).to(FP8)
    raise ValueError(f"low-precision dtype must be int8 or float8_e4m3fn, got {dtype}")


def _pad_to(t: torch.Tensor, dim: int, multiple: int, minimum: int = 0) -> torch.Tensor:
    size = t.shape[dim]
    target = max(-(-size // multiple) * multiple, minimum)
    if target == size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, target - size]
    if t.dtype == FP8:  # F.pad has no float8 kernel: zero codes are zero bytes
        return F.pad(t.view(torch.uint8), pad).view(FP8)
    return F.pad(t, pad)


def gemm_lowp(xq: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`scale * (xq @ wq.T)` for 2-D codes xq (M, K), wq (N, K) of one dtype, in `out_dtype`; exact accumulation."""
    m, n = xq.shape[0], wq.shape[0]
    a = _pad_to(_pad_to(xq, 1, ALIGN), 0, 1, MIN_ROWS if xq.dtype == INT8 else 0)
    b = _pad_to(_pad_to(wq, 1, ALIGN), 0, ALIGN)
    if xq.dtype == INT8:
        acc = torch._int_mm(a, b.t())[:m, :n]
        return (acc.float() * scale.float()).to(out_dtype)
    if scale.numel() == 1:  # per-tensor: the GEMM applies the scale
        one = torch.ones((), dtype=torch.float32, device=xq.device)
        out = torch._scaled_mm(a, b.t(), scale_a=scale.float().reshape(()), scale_b=one, out_dtype=out_dtype)
        return out[:m, :n]
    one = torch.ones((), dtype=torch.float32, device=xq.device)
    acc = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)[:m, :n]
    return (acc * scale.float()).to(out_dtype)


def linear_lowp(
    x: torch.Tensor, wq: torch.Tensor, mult: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A quantized `F.linear`: `x` (..., K) quantized with `mult`, times codes `wq` (N, K), dequantized by `scale`
    (scalar or (N,)), plus `bias`; in `x`'s dtype."""
    shape = x.shape
    xq = quantize(x.reshape(-1, shape[-1]), mult, wq.dtype)
    out = gemm_lowp(xq, wq, scale, x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*shape[:-1], wq.shape[0])


def conv2d_lowp_im2col(
    x: torch.Tensor,
    wq: torch.Tensor,
    mult: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """A quantized `F.conv2d` (groups 1, zero padding) as im2col + `gemm_lowp`; NCHW in `x`'s dtype."""
    batch, _, height, width = x.shape
    n, c, kh, kw = wq.shape
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0):
        cols = x.permute(0, 2, 3, 1).reshape(-1, c)
    else:  # (B, C*kh*kw, L) -> (B*L, C*kh*kw); quantizing the zero padding gives zero codes
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)
        cols = cols.transpose(1, 2).reshape(-1, c * kh * kw)
    out = gemm_lowp(quantize(cols, mult, wq.dtype), wq.reshape(n, -1), scale, x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(batch, out_h, out_w, n).permute(0, 3, 1, 2)


def conv2d_lowp(
    x: torch.Tensor,
    wq: torch.Tensor,
    mult: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """A quantized `F.conv2d`: the Triton implicit-GEMM kernel (`kernels.lowp_conv`) on CUDA when Triton imports,
    else im2col + `gemm_lowp`."""
    if x.is_cuda and use_triton(x):
        from .lowp_conv import conv2d_lowp_triton

        xq = quantize(x, mult, wq.dtype)
        per_channel = scale.float().expand(wq.shape[0]).contiguous()
        return conv2d_lowp_triton(xq, wq, per_channel, bias, stride, padding, dilation, x.dtype)
    return conv2d_lowp_im2col(x, wq, mult, scale, bias, stride, padding, dilation)


def conv_kernel(device: str, gemm: str) -> str:
    """What `conv2d_lowp` runs on `device` for a layer whose GEMM is `gemm`: the Triton implicit-GEMM kernel on
    CUDA when Triton imports, else im2col + that GEMM."""
    return "triton implicit-GEMM" if device == "cuda" and triton_available() else f"im2col + {gemm}"
