"""What ME-CondConv inheritance (`prune_blocks` with `condconv_experts`) must produce on the SD topology, shared by
the unit and integration tests of the bk-*-condconv presets."""

from __future__ import annotations

from sdcompiler.passes.condconv import CondConv2d

PRESETS = ["bk-base", "bk-small", "bk-tiny"]

# Replaced conv2s per preset on the SD topology (4 stages, 2 ResNets per down stage, 3 per up stage).
EXPECTED_TARGETS = {
    preset: {f"{side}_blocks.{i}.resnets.0.conv2" for side in ("down", "up") for i in range(stages)}
    for preset, stages in (("bk-base", 4), ("bk-small", 4), ("bk-tiny", 3))
}


def condconvs(unet) -> dict[str, CondConv2d]:
    """The U-Net's CondConv2d modules by name."""
    return {name: module for name, module in unet.named_modules() if isinstance(module, CondConv2d)}
