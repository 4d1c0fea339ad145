"""W4A4 integer linear and conv kernels: 4-bit (or 8-bit) weights x 4-bit (or 8-bit) activations on int8 tensor cores.

Hopper has no 4-bit tensor cores, so 4-bit codes are stored packed two per byte, widened to int8 in registers and
multiplied with int8 x int8 -> int32 `tl.dot`. One scheme, shared exactly by the fake-quant simulation (what a
quantization pass trains through) and the integer kernels (what it deploys through):

Weights `W (N, K)` (conv weights flattened to `(N, C*kh*kw)`, the `F.unfold` order): per-output-channel
**asymmetric** uniform with `w_bits` in {4, 8}, scale `s_w[n] > 0` and integer zero point `z_w[n]` in
`[0, 2^b - 1]`::

    q_w[n, k] = clamp(floor(W[n, k] / s_w[n] + 0.5) + z_w[n], 0, 2^b - 1)        (uint8 codes)
    W[n, k]  ~= s_w[n] * (q_w[n, k] - z_w[n])

4-bit codes are packed two per byte along K (low nibble = even k, high nibble = odd k, K padded to even), giving a
uint8 `(N, ceil(K/2))` tensor whose rows are contiguous along K; 8-bit codes are stored unpacked, uint8 `(N, K)`.

Activations `X (M, K)`: **symmetric** signed `a_bits` in {4, 8}, `qmax = 2^(b-1) - 1`::

    inv_s   = 1 / s                       (fp32 IEEE division, once per scale; X is multiplied by it)
    q_a     = clamp(floor(float32(X) * inv_s + 0.5), -qmax - 1, qmax)           (int8 codes)
    static:    s = one scalar (chosen by the pass, e.g. per timestep)
    per token: s[m] = max(absmax(X[m, :]), 2^-30) / qmax                        (IEEE division)

Integer GEMM and epilogue (all integer math exact in int32)::

    acc[m, n]  = sum_k q_a[m, k] * (q_w[n, k] - z_w[n])  =  sum_k q_a[m, k] q_w[n, k] - z_w[n] * rowsum[m]
    rowsum[m]  = sum_k q_a[m, k]
    y[m, n]    = (s_a[m] * s_w[n]) * float32(acc[m, n]) + bias[n]                    -> output dtype

which equals the fake-quant float product `(s_a q_a) @ (s_w (q_w - z_w))^T + bias` up to float rounding. The Triton
kernels are compiled with `enable_fp_fusion=False` so `x * inv_s + 0.5` and the epilogue round like the torch
reference (no FMA contraction) and the codes match it exactly; per-token scales and 1/s use `tl.math.div_rn`
(IEEE, like torch), not Triton's default approximate fp32 division.

Kernels:
- `_quantize_act_kernel`: activation codes (int8) from float X, static scale or per-token absmax;
- `_w4a4_gemm_kernel`: int8 activation codes x packed int4 (or uint8) weight codes, epilogue fusing the zero-point
  correction, dequantisation, bias and cast. 4-bit codes are unpacked in registers and the zero point folded in
  there (`q_w - z_w` lies in [-15, 15]: an int8), so `tl.dot` yields `acc` directly. 8-bit codes enter `tl.dot` as
  `q_w - 128` (int8) and the epilogue takes `acc' - (z_w - 128) * rowsum`, the same integer, with the row sums
  accumulated from the A tiles. (Measured on H200: folding the zero point beats the row-sum correction, which cost
  10-35% of the 4-bit GEMM.) With `A_FLOAT` the kernel takes float activations and a static scale and quantises
  the A tile in registers right before `tl.dot`; with `OUT_ACC` it stores the int32 `acc` instead of y (to check
  the integer math exactly).

The fused float-input variant re-quantises each A tile once per N block, so it only reads X once when one N block
covers N; `w4a4_linear` uses it for a static scale when N fits one block (N <= 128 on GPU) and otherwise runs the
quantisation kernel and the code GEMM (on H200 at SD shapes, N >= 320, the two passes were 20-70% faster).
Speed today (H200, SD1.5 shapes, benchmarks/bench_w4a4_kernel.py): the code GEMM runs at 0.2-0.9x of fp16 cuBLAS
(4x fewer weight bytes); the win of this path is memory, not yet speed.

Conv2d (`w4a4_conv2d`) runs through the same GEMM: a 1x1 conv (padding 0) as a GEMM over channels-last pixels, any
other kernel through `F.unfold` (im2col; no implicit GEMM). There, a per-token activation scale is one scale per
im2col row, i.e. per output pixel over its receptive field (for 1x1: per pixel over channels).

Ops: `sdcompiler::quantize_act` and `sdcompiler::w4a4_linear` (Triton on CUDA via `use_triton`, the reference
elsewhere; fake impls; `w4a4_linear` counts 2*M*N*K FLOPs in `FlopCounterMode`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from ._common import LIBRARY, cdiv, interpreting, next_power_of_2, require_triton, use_triton

BITS = (4, 8)
AMAX_FLOOR = 2.0**-30  # per-token guard: an all-zero row gets a tiny positive scale (and codes 0), never 1/0


# --- validation ------------------------------------------------------------------------------------------------


def _check_bits(name: str, bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"{name} must be 4 or 8, got {bits}")


def _check_packed(packed_w: torch.Tensor, w_bits: int, in_features: int) -> int:
    """Validate stored weight codes; return N (out features)."""
    _check_bits("w_bits", w_bits)
    if packed_w.dtype != torch.uint8 or packed_w.dim() != 2:
        raise ValueError(f"weight codes must be a 2-D uint8 tensor, got {packed_w.dtype} {tuple(packed_w.shape)}")
    n = packed_w.shape[0]
    width = packed_width(in_features, w_bits)
    if packed_w.shape[1] != width:
        raise ValueError(
            f"{w_bits}-bit weight codes for in_features={in_features} must have shape ({n}, {width}), "
            f"got {tuple(packed_w.shape)}"
        )
    return n


def _check_weight(
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    w_bits: int,
    in_features: int,
) -> int:
    """Validate stored weight codes and their per-channel parameters; return N (out features)."""
    n = _check_packed(packed_w, w_bits, in_features)
    if w_scale.shape != (n,) or w_zero.shape != (n,):
        raise ValueError(
            f"w_scale and w_zero must have shape ({n},), got {tuple(w_scale.shape)} and {tuple(w_zero.shape)}"
        )
    if w_zero.is_floating_point() or w_zero.is_complex():
        raise ValueError(f"w_zero must be an integer tensor, got {w_zero.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    return n


def _check_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    in_features: int,
) -> int:
    _check_bits("a_bits", a_bits)
    n = _check_weight(packed_w, w_scale, w_zero, bias, w_bits, in_features)
    if x.dim() < 1 or x.shape[-1] != in_features or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor (..., {in_features}), got {x.dtype} {tuple(x.shape)}")
    if act_scale is not None and act_scale.numel() != 1:
        raise ValueError(
            f"act_scale must be one static scale (or None for per-token), got shape {tuple(act_scale.shape)}"
        )
    return n


def _check_codes(q_a: torch.Tensor, act_scale: torch.Tensor | None, in_features: int) -> None:
    if q_a.dtype != torch.int8 or q_a.dim() != 2 or q_a.shape[1] != in_features:
        raise ValueError(f"activation codes must be int8 (M, {in_features}), got {q_a.dtype} {tuple(q_a.shape)}")
    if act_scale is not None and act_scale.numel() not in (1, q_a.shape[0]):
        raise ValueError(f"act_scale must have 1 or M={q_a.shape[0]} elements, got {act_scale.numel()}")


# --- weights: quantise, pack (pure torch, offline) ---------------------------------------------------------------


def range_weight_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel parameters for the ranges `[lo, hi]` (N,) (widened to contain 0):
    `(scale fp32 (N,), zero int32 (N,))`, `s_w = (hi - lo) / (2^b - 1)` (1 for an all-zero channel) and
    `z_w = clamp(floor(-lo / s_w + 0.5), 0, 2^b - 1)`."""
    _check_bits("bits", bits)
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.floor(-lo / scale + 0.5).clamp(0, qmax).to(torch.int32)
    return scale, zero


def minmax_weight_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`range_weight_params` for each output channel's [min, max]: `(scale fp32 (N,), zero int32 (N,))`."""
    w2 = w.detach().reshape(w.shape[0], -1).float()
    return range_weight_params(w2.amin(1), w2.amax(1), bits)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Weight codes `clamp(floor(W / s_w + 0.5) + z_w, 0, 2^b - 1)` as uint8 (N, K); W is flattened to 2-D."""
    _check_bits("bits", bits)
    w2 = w.reshape(w.shape[0], -1).float()
    q = torch.floor(w2 / scale.float()[:, None] + 0.5) + zero[:, None].float()
    return q.clamp(0, 2**bits - 1).to(torch.uint8)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """`s_w * (q_w - z_w)` in fp32, shape (N, K)."""
    return scale.float()[:, None] * (codes.float() - zero.float()[:, None])


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15], (N, K) -> (N, ceil(K/2)): low nibble = even k, high nibble = odd k."""
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"4-bit codes must lie in [0, 15], got max {int(codes.max())}")
    if codes.shape[1] % 2:
        codes = F.pad(codes, (0, 1))
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_int4`: (N, ceil(K/2)) uint8 -> (N, K) uint8 codes."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != cdiv(in_features, 2):
        raise ValueError(
            f"packed codes for K={in_features} must be uint8 (N, {cdiv(in_features, 2)}), got "
            f"{packed.dtype} {tuple(packed.shape)}"
        )
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :in_features]


def packed_width(in_features: int, bits: int) -> int:
    """Bytes per output channel of stored weight codes: ceil(K/2) packed 4-bit codes, or K 8-bit ones."""
    return cdiv(in_features, 2) if bits == 4 else in_features


def pack_weight_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The kernels' storage of weight codes: packed int4 for 4 bits, the uint8 codes themselves for 8."""
    _check_bits("bits", bits)
    return pack_int4(codes) if bits == 4 else codes.contiguous()


def unpack_weight_codes(packed_w: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Stored weight codes -> uint8 (N, K) codes."""
    _check_bits("bits", bits)
    return unpack_int4(packed_w, in_features) if bits == 4 else packed_w


# --- reference (pure torch): the spec ---------------------------------------------------------------------------


def per_token_scale(x: torch.Tensor, bits: int, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Dynamic activation scales `max(absmax(x) over dim, 2^-30) / qmax` in fp32, one per token (a slice along
    `dim`)."""
    _check_bits("bits", bits)
    amax = x.float().abs().amax(dim, keepdim=keepdim).clamp_min(AMAX_FLOOR)
    # a tensor divisor: CUDA torch turns division by a Python scalar into a multiply by its reciprocal
    return amax / torch.full_like(amax, 2 ** (bits - 1) - 1)


def quantize_act_reference(x: torch.Tensor, scale: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation codes: `(q int8 like x, scale fp32)`; scale is `()` (static) or `x.shape[:-1]` (per token)."""
    _check_bits("bits", bits)
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    if scale is None:
        scale = per_token_scale(xf, bits)
        inv = (1.0 / scale)[..., None]
    else:
        scale = scale.detach().float().reshape(()).clone()
        inv = 1.0 / scale
    q = torch.floor(xf * inv + 0.5).clamp(-qmax - 1, qmax).to(torch.int8)
    return q, scale


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor | None, bits: int) -> torch.Tensor:
    """`s * q_a` in fp32: what the integer path sees of x."""
    q, s = quantize_act_reference(x, scale, bits)
    return q.float() * (s[..., None] if s.dim() else s)


def w4a4_acc_reference(
    q_a: torch.Tensor, packed_w: torch.Tensor, w_zero: torch.Tensor, w_bits: int, in_features: int
) -> torch.Tensor:
    """`acc[m, n] = sum_k q_a[m, k] (q_w[n, k] - z_w[n])` as int32 (exact: float64 sums of integers < 2^53, so it
    runs on CUDA, which has no integer matmul, too)."""
    codes = unpack_weight_codes(packed_w, w_bits, in_features)
    return (q_a.double() @ (codes.double() - w_zero.double()[:, None]).T).to(torch.int32)


def w4a4_gemm_reference(
    q_a: torch.Tensor,
    act_scale: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    w_bits: int,
    in_features: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantised GEMM on activation codes (M, K) with scale (1 or M elements): y (M, N) in `out_dtype`."""
    _check_weight(packed_w, w_scale, w_zero, bias, w_bits, in_features)
    _check_codes(q_a, act_scale, in_features)
    acc = w4a4_acc_reference(q_a, packed_w, w_zero, w_bits, in_features)
    s_a = act_scale.float().reshape(-1)
    y = (s_a[:, None] * w_scale.float()[None, :]) * acc.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def w4a4_linear_reference(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    in_features: int,
) -> torch.Tensor:
    """Integer-path linear on float x (..., K): quantise (static scale, or per token when `act_scale` is None),
    integer GEMM, dequantise; output (..., N) in x's dtype."""
    n = _check_linear(x, packed_w, w_scale, w_zero, bias, act_scale, a_bits, w_bits, in_features)
    q, s = quantize_act_reference(x.reshape(-1, in_features), act_scale, a_bits)
    y = w4a4_gemm_reference(q, s, packed_w, w_scale, w_zero, bias, w_bits, in_features, x.dtype)
    return y.reshape(*x.shape[:-1], n)


def fake_quant_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    in_features: int,
) -> torch.Tensor:
    """The float simulation of `w4a4_linear_reference`: dequantised activations @ dequantised weights (fp32)."""
    _check_linear(x, packed_w, w_scale, w_zero, bias, act_scale, a_bits, w_bits, in_features)
    w_hat = dequantize_weight(unpack_weight_codes(packed_w, w_bits, in_features), w_scale, w_zero)
    y = F.linear(fake_quant_act(x, act_scale, a_bits), w_hat, None if bias is None else bias.float())
    return y.to(x.dtype)


# --- Triton kernels ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmBlocks:
    """Tile sizes and launch settings of the GEMM kernel (on GPU: block_k >= 32, block_m/n >= 16)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def gemm_blocks(m: int, n: int, k: int, device: torch.device, a_float: bool = False) -> GemmBlocks:
    """Blocks chosen by shape. Interpreter: as large as the problem (its cost is programs x loop steps). GPU (tuned
    on H200 at SD shapes): 128 x 64 x 128 tiles for codes, 128 x 128 for float input (each N block re-quantises
    its A tile: fewer, wider N blocks), the K tile dividing K where it can; BLOCK_M halved while the grid would
    leave SMs idle."""
    if device.type != "cuda":
        return GemmBlocks(
            min(128, max(16, next_power_of_2(m))),
            min(128, max(16, next_power_of_2(n))),
            min(256, max(32, next_power_of_2(k))),
            num_stages=1,
        )
    block_m = 128 if m > 64 else max(16, next_power_of_2(m))
    block_n = min(128 if a_float else 64, max(16, next_power_of_2(n)))
    block_k = 64 if k % 128 and k % 64 == 0 else 128
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    while cdiv(m, block_m) * cdiv(n, block_n) < sms and block_m > 64:
        block_m //= 2
    if a_float:
        return GemmBlocks(block_m, block_n, block_k, num_warps=8 if block_m * block_n >= 128 * 128 else 4, num_stages=3)
    return GemmBlocks(block_m, block_n, block_k, num_warps=4, num_stages=4)


def fuse_static_quant(m: int, n: int, k: int, device: torch.device) -> bool:
    """Whether a static-scale linear runs the fused float-input kernel: when one N block covers N, so each A tile
    is quantised once; else quantise once and run the code GEMM."""
    return cdiv(n, gemm_blocks(m, n, k, device, a_float=True).block_n) == 1


@functools.cache
def _kernels():
    """The Triton kernels, defined on first use so importing this module does not import Triton. `tl` is bound as
    a module global (Triton before 3.4 or so
    resolves a kernel's names in its module globals only, not in closures)."""
    global tl
    require_triton()
    import triton
    import triton.language as tl

    @triton.jit
    def _quantize_act_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        M,
        K,
        stride_xm,
        stride_qm,
        QMAX: tl.constexpr,
        AMAX_FLOOR: tl.constexpr,
        PER_TOKEN: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        # PER_TOKEN: scale_ptr receives s[m] (M,); else it holds the static s (one element).
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        cols = tl.arange(0, BLOCK_K)
        if PER_TOKEN:
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask = row_ok[:, None] & (k0 + cols < K)[None, :]
                x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + cols)[None, :], mask=mask, other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
            scale = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), tl.full((BLOCK_M,), QMAX, tl.float32))
            tl.store(scale_ptr + rows, scale, mask=row_ok)
            inv = tl.math.div_rn(tl.full((BLOCK_M,), 1.0, tl.float32), scale)[:, None]
        else:
            inv = tl.math.div_rn(tl.full((1,), 1.0, tl.float32), tl.load(scale_ptr + tl.arange(0, 1)))[None, :]
        for k0 in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (k0 + cols < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + cols)[None, :], mask=mask, other=0.0)
            q = tl.minimum(tl.maximum(tl.floor(x.to(tl.float32) * inv + 0.5), -QMAX - 1.0), QMAX * 1.0)
            tl.store(q_ptr + rows[:, None] * stride_qm + (k0 + cols)[None, :], q.to(tl.int8), mask=mask)

    @triton.jit
    def _w4a4_gemm_kernel(
        a_ptr,
        w_ptr,
        s_a_ptr,
        s_w_ptr,
        z_w_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_am,
        stride_wn,
        stride_om,
        A_FLOAT: tl.constexpr,
        A_QMAX: tl.constexpr,
        ACT_PER_TOKEN: tl.constexpr,
        W_BITS: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        OUT_ACC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Grouped program order: GROUP_M row blocks share each weight column block while it is in L2.
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
        offs_k = tl.arange(0, BLOCK_K)
        if A_FLOAT:  # static scale: 1/s once, IEEE like torch's
            inv_s = tl.math.div_rn(tl.full((1,), 1.0, tl.float32), tl.load(s_a_ptr + tl.arange(0, 1)))[None, :]
        z = tl.load(z_w_ptr + offs_n, mask=n_ok, other=0)
        if W_BITS == 4:
            z4 = z.to(tl.int8)[:, None]
        else:
            rowsum = tl.zeros((BLOCK_M,), dtype=tl.int32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :],
                mask=m_ok[:, None] & k_ok[None, :],
                other=0,
            )
            if A_FLOAT:  # static-scale quantisation of the A tile, as in _quantize_act_kernel
                a = tl.minimum(tl.maximum(tl.floor(a.to(tl.float32) * inv_s + 0.5), -A_QMAX - 1.0), A_QMAX * 1.0)
                a = a.to(tl.int8)
            # Weight tile as (BLOCK_N, BLOCK_K), rows contiguous along K (vectorised loads), transposed for dot.
            # Masked k (A is 0 there) may hold any weight value; masked n rows are discarded at the store.
            if W_BITS == 4:
                offs_kb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(
                    w_ptr + offs_n[:, None] * stride_wn + offs_kb[None, :],
                    mask=n_ok[:, None] & (offs_kb < (K + 1) // 2)[None, :],
                    other=0,
                )
                # interleave (low, high) nibbles along K: byte j holds k = 2j (low) and 2j + 1 (high)
                lo = (packed & 15).to(tl.int8) - z4
                hi = (packed >> 4).to(tl.int8) - z4
                w = tl.join(lo, hi).reshape(BLOCK_N, BLOCK_K)
            else:
                rowsum += tl.sum(a.to(tl.int32), axis=1)
                w = tl.load(
                    w_ptr + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :],
                    mask=n_ok[:, None] & k_ok[None, :],
                    other=128,
                )
                w = (w.to(tl.int32) - 128).to(tl.int8)  # uint8 code -> int8 for the int8 tensor core
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        if W_BITS == 8:
            acc -= rowsum[:, None] * (z - 128)[None, :]

        if OUT_ACC:
            out = acc
        else:
            if ACT_PER_TOKEN:
                s_a = tl.load(s_a_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
            else:
                s_a = tl.load(s_a_ptr)
            s_w = tl.load(s_w_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
            out = (s_a * s_w) * acc.to(tl.float32)
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_ok[:, None] & n_ok[None, :],
        )

    return _quantize_act_kernel, _w4a4_gemm_kernel


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as a 2-D (M, K) tensor with unit stride along K."""
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(1) == 1 or k <= 1 else x2.contiguous()


def _launch_quantize(x2: torch.Tensor, scale: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantisation kernel on (M, K) rows: (codes, per-token scales (M,) or the static scale as fp32 (1,))."""
    quant_kernel, _ = _kernels()
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    per_token = scale is None
    if per_token:
        scale = torch.empty(m, dtype=torch.float32, device=x2.device)
    else:
        scale = scale.detach().float().reshape(1)
    if m and k:
        block_k = min(1024, next_power_of_2(k))
        block_m = min(next_power_of_2(m), max(1, (8192 if interpreting() else 4096) // block_k))
        quant_kernel[(cdiv(m, block_m),)](
            x2,
            q,
            scale,
            m,
            k,
            x2.stride(0),
            q.stride(0),
            QMAX=2 ** (bits - 1) - 1,
            AMAX_FLOOR=AMAX_FLOOR,
            PER_TOKEN=per_token,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            num_warps=4,
            enable_fp_fusion=False,
        )
    return q, scale


def quantize_act_triton(x: torch.Tensor, scale: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `quantize_act_reference` (same outputs, codes bit-exact)."""
    _check_bits("bits", bits)
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"scale must be one static scale (or None for per-token), got shape {tuple(scale.shape)}")
    q, s = _launch_quantize(_rows(x, x.shape[-1]), scale, bits)
    return q.reshape(x.shape), (s.reshape(x.shape[:-1]) if scale is None else s.reshape(()).clone())


def _launch_gemm(
    a: torch.Tensor,
    act_scale: torch.Tensor | None,
    a_bits: int,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor | None,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    w_bits: int,
    in_features: int,
    out: torch.Tensor,
    blocks: GemmBlocks | None,
) -> torch.Tensor:
    """Launch the GEMM kernel into `out` (M, N): int32 `out` stores acc, a float `out` y. Float `a` is quantised
    in the kernel with the static `act_scale`."""
    _, gemm_kernel = _kernels()
    m, n = out.shape
    if m == 0 or n == 0:
        return out
    a_float = a.is_floating_point()
    blocks = blocks or gemm_blocks(m, n, in_features, a.device, a_float)
    out_acc = out.dtype == torch.int32
    packed_w = packed_w if packed_w.stride(1) == 1 else packed_w.contiguous()
    dummy = out  # stands in for pointers a constexpr flag leaves unread
    grid = (cdiv(m, blocks.block_m) * cdiv(n, blocks.block_n),)
    gemm_kernel[grid](
        a,
        packed_w,
        dummy if out_acc else act_scale.float().reshape(-1).contiguous(),
        dummy if out_acc else w_scale.float().contiguous(),
        w_zero.to(torch.int32).contiguous(),
        dummy if bias is None else bias.contiguous(),
        out,
        m,
        n,
        in_features,
        a.stride(0),
        packed_w.stride(0),
        out.stride(0),
        A_FLOAT=a_float,
        A_QMAX=2 ** (a_bits - 1) - 1,
        ACT_PER_TOKEN=act_scale is not None and act_scale.numel() > 1,
        W_BITS=w_bits,
        HAS_BIAS=bias is not None,
        OUT_ACC=out_acc,
        BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k,
        GROUP_M=blocks.group_m,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        enable_fp_fusion=False,
    )
    return out


def w4a4_acc_triton(
    q_a: torch.Tensor,
    packed_w: torch.Tensor,
    w_zero: torch.Tensor,
    w_bits: int,
    in_features: int,
    blocks: GemmBlocks | None = None,
) -> torch.Tensor:
    """The GEMM kernel's int32 accumulator `acc = q_a @ (q_w - z_w)^T` (the kernel run with `OUT_ACC`); equals
    `w4a4_acc_reference` exactly."""
    n = _check_packed(packed_w, w_bits, in_features)
    _check_codes(q_a, None, in_features)
    if w_zero.shape != (n,):
        raise ValueError(f"w_zero must have shape ({n},), got {tuple(w_zero.shape)}")
    out = torch.empty((q_a.shape[0], n), dtype=torch.int32, device=q_a.device)
    return _launch_gemm(
        _rows(q_a, in_features), None, 8, packed_w, None, w_zero, None, w_bits, in_features, out, blocks
    )


def w4a4_gemm_triton(
    q_a: torch.Tensor,
    act_scale: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    w_bits: int,
    in_features: int,
    out_dtype: torch.dtype,
    blocks: GemmBlocks | None = None,
) -> torch.Tensor:
    """Triton `w4a4_gemm_reference`: activation codes (M, K) int8 with scale (1 or M elements) -> y (M, N)."""
    n = _check_weight(packed_w, w_scale, w_zero, bias, w_bits, in_features)
    _check_codes(q_a, act_scale, in_features)
    out = torch.empty((q_a.shape[0], n), dtype=out_dtype, device=q_a.device)
    return _launch_gemm(
        _rows(q_a, in_features), act_scale, 8, packed_w, w_scale, w_zero, bias, w_bits, in_features, out, blocks
    )


def w4a4_linear_triton(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    in_features: int,
    blocks: GemmBlocks | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Triton `w4a4_linear_reference`. Per token: `quantize_act_triton`, then the code GEMM. A static scale: the
    same two passes, or with `fused` the float-input kernel that quantises the A tiles in registers (default:
    `fuse_static_quant`). The codes, hence the outputs, are identical either way."""
    n = _check_linear(x, packed_w, w_scale, w_zero, bias, act_scale, a_bits, w_bits, in_features)
    if fused and act_scale is None:
        raise ValueError("the fused float-input kernel needs a static act_scale")
    x2 = _rows(x, in_features)
    if fused is None:
        fused = act_scale is not None and fuse_static_quant(x2.shape[0], n, in_features, x.device)
    if fused:
        out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
        y = _launch_gemm(
            x2,
            act_scale.detach().float().reshape(1),
            a_bits,
            packed_w,
            w_scale,
            w_zero,
            bias,
            w_bits,
            in_features,
            out,
            blocks,
        )
    else:
        q, s = _launch_quantize(x2, act_scale, a_bits)
        y = w4a4_gemm_triton(q, s, packed_w, w_scale, w_zero, bias, w_bits, in_features, x.dtype, blocks)
    return y.reshape(*x.shape[:-1], n)


# --- ops --------------------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{LIBRARY}::quantize_act", mutates_args=())
def quantize_act(x: torch.Tensor, scale: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation codes `(q int8 like x, scale fp32: () static or x.shape[:-1] per token)`; Triton on CUDA."""
    tensors = (x,) if scale is None else (x, scale)
    if use_triton(*tensors):
        return quantize_act_triton(x, scale, bits)
    return quantize_act_reference(x, scale, bits)


@quantize_act.register_fake
def _(x, scale, bits):
    _check_bits("bits", bits)
    q = torch.empty_like(x, dtype=torch.int8)
    shape = x.shape[:-1] if scale is None else ()
    return q, x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op(f"{LIBRARY}::w4a4_linear", mutates_args=())
def w4a4_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    a_bits: int,
    w_bits: int,
    in_features: int,
) -> torch.Tensor:
    """W4A4 (or W4A8/W8A4/W8A8) linear on float x (..., K) -> (..., N) in x's dtype; see the module docstring.

    Args:
        x: float activations (..., in_features).
        packed_w: stored weight codes, `pack_weight_codes(quantize_weight(w, w_scale, w_zero, w_bits), w_bits)`.
        w_scale, w_zero: per-output-channel scale (N,) and integer zero point (N,).
        bias: (N,) or None.
        act_scale: static activation scale (one element), or None for dynamic per-token scales.
        a_bits, w_bits: 4 or 8.
        in_features: K (the packed width alone cannot tell an odd K).
    """
    tensors = [t for t in (x, packed_w, w_scale, w_zero, bias, act_scale) if t is not None]
    if use_triton(*tensors):
        return w4a4_linear_triton(x, packed_w, w_scale, w_zero, bias, act_scale, a_bits, w_bits, in_features)
    return w4a4_linear_reference(x, packed_w, w_scale, w_zero, bias, act_scale, a_bits, w_bits, in_features)


@w4a4_linear.register_fake
def _(x, packed_w, w_scale, w_zero, bias, act_scale, a_bits, w_bits, in_features):
    n = _check_linear(x, packed_w, w_scale, w_zero, bias, act_scale, a_bits, w_bits, in_features)
    return x.new_empty((*x.shape[:-1], n))


@register_flop_formula(torch.ops.sdcompiler.w4a4_linear)
def _w4a4_linear_flops(x_shape, packed_w_shape, *args, **kwargs) -> int:
    m = 1
    for d in x_shape[:-1]:
        m *= d
    return 2 * m * packed_w_shape[0] * x_shape[-1]


# --- conv2d through the GEMM --------------------------------------------------------------------------------------


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_tokens(x: torch.Tensor, kernel_size, stride, padding) -> tuple[torch.Tensor, int, int]:
    """(B, C, H, W) -> GEMM rows (B, Ho*Wo, C*kh*kw) in `F.unfold` order, and Ho, Wo."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel_size), _pair(stride), _pair(padding)
    if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
        x = x[:, :, ::sh, ::sw]
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1]), x.shape[2], x.shape[3]
    ho = (x.shape[2] + 2 * ph - kh) // sh + 1
    wo = (x.shape[3] + 2 * pw - kw) // sw + 1
    cols = F.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))
    return cols.transpose(1, 2), ho, wo


def _conv_in_features(x: torch.Tensor, kernel_size) -> int:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
    kh, kw = _pair(kernel_size)
    return x.shape[1] * kh * kw


def w4a4_conv2d(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    *,
    a_bits: int,
    w_bits: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """Conv2d (groups=1, dilation 1) through `w4a4_linear`: 1x1 on channels-last pixels, else im2col.

    `packed_w` holds the codes of the weight flattened to (N, C*kh*kw). A per-token scale (`act_scale=None`) is
    per output pixel over its receptive field. Returns (B, N, Ho, Wo) in x's dtype, channels-last in memory.
    """
    k = _conv_in_features(x, kernel_size)
    tokens, ho, wo = _conv_tokens(x, kernel_size, stride, padding)
    y = w4a4_linear(tokens, packed_w, w_scale, w_zero, bias, act_scale, a_bits, w_bits, k)
    return y.transpose(1, 2).reshape(x.shape[0], -1, ho, wo)


def fake_quant_conv2d(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero: torch.Tensor,
    bias: torch.Tensor | None,
    act_scale: torch.Tensor | None,
    *,
    a_bits: int,
    w_bits: int,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """Float simulation of `w4a4_conv2d`. A static scale quantises x elementwise, so this is an ordinary
    `F.conv2d` of the fake-quantised x (padding zeros quantise to 0); per-token scales belong to im2col rows, so
    that case is the fake-quant linear over the unfolded patches."""
    k = _conv_in_features(x, kernel_size)
    _check_linear(x.new_empty(1, k), packed_w, w_scale, w_zero, bias, act_scale, a_bits, w_bits, k)
    if act_scale is not None:
        w_hat = dequantize_weight(unpack_weight_codes(packed_w, w_bits, k), w_scale, w_zero)
        w_hat = w_hat.reshape(packed_w.shape[0], x.shape[1], *_pair(kernel_size))
        y = F.conv2d(
            fake_quant_act(x, act_scale, a_bits),
            w_hat,
            None if bias is None else bias.float(),
            _pair(stride),
            _pair(padding),
        )
        return y.to(x.dtype)
    tokens, ho, wo = _conv_tokens(x, kernel_size, stride, padding)
    y = fake_quant_linear(tokens, packed_w, w_scale, w_zero, bias, None, a_bits, w_bits, k)
    return y.transpose(1, 2).reshape(x.shape[0], -1, ho, wo)
