"""Passes that keep the U-Net's down / mid layout, compiled with a ControlNet (issue 19, item 2): GRI attention,
INT8 (modelopt, real INT8 layers on the torch target), QuEST W4A4, CFG distillation, LCM distillation and the
LCM scheduler swap.

Oracle: diffusers' own `StableDiffusionControlNetPipeline` built from the artifact's modules as loaded (the
transformed U-Net, the stored ControlNet, the artifact's scheduler): the compiled pipeline must feed the net's
residuals into the transformed U-Net exactly as diffusers does (images within 1e-5), and the control image must
move the images (a pass whose U-Net dropped the residuals would agree with nothing but itself). Each record says
the pass keeps the layout; the ControlNet itself stays float (quantization passes change the U-Net only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcompiler import compile_pipeline
from sdcompiler.testing import make_controlnet

TOLERANCE = 1e-5
TRAINING = {"steps": 2, "batch_size": 2, "num_prompts": 2, "held_out_prompts": 1, "teacher_steps": 2}
RECIPES = {
    "gri": ["gri"],
    "int8": [{"pass": "ptq", "precision": "int8", "calib_prompts": 1, "calib_steps": 2, "resolution": 64}],
    "quest-w4a4": [
        {
            "pass": "quest_w4a4",
            "calib_prompts": 1,
            "held_out_prompts": 1,
            "calib_steps": 2,
            "resolution": 64,
            "finetune": False,
        }
    ],
    "cfg-distill": [{"pass": "distill_cfg", **TRAINING, "image_steps": 2}],
    # a guidance embedding: the U-Net takes `timestep_cond` (the loop's other U-Net call) next to the residuals
    "cfg-distill-range": [{"pass": "distill_cfg", **TRAINING, "image_steps": 2, "guidance_range": [2.0, 8.0]}],
    "lcm": [{"pass": "distill_steps", **TRAINING, "reference_steps": 2}],
    "lcm-scheduler": ["lcm-scheduler"],  # set_scheduler: the nets run under the artifact's LCMScheduler
}
PASS_NAMES = {
    "gri": "swap_attention",
    "int8": "ptq",
    "quest-w4a4": "quest_w4a4",
    "cfg-distill": "distill_cfg",
    "cfg-distill-range": "distill_cfg",
    "lcm": "distill_steps",
    "lcm-scheduler": "set_scheduler",
}


@pytest.fixture(scope="module")
def controlnet(tiny_checkpoint, tmp_path_factory):
    return make_controlnet(tmp_path_factory.mktemp("cn") / "net", tiny_checkpoint("sd15"), seed=0)


def _control_image(seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).random((1, 64, 64, 3)).astype(np.float32)
    pixels[:, :32, : 16 + 8 * seed] = 1.0
    return pixels


def _diffusers_on_the_artifact(pipe):
    """diffusers' ControlNet pipeline on the compiled pipeline's own torch modules and scheduler."""
    import diffusers

    components = pipe.components.pipeline.components
    parts = {k: v for k, v in components.items() if k in ("vae", "text_encoder", "tokenizer", "unet")}
    net = pipe.components.modules["controlnet"]
    reference = diffusers.StableDiffusionControlNetPipeline(
        **parts,
        scheduler=pipe.components.scheduler_factory(),
        controlnet=net,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_a_layout_keeping_pass_runs_with_a_controlnet_as_diffusers_does(
    name, tiny_checkpoint, controlnet, tmp_path, monkeypatch
):
    # the kernels' torch paths on both sides (under TRITON_INTERPRET the GRI / low-precision kernels would run
    # interpreted for minutes; they have their own tests against these references)
    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
    pipe = compile_pipeline(
        tiny_checkpoint("sd15"),
        recipe=RECIPES[name],
        target="torch",
        output_dir=tmp_path / "out",
        device="cpu",
        controlnet=controlnet,
        show_progress=False,
    )
    record = pipe.manifest["passes"][-1]
    assert (record["name"], record["controlnet"]) == (PASS_NAMES[name], "keeps_layout")
    defaults = pipe.manifest.get("defaults", {})
    call = dict(
        prompt=["a red cube on a table", "a fox"],
        num_inference_steps=defaults.get("num_inference_steps", 3),
        guidance_scale=defaults.get("guidance_scale", 5.0),
        output_type="np",
        height=64,
        width=64,
        controlnet_conditioning_scale=0.8,
    )
    image = _control_image(0)
    got = pipe(**call, image=image, generator=torch.Generator().manual_seed(0)).images
    reference = _diffusers_on_the_artifact(pipe)
    expected = reference(**call, image=image, generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(got).all() and np.asarray(expected).std() > 0.01
    error = float(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64)).max())
    print(f"{name} with a ControlNet: max abs error vs diffusers {error:.2e}")
    assert error < TOLERANCE
    other = pipe(**call, image=_control_image(1), generator=torch.Generator().manual_seed(0)).images
    assert np.abs(other - got).max() > 1e-3, "the control image changed nothing"
