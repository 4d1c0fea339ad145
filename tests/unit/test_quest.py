"""QuEST W4A4 (`quest_w4a4`): the shared scheme, calibration pieces, and the pass on tiny SD / SDXL."""

from __future__ import annotations

import pytest
import torch

from sdcompiler.errors import LoweringError
from sdcompiler.kernels import w4a4
from sdcompiler.passes.quest import (
    ActQuantizer, QuantState, _skip_split,
    fake_quant_act, fake_quant_weight, search_weight_range, weight_params,
)



@pytest.mark.parametrize("bits", [4, 8])
def test_weight_scheme_is_the_kernels_scheme(bits):
    w = torch.randn(24, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w[5] = 0.0  # an all-zero channel
    flat = w.flatten(1)
    scale, zero = weight_params(flat, bits, flat.min(1).values, flat.max(1).values)
    k_scale, k_zero = w4a4.minmax_weight_params(w, bits)
    torch.testing.assert_close(scale, k_scale, rtol=0, atol=0)
    torch.testing.assert_close(zero, k_zero.float(), rtol=0, atol=0)
    expected = w4a4.dequantize_weight(w4a4.quantize_weight(w, k_scale, k_zero, bits), k_scale, k_zero)
    torch.testing.assert_close(fake_quant_weight(w, scale, zero, bits).flatten(1), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_scheme_is_the_kernels_scheme(bits):
    x = torch.randn(6, 10, 40, generator=torch.Generator().manual_seed(1)) * 3
    scale = torch.tensor(0.37)
    torch.testing.assert_close(fake_quant_act(x, scale, bits), w4a4.fake_quant_act(x, scale, bits), rtol=0, atol=0)
    state = QuantState(torch.nn.Module())
    dynamic = ActQuantizer(state, bits, 1, dynamic=True, token_dim=-1)
    torch.testing.assert_close(dynamic(x), w4a4.fake_quant_act(x, None, bits), rtol=0, atol=0)


def test_weight_search_is_never_worse_than_min_max():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    w[:, 0] = 8.0  # outliers make clipping pay off
    minmax = weight_params(w, 4, w.min(1).values, w.max(1).values)
    searched = search_weight_range(w, 4, 16)
    err = lambda p: (fake_quant_weight(w, *p, 4) - w).pow(2).sum(1)  # noqa: E731
    assert (err(searched) <= err(minmax) + 1e-6).all() and err(searched).sum() < err(minmax).sum()


def test_nearest_calibrated_timestep_per_sample():
    holder = torch.nn.Module()
    holder.register_buffer("quant_timesteps", torch.tensor([999.0, 749.0, 499.0, 249.0]))
    state = QuantState(holder)
    state.set_timestep(torch.tensor([990, 700, 10, 499]))
    assert state.index.tolist() == [0, 1, 3, 2]
    state.set_timestep(torch.tensor(260.0))
    assert state.index.tolist() == [3]


def test_skip_concat_split_points(tiny_checkpoint):
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_checkpoint("sd15") / "unet")
    splits = _skip_split(unet)
    # every decoder ResNet reads [h, skip]; h is the previous block's output (first ResNet) or its own width
    assert set(splits) == {f"up_blocks.{j}.resnets.{i}" for j in range(4) for i in range(3)}
    assert splits["up_blocks.0.resnets.0"] == unet.mid_block.resnets[-1].out_channels
    for name, hidden in splits.items():
        assert 0 < hidden < unet.get_submodule(name).in_channels


def test_onnx_target_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    from sdcompiler import compile_pipeline

    out = tmp_path / "artifact"
    with pytest.raises(LoweringError, match=r"quest_w4a4.*target='torch'"):
        compile_pipeline(tiny_checkpoint("sd15"), recipe="quest-w4a4", target="onnx", output_dir=out)
    assert not out.exists()
