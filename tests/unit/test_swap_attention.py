"""GRI attention swap (`swap_attention`, preset `gri`): equivalence, honest MACs, errors, both targets.

The fast tests, without an end-to-end compile; the compiles are in tests/integration/test_swap_attention_compile.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from gri_processors import gri_modules, reference_kernels  # noqa: F401  (reference_kernels: autouse fixture)

from sdcompiler.errors import ConfigError
from sdcompiler.kernels.gri_attention import gri_macs
from sdcompiler.passes import count_macs, count_params, unet_example_inputs
from sdcompiler.passes.swap_attention import SwapAttentionConfig, apply_gri, resolve_geometry


def _unet(tiny_checkpoint, arch):
    import diffusers

    return diffusers.UNet2DConditionModel.from_pretrained(tiny_checkpoint(arch) / "unet").eval()


def _output(unet, latent=16, seed=3):
    inputs = unet_example_inputs(unet, 2, (latent, latent), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return unet(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_whole_map_window_without_global_tokens_is_full_attention(tiny_checkpoint, arch):
    unet = _unet(tiny_checkpoint, arch)
    expected = _output(unet)
    blocks, _, _ = resolve_geometry(unet, SwapAttentionConfig())
    side = unet.config.sample_size >> min(blocks.values())
    assert apply_gri(unet, SwapAttentionConfig(window=side, global_tokens=False)) > 0
    torch.testing.assert_close(_output(unet), expected, rtol=1e-5, atol=1e-5)


def test_defaults_select_the_top_attention_level_and_cut_macs_as_computed(tiny_checkpoint):
    unet = _unet(tiny_checkpoint, "sd15")
    blocks, window, pool = resolve_geometry(unet, SwapAttentionConfig())
    assert blocks == {"down_blocks.0": 0, "up_blocks.3": 0}
    side = unet.config.sample_size  # 16: level-0 map at the default 128 px
    assert window == side // 4 and pool == window
    before, params = count_macs(unet, (128, 128)), count_params(unet)
    swapped = apply_gri(unet, SwapAttentionConfig())
    assert swapped == len(gri_modules(unet)) == 2 * unet.config.layers_per_block + 1  # 2 down + 3 up transformers
    attn = gri_modules(unet)[0]
    heads, head_dim = attn.heads, attn.inner_dim // attn.heads
    n = side * side
    full = 2 * heads * head_dim * n * n  # QK^T and PV of full attention, batch 1
    gri = gri_macs(1, heads, side, side, window, math.ceil(side / pool) ** 2, head_dim)
    assert count_macs(unet, (128, 128)) == before - swapped * (full - gri)
    assert count_params(unet) == params  # the q/k/v/out weights are reused


def test_sdxl_defaults_use_the_highest_level_that_has_attention(tiny_checkpoint):
    unet = _unet(tiny_checkpoint, "sdxl")
    blocks, window, _ = resolve_geometry(unet, SwapAttentionConfig())
    assert blocks == {"down_blocks.1": 1, "up_blocks.1": 1}  # level 0 of SDXL has no transformer
    assert window == (unet.config.sample_size >> 1) // 4


def test_bad_geometry_is_a_one_line_config_error(tiny_checkpoint):
    unet = _unet(tiny_checkpoint, "sd15")
    with pytest.raises(ConfigError, match=r"window 32 is larger than the 16x16 feature map of .*use window <= 16"):
        resolve_geometry(unet, SwapAttentionConfig(window=32))
    with pytest.raises(ConfigError, match="down_blocks.9"):
        resolve_geometry(unet, SwapAttentionConfig(blocks=("down_blocks.9",)))
    with pytest.raises(ConfigError, match="no transformer"):
        resolve_geometry(unet, SwapAttentionConfig(blocks=("down_blocks.3",)))  # SD1.x's deepest stage
    with pytest.raises(ConfigError):
        SwapAttentionConfig.from_dict({"window": -1}, owner="swap_attention")


def test_fuse_qkv_in_either_order_keeps_gri(tiny_checkpoint):
    from sdcompiler.passes.fuse_qkv import fuse_attention_projections

    reference = _unet(tiny_checkpoint, "sd15")
    apply_gri(reference, SwapAttentionConfig())
    expected = _output(reference)
    for order in ("fuse_first", "gri_first"):
        unet = _unet(tiny_checkpoint, "sd15")
        if order == "fuse_first":
            fuse_attention_projections(unet, True, True)
        apply_gri(unet, SwapAttentionConfig())
        if order == "gri_first":
            fuse_attention_projections(unet, True, True)
        assert len(gri_modules(unet)) == 5
        torch.testing.assert_close(_output(unet), expected, rtol=1e-4, atol=1e-5)


def test_gri_changes_the_output_but_stays_close(tiny_checkpoint):
    unet = _unet(tiny_checkpoint, "sd15")
    expected = _output(unet)
    apply_gri(unet, SwapAttentionConfig())
    got = _output(unet)
    assert not torch.allclose(got, expected, atol=1e-6)
    assert (got - expected).abs().max() < 0.5 * expected.abs().max()
