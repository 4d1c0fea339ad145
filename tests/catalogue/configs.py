"""Checkpoints whose component configs hold NaN or out-of-range numbers, or describe a U-Net too large for the
machine: refused when the configs are read, before diffusers builds (or allocates) any model."""

from __future__ import annotations

import json
from pathlib import Path

from catalogue import Case

BUILDERS = ("sdcompiler.loading._pipeline_class",)  # the diffusers pipeline class is looked up after the checks


def _patched(component: str, file: str, **changes):
    def build(tmp: Path, inputs) -> list[str]:
        folder = inputs.copy_checkpoint(tmp)
        path = folder / component / file
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))  # json writes NaN / Infinity, which json.loads (and diffusers) read
        return ["compile", str(folder), "--recipe", "none", "--target", "torch", "--out", str(tmp / "out")]

    return build


def _scheduler(**changes):
    return _patched("scheduler", "scheduler_config.json", **changes)


def _vae(**changes):
    return _patched("vae", "config.json", **changes)


def _unet(**changes):
    return _patched("unet", "config.json", **changes)


NAN, INF = float("nan"), float("inf")

CASES = [
    Case("config scheduler beta_start nan", _scheduler(beta_start=NAN), ("beta_start=nan", "finite"), BUILDERS),
    Case("config scheduler beta_end inf", _scheduler(beta_end=INF), ("beta_end=inf", "finite"), BUILDERS),
    Case("config scheduler beta_end above one", _scheduler(beta_end=1.5), ("beta_end=1.5", "(0, 1)"), BUILDERS),
    Case(
        "config scheduler betas swapped", _scheduler(beta_start=0.02, beta_end=0.001), ("beta_start", "swap"), BUILDERS
    ),
    Case("config scheduler zero timesteps", _scheduler(num_train_timesteps=0), ("num_train_timesteps=0",), BUILDERS),
    Case("config vae scaling_factor nan", _vae(scaling_factor=NAN), ("scaling_factor=nan", "finite"), BUILDERS),
    Case(
        "config vae scaling_factor negative", _vae(scaling_factor=-0.2), ("scaling_factor=-0.2", "positive"), BUILDERS
    ),
    Case("config vae zero latent channels", _vae(latent_channels=0), ("latent_channels=0", "positive"), BUILDERS),
    Case("config unet sample_size zero", _unet(sample_size=0), ("sample_size=0", "positive"), BUILDERS),
    Case(
        "config unet negative channels", _unet(block_out_channels=[32, -32, 64, 64]), ("block_out_channels",), BUILDERS
    ),
    Case(
        "config unet absurdly wide",
        _unet(block_out_channels=[100000, 100000, 100000, 100000]),
        ("u-net of", "parameters", "GiB", "block_out_channels"),
        BUILDERS,
    ),
    Case(
        "config unet above the memory limit",
        _unet(block_out_channels=[320, 640, 1280, 1280], norm_num_groups=32),
        ("u-net of", "SDCOMPILER_MEMORY_LIMIT"),
        BUILDERS,
        env={"SDCOMPILER_MEMORY_LIMIT": "100M"},
    ),
]
