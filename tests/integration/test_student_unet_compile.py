"""prune_blocks (BK-SDM) and slim_unet (KOALA): exact counts, the inheritance mapping, targets, errors.

The tests that compile artifacts (or run the pass end to end); the fast ones, and the oracles they share,
are in tests/unit/test_student_unet.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from unet_holder import pruned_student

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.errors import PassError
from sdcompiler.loading import load_checkpoint
from sdcompiler.passes import count_params
from sdcompiler.passes.student_unet import student_config

TINY_PRESETS = [
    ("sd15", "bk-base"),
    ("sd15", "bk-small"),
    ("sd15", "bk-tiny"),
    ("sd21", "bk-small"),
    ("sdxl", "koala-1b"),
    ("sdxl", "koala-700m"),
]


@pytest.fixture(scope="module")
def teachers(tiny_checkpoint):
    return {arch: load_checkpoint(tiny_checkpoint(arch)).pipeline for arch in ("sd15", "sd21", "sdxl")}


@pytest.mark.parametrize("target", ["torch", "onnx"])
@pytest.mark.parametrize("arch,preset", TINY_PRESETS)
def test_every_preset_compiles_reloads_and_generates(arch, preset, target, tiny_checkpoint, tmp_path):
    compiled = compile_pipeline(tiny_checkpoint(arch), preset, target, tmp_path / "out", show_progress=False)
    record = compiled.manifest["passes"][0]
    assert record["params_after"] < record["params_before"] and record["macs_after"] < record["macs_before"]
    reloaded = load_compiled(tmp_path / "out")
    kwargs = dict(num_inference_steps=2, output_type="np")
    first = compiled(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kwargs).images
    again = reloaded(["a cat", "a dog"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert first.std() > 0.01 and np.abs(first[0] - first[1]).max() > 1e-3
    assert np.abs(first - again).max() < 1e-5


def test_torch_artifact_replays_structural_passes_in_order(tiny_checkpoint, tmp_path):
    """bk-small then fuse-qkv: load_compiled rebuilds both and the weights fit exactly."""
    compiled = compile_pipeline(
        tiny_checkpoint("sd15"), ["bk-small", "fuse-qkv"], "torch", tmp_path / "out", show_progress=False
    )
    source = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert source["layers_per_block"] == 2  # the artifact stores the pre-pass config; rebuild derives the rest
    from sdcompiler.targets.torch_target import rebuild_pipeline

    unet = rebuild_pipeline(tmp_path / "out", compiled.manifest).unet
    assert unet.mid_block is None and hasattr(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1, "to_qkv")
    assert count_params(unet) == compiled.manifest["passes"][-1]["params_after"]


def test_unsuitable_models_are_refused_before_work(teachers, tiny_checkpoint, tmp_path):
    with pytest.raises(PassError, match="attention-free deepest stage"):
        pruned_student(teachers["sdxl"].unet, "sdxl", "bk-tiny")
    with pytest.raises(PassError, match="3 entries for 4 stages"):
        pruned_student(teachers["sd15"].unet, "sd15", "koala-1b")
    with pytest.raises(PassError, match="exceeds the teacher"):
        student_config(dict(teachers["sd15"].unet.config), 3, False)
    with pytest.raises(PassError, match="no mid-block left"):
        compile_pipeline(
            tiny_checkpoint("sd15"), ["bk-small", "bk-small"], "torch", tmp_path / "out", show_progress=False
        )
    assert not (tmp_path / "out").exists()
