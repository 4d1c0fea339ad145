"""ptq's calibration size and memory bound, decided before any work (no calibration runs here).

Oracles: the default resolution is the native size of a tiny model (128 px) and 256 px for the full-size
SD1.5 / SDXL configs (built on meta); an explicit resolution wins; a calibration whose per-input activations
(estimated on meta) exceed `max_calibration_gib` is refused in one line by `requires`, before any export.
"""

from __future__ import annotations

import json
from importlib import resources
from types import SimpleNamespace

import pytest
import torch

from sdcompiler.errors import PassError
from sdcompiler.passes.ptq import PtqConfig, calibration_resolution, check_calibration_memory


def _pipe(arch: str):
    from diffusers import UNet2DConditionModel

    config = json.loads((resources.files("sdcompiler") / "configs" / arch / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return SimpleNamespace(unet=unet, vae_scale_factor=8)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_checkpoint):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint("sd15"), subfolder="unet").eval()
    return SimpleNamespace(unet=unet, vae_scale_factor=8)


def test_default_resolution_is_the_native_size_of_a_tiny_model(tiny_pipe):
    pipe = tiny_pipe
    assert calibration_resolution(PtqConfig(), pipe) == pipe.unet.config.sample_size * 8 == 128
    assert calibration_resolution(PtqConfig(resolution=64), pipe) == 64


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_default_resolution_of_full_size_models_is_256(arch):
    assert calibration_resolution(PtqConfig(), _pipe(arch)) == 256


def test_calibration_over_the_memory_budget_is_refused_before_any_work():
    pipe = _pipe("sd15")
    check_calibration_memory(pipe, PtqConfig(), 256)  # about 1.1 GiB: fits the 4 GiB default
    with pytest.raises(PassError, match="1024 px holds about .* GiB .* max_calibration_gib 4") as info:
        check_calibration_memory(pipe, PtqConfig(), 1024)  # about 97 GiB
    assert "\n" not in str(info.value)
    check_calibration_memory(pipe, PtqConfig(max_calibration_gib=200), 1024)  # raised on purpose: allowed


def test_requires_refuses_over_budget(tiny_pipe):
    from sdcompiler.passes.base import PassProducts
    from sdcompiler.passes.ptq import Ptq

    ctx = SimpleNamespace(products=PassProducts(), target="onnx")
    Ptq().requires(tiny_pipe, PtqConfig(), ctx)
    with pytest.raises(PassError, match="calibrating at 128 px"):
        Ptq().requires(tiny_pipe, PtqConfig(max_calibration_gib=0.001), ctx)
