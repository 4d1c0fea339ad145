"""Low-precision conv (`sdcompiler.kernels.lowp_conv`): the implicit-GEMM Triton kernel under the CPU interpreter
against the pure-torch reference, and the reference against float64 `F.conv2d`.

Oracles: int8, the kernel's output equals the reference's bit for bit (the int32 accumulator is exact, and the
epilogue rounds the same way), for any scale, bias and output dtype; the accumulator itself (scale 1, no bias,
fp32 out) equals float64 `F.conv2d` of the codes. fp8, both sum the same exact products in a different order: the
kernel (fp32 accumulation) is within the fp32 summation bound `K * 2^-24 * conv(|x|, |w|)` of the reference (the
exact fp64 sum rounded once), and the reference within `2^-24 |exact|` of float64 `F.conv2d`. Without a GPU,
the kernel is also compiled ahead of time for sm_90 and its PTX checked for the int8 / fp8 wgmma.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sdcompiler.kernels import lowp_conv
from sdcompiler.kernels._common import interpreting

triton = pytest.importorskip("triton")  # noqa: F841  (the kernel tests launch Triton)
needs_interpreter = pytest.mark.skipif(
    not interpreting(), reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1"
)

FP8 = torch.float8_e4m3fn
EPS32 = 2.0**-24  # unit roundoff of fp32

# (B, C, H, W, N, (kh, kw), stride, padding, dilation); M, N, K are ragged against the 32 x 32 x 32 tiles
CONVS = {
    "3x3_s1_p1": (2, 5, 7, 9, 11, (3, 3), (1, 1), (1, 1), (1, 1)),  # M = 126, N = 11, K = 45, batch 2, odd H / W
    "3x3_s2_p1": (2, 8, 9, 7, 12, (3, 3), (2, 2), (1, 1), (1, 1)),  # the U-Net's downsample: 9 x 7 -> 5 x 4
    "1x1": (2, 40, 5, 3, 33, (1, 1), (1, 1), (0, 0), (1, 1)),  # M = 30, N = 33, K = 40
    "ragged": (1, 3, 11, 13, 37, (3, 3), (1, 1), (1, 1), (1, 1)),  # M = 143 (5 M blocks), N = 37, K = 27
    "2x3_dilated": (1, 4, 8, 10, 9, (2, 3), (1, 2), (0, 1), (2, 1)),  # rectangular kernel, mixed stride / dilation
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random codes. int8: the full range [-128, 127]. fp8: magnitudes spread over 2^-12 .. 2^8 (subnormals to
    near 448), random signs, some exact zeros: sums with cancellation, the fp32 rounding the bound is about."""
    g = _gen(seed)
    if dtype == torch.int8:
        return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-10, 7, shape, generator=g).float())
    x[torch.rand(shape, generator=g) < 0.1] = 0.0
    return x.clamp(-448, 448).to(FP8)


def _problem(name: str, dtype: torch.dtype, seed: int = 0):
    b, c, h, w, n, (kh, kw), stride, padding, dilation = CONVS[name]
    xq = _codes(dtype, (b, c, h, w), seed)
    wq = _codes(dtype, (n, c, kh, kw), seed + 1)
    return xq, wq, dict(stride=stride, padding=padding, dilation=dilation)


def _exact_conv(xq: torch.Tensor, wq: torch.Tensor, conv: dict, absolute: bool = False) -> torch.Tensor:
    """float64 `F.conv2d` of the codes: the exact sum for both formats at these sizes (int8: |sum| < 2^53; fp8:
    multiples of 2^-18 below 2^18 * K); with `absolute`, the conv of |x| and |w| (the summation bound's scale)."""
    x, w = xq.double(), wq.double()
    if absolute:
        x, w = x.abs(), w.abs()
    return F.conv2d(x, w, None, conv["stride"], conv["padding"], conv["dilation"])


def _fp8_bound(xq: torch.Tensor, wq: torch.Tensor, conv: dict) -> torch.Tensor:
    """fp32 summation of K exact products: |kernel - exact| <= K u sum|p| (first order), and the reference is the
    exact value rounded once (u |exact|); the sum of the two bounds |kernel - reference|."""
    k = wq[0].numel()
    return k * EPS32 * _exact_conv(xq, wq, conv, absolute=True) + EPS32 * _exact_conv(xq, wq, conv).abs()


def _run(fn, xq, wq, scale, bias, conv, out_dtype):
    return fn(xq, wq, scale, bias, conv["stride"], conv["padding"], conv["dilation"], out_dtype)


# --- the reference is the conv -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONVS)
def test_reference_is_the_exact_conv(name):
    for dtype in (torch.int8, FP8):
        xq, wq, conv = _problem(name, dtype, seed=10)
        ones = torch.ones(wq.shape[0])
        ref = _run(lowp_conv.conv2d_lowp_reference, xq, wq, ones, None, conv, torch.float32)
        exact = _exact_conv(xq, wq, conv)
        assert ref.shape == exact.shape and ref.dtype == torch.float32 and ref.is_contiguous()
        if dtype == torch.int8:
            assert torch.equal(ref.double(), exact)  # |acc| < 2^24 here: exact in fp32
        else:
            assert ((ref.double() - exact).abs() <= EPS32 * exact.abs()).all()  # the exact sum, rounded once


# --- the kernel against the reference ----------------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("name", CONVS)
def test_int8_accumulator_exact(name):
    xq, wq, conv = _problem(name, torch.int8)
    ones = torch.ones(wq.shape[0])
    y = _run(lowp_conv.conv2d_lowp_triton, xq, wq, ones, None, conv, torch.float32)
    ref = _run(lowp_conv.conv2d_lowp_reference, xq, wq, ones, None, conv, torch.float32)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert ref.abs().max() < 2**24  # so the float32 output is the int32 accumulator itself
    assert torch.equal(y, ref)
    assert torch.equal(y.double(), _exact_conv(xq, wq, conv))


@needs_interpreter
@pytest.mark.parametrize("name", CONVS)
def test_fp8_within_fp32_summation_bound(name):
    xq, wq, conv = _problem(name, FP8)
    ones = torch.ones(wq.shape[0])
    y = _run(lowp_conv.conv2d_lowp_triton, xq, wq, ones, None, conv, torch.float32)
    ref = _run(lowp_conv.conv2d_lowp_reference, xq, wq, ones, None, conv, torch.float32)
    assert y.shape == ref.shape and y.dtype == torch.float32
    error = (y.double() - ref.double()).abs()
    assert (error <= _fp8_bound(xq, wq, conv)).all(), f"max error {error.max().item():.3g}"


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_bias_epilogue(dtype, out_dtype):
    xq, wq, conv = _problem("3x3_s2_p1", dtype, seed=3)
    n = wq.shape[0]
    g = _gen(4)
    # scale = input_scale * weight_scale[n]: small for int8 (acc reaches ~1e5), near 1 for fp8
    scale = (torch.rand(n, generator=g) + 0.5) * (1e-4 if dtype == torch.int8 else 1.0)
    bias = torch.randn(n, generator=g).to(torch.float16)  # any float dtype; the epilogue adds it in fp32
    y = _run(lowp_conv.conv2d_lowp_triton, xq, wq, scale, bias, conv, out_dtype)
    ref = _run(lowp_conv.conv2d_lowp_reference, xq, wq, scale, bias, conv, out_dtype)
    assert y.dtype == ref.dtype == out_dtype and y.shape == ref.shape
    if dtype == torch.int8:
        assert torch.equal(y, ref)  # exact accumulator, same fp32 epilogue (no FMA), same cast
    else:
        # the fp32 summation bound, scaled, plus one rounding of the output dtype
        bound = _fp8_bound(xq, wq, conv) * scale.double()[None, :, None, None]
        bound += torch.finfo(out_dtype).eps * ref.double().abs()
        assert ((y.double() - ref.double()).abs() <= bound).all()
    # the epilogue is the spec's: the exact conv, times the scale, plus the bias
    exact = _exact_conv(xq, wq, conv) * scale.double()[None, :, None, None] + bias.double()[None, :, None, None]
    rtol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    torch.testing.assert_close(y.double(), exact, rtol=rtol, atol=rtol * exact.abs().max().item())


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.int8, FP8], ids=["int8", "fp8"])
def test_other_tiles_same_result(dtype):
    """16-wide tiles (more programs, more K steps, the grouped order over 9 x 3 blocks) and 64-wide ones (a single
    K step, N in one block) give the default tiles' result."""
    xq, wq, conv = _problem("ragged", dtype, seed=5)
    scale = torch.rand(wq.shape[0], generator=_gen(6)) + 0.5
    args = (xq, wq, scale, None, conv["stride"], conv["padding"], conv["dilation"], torch.float32)
    y = lowp_conv.conv2d_lowp_triton(*args)
    for blocks in (lowp_conv.ConvBlocks(16, 16, 16, group_m=2), lowp_conv.ConvBlocks(64, 64, 64)):
        other = lowp_conv._launch(*args, blocks=blocks)
        if dtype == torch.int8:
            assert torch.equal(other, y)
        else:  # another K split is another summation order
            bound = 2 * _fp8_bound(xq, wq, conv) * scale.double()[None, :, None, None]
            assert ((other.double() - y.double()).abs() <= bound).all()


def test_input_validation():
    xq, wq, conv = _problem("1x1", torch.int8)
    ones = torch.ones(wq.shape[0])
    good = dict(xq=xq, wq=wq, scale=ones, bias=None, **conv, out_dtype=torch.float32)
    bad = [
        (dict(xq=xq.float()), "xq must be"),
        (dict(xq=xq[0]), "xq must be"),
        (dict(wq=wq.to(FP8)), "wq must be"),
        (dict(wq=wq[:, :3]), "wq must be"),
        (dict(scale=ones.double()), "scale must be"),
        (dict(scale=ones[:-1]), "scale must be"),
        (dict(bias=torch.ones(3)), "bias must be"),
        (dict(bias=torch.ones(wq.shape[0], dtype=torch.int32)), "bias must be"),
        (dict(out_dtype=torch.int32), "out_dtype must be"),
        (dict(stride=(0, 1)), "stride must be"),
        (dict(padding=(-1, 0)), "padding must be"),
        (dict(dilation=(1,)), "dilation must be"),
        (dict(wq=torch.zeros(33, 40, 7, 7, dtype=torch.int8)), "does not fit"),
    ]
    for fn in (lowp_conv.conv2d_lowp_reference, lowp_conv.conv2d_lowp_triton):
        for change, match in bad:
            with pytest.raises(ValueError, match=match) as info:
                fn(**(good | change))
            assert "\n" not in str(info.value)


# Compiles the kernel for sm_90 in a fresh interpreter: under TRITON_INTERPRET=1 Triton's own library functions
# (tl.cdiv, ...) are interpreter objects that its compiler refuses, so this cannot run inside the test session.
_COMPILE_FOR_SM90 = """
import json, sys
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sdcompiler.kernels import lowp_conv

try:
    from triton.backends.nvidia.compiler import get_ptxas_version
    get_ptxas_version(90)  # runs the bundled ptxas
except Exception as error:
    print(json.dumps({"skip": f"Triton's NVIDIA backend cannot compile here: {error}"}))
    sys.exit(0)
blocks = lowp_conv.conv_blocks(320, 2880, torch.device("cuda"))  # SD1.5's 320-channel 3x3 conv
mma = {}
for name, code, zero in (("int8", "*i8", 0), ("fp8", "*fp8e4nv", 0.0)):
    signature = {"x_ptr": code, "w_ptr": code, "scale_ptr": "*fp32", "bias_ptr": "*fp16", "out_ptr": "*fp16"}
    signature |= dict.fromkeys(["M", "N", "K", "C", "H", "W", "HO", "WO", "stride_wn", "stride_wk"], "i32")
    constants = dict(KH=3, KW=3, STRIDE_H=2, STRIDE_W=2, PAD_H=1, PAD_W=1, DIL_H=1, DIL_W=1, IS_INT=name == "int8")
    constants |= dict(ZERO=zero, FP8_PROMOTE=32, HAS_BIAS=True, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n)
    constants |= dict(BLOCK_K=blocks.block_k, GROUP_M=blocks.group_m)
    signature |= dict.fromkeys(constants, "constexpr")
    compiled = triton.compile(
        ASTSource(fn=lowp_conv._kernel(), signature=signature, constexprs=constants),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages, enable_fp_fusion=False),
    )
    mma[name] = [line.strip() for line in compiled.asm["ptx"].splitlines() if "wgmma.mma_async" in line]
print(json.dumps({"mma": mma}))
"""


@pytest.fixture(scope="module")
def sm90_mma(tmp_path_factory):
    """The wgmma instructions of the kernel's PTX for sm_90, per code format (int8, fp8)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result["mma"]


@pytest.mark.parametrize("name,mma", [("int8", "s32.s8.s8"), ("fp8", "f32.e4m3.e4m3")])
def test_kernel_compiles_to_hopper_tensor_cores(sm90_mma, name, mma):
    """No GPU needed: Triton compiles the kernel ahead of time for sm_90 (its bundled ptxas) at the CUDA tiles, and
    the PTX multiplies on the int8 or fp8 tensor cores. The interpreter runs the kernel's Python semantics in numpy
    and checks none of the lowering (layouts, wgmma operand rules, the fp8 accumulator promotion)."""
    assert sm90_mma[name] and all(mma in line for line in sm90_mma[name])
