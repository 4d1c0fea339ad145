"""QuEST W4A4 (`quest_w4a4`): the shared scheme, calibration pieces, and the pass on tiny SD / SDXL.

The tests that compile artifacts (or run the pass end to end); the fast ones, and the oracles they share,
are in tests/unit/test_quest.py.
"""

from __future__ import annotations

import pytest
import torch

from sdcompiler.passes import unet_example_inputs
from sdcompiler.passes.quest.modules import (
    PackedQuantConv2d,
    PackedQuantLinear,
    QuantConv2d,
    QuantLinear,
)

# CPU-sized: 2 calibration prompts x 4 steps, 1 held-out prompt, 10 + 20 finetuning steps
SMALL = {"calib_prompts": 2, "held_out_prompts": 1, "calib_steps": 4, "stage1_steps": 10, "stage2_steps": 20}


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint):
    from sdcompiler import compile_pipeline

    pipes = {}

    def get(arch):
        if arch not in pipes:
            pipes[arch] = compile_pipeline(
                tiny_checkpoint(arch), recipe=[{"preset": "quest-w4a4", **SMALL}], target="torch"
            )
        return pipes[arch]

    return get


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_calibration_and_finetuning_beat_rtn(quantized, arch):
    m = quantized(arch).manifest["passes"][0]["metrics"]
    print(
        f"{arch}: rtn {m['sqnr_rtn_db']:.2f} dB, calibrated {m['sqnr_calibrated_db']:.2f} dB, "
        f"finetuned {m['sqnr_finetuned_db']:.2f} dB"
    )
    assert m["sqnr_calibrated_db"] >= m["sqnr_rtn_db"] + 3
    if arch == "sd15":  # finetuning pays off here (tiny sd15: calibrated 11.38 dB -> finetuned 11.54 dB)
        assert m["finetune_kept"] == 1.0
    # the finetuned model is kept only when it beats the calibrated one on the held-out prompt, else the calibrated
    # model is restored exactly. Tiny sdxl sits at the edge: 11.88 -> 11.86 dB (restored) on one CPU, 12.09 ->
    # 12.16 dB (kept) on another (oneDNN's kernels differ by ISA), so the rule is checked, not the branch.
    if m["finetune_kept"] == 1.0:
        assert m["sqnr_db"] == m["sqnr_finetuned_db"] > m["sqnr_calibrated_db"]
    else:
        assert m["finetune_kept"] == 0.0 and m["sqnr_finetuned_db"] <= m["sqnr_calibrated_db"]
        assert m["sqnr_db"] == m["sqnr_calibrated_db"]
    assert m["calibrated_timesteps"] == SMALL["calib_steps"]
    assert m["stage1_loss_last"] > 0 and m["stage2_loss_last"] > 0  # both stages ran: their last losses
    assert not any(name.startswith("simulated") for name in m)  # design constants are not metrics


def test_a_stage_without_steps_records_no_loss(tiny_checkpoint, tmp_path):
    """No step ran in stage 1: the record has no stage1_loss_last (not a 0.0 that reads like a perfect fit)."""
    from sdcompiler.loading import load_checkpoint
    from sdcompiler.passes import PassContext, PassManager
    from sdcompiler.recipe import resolve_recipe

    pipe = load_checkpoint(tiny_checkpoint("sd15")).pipeline
    ctx = PassContext(arch="sd15", macs_resolution=(64, 64), cache_dir=tmp_path, show_progress=False)
    # the smallest run of the pass that still finetunes (~2 s): one prompt, one step, 64 px, a 2-point search
    tiny = dict(calib_prompts=1, held_out_prompts=1, calib_steps=1, resolution=64, search_grid=2, batch_size=1)
    recipe = resolve_recipe([{"preset": "quest-w4a4", **tiny, "stage1_steps": 0, "stage2_steps": 1}])
    (record,) = PassManager(recipe, count_cost=False).run(pipe, ctx)
    assert "stage1_loss_last" not in record.metrics and record.metrics["stage2_loss_last"] > 0


def test_torch_artifact_holds_packed_integer_layers_equal_to_the_fake_quant_model(
    quantized, tiny_checkpoint, compiled, tmp_path
):
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
