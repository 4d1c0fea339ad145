"""prune_blocks with ME-CondConv inheritance (`condconv_experts`): presets, exactness, full-size counts, targets.

The fast tests, without an end-to-end compile; the compiles are in tests/integration/test_condconv_prune_compile.py.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from condconv_expected import EXPECTED_TARGETS, PRESETS, condconvs
from diffusers import UNet2DConditionModel
from unet_holder import UNetHolder

from sdcompiler.errors import PassError
from sdcompiler.loading import load_checkpoint
from sdcompiler.passes import PassContext, count_params
from sdcompiler.passes.accounting import parameter_layout
from sdcompiler.recipe import resolve_recipe

# SD1.5 U-Net parameters (pure, with 2-expert CondConv): the pure counts are test_student_unet's. The extra
# parameters are one more expert (C*C*9 + C) and a routing head (2 C + 2) per replaced conv2 of width C:
# bk-base/small replace 8 convs (down 320, 640, 1280, 1280; up 1280, 1280, 640, 320), bk-tiny 6.
FULL_SIZE = {
    "bk-base": (579_384_964, 647_604_500),
    "bk-small": (482_346_884, 550_566_420),
    "bk-tiny": (323_384_964, 362_105_616),
}


def _ctx() -> PassContext:
    return PassContext(arch="sd15", macs_resolution=(512, 512), cache_dir=Path("."))


def _step(recipe):
    (step,) = resolve_recipe([recipe] if isinstance(recipe, dict) else recipe)
    return step


def _apply(pipe, recipe) -> dict:
    step = _step(recipe)
    step.pass_.requires(pipe, step.config, _ctx())
    return step.pass_.run(pipe, step.config, _ctx())


def _full_meta_unet() -> UNet2DConditionModel:
    path = resources.files("sdcompiler") / "configs" / "sd15" / "unet" / "config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.fixture(scope="module")
def teacher(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint("sd15")).pipeline.unet


def _student(teacher, recipe):
    pipe = UNetHolder(UNet2DConditionModel.from_config(teacher.config))
    pipe.unet.load_state_dict(teacher.state_dict())
    metrics = _apply(pipe, recipe)
    return pipe.unet.eval(), metrics


@pytest.mark.parametrize("preset", PRESETS)
def test_kept_expert_routing_reproduces_the_pure_student(preset, teacher):
    pure, _ = _student(teacher, preset)
    cond, metrics = _student(teacher, f"{preset}-condconv")
    modules = condconvs(cond)
    assert set(modules) == EXPECTED_TARGETS[preset] and metrics["condconv_modules"] == len(modules)
    assert count_params(cond) - count_params(pure) == metrics["condconv_params"]
    generator = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        want = pure(sample, 500, text).sample
        learned_routing = cond(sample, 500, text).sample  # sigmoid(+-10) routing: close, not exact
        for module in modules.values():
            module.fixed_routing = torch.tensor([1.0, 0.0])
        fixed = cond(sample, 500, text).sample
    torch.testing.assert_close(fixed, want, atol=1e-5, rtol=0)
    assert (learned_routing - want).abs().max() < 1e-2 * want.abs().max()


def test_experts_are_the_kept_and_the_removed_convs(teacher):
    """bk-small: down stage -> [resnets.0, teacher resnets.1]; up stage -> [resnets.0, teacher's middle resnets.1]."""
    cond, _ = _student(teacher, "bk-small-condconv")
    t = teacher.state_dict()
    down = cond.get_submodule("down_blocks.3.resnets.0.conv2")
    assert torch.equal(down.weight[0], t["down_blocks.3.resnets.0.conv2.weight"])
    assert torch.equal(down.weight[1], t["down_blocks.3.resnets.1.conv2.weight"])
    up = cond.get_submodule("up_blocks.1.resnets.0.conv2")
    assert torch.equal(up.weight[0], t["up_blocks.1.resnets.0.conv2.weight"])
    assert torch.equal(up.bias[1], t["up_blocks.1.resnets.1.conv2.bias"])
    # the kept conv2 of the last up ResNet (teacher resnets.2) stays a plain conv
    assert type(cond.get_submodule("up_blocks.1.resnets.1.conv2")) is torch.nn.Conv2d


def test_more_experts_take_mid_block_and_deepest_stage_candidates(teacher):
    """bk-tiny, 4 experts: the last down stage's conv gets its removed resnet, then the mid-block's conv2s."""
    recipe = {
        "pass": "prune_blocks",
        "layers_per_block": 1,
        "drop_mid_block": True,
        "drop_deepest_stage": True,
        "condconv_experts": 4,
    }
    cond, metrics = _student(teacher, recipe)
    t = teacher.state_dict()
    last = cond.get_submodule("down_blocks.2.resnets.0.conv2")
    sources = ["down_blocks.2.resnets.0", "down_blocks.2.resnets.1", "mid_block.resnets.0", "mid_block.resnets.1"]
    for expert, source in enumerate(sources):
        assert torch.equal(last.weight[expert], t[f"{source}.conv2.weight"])
    other = cond.get_submodule("down_blocks.0.resnets.0.conv2")  # one real candidate, padded with the kept conv
    assert torch.equal(other.weight[2], other.weight[0]) and torch.equal(other.weight[3], other.weight[0])
    assert metrics["condconv_inherited_experts"] == 3 + 5 * 1


def test_one_expert_is_refused(teacher):
    with pytest.raises(PassError, match="condconv_experts=1"):
        _student(teacher, {"pass": "prune_blocks", "layers_per_block": 1, "condconv_experts": 1})


def test_fixed_routing_survives_a_strict_state_dict_round_trip(teacher):
    """fixed_routing is an optional buffer: strict loading follows the state_dict (set or cleared)."""
    cond, _ = _student(teacher, "bk-tiny-condconv")
    name = "up_blocks.0.resnets.0.conv2"
    cond.get_submodule(name).fixed_routing = torch.tensor([1.0, 0.0])
    state = cond.state_dict()
    assert f"{name}.fixed_routing" in state
    with torch.device("meta"):
        pipe = UNetHolder(UNet2DConditionModel.from_config(teacher.config))
    _step("bk-tiny-condconv").pass_.rebuild(pipe, _step("bk-tiny-condconv").config)
    pipe.unet.load_state_dict(state, strict=True, assign=True)
    assert torch.equal(pipe.unet.get_submodule(name).fixed_routing, torch.tensor([1.0, 0.0]))
    del state[f"{name}.fixed_routing"]
    pipe.unet.load_state_dict(state, strict=True)
    assert pipe.unet.get_submodule(name).fixed_routing is None


@pytest.mark.parametrize("preset", PRESETS)
def test_full_size_condconv_parameter_counts(preset, capsys):
    pure_count, cond_count = FULL_SIZE[preset]
    pipe = UNetHolder(_full_meta_unet())
    metrics = _apply(pipe, f"{preset}-condconv")
    counted = count_params(pipe.unet)
    with capsys.disabled():
        print(
            f"\nSD1.5 {preset}: pure {pure_count:,} -> {preset}-condconv {counted:,} "
            f"(+{metrics['condconv_params']:,} in {metrics['condconv_modules']} CondConv2d)"
        )
    assert counted == cond_count > pure_count
    assert counted == pure_count + metrics["condconv_params"]
    assert set(condconvs(pipe.unet)) == EXPECTED_TARGETS[preset]

    rebuilt = UNetHolder(_full_meta_unet())  # rebuild makes the same structure as run
    step = _step(f"{preset}-condconv")
    step.pass_.rebuild(rebuilt, step.config)
    assert parameter_layout(rebuilt.unet) == parameter_layout(pipe.unet)
