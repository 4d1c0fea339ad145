"""prune_blocks (BK-SDM) and slim_unet (KOALA): exact counts, the inheritance mapping, targets, errors."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.errors import PassError
from sdcompiler.loading import load_checkpoint
from sdcompiler.passes import PassContext, count_params
from sdcompiler.passes.block_pruning import student_config
from sdcompiler.recipe import resolve_recipe
from unet_holder import UNetHolder

# Published U-Net sizes: BK-SDM 0.58B / 0.49B / 0.33B (SD v1.4), KOALA 1,161M / 782M (SDXL).
FULL_SIZE = {
    ("sd15", "bk-base"): (579_384_964, 0.58e9),
    ("sd15", "bk-small"): (482_346_884, 0.49e9),
    ("sd15", "bk-tiny"): (323_384_964, 0.33e9),
    ("sdxl", "koala-1b"): (1_161_184_324, 1_161e6),
    ("sdxl", "koala-700m"): (782_822_724, 782e6),
}
TINY_PRESETS = [("sd15", "bk-base"), ("sd15", "bk-small"), ("sd15", "bk-tiny"), ("sd21", "bk-small"),
                ("sdxl", "koala-1b"), ("sdxl", "koala-700m")]




def _ctx(arch: str) -> PassContext:
    return PassContext(arch=arch, macs_resolution=(512, 512), cache_dir=Path("."))


def _full_meta_unet(arch: str) -> UNet2DConditionModel:
    path = resources.files("sdcompiler") / "configs" / arch / "unet" / "config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _apply(pipe, preset: str, arch: str):
    (step,) = resolve_recipe(preset)
    step.pass_.requires(pipe, step.config, _ctx(arch))
    return step.pass_.run(pipe, step.config, _ctx(arch))


@pytest.mark.parametrize("arch,preset", list(FULL_SIZE))
def test_full_size_parameter_counts_match_published(arch, preset):
    exact, published = FULL_SIZE[(arch, preset)]
    pipe = UNetHolder(_full_meta_unet(arch))
    metrics = _apply(pipe, preset, arch)  # the full inheritance mapping, shape-checked, on meta tensors
    assert count_params(pipe.unet) == exact
    tolerance = 0.025 if preset.startswith("bk") else 0.005
    assert abs(exact - published) / published < tolerance
    assert metrics["inherited_tensors"] == len(pipe.unet.state_dict())


@pytest.fixture(scope="module")
def teachers(tiny_checkpoint):
    return {arch: load_checkpoint(tiny_checkpoint(arch)).pipeline for arch in ("sd15", "sd21", "sdxl")}


def _student(teachers, arch, preset):
    teacher = teachers[arch].unet
    pipe = UNetHolder(UNet2DConditionModel.from_config(teacher.config))
    pipe.unet.load_state_dict(teacher.state_dict())
    _apply(pipe, preset, arch)
    return teacher, pipe.unet


def test_bk_base_keeps_first_down_pair_and_outer_up_pairs(teachers):
    teacher, student = _student(teachers, "sd15", "bk-base")
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["down_blocks.0.resnets.0.conv1.weight"], t["down_blocks.0.resnets.0.conv1.weight"])
    assert "down_blocks.0.resnets.1.conv1.weight" not in s
    assert torch.equal(s["up_blocks.1.resnets.1.conv1.weight"], t["up_blocks.1.resnets.2.conv1.weight"])
    assert torch.equal(s["up_blocks.2.attentions.1.proj_in.weight"], t["up_blocks.2.attentions.2.proj_in.weight"])
    assert torch.equal(s["mid_block.resnets.0.conv1.weight"], t["mid_block.resnets.0.conv1.weight"])
    assert torch.equal(s["up_blocks.0.upsamplers.0.conv.weight"], t["up_blocks.0.upsamplers.0.conv.weight"])


def test_bk_tiny_shifts_up_stages_and_drops_the_deepest(teachers):
    teacher, student = _student(teachers, "sd15", "bk-tiny")
    t, s = teacher.state_dict(), student.state_dict()
    assert student.mid_block is None and len(student.down_blocks) == 3 and len(student.up_blocks) == 3
    assert student.down_blocks[-1].downsamplers is None  # the new last stage does not downsample
    assert torch.equal(s["up_blocks.0.attentions.1.proj_out.weight"], t["up_blocks.1.attentions.2.proj_out.weight"])
    assert torch.equal(s["up_blocks.2.resnets.0.conv2.weight"], t["up_blocks.3.resnets.0.conv2.weight"])
    assert torch.equal(s["up_blocks.0.upsamplers.0.conv.weight"], t["up_blocks.1.upsamplers.0.conv.weight"])


def test_koala_takes_evenly_spaced_transformer_layers(teachers):
    teacher, student = _student(teachers, "sdxl", "koala-1b")
    t, s = teacher.state_dict(), student.state_dict()
    block = "down_blocks.2.attentions.0.transformer_blocks.{}.attn1.to_q.weight"
    for k, source in enumerate([0, 2, 4, 5, 7, 9]):  # 10 -> 6, first and last kept
        assert torch.equal(s[block.format(k)], t[block.format(source)])
    assert len(student.down_blocks[2].attentions[0].transformer_blocks) == 6
    assert len(student.mid_block.attentions[0].transformer_blocks) == 6


def test_pruned_student_still_predicts_like_a_unet(teachers):
    """Inheritance keeps the student close to the teacher (random init would not be)."""
    teacher, student = _student(teachers, "sd15", "bk-base")
    torch.manual_seed(0)
    sample, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        want = teacher(sample, 500, text).sample
        got = student(sample, 500, text).sample
        random_student = UNet2DConditionModel.from_config(student.config)(sample, 500, text).sample
    assert (got - want).norm() < (random_student - want).norm()


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
    compiled = compile_pipeline(tiny_checkpoint("sd15"), ["bk-small", "fuse-qkv"], "torch", tmp_path / "out",
                                show_progress=False)
    source = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert source["layers_per_block"] == 2  # the artifact stores the pre-pass config; rebuild derives the rest
    from sdcompiler.targets.torch_target import rebuild_pipeline

    unet = rebuild_pipeline(tmp_path / "out", compiled.manifest).unet
    assert unet.mid_block is None and hasattr(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1, "to_qkv")
    assert count_params(unet) == compiled.manifest["passes"][-1]["params_after"]


def test_unsuitable_models_are_refused_before_work(teachers, tiny_checkpoint, tmp_path):
    with pytest.raises(PassError, match="attention-free deepest stage"):
        _student(teachers, "sdxl", "bk-tiny")
    with pytest.raises(PassError, match="3 entries for 4 stages"):
        _student(teachers, "sd15", "koala-1b")
    with pytest.raises(PassError, match="exceeds the teacher"):
        student_config(dict(teachers["sd15"].unet.config), 3, False)
    with pytest.raises(PassError, match="no mid-block left"):
        compile_pipeline(tiny_checkpoint("sd15"), ["bk-small", "bk-small"], "torch", tmp_path / "out",
                         show_progress=False)
    assert not (tmp_path / "out").exists()
