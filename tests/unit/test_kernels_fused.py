"""Fused GroupNorm+SiLU and GEGLU kernels (Triton under the CPU interpreter vs the pure-torch references), their
ops (dispatch, fake, FLOPs, gradients), and the lowering of diffusers modules onto them.

conftest sets TRITON_INTERPRET=1 on machines without CUDA, so in this session `use_triton` is true for CPU
tensors: the ops run their Triton kernels unless a test sets SDCOMPILER_DISABLE_TRITON=1.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sdcompiler.kernels import geglu as geglu_module
from sdcompiler.kernels import groupnorm_silu as gn_module
from sdcompiler.kernels._common import interpreting
from sdcompiler.kernels.geglu import geglu, geglu_reference, geglu_triton
from sdcompiler.kernels.groupnorm_silu import group_norm_silu, group_norm_silu_reference, group_norm_silu_triton
from sdcompiler.kernels.lowering import KINDS, FusedGEGLU, FusedResnetBlock2D, lower_unet, unlower_unet
from sdcompiler.passes.accounting import count_macs, unet_example_inputs

needs_interpreter = pytest.mark.skipif(
    not interpreting(), reason="Triton runs on CPU tensors only under TRITON_INTERPRET=1"
)


@pytest.fixture
def triton():
    return pytest.importorskip("triton")


@pytest.fixture
def reference_only(monkeypatch):
    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")


def _gn_inputs(batch, channels, spatial, layout, *, seed=0, mean=1.5, std=2.0, dtype=torch.float32):
    """Random x (never zeros, off-centre), weight and bias; `layout` is "nchw", "nhwc" (channels_last) or "ncl"."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, generator=g) * std + mean
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(channels, generator=g) + 1.0
    bias = torch.randn(channels, generator=g)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def _layout_cases():
    for per_group in (10, 8):
        for spatial in ((6, 5), (4, 4)):
            for layout in ("nchw", "nhwc"):
                yield per_group, spatial, layout
        yield per_group, (30,), "ncl"


# --- GroupNorm + SiLU -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("apply_silu", [True, False], ids=["silu", "norm"])
@pytest.mark.parametrize("per_group,spatial,layout", list(_layout_cases()))
def test_group_norm_silu_triton_matches_reference(triton, per_group, spatial, layout, apply_silu):
    groups = 3
    x, weight, bias = _gn_inputs(2, groups * per_group, spatial, layout)
    expected = F.group_norm(x, groups, weight, bias, 1e-5)
    if apply_silu:
        expected = F.silu(expected)
    got = group_norm_silu_triton(x, groups, weight, bias, 1e-5, apply_silu)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.stride() == x.stride()  # same memory format as the input
    torch.testing.assert_close(group_norm_silu_reference(x, groups, weight, bias, 1e-5, apply_silu), expected)


# Masked lanes (loaded as 0) normalize to large values whose sigmoid overflows numpy's exp; they are not stored.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_group_norm_silu_triton_split_tiles(triton, monkeypatch, layout):
    """Tiny tiles and one program per tile: several chunks per group (the last one ragged), several channel
    blocks, and the cross-chunk merge of statistics; an off-centre input (|mean| = 40 std) checks the shifted
    sums do not cancel."""
    monkeypatch.setattr(gn_module, "_INTERPRETER_TILE", 16)
    monkeypatch.setattr(gn_module, "_INTERPRETER_PROGRAMS", 10**6)
    x, weight, bias = _gn_inputs(2, 20, (6, 5), layout, mean=20.0, std=0.5)
    tiling = gn_module._tiling(2 * 2, 10, 30, layout == "nhwc", 16, 10**6)
    assert tiling.num_chunks > 1
    got = group_norm_silu_triton(x, 2, weight, bias, 1e-6)
    expected = F.silu(F.group_norm(x.double(), 2, weight.double(), bias.double(), 1e-6)).float()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_group_norm_silu_triton_half_precision(triton, dtype):
    x, weight, bias = _gn_inputs(2, 20, (6, 5), "nhwc", dtype=dtype)
    got = group_norm_silu_triton(x, 2, weight, bias, 1e-5)
    assert got.dtype == dtype
    expected = F.silu(F.group_norm(x.float(), 2, weight.float(), bias.float(), 1e-5))
    tolerance = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)


def test_group_norm_silu_rejects_bad_groups():
    x, weight, bias = _gn_inputs(1, 20, (4, 4), "nchw")
    with pytest.raises(ValueError, match="do not split"):
        group_norm_silu_reference(x, 3, weight, bias)


# --- GEGLU ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 7, 80), (5, 64), (2, 3, 5, 48)], ids=["3d-inner40", "2d", "4d"])
def test_geglu_triton_matches_reference(triton, shape):
    h = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    hidden, gate = h.chunk(2, dim=-1)
    expected = hidden * F.gelu(gate)
    got = geglu_triton(h)
    assert got.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(geglu_reference(h), expected)


def test_geglu_triton_split_tiles(triton, monkeypatch):
    """Column blocks narrower than `inner` (the last one ragged) and several row blocks, as on a GPU."""
    monkeypatch.setattr(geglu_module, "_INTERPRETER_TILE", 64)
    monkeypatch.setattr(geglu_module, "_INTERPRETER_BLOCK_I", 16)
    h = torch.randn(3, 7, 80, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(geglu_triton(h), geglu_reference(h), atol=1e-5, rtol=1e-5)


def test_geglu_rejects_odd_last_dim():
    with pytest.raises(ValueError, match="even last dimension"):
        geglu_reference(torch.randn(2, 5))


# --- the ops ----------------------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_ops_dispatch_to_reference_when_triton_disabled(monkeypatch, reference_only):
    gn_triton = _spy(monkeypatch, gn_module, "group_norm_silu_triton")
    gn_reference = _spy(monkeypatch, gn_module, "group_norm_silu_reference")
    geglu_triton_calls = _spy(monkeypatch, geglu_module, "geglu_triton")
    geglu_reference_calls = _spy(monkeypatch, geglu_module, "geglu_reference")
    x, weight, bias = _gn_inputs(2, 20, (6, 5), "nhwc")
    y = group_norm_silu(x, 2, weight, bias, 1e-5)
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 2, weight, bias, 1e-5)))
    assert y.is_contiguous(memory_format=torch.channels_last)
    h = torch.randn(2, 3, 80)
    torch.testing.assert_close(geglu(h), geglu_reference(h))
    assert (gn_triton, gn_reference, geglu_triton_calls, geglu_reference_calls) == (
        [],
        ["group_norm_silu_reference"],
        [],
        ["geglu_reference"],
    )


@needs_interpreter
def test_ops_dispatch_to_triton_under_interpreter(triton, monkeypatch):
    gn_triton = _spy(monkeypatch, gn_module, "group_norm_silu_triton")
    geglu_triton_calls = _spy(monkeypatch, geglu_module, "geglu_triton")
    x, weight, bias = _gn_inputs(1, 20, (4, 4), "nchw")
    group_norm_silu(x, 2, weight, bias)
    geglu(torch.randn(2, 3, 80))
    assert (gn_triton, geglu_triton_calls) == (["group_norm_silu_triton"], ["geglu_triton"])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_fake_impls_on_meta_and_zero_flops(layout):
    x, weight, bias = (t.to("meta") for t in _gn_inputs(2, 20, (6, 5), layout))
    h = torch.empty(2, 7, 80, device="meta")
    with FlopCounterMode(display=False) as counter:
        y = group_norm_silu(x, 2, weight, bias, 1e-5)
        z = geglu(h)
    assert (y.shape, y.stride(), y.device.type) == (x.shape, x.stride(), "meta")
    assert (z.shape, z.device.type) == ((2, 7, 40), "meta")
    assert counter.get_total_flops() == 0
    counted = counter.get_flop_counts()["Global"]  # the registered formulas were consulted
    assert counted == {torch.ops.sdcompiler.group_norm_silu: 0, torch.ops.sdcompiler.geglu: 0}


def test_ops_gradients_match_eager():
    x, weight, bias = _gn_inputs(2, 20, (6, 5), "nchw")
    h = torch.randn(2, 3, 80)
    grads = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, h)]
        xx, ww, bb, hh = leaves
        if fused:
            y, z = group_norm_silu(xx, 2, ww, bb, 1e-5), geglu(hh)
        else:
            a, b = hh.chunk(2, dim=-1)
            y, z = F.silu(F.group_norm(xx, 2, ww, bb, 1e-5)), a * F.gelu(b)
        (y.square().sum() + z.square().sum()).backward()
        grads.append([t.grad for t in leaves])
    for fused_grad, eager_grad in zip(*grads):
        torch.testing.assert_close(fused_grad, eager_grad, atol=1e-4, rtol=1e-4)


# --- lowering ---------------------------------------------------------------------------------------------------


def _forward(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def _class_names(module):
    return [type(m).__name__ for m in module.modules()]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lower_unet_tiny_checkpoint(tiny_checkpoint, reference_only, arch):
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_checkpoint(arch) / "unet").eval()
    inputs = unet_example_inputs(unet, 2, generator=torch.Generator().manual_seed(0))
    expected = _forward(unet, inputs)
    state = unet.state_dict(keep_vars=True)
    classes = _class_names(unet)
    macs = count_macs(unet, (64, 64))

    counts = lower_unet(unet)
    assert set(counts) == set(KINDS) and all(n > 0 for n in counts.values()), counts
    assert counts["group_norm_silu"] == sum(isinstance(m, FusedResnetBlock2D) for m in unet.modules())
    assert counts["geglu"] == sum(isinstance(m, FusedGEGLU) for m in unet.modules())
    lowered_state = unet.state_dict(keep_vars=True)
    assert list(lowered_state) == list(state)
    assert all(lowered_state[k] is state[k] for k in state)
    torch.testing.assert_close(_forward(unet, inputs), expected, atol=1e-5, rtol=1e-5)
    assert count_macs(unet, (64, 64)) == macs

    assert lower_unet(unet) == counts  # idempotent
    assert unlower_unet(unet) == counts
    assert _class_names(unet) == classes
    assert unlower_unet(unet) == dict.fromkeys(KINDS, 0)
    torch.testing.assert_close(_forward(unet, inputs), expected, atol=0, rtol=0)


def _non_pow2_unet():
    """Two stages of 40 / 80 channels in 4 groups: 10 and 20 channels per group; GEGLU inner 160 and 320."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(40, 80),
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    ).eval()


@needs_interpreter
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_lowered_unet_runs_triton_under_interpreter(triton, monkeypatch, channels_last):
    unet = _non_pow2_unet()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    inputs = unet_example_inputs(unet, 1, generator=torch.Generator().manual_seed(0))
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :7]
    if channels_last:
        inputs["sample"] = inputs["sample"].to(memory_format=torch.channels_last)
    expected = _forward(unet, inputs)
    assert lower_unet(unet) == {"group_norm_silu": 8, "geglu": 4}
    gn_triton = _spy(monkeypatch, gn_module, "group_norm_silu_triton")
    geglu_triton_calls = _spy(monkeypatch, geglu_module, "geglu_triton")
    torch.testing.assert_close(_forward(unet, inputs), expected, atol=1e-4, rtol=1e-4)
    assert (len(gn_triton), len(geglu_triton_calls)) == (16, 4)


_RESNET_VARIANTS = {
    "shortcut-conv": dict(in_channels=20, out_channels=40, temb_channels=16, groups=2),
    "no-temb-scaled": dict(in_channels=20, temb_channels=None, groups=2, output_scale_factor=2.0),
    "skip-time-act": dict(in_channels=20, temb_channels=16, groups=2, groups_out=4, skip_time_act=True, eps=1e-5),
    "forced-shortcut": dict(in_channels=20, temb_channels=16, groups=2, use_in_shortcut=True, conv_shortcut_bias=False),
}


@pytest.mark.parametrize("variant", list(_RESNET_VARIANTS))
def test_fused_resnet_block_matches_diffusers(reference_only, variant):
    torch.manual_seed(0)
    kwargs = _RESNET_VARIANTS[variant]
    block = diffusers.models.resnet.ResnetBlock2D(**kwargs).eval()
    x = torch.randn(2, kwargs["in_channels"], 5, 6) + 0.5
    temb = torch.randn(2, kwargs["temb_channels"]) if kwargs["temb_channels"] else None
    with torch.no_grad():
        expected = block(x, temb)
        assert lower_unet(block) == {"group_norm_silu": 1, "geglu": 0}
        torch.testing.assert_close(block(x, temb), expected, atol=1e-5, rtol=1e-5)


def test_lowering_leaves_other_variants_and_kinds_alone():
    from diffusers.models.activations import GEGLU
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        [
            ResnetBlock2D(in_channels=8, groups=2, time_embedding_norm="scale_shift"),
            ResnetBlock2D(in_channels=8, groups=2, up=True),
            ResnetBlock2D(in_channels=8, groups=2, down=True),
            ResnetBlock2D(in_channels=8, groups=2, non_linearity="mish"),
            ResnetBlock2D(in_channels=8, groups=2),
            GEGLU(8, 16),
        ]
    )
    assert lower_unet(blocks, kinds=("geglu",)) == {"geglu": 1}
    assert [type(b) for b in blocks] == [ResnetBlock2D] * 5 + [FusedGEGLU]
    assert lower_unet(blocks) == {"group_norm_silu": 1, "geglu": 1}
    assert [type(b) for b in blocks] == [ResnetBlock2D] * 4 + [FusedResnetBlock2D, FusedGEGLU]
    with pytest.raises(ValueError, match="unknown lowering kind"):
        lower_unet(blocks, kinds=("layer_norm",))
