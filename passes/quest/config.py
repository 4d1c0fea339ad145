"""`QuestConfig`: the settings of the `quest_w4a4` pass (bit widths, which layers, calibration data,
range searches, finetuning); the presets `quest-w4a4`, `quest-w4a8` and `quest-w8a8` fill it in.

Its own module because every stage reads it: `modules.quantize_modules` (bits, `keep_fp`, `split_skip`,
`dynamic_tokens`), `finetune.finetune_stage` (steps, learning rates, trainer settings) and the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sdcompiler.passes.config import PassConfig


@dataclass(frozen=True)
class QuestConfig(PassConfig):
    w_bits: int = 4
    a_bits: int = 4
    attn_bits: int = 8  # q, k, v
    prob_bits: int = 8  # softmax probabilities
    first_last_bits: int = 8  # conv_in, conv_out
    dynamic_tokens: bool = False  # per-token scales computed at run time instead of time-wise static ones
    split_skip: bool = True
    keep_fp: tuple[str, ...] = ("time_embedding", "add_embedding")
    keep_shortcut_fp: bool = False
    calib_prompts: int = 4
    held_out_prompts: int = 2
    prompts_file: str | None = None  # calibration prompts, one per line (default: the shipped list)
    calib_steps: int = 8  # sampling steps per trajectory = calibrated timesteps
    guidance_scale: float = 7.5
    resolution: int | None = None
    search_grid: int = 16  # shrink factors tried by the range searches
    finetune: bool = True
    stage1_steps: int = 20
    stage2_steps: int = 40
    batch_size: int = 4
    lr: float = 5e-4  # weights
    scale_lr: float = 1e-3  # activation scales
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 0
    # with ControlNets (target torch): quantize the nets too, the same scheme, calibrated on their own inputs along
    # the same trajectories before the U-Net (`modules.CONTROLNET_FIRST_LAST` at `first_last_bits`); not finetuned
    quantize_controlnets: bool = False

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "attn_bits", "prob_bits", "first_last_bits"):
            if getattr(self, name) not in (4, 8):
                raise ValueError(f"{name} must be 4 or 8, got {getattr(self, name)}")
        if self.calib_prompts < 1 or self.held_out_prompts < 1 or self.calib_steps < 1:
            raise ValueError("calib_prompts, held_out_prompts and calib_steps must be >= 1")
