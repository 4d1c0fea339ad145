"""slim_unet: KOALA U-Net slimming (presets koala-1b, koala-700m; SDXL): one (ResNet, Transformer) pair per
encoder stage, shallower transformers, optionally no mid-block.

The student U-Net's config and the teacher -> student key mapping its weights are inherited by (evenly
spaced transformer layers included) are `student_unet.py`'s, shared with `prune_blocks`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.student_unet import restructure, student_config


@dataclass(frozen=True)
class SlimUNetConfig(PassConfig):
    """KOALA slimming: fewer pairs per stage and shallower transformers. Presets: koala-1b, koala-700m (SDXL)."""

    layers_per_block: int | None = 1
    transformer_depth: tuple[int, ...] | None = None  # per stage; None keeps the teacher's
    drop_mid_block: bool = False


@register_pass
class SlimUNet(Pass):
    name = "slim_unet"
    controlnet = "changes_layout"
    config_class = SlimUNetConfig
    stage = "structural"
    changes_structure = True
    description = "KOALA slimming: one pair per encoder stage, shallower transformers (koala-1b / koala-700m)"

    def _config(self, pipe, config: SlimUNetConfig) -> dict:
        return student_config(
            dict(pipe.unet.config),
            config.layers_per_block,
            config.drop_mid_block,
            transformer_depth=config.transformer_depth,
        )

    def requires(self, pipe, config: SlimUNetConfig, ctx: PassContext) -> None:
        self._config(pipe, config)

    def run(self, pipe, config: SlimUNetConfig, ctx: PassContext) -> dict[str, float]:
        return restructure(pipe, self._config(pipe, config), 0, inherit=True)

    def rebuild(self, pipe, config: SlimUNetConfig) -> None:
        restructure(pipe, self._config(pipe, config), 0, inherit=False)
