"""The pass layer: strict configs, the registry, ordering rules, the PassManager's ledger, fuse_qkv, MAC counting.

The fast tests, without an end-to-end compile; the compiles are in tests/integration/test_passes_compile.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import pytest
import stub_passes  # noqa: E402,F401  (registers the _test_passes_* passes)
import torch
from diffusers import UNet2DConditionModel

from sdcompiler.errors import ConfigError, RecipeError
from sdcompiler.passes import (
    Pass,
    PassConfig,
    PassManager,
    PassStep,
    available_passes,
    check_order,
    count_macs,
    count_params,
    get_pass,
    register_pass,
)
from sdcompiler.passes.fuse_qkv import FuseQKVConfig


@dataclass(frozen=True)
class _TypedConfig(PassConfig):
    ratio: float = 0.5
    steps: int = 4
    mode: str = "a"


@pytest.fixture(scope="module")
def tiny_unet(tiny_checkpoint):
    return UNet2DConditionModel.from_pretrained(tiny_checkpoint("sd15"), subfolder="unet").eval()


def _step(name: str, **config) -> PassStep:
    return PassStep(name, get_pass(name).config_class.from_dict(config, owner=name))


def test_unknown_config_key_names_key_and_allowed_keys():
    with pytest.raises(ConfigError) as info:
        FuseQKVConfig.from_dict({"self_attention": True, "bogus_key": 1}, owner="fuse_qkv")
    message = str(info.value)
    assert "bogus_key" in message and "fuse_qkv" in message
    for allowed in ("self_attention", "cross_attention", "version"):
        assert allowed in message
    assert "\n" not in message


@pytest.mark.parametrize("data", [{"self_attention": "yes"}, {"self_attention": 1}, {"cross_attention": None}])
def test_wrong_type_is_config_error(data):
    with pytest.raises(ConfigError, match=next(iter(data))):
        FuseQKVConfig.from_dict(data, owner="fuse_qkv")


@pytest.mark.parametrize(
    "data, key",
    [({"ratio": "half"}, "ratio"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"), ({"mode": 3}, "mode")],
)
def test_wrong_scalar_types(data, key):
    with pytest.raises(ConfigError, match=key):
        _TypedConfig.from_dict(data, owner="typed")


def test_config_coercions_and_round_trip():
    config = _TypedConfig.from_dict({"ratio": 1, "steps": 3}, owner="typed")
    assert config.ratio == 1.0 and isinstance(config.ratio, float)
    assert _TypedConfig.from_dict(config.to_dict()) == config
    assert FuseQKVConfig.from_dict(None) == FuseQKVConfig()


def test_newer_config_version_is_refused():
    with pytest.raises(ConfigError, match="version"):
        FuseQKVConfig.from_dict({"version": 2}, owner="fuse_qkv")


@pytest.mark.parametrize("version", ["1", None])
def test_wrongly_typed_version_is_config_error(version):
    with pytest.raises(ConfigError):
        FuseQKVConfig.from_dict({"version": version}, owner="fuse_qkv")


def test_unknown_pass_lists_available():
    with pytest.raises(RecipeError) as info:
        get_pass("no_such_pass")
    message = str(info.value)
    assert "no_such_pass" in message and "fuse_qkv" in message
    assert "fuse_qkv" in available_passes()


def test_register_pass_rejects_duplicates_and_unknown_stages():
    class Duplicate(Pass):
        name = "fuse_qkv"

    with pytest.raises(ValueError, match="twice"):
        register_pass(Duplicate)

    class BadStage(Pass):
        name = "_test_passes_bad_stage"
        stage = "not-a-stage"

    with pytest.raises(ValueError, match="not-a-stage"):
        register_pass(BadStage)
    assert "_test_passes_bad_stage" not in available_passes()


@pytest.mark.parametrize(
    "names",
    [
        ("_test_passes_quantize", "fuse_qkv"),
        ("fuse_qkv", "_test_passes_merge"),
        ("_test_passes_quantize", "_test_passes_merge"),
    ],
)
def test_check_order_rejects_and_names_both_passes(names):
    steps = [_step(n) for n in names]
    with pytest.raises(RecipeError) as info:
        check_order(steps)
    for name in names:
        assert repr(name) in str(info.value)
    with pytest.raises(RecipeError):  # the manager refuses it too, before running anything
        PassManager(steps)


@pytest.mark.parametrize("name", ["distill", "distill_cfg", "distill_steps"])
def test_teacher_sampling_passes_are_refused_on_the_refiner_before_any_work(name, tmp_path):
    """The distillation passes' teacher data is text-to-image (the refiner's would need its own 5 time ids and an
    input image); refused in one line, before the pipeline is even looked at (None here). The calibration passes
    sample the refiner as it runs and are not refused (tests/integration/test_inpaint_refiner_passes.py)."""
    from sdcompiler.passes import PassContext
    from sdcompiler.passes.errors import PassError

    ctx = PassContext(arch="sdxl-refiner", macs_resolution=(128, 128), cache_dir=tmp_path)
    with pytest.raises(PassError, match=f"pass '{name}' samples the teacher .* SDXL refiner") as info:
        PassManager([_step(name)]).run(None, ctx)
    assert "\n" not in str(info.value)
    assert "ptq, quest_w4a4" in str(info.value)  # the message names the calibration passes that do run


@pytest.mark.parametrize("name", ["ptq", "quest_w4a4"])
def test_calibration_passes_sample_a_teacher_that_fits(name):
    """Calibration (`teacher_trajectories`) samples inpainting U-Nets and the refiner as they run: not refused."""
    assert not get_pass(name).text_to_image_teacher


def test_check_order_accepts_valid_orders():
    check_order([_step("fuse_qkv"), _step("_test_passes_quantize")])
    check_order([_step("_test_passes_merge"), _step("fuse_qkv"), _step("_test_passes_quantize")])
    check_order([])


def test_recipe_resolution_applies_ordering_rules():
    from sdcompiler.recipe import resolve_recipe

    with pytest.raises(RecipeError, match="_test_passes_quantize"):
        resolve_recipe([{"pass": "_test_passes_quantize"}, "fuse-qkv"])
    assert [s.name for s in resolve_recipe(["fuse-qkv", {"pass": "_test_passes_quantize"}])] == [
        "fuse_qkv",
        "_test_passes_quantize",
    ]


def _meta_unet(arch: str):
    config = json.loads((resources.files("sdcompiler") / "configs" / arch / "unet" / "config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize("arch, params, resolution", [("sd15", 859_520_964, 512), ("sdxl", 2_567_463_684, 1024)])
def test_count_macs_full_size_on_meta(arch, params, resolution):
    import resource

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    unet = _meta_unet(arch)
    assert count_params(unet) == params
    macs = count_macs(unet, (resolution, resolution))
    # on meta: no weights, no activations (SDXL's would be ~10 GB); a peak-memory check, not a timing one, since a
    # busy machine made a 20 s limit fail (20.8 s at load 8)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 1024 * 1024  # KiB: under 1 GiB
    assert macs > 3e11
    # half the pixels per side: at least 4x fewer MACs (convolutions scale with pixels, attention faster)
    assert 0 < count_macs(unet, (resolution // 2, resolution // 2)) <= macs / 4


def test_count_macs_sd15_at_512_is_in_the_published_range():
    macs = count_macs(_meta_unet("sd15"), (512, 512))
    # BK-SDM reports 339G MACs for the SD1.5 U-Net at 512x512 (without attention score matmuls); ours include them
    assert 3.0e11 < macs < 4.5e11


def test_count_macs_leaves_the_module_untouched(tiny_unet):
    before = {n: p.clone() for n, p in tiny_unet.state_dict().items()}
    assert count_macs(tiny_unet, (128, 128)) > 0
    after = tiny_unet.state_dict()
    assert all(not t.is_meta for t in after.values())
    assert all(torch.equal(before[n], after[n]) for n in before)
