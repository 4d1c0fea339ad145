"""The pass layer: strict configs, the registry, ordering rules, the PassManager's ledger, fuse_qkv, MAC counting."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from importlib import resources

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from sdcompiler.errors import ConfigError, PassError, RecipeError
from sdcompiler.passes import (
    Pass,
    PassConfig,
    PassContext,
    PassManager,
    PassStep,
    available_passes,
    check_order,
    count_macs,
    count_params,
    get_pass,
    register_pass,
    unet_example_inputs,
)
from sdcompiler.passes.fuse_qkv import FuseQKVConfig

# --- throwaway passes, registered under test-only names ------------------------------------------------------


@register_pass
class _TestQuantize(Pass):
    name = "_test_passes_quantize"
    stage = "quantize"

    def run(self, pipe, config, ctx):
        return {}


@register_pass
class _TestMerge(Pass):
    name = "_test_passes_merge"
    stage = "merge"

    def run(self, pipe, config, ctx):
        return {}


@register_pass
class _TestSneakyRename(Pass):
    """Changes the U-Net's parameter layout while declaring changes_structure=False."""

    name = "_test_passes_sneaky_rename"
    stage = "noop"
    changes_structure = False

    def run(self, pipe, config, ctx):
        pipe.unet.conv_in_renamed = pipe.unet.conv_in
        del pipe.unet.conv_in
        return {}


@dataclass(frozen=True)
class _TypedConfig(PassConfig):
    ratio: float = 0.5
    steps: int = 4
    mode: str = "a"


# --- helpers -------------------------------------------------------------------------------------------------


class _Pipe:
    """What passes see of a pipeline: `.unet` and `.vae_scale_factor`."""

    def __init__(self, unet):
        self.unet = unet
        self.vae_scale_factor = 8


@pytest.fixture(scope="module")
def tiny_unet(tiny_checkpoint):
    return UNet2DConditionModel.from_pretrained(tiny_checkpoint("sd15"), subfolder="unet").eval()


@pytest.fixture(scope="module")
def tiny_sdxl_unet(tiny_checkpoint):
    return UNet2DConditionModel.from_pretrained(tiny_checkpoint("sdxl"), subfolder="unet").eval()


def _ctx() -> PassContext:
    import tempfile
    from pathlib import Path

    return PassContext(arch="sd15", macs_resolution=(128, 128), cache_dir=Path(tempfile.gettempdir()), show_progress=False)


def _step(name: str, **config) -> PassStep:
    return PassStep(name, get_pass(name).config_class.from_dict(config, owner=name))


def _unet_out(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


# --- strict configs ------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("data, key", [({"ratio": "half"}, "ratio"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"),
                                       ({"mode": 3}, "mode")])
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


# --- registry ------------------------------------------------------------------------------------------------


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


# --- ordering rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [("_test_passes_quantize", "fuse_qkv"), ("fuse_qkv", "_test_passes_merge"),
                                   ("_test_passes_quantize", "_test_passes_merge")])
def test_check_order_rejects_and_names_both_passes(names):
    steps = [_step(n) for n in names]
    with pytest.raises(RecipeError) as info:
        check_order(steps)
    for name in names:
        assert repr(name) in str(info.value)
    with pytest.raises(RecipeError):  # the manager refuses it too, before running anything
        PassManager(steps)


def test_check_order_accepts_valid_orders():
    check_order([_step("fuse_qkv"), _step("_test_passes_quantize")])
    check_order([_step("_test_passes_merge"), _step("fuse_qkv"), _step("_test_passes_quantize")])
    check_order([])


def test_recipe_resolution_applies_ordering_rules():
    from sdcompiler.recipe import resolve_recipe

    with pytest.raises(RecipeError, match="_test_passes_quantize"):
        resolve_recipe([{"pass": "_test_passes_quantize"}, "fuse-qkv"])
    assert [s.name for s in resolve_recipe(["fuse-qkv", {"pass": "_test_passes_quantize"}])] == [
        "fuse_qkv", "_test_passes_quantize"]


# --- PassManager ---------------------------------------------------------------------------------------------


def test_pass_manager_records_fuse_qkv(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    n_attention = sum(isinstance(m, Attention) for m in unet.modules())
    assert n_attention > 0
    params = count_params(unet)
    (record,) = PassManager([_step("fuse_qkv")]).run(_Pipe(unet), _ctx())
    assert record.name == "fuse_qkv"
    assert record.config == {"version": 1, "self_attention": True, "cross_attention": True}
    assert record.params_before == params > 0
    assert record.params_after == params  # stacking keeps every weight exactly once
    assert record.macs_before > 0 and record.macs_after == record.macs_before  # one GEMM, the same MACs
    assert record.seconds >= 0
    assert record.metrics["fused_attention_modules"] == n_attention
    as_dict = record.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict  # JSON-ready for the manifest


def test_pass_manager_runs_in_order_and_chains_records(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    steps = [_step("_test_passes_merge"), _step("fuse_qkv", cross_attention=False), _step("_test_passes_quantize")]
    seen = []
    records = PassManager(steps).run(_Pipe(unet), _ctx(), on_step=lambda s: seen.append(s.name))
    assert [r.name for r in records] == seen == [s.name for s in steps]
    for before, after in zip(records, records[1:]):
        assert after.params_before == before.params_after and after.macs_before == before.macs_after
    n_self = sum(isinstance(m, Attention) and not m.is_cross_attention for m in unet.modules())
    assert records[1].metrics["fused_attention_modules"] == n_self


def test_pass_changing_layout_without_declaring_it_is_caught(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    with pytest.raises(PassError, match="_test_passes_sneaky_rename"):
        PassManager([_step("_test_passes_sneaky_rename")]).run(_Pipe(unet), _ctx())


# --- fuse_qkv ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_fuse_qkv_keeps_outputs_and_removes_projections(tiny_unet, tiny_sdxl_unet, arch):
    original = tiny_unet if arch == "sd15" else tiny_sdxl_unet
    unet = copy.deepcopy(original)
    inputs = unet_example_inputs(unet, 2, (12, 12), generator=torch.Generator().manual_seed(0))
    expected = _unet_out(original, inputs)
    n_attention = sum(isinstance(m, Attention) for m in unet.modules())

    (record,) = PassManager([_step("fuse_qkv")]).run(_Pipe(unet), _ctx())
    assert record.metrics["fused_attention_modules"] == n_attention

    torch.testing.assert_close(_unet_out(unet, inputs), expected, atol=1e-5, rtol=0)
    attention = [m for m in unet.modules() if isinstance(m, Attention)]
    for module in attention:
        if module.is_cross_attention:
            assert hasattr(module, "to_kv") and hasattr(module, "to_q")
            assert not hasattr(module, "to_k") and not hasattr(module, "to_v")
        else:
            assert hasattr(module, "to_qkv")
            assert not any(hasattr(module, n) for n in ("to_q", "to_k", "to_v"))
    assert any(m.is_cross_attention for m in attention) and any(not m.is_cross_attention for m in attention)
    names = {n for n, _ in unet.named_parameters()}
    assert not any(".attn1.to_q." in n or ".attn1.to_k." in n or ".attn1.to_v." in n for n in names)


def test_fuse_qkv_self_only_leaves_cross_attention(tiny_unet):
    unet = copy.deepcopy(tiny_unet)
    inputs = unet_example_inputs(unet, 1, generator=torch.Generator().manual_seed(1))
    expected = _unet_out(tiny_unet, inputs)
    PassManager([_step("fuse_qkv", cross_attention=False)]).run(_Pipe(unet), _ctx())
    for module in unet.modules():
        if isinstance(module, Attention):
            assert hasattr(module, "to_k") == module.is_cross_attention
    torch.testing.assert_close(_unet_out(unet, inputs), expected, atol=1e-5, rtol=0)


def test_fuse_qkv_rebuild_gives_the_same_layout(tiny_unet):
    fused = copy.deepcopy(tiny_unet)
    PassManager([_step("fuse_qkv")]).run(_Pipe(fused), _ctx())
    with torch.device("meta"):
        fresh = UNet2DConditionModel.from_config(tiny_unet.config)
    get_pass("fuse_qkv").rebuild(_Pipe(fresh), FuseQKVConfig())
    layout = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert layout(fresh) == layout(fused)


# --- accounting ----------------------------------------------------------------------------------------------


def _meta_unet(arch: str):
    config = json.loads((resources.files("sdcompiler") / "configs" / arch / "unet" / "config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize("arch, params, resolution", [("sd15", 859_520_964, 512), ("sdxl", 2_567_463_684, 1024)])
def test_count_macs_full_size_on_meta(arch, params, resolution):
    start = time.perf_counter()
    unet = _meta_unet(arch)
    assert count_params(unet) == params
    macs = count_macs(unet, (resolution, resolution))
    assert time.perf_counter() - start < 20  # on meta: no weights, no activations (about a second here)
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
