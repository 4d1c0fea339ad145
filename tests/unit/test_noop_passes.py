"""A structural pass that changes nothing is reported, and the bk-* presets' SDXL behaviour.

Oracles: the manager's warning record names the pass when bk-base meets a U-Net that already has one pair per
stage (parameters and MACs unchanged), a recipe whose every pass is such a no-op stops with one line naming
the koala presets, a pass that does change the U-Net logs nothing; on the full-size SDXL config (meta) bk-base
and bk-small remove blocks by BK-SDM's rule (exact counts, as README states) and bk-tiny is refused.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from unet_holder import UNetHolder, apply_preset

from sdcompiler.errors import PassError
from sdcompiler.passes import PassContext, count_params
from sdcompiler.passes.manager import PassManager
from sdcompiler.recipe import resolve_recipe

MANAGER_LOGGER = "sdcompiler.passes.manager"


def _ctx() -> PassContext:
    return PassContext(arch="sd15", macs_resolution=(128, 128), cache_dir=Path("."))


def _holder(tiny_checkpoint, **overrides) -> UNetHolder:
    config = dict(UNet2DConditionModel.load_config(tiny_checkpoint("sd15"), subfolder="unet")) | overrides
    torch.manual_seed(0)
    holder = UNetHolder(UNet2DConditionModel.from_config(config).eval())
    holder.vae_scale_factor = 8
    return holder


def test_bk_base_on_one_pair_per_stage_warns_and_a_recipe_of_no_ops_is_refused(tiny_checkpoint, caplog):
    holder = _holder(tiny_checkpoint, layers_per_block=1)
    with caplog.at_level(logging.WARNING, logger=MANAGER_LOGGER):
        records = PassManager(resolve_recipe(["bk-base", "fuse-qkv"])).run(holder, _ctx())
    assert records[0].params_before == records[0].params_after
    (warning,) = [r for r in caplog.records if r.name == MANAGER_LOGGER]
    assert "'prune_blocks' changed nothing" in warning.getMessage()

    holder = _holder(tiny_checkpoint, layers_per_block=1)
    with pytest.raises(PassError, match="the recipe changes nothing: 'prune_blocks'.*koala") as info:
        PassManager(resolve_recipe(["bk-base"])).run(holder, _ctx())
    assert "\n" not in str(info.value)


def test_a_pass_that_changes_the_unet_logs_nothing(tiny_checkpoint, caplog):
    holder = _holder(tiny_checkpoint)  # two pairs per stage: bk-base removes one
    with caplog.at_level(logging.WARNING, logger=MANAGER_LOGGER):
        (record,) = PassManager(resolve_recipe(["bk-base"])).run(holder, _ctx())
    assert record.params_after < record.params_before
    assert not [r for r in caplog.records if r.name == MANAGER_LOGGER]


def _full_sdxl() -> UNetHolder:
    path = resources.files("sdcompiler") / "configs" / "sdxl" / "unet" / "config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNetHolder(UNet2DConditionModel.from_config(config))


@pytest.mark.parametrize("preset, params", [("bk-base", 1_717_277_764), ("bk-small", 1_304_160_324)])
def test_bk_presets_on_sdxl_remove_blocks_by_the_bk_sdm_rule(preset, params):
    holder = _full_sdxl()
    assert count_params(holder.unet) == 2_567_463_684
    apply_preset(holder, preset, "sdxl")
    assert count_params(holder.unet) == params
    assert holder.unet.config.layers_per_block == 1
    assert (holder.unet.mid_block is None) == (preset == "bk-small")


def test_bk_tiny_is_refused_on_sdxl():
    with pytest.raises(PassError, match="attention-free deepest stage"):
        apply_preset(_full_sdxl(), "bk-tiny", "sdxl")
