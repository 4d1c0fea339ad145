"""The pass layer: strict configs, the registry, ordering rules, the PassManager's ledger, fuse_qkv, MAC counting.

The tests that compile artifacts (or run the pass end to end); the fast ones, and the oracles they share,
are in tests/unit/test_passes.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import stub_passes  # noqa: E402,F401  (registers the _test_passes_* passes)
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from sdcompiler.errors import PassError
from sdcompiler.passes import (
    PassContext,
    PassManager,
    PassStep,
    count_params,
    get_pass,
    unet_example_inputs,
)
from sdcompiler.passes.fuse_qkv import FuseQKVConfig


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

    return PassContext(
        arch="sd15", macs_resolution=(128, 128), cache_dir=Path(tempfile.gettempdir()), show_progress=False
    )


def _step(name: str, **config) -> PassStep:
    return PassStep(name, get_pass(name).config_class.from_dict(config, owner=name))


def _unet_out(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


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
