"""QuEST W4A4 (`quest_w4a4`): the shared scheme, calibration pieces, and the pass on tiny SD / SDXL."""

from __future__ import annotations

import pytest
import torch

from sdcompiler.errors import LoweringError
from sdcompiler.kernels import w4a4
from sdcompiler.passes import unet_example_inputs
from sdcompiler.passes.quest import (
    ActQuantizer, PackedQuantConv2d, PackedQuantLinear, QuantConv2d, QuantLinear, QuantState, _skip_split,
    fake_quant_act, fake_quant_weight, search_weight_range, weight_params,
)

# CPU-sized: 2 calibration prompts x 4 steps, 1 held-out prompt, 10 + 20 finetuning steps
SMALL = {"calib_prompts": 2, "held_out_prompts": 1, "calib_steps": 4, "stage1_steps": 10, "stage2_steps": 20}


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


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint):
    from sdcompiler import compile_pipeline

    pipes = {}

    def get(arch):
        if arch not in pipes:
            pipes[arch] = compile_pipeline(tiny_checkpoint(arch), recipe=[{"preset": "quest-w4a4", **SMALL}],
                                           target="torch")
        return pipes[arch]

    return get


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_calibration_and_finetuning_beat_rtn(quantized, arch):
    m = quantized(arch).manifest["passes"][0]["metrics"]
    print(f"{arch}: rtn {m['sqnr_rtn_db']:.2f} dB, calibrated {m['sqnr_calibrated_db']:.2f} dB, "
          f"finetuned {m['sqnr_finetuned_db']:.2f} dB")
    assert m["sqnr_finetuned_db"] >= m["sqnr_rtn_db"] + 3
    assert m["sqnr_finetuned_db"] >= m["sqnr_calibrated_db"]
    assert m["simulated_attention_qkv"] == 1.0 and m["calibrated_timesteps"] == SMALL["calib_steps"]


def test_torch_artifact_holds_packed_integer_layers_equal_to_the_fake_quant_model(quantized, tiny_checkpoint,
                                                                                   compiled, tmp_path):
    from sdcompiler.loading import load_checkpoint
    from sdcompiler.passes import PassContext, PassManager
    from sdcompiler.recipe import resolve_recipe

    pipe = quantized("sd15")
    unet = pipe.unet
    packed = [m for m in unet.modules() if isinstance(m, (PackedQuantLinear, PackedQuantConv2d))]
    assert packed and not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in unet.modules())
    assert {m.w_bits for m in packed} == {4, 8}  # conv_in / conv_out stay at 8 bit
    assert all(m.weight_packed.dtype == torch.uint8 for m in packed)
    stage = {s["name"]: s for s in pipe.manifest["lowering"]["stages"]}["save_weights"]
    assert stage["results"]["packed_quantized_layers"] == len(packed)
    weights = lambda p: (p.root / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size  # noqa: E731
    ratio = weights(pipe) / weights(compiled("sd15", "torch", "none"))
    print(f"packed W4A4 U-Net file / fp32 file = {ratio:.3f}")
    assert ratio < 0.3  # 4-bit codes instead of fp32 weights; scales, biases and norms stay float

    # the same recipe run in memory (deterministic by seed) is the fake-quant model the artifact packs
    memory = load_checkpoint(tiny_checkpoint("sd15")).pipeline
    ctx = PassContext(arch="sd15", macs_resolution=(128, 128), cache_dir=tmp_path, show_progress=False)
    PassManager(resolve_recipe([{"preset": "quest-w4a4", **SMALL}])).run(memory, ctx)
    inputs = unet_example_inputs(unet, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fake = memory.unet(**inputs).sample
        integer = unet(**inputs).sample
        memory.unet.quant_state.enabled = False
        float_out = memory.unet(**inputs).sample
    # same integers, up to float summation order (which can flip a rounding at an exact .5 downstream)
    mismatch = (integer - fake).abs().max().item()
    assert mismatch < 1e-2 * fake.abs().max().item()
    assert mismatch < 0.05 * (float_out - fake).abs().max().item()  # far below the quantization error itself
    images = pipe("a red cube", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert torch.isfinite(torch.as_tensor(images.images)).all()


def test_onnx_target_is_refused_before_any_work(tiny_checkpoint, tmp_path):
    from sdcompiler import compile_pipeline

    out = tmp_path / "artifact"
    with pytest.raises(LoweringError, match=r"quest_w4a4.*target='torch'"):
        compile_pipeline(tiny_checkpoint("sd15"), recipe="quest-w4a4", target="onnx", output_dir=out)
    assert not out.exists()
