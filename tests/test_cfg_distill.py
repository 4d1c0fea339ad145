"""distill_cfg: guidance distilled into the weights; one U-Net call per step afterwards."""

from __future__ import annotations

import pytest
import torch

from sdcompiler import compile_pipeline
from sdcompiler.errors import PassError


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_cfg_distill_halves_unet_calls_and_approaches_the_guided_teacher(arch, tiny_checkpoint, tmp_path):
    pipe = compile_pipeline(tiny_checkpoint(arch), "cfg-distill", "torch", tmp_path / "out", show_progress=False)
    (record,) = pipe.manifest["passes"]
    metrics = record["metrics"]
    print(f"{arch} cfg-distill: eps SQNR vs guided teacher {metrics['sqnr_before_db']:.2f} -> "
          f"{metrics['sqnr_after_db']:.2f} dB")
    assert metrics["sqnr_after_db"] > metrics["sqnr_before_db"]
    assert metrics["nfe_per_step_after"] * 2 <= metrics["nfe_per_step_before"]
    assert pipe.manifest["defaults"]["guidance_scale"] == 1.0
    assert record["params_after"] == record["params_before"]  # the LoRA is merged, nothing is added
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())

    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        images = pipe("a red cube", num_inference_steps=3, output_type="np").images
    finally:
        handle.remove()
    scheduler = pipe.components.scheduler_factory()
    scheduler.set_timesteps(3)
    assert len(calls) == len(scheduler.timesteps)  # one call per step (PNDM adds a warm-up step)
    assert all(batch == 1 for batch in calls)  # batch 1: no unconditional pass
    assert images.std() > 0.01


def test_cfg_distill_needs_guidance_above_one(tiny_checkpoint, tmp_path):
    with pytest.raises(PassError, match="no guidance to distill"):
        compile_pipeline(tiny_checkpoint("sd15"), [{"pass": "distill_cfg", "guidance_scale": 1.0}], "torch",
                         tmp_path / "out", show_progress=False)
