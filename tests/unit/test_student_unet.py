"""prune_blocks (BK-SDM) and slim_unet (KOALA): exact counts, the inheritance mapping, targets, errors.

The fast tests, without an end-to-end compile; the compiles are in tests/integration/test_student_unet_compile.py.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from diffusers import UNet2DConditionModel
from unet_holder import UNetHolder, apply_preset, pruned_student

from sdcompiler.loading import load_checkpoint
from sdcompiler.passes import count_params

# Published U-Net sizes: BK-SDM 0.58B / 0.49B / 0.33B (SD v1.4), KOALA 1,161M / 782M (SDXL).
FULL_SIZE = {
    ("sd15", "bk-base"): (579_384_964, 0.58e9),
    ("sd15", "bk-small"): (482_346_884, 0.49e9),
    ("sd15", "bk-tiny"): (323_384_964, 0.33e9),
    ("sdxl", "koala-1b"): (1_161_184_324, 1_161e6),
    ("sdxl", "koala-700m"): (782_822_724, 782e6),
}


def _full_meta_unet(arch: str) -> UNet2DConditionModel:
    path = resources.files("sdcompiler") / "configs" / arch / "unet" / "config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize("arch,preset", list(FULL_SIZE))
def test_full_size_parameter_counts_match_published(arch, preset):
    exact, published = FULL_SIZE[(arch, preset)]
    pipe = UNetHolder(_full_meta_unet(arch))
    metrics = apply_preset(pipe, preset, arch)  # the full inheritance mapping, shape-checked, on meta tensors
    assert count_params(pipe.unet) == exact
    tolerance = 0.025 if preset.startswith("bk") else 0.005
    assert abs(exact - published) / published < tolerance
    assert metrics["inherited_tensors"] == len(pipe.unet.state_dict())


@pytest.fixture(scope="module")
def teachers(tiny_checkpoint):
    return {arch: load_checkpoint(tiny_checkpoint(arch)).pipeline for arch in ("sd15", "sd21", "sdxl")}


def test_bk_base_keeps_first_down_pair_and_outer_up_pairs(teachers):
    teacher = teachers["sd15"].unet
    student = pruned_student(teacher, "sd15", "bk-base")
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["down_blocks.0.resnets.0.conv1.weight"], t["down_blocks.0.resnets.0.conv1.weight"])
    assert "down_blocks.0.resnets.1.conv1.weight" not in s
    assert torch.equal(s["up_blocks.1.resnets.1.conv1.weight"], t["up_blocks.1.resnets.2.conv1.weight"])
    assert torch.equal(s["up_blocks.2.attentions.1.proj_in.weight"], t["up_blocks.2.attentions.2.proj_in.weight"])
    assert torch.equal(s["mid_block.resnets.0.conv1.weight"], t["mid_block.resnets.0.conv1.weight"])
    assert torch.equal(s["up_blocks.0.upsamplers.0.conv.weight"], t["up_blocks.0.upsamplers.0.conv.weight"])


def test_bk_tiny_shifts_up_stages_and_drops_the_deepest(teachers):
    teacher = teachers["sd15"].unet
    student = pruned_student(teacher, "sd15", "bk-tiny")
    t, s = teacher.state_dict(), student.state_dict()
    assert student.mid_block is None and len(student.down_blocks) == 3 and len(student.up_blocks) == 3
    assert student.down_blocks[-1].downsamplers is None  # the new last stage does not downsample
    assert torch.equal(s["up_blocks.0.attentions.1.proj_out.weight"], t["up_blocks.1.attentions.2.proj_out.weight"])
    assert torch.equal(s["up_blocks.2.resnets.0.conv2.weight"], t["up_blocks.3.resnets.0.conv2.weight"])
    assert torch.equal(s["up_blocks.0.upsamplers.0.conv.weight"], t["up_blocks.1.upsamplers.0.conv.weight"])


def test_koala_takes_evenly_spaced_transformer_layers(teachers):
    teacher = teachers["sdxl"].unet
    student = pruned_student(teacher, "sdxl", "koala-1b")
    t, s = teacher.state_dict(), student.state_dict()
    block = "down_blocks.2.attentions.0.transformer_blocks.{}.attn1.to_q.weight"
    for k, source in enumerate([0, 2, 4, 5, 7, 9]):  # 10 -> 6, first and last kept
        assert torch.equal(s[block.format(k)], t[block.format(source)])
    assert len(student.down_blocks[2].attentions[0].transformer_blocks) == 6
    assert len(student.mid_block.attentions[0].transformer_blocks) == 6


def test_pruned_student_still_predicts_like_a_unet(teachers):
    """Inheritance keeps the student close to the teacher (random init would not be)."""
    teacher = teachers["sd15"].unet
    student = pruned_student(teacher, "sd15", "bk-base")
    torch.manual_seed(0)
    sample, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        want = teacher(sample, 500, text).sample
        got = student(sample, 500, text).sample
        random_student = UNet2DConditionModel.from_config(student.config)(sample, 500, text).sample
    assert (got - want).norm() < (random_student - want).norm()
