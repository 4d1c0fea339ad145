"""INT8 / FP8 layers (`sdcompiler.kernels.lowp`) on CUDA against the same functions on CPU (torch + Triton only).

The ptq pass's torch-target modules call `linear_lowp` / `conv2d_lowp`: on CUDA they run `torch._int_mm`,
`torch._scaled_mm` (compute capability >= 8.9) and the Triton implicit-GEMM conv, on CPU the same torch ops and
im2col. The codes are the same on both (the quantization is elementwise fp32), so INT8 sums are exact integers
and the outputs agree to fp32 rounding of the epilogue; FP8 sums are fp32 in another order: SQNR > 60 dB. Ragged
shapes (M <= 16, K and N not multiples of 16) exercise the padding the CUDA ops need.
"""

from __future__ import annotations

import pytest
import torch

from sdcompiler.kernels.lowp import FP8, INT8, QMAX, conv2d_lowp, linear_lowp

DTYPES = {"int8": INT8, "fp8": FP8}


def needs(dtype: torch.dtype) -> None:
    if dtype == FP8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm with float8_e4m3fn needs compute capability >= 8.9")


def sqnr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    noise = (estimate.double() - reference.double()).pow(2).sum()
    return float("inf") if noise == 0 else (10 * torch.log10(reference.double().pow(2).sum() / noise)).item()


def layer(weight: torch.Tensor, dtype: torch.dtype, per_channel: bool, x_amax: float):
    """Codes, activation multiplier and output scale as the ptq modules hold them."""
    flat = weight.reshape(weight.shape[0], -1)
    w_amax = flat.abs().amax(dim=1) if per_channel else flat.abs().amax()
    w_step = w_amax / QMAX[dtype]
    shape = (-1,) + (1,) * (weight.dim() - 1)
    scaled = weight / (w_step.reshape(shape) if per_channel else w_step)
    wq = torch.round(scaled).clamp(-128, 127).to(INT8) if dtype == INT8 else scaled.clamp(-448, 448).to(FP8)
    x_step = torch.tensor(x_amax / QMAX[dtype])
    return wq, 1 / x_step, (x_step * w_step).float()


def compare(dtype: torch.dtype, cuda_out: torch.Tensor, cpu_out: torch.Tensor) -> None:
    cuda_out = cuda_out.float().cpu()
    if dtype == INT8:
        torch.testing.assert_close(cuda_out, cpu_out.float(), rtol=1e-5, atol=1e-5)
    else:
        assert sqnr_db(cpu_out, cuda_out) > 60


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("m,k,n", [(5, 40, 24), (77, 64, 48), (300, 320, 1280)], ids=["ragged", "tokens", "ffn"])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_linear_cuda_matches_cpu(name, m, k, n, per_channel):
    dtype = DTYPES[name]
    needs(dtype)
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5, torch.randn(n, generator=g)
    wq, mult, scale = layer(w, dtype, per_channel, x.abs().max().item())
    cpu = linear_lowp(x, wq, mult, scale, bias)
    cuda = linear_lowp(x.cuda(), wq.cuda(), mult.cuda(), scale.cuda(), bias.cuda())
    assert cuda.shape == cpu.shape and cuda.dtype == cpu.dtype
    compare(dtype, cuda, cpu)


@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize(
    "shape,stride,padding", [((2, 20, 9, 11), 1, 1), ((1, 32, 16, 16), 2, 1), ((2, 24, 8, 8), 1, 0)]
)
def test_conv_cuda_matches_cpu(name, shape, stride, padding):
    dtype = DTYPES[name]
    needs(dtype)
    g = torch.Generator().manual_seed(1)
    kernel = 3 if padding else 1
    x = torch.randn(*shape, generator=g)
    w = torch.randn(40, shape[1], kernel, kernel, generator=g) / (shape[1] * kernel**2) ** 0.5
    bias = torch.randn(40, generator=g)
    wq, mult, scale = layer(w, dtype, dtype == INT8, x.abs().max().item())
    args = ((stride, stride), (padding, padding), (1, 1))
    cpu = conv2d_lowp(x, wq, mult, scale, bias, *args)
    cuda = conv2d_lowp(x.cuda(), wq.cuda(), mult.cuda(), scale.cuda(), bias.cuda(), *args)
    assert cuda.shape == cpu.shape
    compare(dtype, cuda, cpu)


@pytest.mark.parametrize("name", DTYPES)
def test_fp16_activations(name):
    """The deployed dtype: fp16 activations on CUDA stay close to the fp32 CPU reference (SQNR > 35 dB)."""
    dtype = DTYPES[name]
    needs(dtype)
    g = torch.Generator().manual_seed(2)
    x, w, bias = torch.randn(64, 320, generator=g), torch.randn(640, 320, generator=g) / 320**0.5, torch.zeros(640)
    wq, mult, scale = layer(w, dtype, dtype == INT8, x.abs().max().item())
    cpu = linear_lowp(x, wq, mult, scale, bias)
    cuda = linear_lowp(x.cuda().half(), wq.cuda(), mult.cuda(), scale.cuda(), bias.cuda())
    assert cuda.dtype == torch.float16
    assert sqnr_db(cpu, cuda.float().cpu()) > 35
