"""GRI attention (`sdcompiler.kernels.gri_attention`): reference vs a dense N x N oracle, Triton kernel vs
reference (under TRITON_INTERPRET=1 on CPU: small shapes), op dispatch, FLOP counting on meta, dynamic-size
ONNX export of the reference, argument errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sdcompiler.kernels import gri_attention as gri_module
from sdcompiler.kernels.gri_attention import gri_attention, gri_attention_reference, gri_attention_sdpa, gri_macs


def make_inputs(batch, heads, height, width, num_global, head_dim, *, seed=0):
    """Random q, k, v (B, heads, N, d) and global k, v (B, heads, G, d), fp32."""
    gen = torch.Generator().manual_seed(seed)
    n = height * width
    local = [torch.randn(batch, heads, n, head_dim, generator=gen) for _ in range(3)]
    glob = [torch.randn(batch, heads, num_global, head_dim, generator=gen) for _ in range(2)]
    return (*local, *glob)


def dense_gri(q, k, v, k_global, v_global, height, width, window):
    """The definition, spelled out as one N x (N + G) masked attention (tile ids of every token)."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    tile = (rows // window) * width + cols // window  # unique per tile (width >= tiles per row)
    same_tile = tile[:, None] == tile[None, :]
    mask = torch.cat([same_tile, torch.ones(height * width, k_global.shape[2], dtype=torch.bool)], dim=1)
    return F.scaled_dot_product_attention(q, torch.cat([k, k_global], 2), torch.cat([v, v_global], 2), attn_mask=mask)


# (batch, heads, height, width, window, num_global, head_dim): ragged edges on both axes, G = 0 and G > 0,
# non-power-of-two head dims up to SD's 160, a window larger than the map, several global-key chunks (37 > 16)
# and a 144-token tile (two query blocks of 128, three key chunks of 64).
CASES = [
    (1, 2, 7, 10, 4, 3, 40),
    (2, 1, 8, 8, 4, 0, 64),
    (1, 1, 5, 6, 16, 20, 16),
    (1, 1, 9, 3, 2, 1, 24),
    (1, 1, 4, 5, 4, 2, 160),
    (1, 2, 6, 6, 3, 37, 32),
    (1, 1, 13, 13, 12, 5, 16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}h{}_{}x{}_w{}_G{}_d{}".format(*c))
def test_reference_matches_dense_definition(case):
    batch, heads, height, width, window, num_global, head_dim = case
    inputs = make_inputs(batch, heads, height, width, num_global, head_dim)
    out = gri_attention_reference(*inputs, height, width, window)
    expected = dense_gri(*inputs, height, width, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}h{}_{}x{}_w{}_G{}_d{}".format(*c))
def test_triton_matches_reference(case):
    pytest.importorskip("triton")
    batch, heads, height, width, window, num_global, head_dim = case
    inputs = make_inputs(batch, heads, height, width, num_global, head_dim)
    out = gri_module.gri_attention_triton(*inputs, height, width, window)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, gri_attention_reference(*inputs, height, width, window), atol=1e-5, rtol=1e-5)


def test_triton_non_contiguous_inputs_and_scale():
    pytest.importorskip("triton")
    batch, heads, height, width, window, num_global, head_dim = 1, 2, 6, 7, 4, 5, 40
    gen = torch.Generator().manual_seed(1)
    n = height * width
    # Attention layers produce (B, N, heads, d) and view it as (B, heads, N, d): strided, not contiguous.
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=gen).transpose(1, 2) for _ in range(3))
    k_global, v_global = (
        torch.randn(batch, num_global, heads, head_dim, generator=gen).transpose(1, 2) for _ in range(2)
    )
    assert not q.is_contiguous() and not k_global.is_contiguous()
    out = gri_module.gri_attention_triton(q, k, v, k_global, v_global, height, width, window, 0.3)
    expected = gri_attention_reference(q, k, v, k_global, v_global, height, width, window, 0.3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [5, 100])
def test_window_covering_the_map_is_full_attention(window):
    height, width = 5, 4
    q, k, v, k_global, v_global = make_inputs(1, 2, height, width, 0, 40)
    full = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(
        gri_attention_reference(q, k, v, k_global, v_global, height, width, window), full, atol=1e-5, rtol=1e-5
    )
    pytest.importorskip("triton")
    torch.testing.assert_close(
        gri_module.gri_attention_triton(q, k, v, k_global, v_global, height, width, window), full, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}h{}_{}x{}_w{}_G{}_d{}".format(*c))
def test_sdpa_path_matches_reference(case):
    batch, heads, height, width, window, num_global, head_dim = case
    inputs = make_inputs(batch, heads, height, width, num_global, head_dim, seed=5)
    torch.testing.assert_close(
        gri_attention_sdpa(*inputs, height, width, window),
        gri_attention_reference(*inputs, height, width, window),
        atol=1e-5,
        rtol=1e-5,
    )


def test_op_dispatch_on_cpu(monkeypatch):
    inputs = make_inputs(1, 1, 4, 4, 2, 16)
    launched = []

    def spy(*args):
        launched.append(args)
        return gri_attention_reference(*args)

    monkeypatch.setattr(gri_module, "gri_attention_triton", spy)
    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
    out = gri_attention(*inputs, 4, 4, 2)
    assert not launched
    assert torch.equal(out, gri_attention_sdpa(*inputs, 4, 4, 2))
    monkeypatch.delenv("SDCOMPILER_DISABLE_TRITON")
    gri_attention(*inputs, 4, 4, 2)
    # CPU tensors reach the kernel only under the interpreter (this suite sets TRITON_INTERPRET=1 without CUDA).
    assert bool(launched) == gri_module.use_triton(*inputs)


def test_gradients_flow_through_gri_attention_for_training():
    """Training through GRI (`["gri", "distill"]`): with autograd recording, the op gives the dense definition's
    gradients (the differentiable SDPA path runs; the Triton kernel and the custom op have no backward)."""
    height, width, window = 7, 10, 4
    inputs = [t.requires_grad_() for t in make_inputs(1, 2, height, width, 3, 40, seed=3)]
    grad = torch.randn(1, 2, height * width, 40, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(gri_attention(*inputs, height, width, window), inputs, grad)
    expected = torch.autograd.grad(dense_gri(*inputs, height, width, window), inputs, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference still runs the op
        assert gri_attention(*inputs, height, width, window).grad_fn is None


def test_flop_count_on_meta_default_like_case():
    batch, heads, height, width, window, num_global, head_dim = 2, 8, 64, 64, 16, 16, 40
    q = torch.empty(batch, heads, height * width, head_dim, device="meta")
    g = torch.empty(batch, heads, num_global, head_dim, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = gri_attention(q, q, q, g, g, height, width, window)
    assert out.shape == q.shape and out.device.type == "meta"
    # Per query: 16 * 16 tile keys + 16 global keys = 272; 4096 queries; 2 matmuls of 2 FLOPs per MAC.
    expected = 2 * 2 * batch * heads * head_dim * (height * width) * (window * window + num_global)
    assert expected == 2_852_126_720
    assert gri_macs(batch, heads, height, width, window, num_global, head_dim) * 2 == expected
    assert counter.get_total_flops() == expected
    with FlopCounterMode(display=False) as full_counter:
        F.scaled_dot_product_attention(q, q, q)
    assert full_counter.get_total_flops() == 42_949_672_960
    assert counter.get_total_flops() < full_counter.get_total_flops()


@pytest.mark.parametrize("height,width,window,num_global", [(7, 10, 4, 3), (5, 5, 2, 0), (3, 8, 10, 1)])
def test_gri_macs_exact_for_ragged_tiles(height, width, window, num_global):
    keys = 0
    for r in range(height):  # brute force: each query's tile extent
        for c in range(width):
            tile_h = min(window, height - r // window * window)
            tile_w = min(window, width - c // window * window)
            keys += tile_h * tile_w + num_global
    assert gri_macs(2, 3, height, width, window, num_global, 40) == 2 * 2 * 3 * 40 * keys


def test_gri_macs_full_window_is_full_attention():
    assert gri_macs(2, 8, 12, 9, 12, 0, 64) == 2 * 2 * 8 * 64 * (12 * 9) ** 2


class TinyGRIBlock(nn.Module):
    """q, k, v projected from a (B, C, H, W) map; global tokens from 4 x 4 average pooling (G varies with H, W)."""

    def __init__(self, channels=8, heads=2, window=4):
        super().__init__()
        self.heads, self.head_dim, self.window = heads, channels // heads, window
        self.qkv = nn.Linear(channels, 3 * channels)
        self.kv_global = nn.Linear(channels, 2 * channels)

    def forward(self, x):
        batch, height, width = x.shape[0], x.shape[2], x.shape[3]
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).reshape(batch, -1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        pooled = F.avg_pool2d(x, 4).flatten(2).transpose(1, 2)
        k_global, v_global = (
            self.kv_global(pooled).reshape(batch, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        return gri_attention_reference(q, k, v, k_global, v_global, height, width, self.window)


def test_reference_exports_to_onnx_with_dynamic_map_size(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    block = TinyGRIBlock().eval()
    path = tmp_path / "gri.onnx"
    with warnings.catch_warnings():
        # A TracerWarning means some size was frozen to the 10 x 10 example: make it fail here, not at 7 x 13.
        warnings.simplefilter("error", torch.jit.TracerWarning)
        torch.onnx.export(
            block,
            (torch.randn(1, 8, 10, 10),),
            str(path),
            dynamo=False,
            opset_version=18,
            input_names=["x"],
            output_names=["out"],
            dynamic_axes={"x": {2: "height", 3: "width"}, "out": {2: "tokens"}},
        )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for height, width in [(16, 16), (7, 13)]:
        x = torch.randn(1, 8, height, width)
        (out,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            expected = block(x)
        assert out.shape == tuple(expected.shape)
        torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-4, rtol=0)


def test_bad_arguments_raise_value_error():
    inputs = make_inputs(1, 1, 4, 4, 2, 16)
    with pytest.raises(ValueError, match="window must be >= 1"):
        gri_attention_reference(*inputs, 4, 4, 0)
    with pytest.raises(ValueError, match="height x width"):
        gri_attention_reference(*inputs, 4, 5, 2)
    with pytest.raises(ValueError, match="height x width"):
        gri_attention(*inputs, 3, 4, 2)
    with pytest.raises(ValueError, match="window must be >= 1"):
        gri_macs(1, 1, 4, 4, 0, 0, 16)
    meta = [t.to("meta") for t in inputs]
    with pytest.raises(ValueError, match="height x width"):
        gri_attention(*meta, 2, 4, 2)
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="window must be >= 1"):
        gri_module.gri_attention_triton(*inputs, 4, 4, 0)
