"""kernels.lowp and the ptq pass's INT8 / FP8 layers (passes.ptq_lowp), without a compile.

Oracles: modelopt's own fake quantizers (the codes times the step equal its output bit for bit), exact integer
GEMMs (int64 matmul) and exact fp8 sums (float64), the helper kernel module's independent reference conv, and a
dispatch trace showing that `aten._int_mm` / `aten._scaled_mm` run (a layer that dequantizes and runs a float
matmul fails it). The compile, the modelopt comparison on a calibrated U-Net and the artifact round trip are in
tests/integration/test_ptq_torch_target.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sdcompiler.kernels import lowp
from sdcompiler.kernels.lowp_conv import conv2d_lowp_reference
from sdcompiler.passes.ptq_lowp import LowpConv2d, LowpLinear, fixed_dtype_tensors

DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


class OpTrace(TorchDispatchMode):
    """The aten ops a call dispatches, in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket).removeprefix("aten."))
        return func(*args, **(kwargs or {}))


def _assert_within_fp32_sums(out, exact, magnitude, k, precision, added=0.0):
    """int8: exact sums, so only the fp32 roundings of the epilogue (scale, + `added` bias); fp8: fp32 sums of k
    products, whose error is at most k * 2^-24 * sum |products| (`magnitude`), plus those roundings."""
    error = (out.double() - exact).abs()
    bound = 2**-23 * (exact.abs() + added) + (k * 2**-24 * magnitude if precision == "fp8" else 0)
    assert (error <= bound).all(), f"max error {error.max():.3g} beyond the fp32 bound"


def _codes(shape, precision, generator):
    if precision == "int8":
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)
    return (torch.randn(shape, generator=generator) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_quantize_is_modelopts_fake_quantizer(precision):
    pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant, scaled_e4m3

    x = torch.randn(4, 333, generator=torch.Generator().manual_seed(0)) * 3
    x[0, :5] = torch.tensor([0.0, 1e-9, -50.0, 50.0, 2.5 * 3.0 / 127])  # zero, tiny, clipped both ways, a .5 tie
    amax = torch.tensor(3.0)
    mult = lowp.multiplier(amax, DTYPES[precision])
    codes = lowp.quantize(x, mult, DTYPES[precision])
    assert codes.dtype == DTYPES[precision]
    if precision == "int8":  # modelopt's default is not narrow range: -128 is a code
        expected = fake_tensor_quant(x, amax, None, 8, False, False)
        its_codes = torch.round(expected * mult)  # its dequantized values are codes x step to within an ulp
    else:
        expected = scaled_e4m3(x, amax, None, 4, 3)
        its_codes = (expected * mult).to(torch.float8_e4m3fn).float()
    assert torch.equal(codes.float(), its_codes)
    torch.testing.assert_close(codes.float() / mult, expected, rtol=2.5e-7, atol=0)
    assert torch.equal(
        lowp.quantize(x, lowp.multiplier(torch.tensor(0.0), DTYPES[precision]), DTYPES[precision]).float(),
        torch.zeros_like(x),
    )


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize("m,k,n", [(5, 37, 21), (64, 64, 48), (17, 16, 16)])
def test_gemm_pads_to_the_cuda_constraints_and_sums_exactly(precision, m, k, n):
    g = torch.Generator().manual_seed(m * k + n)
    a, b = _codes((m, k), precision, g), _codes((n, k), precision, g)
    scale = torch.rand(n, generator=g) + 0.5
    out = lowp.gemm_lowp(a, b, scale, torch.float32)
    assert out.shape == (m, n)
    exact = (a.double() @ b.double().T) * scale.double()  # int8: integers < 2^53; fp8: multiples of 2^-18
    _assert_within_fp32_sums(out, exact, (a.double().abs() @ b.double().abs().T) * scale.double(), k, precision)


def test_fp8_per_tensor_scale_runs_inside_scaled_mm():
    g = torch.Generator().manual_seed(1)
    a, b = _codes((8, 32), "fp8", g), _codes((16, 32), "fp8", g)
    scale = torch.tensor(0.37)
    with OpTrace() as trace:
        out = lowp.gemm_lowp(a, b, scale, torch.float32)
    assert trace.ops.count("_scaled_mm") == 1 and "mul" not in trace.ops  # no epilogue multiply
    exact, magnitude = (a.double() @ b.double().T) * 0.37, (a.double().abs() @ b.double().abs().T) * 0.37
    _assert_within_fp32_sums(out, exact, magnitude, 32, "fp8")


@pytest.mark.parametrize("precision", ["int8", "fp8"])
@pytest.mark.parametrize(
    "kernel,stride,padding,dilation",
    [((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((1, 1), (1, 1), (0, 0), (1, 1))],
)
def test_conv_matches_the_reference_conv(precision, kernel, stride, padding, dilation):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 9, 7, generator=g)
    wq = _codes((20, 12, *kernel), precision, g)
    dtype = DTYPES[precision]
    mult = torch.tensor(lowp.QMAX[dtype] / 3.0)
    scale = torch.rand(20, generator=g) * 1e-3 if precision == "int8" else torch.tensor(2e-3)
    bias = torch.randn(20, generator=g)
    out = lowp.conv2d_lowp(x, wq, mult, scale, bias, stride, padding, dilation)
    xq = lowp.quantize(x, mult, dtype)
    expected = conv2d_lowp_reference(
        xq, wq, scale.expand(20).contiguous(), bias, stride, padding, dilation, torch.float32
    )
    assert out.shape == expected.shape
    if precision == "int8":  # same integers, same epilogue
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    per_channel = scale.double().expand(20).reshape(1, -1, 1, 1)
    exact = F.conv2d(xq.double(), wq.double(), None, stride, padding, dilation) * per_channel
    magnitude = F.conv2d(xq.double().abs(), wq.double().abs(), None, stride, padding, dilation) * per_channel
    bias = bias.double().reshape(1, -1, 1, 1)
    _assert_within_fp32_sums(out, exact + bias, magnitude, 12 * kernel[0] * kernel[1], precision, bias.abs())


def _layers(precision, generator):
    dtype = DTYPES[precision]
    scale = torch.rand(24, generator=generator) * 1e-3 if precision == "int8" else torch.tensor(1e-3)
    linear = LowpLinear(
        _codes((24, 40), precision, generator), torch.rand(40, generator=generator) + 1, scale, torch.randn(24)
    )
    conv = LowpConv2d(
        _codes((24, 40, 3, 3), precision, generator),
        torch.tensor(lowp.QMAX[dtype] / 2.0),
        scale.clone(),
        None,
        (1, 1),
        (1, 1),
        (1, 1),
    )
    return linear, conv


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_layers_run_the_low_precision_gemm(precision):
    linear, conv = _layers(precision, torch.Generator().manual_seed(4))
    gemm = "_int_mm" if precision == "int8" else "_scaled_mm"
    with OpTrace() as trace, torch.no_grad():
        linear(torch.randn(2, 7, 40))
        conv(torch.randn(1, 40, 6, 6))
    assert trace.ops.count(gemm) == 2, trace.ops
    float_gemms = {"mm", "addmm", "bmm", "matmul", "convolution", "linear"} & set(trace.ops)
    assert not float_gemms, f"a float GEMM ran: {float_gemms}"


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_dtype_moves_keep_codes_and_scales(precision):
    linear, conv = _layers(precision, torch.Generator().manual_seed(5))
    model = torch.nn.Sequential(linear, conv)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.float16)
    for name, tensor in model.state_dict().items():
        if name.endswith("bias"):
            assert tensor.dtype == torch.float16
        else:  # codes and fp32 scales untouched, bit for bit
            assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    assert fixed_dtype_tensors(model) == {f"{i}.{t}" for i in "01" for t in ("qweight", "act_mult", "scale")}
    with torch.no_grad():
        out = linear(torch.randn(3, 40, dtype=torch.float16))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_fp8_layers_refuse_a_gpu_without_fp8(monkeypatch):
    from sdcompiler.errors import LoweringError
    from sdcompiler.passes.ptq_lowp import check_device

    fp8 = torch.nn.Sequential(*_layers("fp8", torch.Generator().manual_seed(6)))
    int8 = torch.nn.Sequential(*_layers("int8", torch.Generator().manual_seed(6)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100
    with pytest.raises(LoweringError, match="FP8 layers need a GPU of compute capability 8.9 .*this one: 8.0") as info:
        check_device(fp8, "cuda")
    assert "\n" not in str(info.value)
    check_device(int8, "cuda")  # int8 runs on any CUDA GPU
    check_device(fp8, "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100 / H200
    check_device(fp8, "cuda:0")
