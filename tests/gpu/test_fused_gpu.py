"""Fused GroupNorm+SiLU and GEGLU Triton kernels on CUDA, at SD / SDXL U-Net shapes, against fp32 references.

Needs only torch, Triton and `sdcompiler.kernels` (no diffusers: the lowering is tested on CPU in
tests/unit/test_kernels_fused.py). Run: python -m pytest tests/gpu --confcutdir=tests/gpu -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdcompiler.kernels import geglu as geglu_module
from sdcompiler.kernels import groupnorm_silu as gn_module
from sdcompiler.kernels.geglu import geglu, geglu_reference
from sdcompiler.kernels.groupnorm_silu import group_norm_silu

# Output rounding dominates in half precision (the reference is computed in fp32 from the same rounded inputs).
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DTYPES = list(TOLERANCE)


def _gn_inputs(shape, dtype, channels_last, *, mean=1.0, std=2.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=g, device="cuda") * std + mean
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(shape[1], generator=g, device="cuda") + 1.0
    bias = torch.randn(shape[1], generator=g, device="cuda")
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def _check_group_norm_silu(x, weight, bias, groups=32, apply_silu=True, tolerance=None):
    got = group_norm_silu(x, groups, weight, bias, 1e-5, apply_silu)
    expected = F.group_norm(x.float(), groups, weight.float(), bias.float(), 1e-5)
    if apply_silu:
        expected = F.silu(expected)
    assert got.dtype == x.dtype and got.shape == x.shape and got.stride() == x.stride()
    tolerance = tolerance or TOLERANCE[x.dtype]
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "shape",
    [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 960, 64, 64)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_group_norm_silu_sd_shapes(dtype, shape, channels_last):
    _check_group_norm_silu(*_gn_inputs(shape, dtype, channels_last))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_norm_silu_sdxl_1024_latent(channels_last):
    _check_group_norm_silu(*_gn_inputs((2, 320, 128, 128), torch.float16, channels_last))


@pytest.mark.parametrize(
    "shape", [(2, 320, 6, 5), (1, 640, 8, 8), (2, 320, 30), (3, 96, 7, 9)], ids=lambda s: "x".join(map(str, s))
)
def test_group_norm_silu_odd_shapes(shape):
    _check_group_norm_silu(*_gn_inputs(shape, torch.float16, False), apply_silu=len(shape) == 4)


def test_group_norm_silu_off_centre_fp32():
    """|mean| = 30 std: the shifted partial sums must not lose the variance to cancellation."""
    x, weight, bias = _gn_inputs((2, 640, 32, 32), torch.float32, True, mean=30.0, std=1.0)
    _check_group_norm_silu(x, weight, bias, tolerance=2e-4)


@pytest.mark.parametrize(
    "shape", [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 77, 2 * 40)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_geglu_sd_shapes(dtype, shape):
    h = (torch.randn(shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda") * 2).to(dtype)
    got = geglu(h)
    assert got.dtype == dtype and got.shape == (*shape[:-1], shape[-1] // 2)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), geglu_reference(h.float()), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("disabled", [False, True], ids=["triton", "disabled"])
def test_ops_dispatch_to_triton_on_cuda(monkeypatch, disabled):
    if disabled:
        monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
    calls = []
    for module, name in ((gn_module, "group_norm_silu_triton"), (geglu_module, "geglu_triton")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    _check_group_norm_silu(*_gn_inputs((2, 320, 16, 16), torch.float16, False))
    geglu(torch.randn(2, 16, 80, device="cuda", dtype=torch.float16))
    assert calls == ([] if disabled else ["group_norm_silu_triton", "geglu_triton"])
