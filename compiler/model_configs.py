"""Checks of a checkpoint's component configs (the JSON files diffusers builds models from), before anything is built.

diffusers takes these numbers as they are: a NaN `beta_start` gives a scheduler of NaN alphas and black images,
a NaN VAE `scaling_factor` the same, a zero `sample_size` fails deep inside a later stage, and a U-Net config
with `block_out_channels: [100000, ...]` allocates until the kernel kills the process with no message. So:

- every number in unet/, vae/ and scheduler/ configs is finite;
- sizes and counts (`SIZE_KEYS`) are positive integers, lists of them included;
- scheduler betas lie in (0, 1) with beta_start <= beta_end, `trained_betas` likewise;
- the VAE's `scaling_factor` is positive;
- the U-Net's weights, counted on the meta device (`sdcompiler.preflight.unet_parameters`), fit in memory.

Each refusal is one `CheckpointError` line naming the file, the key and the allowed range.
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from sdcompiler.errors import CheckpointError
from sdcompiler.preflight import require_memory, unet_parameters

CONFIG_FILES = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")
SIZE_KEYS = (
    "sample_size",
    "block_out_channels",
    "decoder_block_out_channels",
    "encoder_block_out_channels",
    "layers_per_block",
    "in_channels",
    "out_channels",
    "latent_channels",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "norm_num_groups",
    "transformer_layers_per_block",
    "num_train_timesteps",
)
FP32_BYTES = 4  # checkpoints load in fp32 on the CPU


def check_component_configs(folder: Path, where: str) -> None:
    """Refuse the configs of a diffusers folder (checkpoint or config tree) that cannot give a working model."""
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue  # a missing file is the loader's to report
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # likewise
        if isinstance(config, dict):
            _check_config(config, f"{where}: {name}")
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file():
        _check_unet_memory(json.loads(unet_config.read_text()), f"{where}: unet/config.json")


def _check_config(config: dict[str, Any], where: str) -> None:
    for key, value in config.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise CheckpointError(f"{where} has {key}={item}; it must be a finite number: fix the config")
        if key in SIZE_KEYS and value is not None:
            items = value if isinstance(value, list) else [value]
            if not items or not all(_is_int(v) and v >= 1 for v in items):
                raise CheckpointError(f"{where} has {key}={value}; it must be a positive integer (or a list of them)")
    for key in ("beta_start", "beta_end"):
        value = config.get(key)
        if value is not None and (not _is_real(value) or not 0 < value < 1):
            raise CheckpointError(f"{where} has {key}={value}; it must lie in (0, 1): fix the scheduler config")
    start, end = config.get("beta_start"), config.get("beta_end")
    if _is_real(start) and _is_real(end) and start > end:
        raise CheckpointError(f"{where} has beta_start={start} > beta_end={end}; swap them")
    betas = config.get("trained_betas")
    if betas is not None and not (isinstance(betas, list) and all(_is_real(b) and 0 < b < 1 for b in betas)):
        raise CheckpointError(f"{where} has trained_betas outside (0, 1); fix the scheduler config")
    factor = config.get("scaling_factor")
    if factor is not None and (not _is_real(factor) or factor <= 0):
        raise CheckpointError(f"{where} has scaling_factor={factor}; it must be a positive number")


def _check_unet_memory(config: dict[str, Any], where: str) -> None:
    try:
        params = unet_parameters(config)
    except Exception:
        return  # a config diffusers cannot build: the loader reports it
    require_memory(
        params * FP32_BYTES,
        f"{where} describes a U-Net of {params / 1e9:.2f}B parameters; loading it in fp32",
        "check block_out_channels / layers_per_block, or load it on a machine with more memory",
        CheckpointError,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
