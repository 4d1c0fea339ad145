"""Feature inheritance across timesteps (`feature_cache`, preset `deepcache`): plans, split forward, both targets.

The fast tests, without an end-to-end compile; the compiles are in tests/integration/test_feature_cache_compile.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdcompiler.passes import unet_example_inputs
from sdcompiler.passes.feature_cache import CacheSettings, SplitUNet, full_steps


def _unet(tiny_checkpoint, arch):
    import diffusers

    return diffusers.UNet2DConditionModel.from_pretrained(tiny_checkpoint(arch) / "unet").eval()


@pytest.mark.parametrize("steps", [1, 4, 10, 50])
@pytest.mark.parametrize("interval", [1, 2, 3, 5])
def test_uniform_plan(steps, interval):
    plan = full_steps(steps, CacheSettings(interval=interval))
    assert len(plan) == steps and plan[0]
    assert [i for i, full in enumerate(plan) if full] == list(range(0, steps, interval))


@pytest.mark.parametrize("steps", [4, 10, 25, 50])
def test_nonuniform_plan_has_as_many_full_steps_clustered_at_the_center(steps):
    settings = CacheSettings(interval=3, schedule="nonuniform", center=0.3, power=1.4)
    plan = full_steps(steps, settings)
    full = [i for i, f in enumerate(plan) if f]
    assert plan[0] and len(full) == math.ceil(steps / 3)
    if steps >= 25:  # denser around 30 % of the trajectory than the uniform plan
        near = lambda idx: sum(abs(i - 0.3 * (steps - 1)) <= steps / 6 for i in idx)  # noqa: E731
        assert near(full) > near(range(0, steps, 3))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("latent", [16, 10])
def test_split_unet_full_and_shallow_equal_the_unet(tiny_checkpoint, arch, latent):
    unet = _unet(tiny_checkpoint, arch)
    inputs = unet_example_inputs(unet, 2, (latent, latent), generator=torch.Generator().manual_seed(1))
    added = inputs.get("added_cond_kwargs") or {}
    args = (
        inputs["sample"],
        inputs["timestep"],
        inputs["encoder_hidden_states"],
        added.get("text_embeds"),
        added.get("time_ids"),
    )
    with torch.no_grad():
        expected = unet(**inputs, return_dict=False)[0]
        for branch in range(len(unet.down_blocks) - 1):
            split = SplitUNet(unet, branch)
            eps, deep = split.full(*args)
            torch.testing.assert_close(eps, expected, rtol=0, atol=0)
            # the shallow branch from the same step's deep features is the whole U-Net again
            torch.testing.assert_close(split.shallow(*args, deep=deep), expected, rtol=0, atol=0)
            # deep features: the input of up block n-1-branch, at the resolution of down block `branch`
            assert deep.shape[-2:] == (math.ceil(latent / 2**branch),) * 2
