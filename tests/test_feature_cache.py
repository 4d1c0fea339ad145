"""Feature inheritance across timesteps (`feature_cache`, preset `deepcache`): plans, split forward, both targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdcompiler.errors import ConfigError, PassError
from sdcompiler.passes.feature_cache import CacheSettings, SplitUNet, full_steps
from sdcompiler.passes import unet_example_inputs


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
    args = (inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], added.get("text_embeds"),
            added.get("time_ids"))
    with torch.no_grad():
        expected = unet(**inputs, return_dict=False)[0]
        for branch in range(len(unet.down_blocks) - 1):
            split = SplitUNet(unet, branch)
            eps, deep = split.full(*args)
            torch.testing.assert_close(eps, expected, rtol=0, atol=0)
            # the shallow branch from the same step's deep features is the whole U-Net again
            torch.testing.assert_close(split.shallow(*args, deep=deep), expected, rtol=0, atol=0)
            # deep features: the input of up block n-1-branch, at the resolution of down block `branch`
            assert deep.shape[-2:] == (math.ceil(latent / 2 ** branch),) * 2


def test_bad_configs(tiny_checkpoint):
    from sdcompiler import compile_pipeline

    with pytest.raises(ConfigError, match="interval"):
        compile_pipeline(tiny_checkpoint("sd15"), recipe=[{"pass": "feature_cache", "interval": 0}], target="torch")
    with pytest.raises(PassError, match="branch 3 is too deep"):
        compile_pipeline(tiny_checkpoint("sd15"), recipe=[{"pass": "feature_cache", "branch": 3}], target="torch")


def _timesteps(pipe, steps):
    scheduler = pipe.components.scheduler_factory()
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_torch_target_runs_full_and_shallow_unet_calls_per_plan(compiled, arch):
    pipe = compiled(arch, "torch", "deepcache")
    steps = 7
    n = _timesteps(pipe, steps)
    calls = {"conv_in": 0, "mid_block": 0, "deep": 0}
    unet = pipe.unet
    hooks = [unet.conv_in.register_forward_hook(lambda *a: calls.__setitem__("conv_in", calls["conv_in"] + 1)),
             unet.mid_block.register_forward_hook(lambda *a: calls.__setitem__("mid_block", calls["mid_block"] + 1)),
             unet.down_blocks[1].resnets[0].register_forward_hook(lambda *a: calls.__setitem__("deep", calls["deep"] + 1))]
    try:
        pipe("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")
    finally:
        for hook in hooks:
            hook.remove()
    full = math.ceil(n / 3)  # interval 3; one batched (CFG) U-Net call per step
    assert calls == {"conv_in": n, "mid_block": full, "deep": full}

    metrics = pipe.manifest["passes"][0]["metrics"]
    assert metrics["full_calls_per_image"] == 2 * math.ceil(metrics["steps"] / 3)
    assert metrics["macs_per_image_after"] == 2 * (
        metrics["unet_macs_full"] * math.ceil(metrics["steps"] / 3)
        + metrics["unet_macs_shallow"] * (metrics["steps"] - math.ceil(metrics["steps"] / 3)))
    assert 0 < metrics["unet_macs_shallow"] < metrics["unet_macs_full"]
    assert metrics["macs_per_image_after"] < metrics["macs_per_image_before"]


def test_onnx_target_exports_the_shallow_graph_and_matches_torch(compiled):
    onnx_pipe, torch_pipe = compiled("sd15", "onnx", "deepcache"), compiled("sd15", "torch", "deepcache")
    assert (onnx_pipe.root / "unet_shallow" / "model.onnx").exists()
    cache = onnx_pipe.components.feature_cache
    counts = {"full": 0, "shallow": 0}
    full, shallow = cache.full, cache.shallow

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)
        return wrapped

    cache.full, cache.shallow = count("full", full), count("shallow", shallow)
    try:
        steps = 7
        n = _timesteps(onnx_pipe, steps)
        run = lambda pipe, **kw: pipe("a cat", num_inference_steps=steps, output_type="np",  # noqa: E731
                                      generator=torch.Generator().manual_seed(0), **kw).images
        cached = run(onnx_pipe)
        assert counts == {"full": math.ceil(n / 3), "shallow": n - math.ceil(n / 3)}
        np.testing.assert_allclose(cached, run(torch_pipe), atol=2e-3)
        uncached = run(onnx_pipe, feature_cache=False)
        assert counts["full"] == math.ceil(n / 3)  # feature_cache=False bypasses the cache entirely
        mse = float(((cached - uncached) ** 2).mean())
        assert 0 < mse and 10 * math.log10(1 / mse) > 20  # close to, but not the same as, the uncached images
    finally:
        cache.full, cache.shallow = full, shallow
