"""QuEST W4A4 (`quest_w4a4`): the shared scheme, calibration pieces, and the pass on tiny SD / SDXL.

The fast tests, without an end-to-end compile; the compiles are in tests/integration/test_quest_compile.py.
"""

from __future__ import annotations

import pytest
import torch

from sdcompiler.errors import LoweringError
from sdcompiler.kernels import w4a4
from sdcompiler.passes.quest.modules import ActQuantizer, QuantState, _skip_split
from sdcompiler.passes.quest.scheme import search_weight_range, ste_fake_quant_act, ste_fake_quant_weight


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_scheme_is_the_kernels_scheme(bits):
    w = torch.randn(24, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w[5] = 0.0  # an all-zero channel
    scale, zero = w4a4.minmax_weight_params(w, bits)
    expected = w4a4.dequantize_weight(w4a4.quantize_weight(w, scale, zero, bits), scale, zero)
    # the layers keep the zero point in a float buffer while they train: same values either way
    for z in (zero, zero.float()):
        torch.testing.assert_close(ste_fake_quant_weight(w, scale, z, bits).flatten(1), expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_scheme_is_the_kernels_scheme(bits):
    x = torch.randn(6, 10, 40, generator=torch.Generator().manual_seed(1)) * 3
    scale = torch.tensor(0.37)
    torch.testing.assert_close(ste_fake_quant_act(x, scale, bits), w4a4.fake_quant_act(x, scale, bits), rtol=0, atol=0)
    state = QuantState(torch.nn.Module())
    dynamic = ActQuantizer(state, bits, 1, dynamic=True, token_dim=-1)
    torch.testing.assert_close(dynamic(x), w4a4.fake_quant_act(x, None, bits), rtol=0, atol=0)


def test_ste_fake_quant_passes_gradients_to_x_and_the_scale():
    """What the pass's `ste_` forms add to the kernels' fake quant: the gradients finetuning needs."""
    x = (torch.randn(4, 16, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    scale = torch.tensor(0.2, requires_grad=True)
    ste_fake_quant_act(x, scale, 4).sum().backward()
    q = torch.floor(x.detach() * (1.0 / scale.detach()) + 0.5)
    inside = (q >= -8) & (q <= 7)  # clipped values get no gradient, the rest a straight-through one
    assert torch.equal(x.grad, inside.float()) and scale.grad is not None and scale.grad != 0


def test_weight_search_is_never_worse_than_min_max():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    w[:, 0] = 8.0  # outliers make clipping pay off
    minmax = w4a4.minmax_weight_params(w, 4)
    searched = search_weight_range(w, 4, 16)
    err = lambda p: (ste_fake_quant_weight(w, *p, 4) - w).pow(2).sum(1)  # noqa: E731
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
