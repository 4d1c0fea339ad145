"""Targets as the compiler sees them: the registry, the typed hand-off from passes, what each target serves,
and which passes keep run-time LoRAs possible."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdcompiler.archs import get_arch
from sdcompiler.errors import LoweringError
from sdcompiler.passes import PassProducts, QuantizedUNet, available_passes, get_pass
from sdcompiler.targets import TARGETS, LowerContext, get_target


def _context(quantized: QuantizedUNet) -> LowerContext:
    return LowerContext(get_arch("sd15"), {}, False, {}, PassProducts(unet_quantization=quantized))


def test_registry_lists_every_target_and_names_them_on_a_typo():
    assert set(TARGETS) == {"onnx", "tensorrt", "torch"}
    assert all(get_target(name).name == name for name in TARGETS)
    with pytest.raises(LoweringError, match="unknown target 'onx'; available targets: onnx, tensorrt, torch"):
        get_target("onx")


@pytest.mark.parametrize("target, backend", [("onnx", "modelopt"), ("tensorrt", "onnxruntime")])
def test_a_target_refuses_the_other_backends_quantized_unet_before_any_work(target, backend, tmp_path):
    """The record is typed: a target reads `backend` instead of probing attributes on the U-Net, and refuses a
    record it cannot lower before it touches the pipeline (None here) or writes a file."""
    handed = QuantizedUNet(backend, "int8", {"calibration": "minmax"}, tmp_path if backend == "onnxruntime" else None)
    lowering = get_target(target)
    with pytest.raises(LoweringError, match=f"not a {backend}"):
        lowering.lower(None, tmp_path / "out", lowering.config_class(), _context(handed))
    assert not (tmp_path / "out").exists()


def test_serving_targets_describe_their_models_and_the_rest_do_not():
    assert {name for name, cls in TARGETS.items() if cls.serves_components} == {"onnx", "tensorrt"}
    with pytest.raises(NotImplementedError):
        get_target("torch").serving_models(Path("."), {})


def test_run_time_loras_stay_possible_only_after_passes_that_keep_names_and_float_weights():
    allowed = {name for name in available_passes() if not name.startswith("_") and get_pass(name).runtime_loras}
    assert allowed == {
        "merge_lora",
        "set_scheduler",
        "distill_cfg",
        "distill_steps",
        "feature_cache",
        "swap_attention",
        "distill",
        "swap_vae",
    }
