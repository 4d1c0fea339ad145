"""GRI attention Triton kernel on CUDA at Stable Diffusion shapes, against the reference computed in fp32.

python -m pytest tests/gpu/test_gri_gpu.py --confcutdir=tests/gpu -q
"""

from __future__ import annotations

import pytest
import torch

import sdcompiler.kernels.gri_attention as gri_module
from sdcompiler.kernels.gri_attention import gri_attention, gri_attention_reference, gri_attention_triton

pytest.importorskip("triton")

# (batch, heads, height, width, window, num_global, head_dim)
SD_SHAPES = [
    (2, 8, 64, 64, 16, 16, 40),  # SD1.5 level 1 at 512 px (320 channels), cfg batch
    (2, 8, 32, 32, 8, 16, 64),
    (2, 8, 60, 60, 16, 16, 40),  # ragged edge tiles (60 = 3 * 16 + 12)
    (2, 8, 32, 32, 16, 16, 80),  # SD1.5 level 2 (640 channels)
    (2, 8, 16, 16, 8, 16, 160),  # SD1.5 level 3 (1280 channels)
    (2, 10, 64, 64, 16, 0, 64),  # SDXL-like level 1, no global tokens
]
ATOL = {torch.float16: 2e-2, torch.bfloat16: 4e-2}  # bf16 keeps 8 mantissa bits to fp16's 11


def make_inputs(batch, heads, height, width, num_global, head_dim, dtype, *, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shapes = [(batch, heads, height * width, head_dim)] * 3 + [(batch, heads, num_global, head_dim)] * 2
    return [torch.randn(s, generator=gen, device="cuda").to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SD_SHAPES, ids=lambda s: "B{}h{}_{}x{}_w{}_G{}_d{}".format(*s))
def test_triton_matches_fp32_reference(shape, dtype):
    batch, heads, height, width, window, num_global, head_dim = shape
    inputs = make_inputs(batch, heads, height, width, num_global, head_dim, dtype)
    out = gri_attention_triton(*inputs, height, width, window)
    expected = gri_attention_reference(*[t.float() for t in inputs], height, width, window)
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, atol=ATOL[dtype], rtol=0)


def test_triton_fp32_non_contiguous_ragged():
    batch, heads, height, width, window, num_global, head_dim = 1, 4, 30, 22, 8, 5, 40
    gen = torch.Generator(device="cuda").manual_seed(1)
    n = height * width
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=gen, device="cuda").transpose(1, 2) for _ in range(3))
    k_global, v_global = (
        torch.randn(batch, num_global, heads, head_dim, generator=gen, device="cuda").transpose(1, 2) for _ in range(2)
    )
    out = gri_attention_triton(q, k, v, k_global, v_global, height, width, window)
    expected = gri_attention_reference(q, k, v, k_global, v_global, height, width, window)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)  # fp32 inputs: full-precision dots


def test_op_dispatches_to_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("SDCOMPILER_DISABLE_TRITON", raising=False)
    inputs = make_inputs(2, 8, 64, 64, 16, 40, torch.float16)
    launched = []

    def spy(*args):
        launched.append(args)
        return gri_attention_triton(*args)

    monkeypatch.setattr(gri_module, "gri_attention_triton", spy)
    out = gri_attention(*inputs, 64, 64, 16)
    assert len(launched) == 1
    assert torch.equal(out, gri_attention_triton(*inputs, 64, 64, 16))
