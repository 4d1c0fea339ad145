"""W4A4 kernels (`sdcompiler.kernels.w4a4`): the pure-torch spec, the Triton kernels under the interpreter, the
ops, conv through the GEMM, FLOP counting and input validation.

Oracles: the integer accumulator and the activation codes exactly (torch.equal); dequantised outputs within
float rounding of the reference; the integer path against the fake-quant float path within rounding; SQNR vs
the float layer as a guard against a scheme error shared by both paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sdcompiler.kernels import w4a4

triton = pytest.importorskip("triton")  # noqa: F841  (every kernel test below launches Triton)

SMALL = w4a4.GemmBlocks(16, 32, 32)  # many tiles and K steps: exercises the masks and the grouped order


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_layer(n: int, k: int, w_bits: int, seed: int = 0, bias: bool = True):
    """Random float weight quantised with min/max ranges: (packed codes, scale, zero, bias, float weight)."""
    g = _gen(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    scale, zero = w4a4.minmax_weight_params(w, w_bits)
    packed = w4a4.pack_weight_codes(w4a4.quantize_weight(w, scale, zero, w_bits), w_bits)
    b = torch.randn(n, generator=g) if bias else None
    return packed, scale, zero, b, w


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, rel_atol: float = 1e-4) -> None:
    atol = rel_atol * expected.float().abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def _sqnr_db(approx: torch.Tensor, exact: torch.Tensor) -> float:
    noise = (approx.float() - exact.float()).pow(2).mean()
    return 10 * torch.log10(exact.float().pow(2).mean() / noise).item()


# --- weights --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [94, 33, 1])
def test_pack_unpack_round_trip(k):
    codes = torch.randint(0, 16, (7, k), generator=_gen(k), dtype=torch.uint8)
    packed = w4a4.pack_int4(codes)
    assert packed.shape == (7, (k + 1) // 2) and packed.dtype == torch.uint8
    assert torch.equal(w4a4.unpack_int4(packed, k), codes)
    assert torch.equal(packed[:, 0] & 15, codes[:, 0])  # low nibble = even k


def test_weight_quantization_round_trip():
    w = torch.randn(12, 40, generator=_gen(1))
    for bits in (4, 8):
        scale, zero = w4a4.minmax_weight_params(w, bits)
        codes = w4a4.quantize_weight(w, scale, zero, bits)
        assert int(codes.max()) <= 2**bits - 1 and int(zero.min()) >= 0 and int(zero.max()) <= 2**bits - 1
        w_hat = w4a4.dequantize_weight(codes, scale, zero)
        assert ((w_hat - w).abs() <= scale[:, None] / 2 + 1e-6).all()  # min/max range: only rounding error
        stored = w4a4.pack_weight_codes(codes, bits)
        assert torch.equal(w4a4.unpack_weight_codes(stored, bits, 40), codes)


# --- activation quantisation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_act_triton_matches_reference_exactly(bits, static, dtype):
    x = (3 * torch.randn(2, 19, 150, generator=_gen(bits))).to(dtype)
    x[0, 3] = 0.0  # a silent token: the per-token guard keeps its scale finite and its codes 0
    scale = torch.tensor(0.4) if static else None
    q, s = w4a4.quantize_act_triton(x, scale, bits)
    q_ref, s_ref = w4a4.quantize_act_reference(x, scale, bits)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.shape == (() if static else (2, 19))
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    qmax = 2 ** (bits - 1) - 1
    assert int(q.max()) <= qmax and int(q.min()) >= -qmax - 1
    if not static:
        assert int(q.abs().amax(-1).min()) == 0 and int(q[1].abs().amax(-1).min()) == qmax


# --- GEMM -----------------------------------------------------------------------------------------------------

SHAPES = [(37, 70, 94), (64, 48, 128), (5, 17, 33)]


@pytest.mark.parametrize("w_bits", [4, 8])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocks", [None, SMALL], ids=["auto", "small"])
def test_acc_exact(w_bits, shape, blocks):
    m, n, k = shape
    packed, _, zero, _, _ = make_layer(n, k, w_bits, seed=m)
    q, _ = w4a4.quantize_act_reference(torch.randn(m, k, generator=_gen(n)), None, 8)
    acc = w4a4.w4a4_acc_triton(q, packed, zero, w_bits, k, blocks)
    ref = w4a4.w4a4_acc_reference(q, packed, zero, w_bits, k)
    assert acc.dtype == torch.int32 and torch.equal(acc, ref)
    # the float64 reference is the integer product, in either form of the scheme
    codes = w4a4.unpack_weight_codes(packed, w_bits, k).long()
    assert torch.equal(ref.long(), q.long() @ (codes - zero.long()[:, None]).T)
    assert torch.equal(ref.long(), q.long() @ codes.T - q.long().sum(1, keepdim=True) * zero.long())


@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 4), (4, 8), (8, 8)])
@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("blocks", [None, SMALL], ids=["auto", "small"])
def test_gemm_matches_reference(a_bits, w_bits, static, blocks):
    m, n, k = SHAPES[0]
    packed, scale, zero, bias, _ = make_layer(n, k, w_bits)
    x = torch.randn(m, k, generator=_gen(2))
    q, s = w4a4.quantize_act_reference(x, torch.tensor(0.3) if static else None, a_bits)
    for out_dtype, b in ((torch.float32, bias), (torch.float16, None)):
        y = w4a4.w4a4_gemm_triton(q, s, packed, scale, zero, b, w_bits, k, out_dtype, blocks)
        ref = w4a4.w4a4_gemm_reference(q, s, packed, scale, zero, b, w_bits, k, out_dtype)
        assert y.dtype == out_dtype and y.shape == (m, n)
        if out_dtype == torch.float32:
            _close(y, ref)
        else:
            torch.testing.assert_close(y, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 4), (4, 8), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_float_input_equals_quantize_then_gemm(a_bits, w_bits, dtype):
    m, n, k = SHAPES[0]
    packed, scale, zero, bias, _ = make_layer(n, k, w_bits)
    x = torch.randn(m, k, generator=_gen(3)).to(dtype)
    s = torch.tensor(2.0 / 2 ** (a_bits - 1))
    for blocks in (None, SMALL):
        fused = w4a4.w4a4_linear_triton(x, packed, scale, zero, bias, s, a_bits, w_bits, k, blocks, fused=True)
        q, s_q = w4a4.quantize_act_triton(x, s, a_bits)
        two_pass = w4a4.w4a4_gemm_triton(q, s_q, packed, scale, zero, bias, w_bits, k, dtype, blocks)
        assert fused.dtype == dtype and torch.equal(fused, two_pass)


@pytest.mark.parametrize("a_bits,w_bits", [(4, 4), (8, 8)])
@pytest.mark.parametrize("static", [True, False])
def test_integer_path_equals_fake_quant(a_bits, w_bits, static):
    packed, scale, zero, bias, w = make_layer(70, 94, w_bits)
    x = torch.randn(3, 13, 94, generator=_gen(4))
    s = torch.tensor(3.0 / 2 ** (a_bits - 1)) if static else None
    fake = w4a4.fake_quant_linear(x, packed, scale, zero, bias, s, a_bits, w_bits, 94)
    ref = w4a4.w4a4_linear_reference(x, packed, scale, zero, bias, s, a_bits, w_bits, 94)
    tri = w4a4.w4a4_linear_triton(x, packed, scale, zero, bias, s, a_bits, w_bits, 94)
    assert ref.shape == tri.shape == (3, 13, 70)
    _close(ref, fake, rtol=1e-4)
    _close(tri, fake, rtol=1e-4)
    if a_bits == w_bits == 8:  # a scheme error shared by both paths would still wreck this
        assert _sqnr_db(ref, F.linear(x, w, bias)) > 30


# --- conv -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size,stride,padding", [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1)])
@pytest.mark.parametrize("static", [True, False])
def test_conv2d_matches_fake_quant_conv(kernel_size, stride, padding, static):
    c, n = 8, 12
    packed, scale, zero, bias, w = make_layer(n, c * kernel_size**2, 4, seed=kernel_size)
    x = torch.randn(2, c, 9, 9, generator=_gen(5))
    s = torch.tensor(0.5) if static else None
    kw = dict(a_bits=4, w_bits=4, kernel_size=kernel_size, stride=stride, padding=padding)
    y = w4a4.w4a4_conv2d(x, packed, scale, zero, bias, s, **kw)
    fake = w4a4.fake_quant_conv2d(x, packed, scale, zero, bias, s, **kw)
    float_conv = F.conv2d(x, w.reshape(n, c, kernel_size, kernel_size), bias, stride, padding)
    assert y.shape == fake.shape == float_conv.shape
    _close(y, fake, rtol=1e-4)
    assert _sqnr_db(y, float_conv) > 5  # 4-bit: coarse, but the right conv


# --- ops ------------------------------------------------------------------------------------------------------


def test_ops_dispatch(monkeypatch):
    packed, scale, zero, bias, _ = make_layer(70, 94, 4)
    x = torch.randn(37, 94, generator=_gen(6))
    args = (x, packed, scale, zero, bias, torch.tensor(0.4), 4, 4, 94)
    calls = []

    def spy(name):
        original = getattr(w4a4, name)

        def wrapped(*a, **kw):
            calls.append(name)
            return original(*a, **kw)

        monkeypatch.setattr(w4a4, name, wrapped)

    for name in ("w4a4_linear_triton", "w4a4_linear_reference", "quantize_act_triton", "quantize_act_reference"):
        spy(name)
    y_triton = w4a4.w4a4_linear(*args)  # the interpreter counts as a Triton device for CPU tensors
    w4a4.quantize_act(x, None, 4)
    assert calls == ["w4a4_linear_triton", "quantize_act_triton"]
    calls.clear()
    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
    y_ref = w4a4.w4a4_linear(*args)
    q, s = w4a4.quantize_act(x, None, 4)
    # the linear reference quantises x itself: the first quantize_act_reference call is its own
    assert calls == ["w4a4_linear_reference", "quantize_act_reference", "quantize_act_reference"]
    assert torch.equal(y_triton, y_ref) and s.shape == (37,)


def test_opcheck(monkeypatch):
    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")  # checks the op registration, not the kernel
    packed, scale, zero, bias, _ = make_layer(24, 33, 4)
    x = torch.randn(5, 33, generator=_gen(7))
    torch.library.opcheck(torch.ops.sdcompiler.w4a4_linear, (x, packed, scale, zero, bias, None, 4, 4, 33))
    torch.library.opcheck(torch.ops.sdcompiler.w4a4_linear, (x, packed, scale, zero, None, torch.tensor(0.5), 8, 4, 33))
    torch.library.opcheck(torch.ops.sdcompiler.quantize_act, (x, None, 4))
    torch.library.opcheck(torch.ops.sdcompiler.quantize_act, (x, torch.tensor(0.5), 8))


def test_flop_counting_on_meta():
    packed, scale, zero, bias, _ = make_layer(40, 96, 4)
    to_meta = [t.to("meta") for t in (packed, scale, zero, bias)]
    x = torch.randn(2, 64, 96, device="meta")
    with FlopCounterMode(display=False) as counter:
        y = w4a4.w4a4_linear(x, *to_meta, None, 4, 4, 96)
    assert y.shape == (2, 64, 40) and y.device.type == "meta"
    assert counter.get_total_flops() == 2 * 128 * 40 * 96

    packed, scale, zero, bias, _ = make_layer(16, 8 * 9, 4)
    x = torch.randn(2, 8, 10, 10, device="meta")
    with FlopCounterMode(display=False) as counter:
        y = w4a4.w4a4_conv2d(
            x,
            *[t.to("meta") for t in (packed, scale, zero, bias)],
            torch.tensor(0.5, device="meta"),
            a_bits=4,
            w_bits=4,
            kernel_size=3,
            stride=2,
            padding=1,
        )
    assert y.shape == (2, 16, 5, 5)
    assert counter.get_total_flops() == 2 * (2 * 25) * 16 * (8 * 9)


def test_input_validation():
    packed, scale, zero, bias, _ = make_layer(24, 33, 4)
    x = torch.randn(5, 33, generator=_gen(8))
    bad = [
        ((x, packed[:, :-1], scale, zero, bias, None, 4, 4, 33), "must have shape"),
        ((x, packed, scale, zero, bias, None, 3, 4, 33), "a_bits must be 4 or 8"),
        ((x, packed, scale, zero, bias, None, 4, 2, 33), "w_bits must be 4 or 8"),
        ((x, packed, scale, zero, bias, None, 4, 8, 33), "8-bit weight codes"),
        ((x, packed.to(torch.int8), scale, zero, bias, None, 4, 4, 33), "uint8"),
        ((x, packed, scale[:-1], zero, bias, None, 4, 4, 33), "w_scale and w_zero"),
        ((x, packed, scale, zero.float(), bias, None, 4, 4, 33), "integer tensor"),
        ((x[:, :32], packed, scale, zero, bias, None, 4, 4, 33), "x must be"),
        ((x, packed, scale, zero, bias, torch.ones(5), 4, 4, 33), "one static scale"),
    ]
    for fn in (w4a4.w4a4_linear, w4a4.w4a4_linear_reference):
        for args, match in bad:
            with pytest.raises(ValueError, match=match) as info:
                fn(*args)
            assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="4-bit codes must lie in"):
        w4a4.pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        w4a4.quantize_act(x, None, 2)
    q, _ = w4a4.quantize_act_reference(x, None, 4)
    with pytest.raises(ValueError, match="activation codes"):
        w4a4.w4a4_acc_triton(q[:, :32], packed, zero, 4, 33)
    with pytest.raises(ValueError, match="needs a static act_scale"):
        w4a4.w4a4_linear_triton(x, packed, scale, zero, bias, None, 4, 4, 33, fused=True)
