"""W4A4 Triton kernels on a real GPU at SD U-Net shapes (torch + Triton + sdcompiler.kernels only).

Shapes are tokens x in -> out of SD1.5 layers at 512x512 (CFG batch 2 would double M): attention projections
4096x320->320, 1024x640->640, 256x1280->1280, and the stage-1 FFN, 4096x320->2560 (GEGLU proj is 2*4*320 = 2560
wide) and 4096x1280->320 (its down projection). The references run on the GPU too: the integer accumulator in
float64 (exact for integers below 2^53), the epilogue in fp32.
"""

from __future__ import annotations

import pytest
import torch

from sdcompiler.kernels import w4a4

SHAPES = [(4096, 320, 320), (1024, 640, 640), (256, 1280, 1280), (4096, 320, 2560), (4096, 1280, 320)]
IDS = [f"{m}x{k}->{n}" for m, k, n in SHAPES]


def make_layer(n, k, w_bits, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, generator=g, device="cuda") / k**0.5
    scale, zero = w4a4.minmax_weight_params(w, w_bits)
    packed = w4a4.pack_weight_codes(w4a4.quantize_weight(w, scale, zero, w_bits), w_bits)
    return packed, scale, zero, torch.randn(n, generator=g, device="cuda").half(), w


def make_x(m, k, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (2 * torch.randn(m, k, generator=g, device="cuda")).half()


@pytest.mark.parametrize("m,k,n", SHAPES, ids=IDS)
@pytest.mark.parametrize("w_bits", [4, 8])
def test_acc_exact(m, k, n, w_bits):
    packed, _, zero, _, _ = make_layer(n, k, w_bits)
    q, _ = w4a4.quantize_act_reference(make_x(m, k), None, 4)
    acc = w4a4.w4a4_acc_triton(q, packed, zero, w_bits, k)
    assert torch.equal(acc, w4a4.w4a4_acc_reference(q, packed, zero, w_bits, k))


@pytest.mark.parametrize("m,k,n", SHAPES, ids=IDS)
@pytest.mark.parametrize("static", [True, False])
def test_linear_fp16(m, k, n, static):
    packed, scale, zero, bias, _ = make_layer(n, k, 4)
    x = make_x(m, k)
    s = torch.tensor(0.9, device="cuda") if static else None
    # the activation codes are bit-exact on the GPU too (IEEE div_rn, no FMA contraction)
    q, s_q = w4a4.quantize_act_triton(x, s, 4)
    q_ref, s_ref = w4a4.quantize_act_reference(x, s, 4)
    assert torch.equal(q, q_ref) and torch.equal(s_q, s_ref)
    y = w4a4.w4a4_linear_triton(x, packed, scale, zero, bias, s, 4, 4, k)
    ref = w4a4.w4a4_linear_reference(x, packed, scale, zero, bias, s, 4, 4, k)
    assert y.dtype == torch.float16 and y.shape == (m, n)
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    if static:  # the fused float-input kernel against quantise-then-GEMM
        fused = w4a4.w4a4_linear_triton(x, packed, scale, zero, bias, s, 4, 4, k, fused=True)
        two_pass = w4a4.w4a4_gemm_triton(q, s_q, packed, scale, zero, bias, 4, k, torch.float16)
        assert torch.equal(fused, two_pass) and torch.equal(y, two_pass)


def test_w8a8_and_fake_quant():
    m, k, n = SHAPES[3]
    packed, scale, zero, bias, w = make_layer(n, k, 8)
    x = make_x(m, k)
    y = w4a4.w4a4_linear_triton(x, packed, scale, zero, bias, None, 8, 8, k)
    fake = w4a4.fake_quant_linear(x, packed, scale, zero, bias, None, 8, 8, k)
    torch.testing.assert_close(y.float(), fake.float(), rtol=1e-3, atol=1e-3 * fake.abs().max().item())
    exact = torch.nn.functional.linear(x.float(), w, bias.float())
    sqnr = 10 * torch.log10(exact.pow(2).mean() / (y.float() - exact).pow(2).mean())
    assert sqnr > 30


def test_conv3x3(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the fp32 reference conv, not TF32
    c, n = 320, 320
    packed, scale, zero, bias, _ = make_layer(n, c * 9, 4)
    x = torch.randn(2, c, 32, 32, device="cuda").half()
    for stride in (1, 2):
        kw = dict(a_bits=4, w_bits=4, kernel_size=3, stride=stride, padding=1)
        y = w4a4.w4a4_conv2d(x, packed, scale, zero, bias, torch.tensor(0.5, device="cuda"), **kw)
        fake = w4a4.fake_quant_conv2d(x, packed, scale, zero, bias, torch.tensor(0.5, device="cuda"), **kw)
        torch.testing.assert_close(y.float(), fake.float(), rtol=1e-3, atol=1e-3 * fake.abs().max().item())


def test_op_dispatches_to_triton(monkeypatch):
    m, k, n = SHAPES[0]
    packed, scale, zero, bias, _ = make_layer(n, k, 4)
    x = make_x(m, k)
    expected = w4a4.w4a4_linear_reference(x, packed, scale, zero, bias, None, 4, 4, k)

    def forbidden(*args, **kwargs):
        raise AssertionError("the op fell back to the reference on CUDA")

    monkeypatch.setattr(w4a4, "w4a4_linear_reference", forbidden)
    monkeypatch.setattr(w4a4, "quantize_act_reference", forbidden)
    y = w4a4.w4a4_linear(x, packed, scale, zero, bias, None, 4, 4, k)
    q, _ = w4a4.quantize_act(x, None, 4)
    assert q.dtype == torch.int8
    torch.testing.assert_close(y, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
