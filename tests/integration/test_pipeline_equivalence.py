"""Acceptance oracle for lowering: a compiled artifact, freshly loaded, reproduces diffusers' own pipeline.

For every arch (sd15, sd21, sdxl) and target (onnx, torch), the artifact of
`compile_pipeline(recipe="none")` is loaded again with `load_compiled` (not
the object `compile_pipeline` returned) and run with the same arguments as
`DiffusionPipeline.from_pretrained(checkpoint)`: the images must agree to
1e-3 (max abs, pixel values in [0, 1]). The images are checked to be
non-degenerate first, so agreement means something.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcompiler import load_compiled

ARCHS = ("sd15", "sd21", "sdxl")
TARGETS = ("onnx", "torch")
TOLERANCE = 1e-3

PROMPTS = ["a red cube on a table", "a watercolor fox in the snow"]
NEGATIVE = ["blurry", "low quality, dark"]
BASE = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=2, guidance_scale=5.0)
CASES = {
    "default_size": {},
    "96px": dict(height=96, width=96),  # tiny checkpoints default to 128: proves dynamic spatial shapes
}


def _freeze(kwargs: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


@pytest.fixture(scope="session")
def reference(tiny_checkpoint):
    """Factory: (arch, scheduler=None, **kwargs) -> images of diffusers' eager pipeline on the untouched checkpoint
    (cached); `scheduler`: a diffusers scheduler class name to sample with instead of the checkpoint's."""
    import diffusers

    pipes, images = {}, {}

    def run(arch: str, scheduler: str | None = None, **kwargs) -> np.ndarray:
        key = (arch, scheduler, _freeze(kwargs))
        if key not in images:
            if arch not in pipes:
                pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_checkpoint(arch))
                pipe.set_progress_bar_config(disable=True)
                pipes[arch] = pipe
            pipe = pipes[arch]
            original = pipe.scheduler
            if scheduler is not None:
                pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
            try:
                images[key] = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images
            finally:
                pipe.scheduler = original
        return images[key]

    return run


@pytest.fixture(scope="session")
def fresh(compiled):
    """Factory: (arch, target, recipe) -> a CompiledPipeline loaded anew from the artifact folder."""
    loaded = {}

    def get(arch: str, target: str, recipe: str = "none"):
        key = (arch, target, recipe)
        if key not in loaded:
            returned = compiled(arch, target, recipe)
            pipe = load_compiled(returned.root, device="cpu")
            assert pipe is not returned
            loaded[key] = pipe
        return loaded[key]

    return get


def _run(pipe, **kwargs) -> np.ndarray:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images


def _assert_close(got: np.ndarray, expected: np.ndarray, n_images: int, size: tuple[int, int]) -> None:
    assert isinstance(got, np.ndarray)
    assert got.shape == expected.shape == (n_images, *size, 3)
    assert np.isfinite(got).all()
    # non-degenerate: each image has structure, and the images differ from each other
    for image in expected:
        assert image.std() > 0.01
    if n_images > 1:
        assert np.abs(expected[0] - expected[1]).max() > 0.01
    error = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
    assert error < TOLERANCE, f"max abs error {error:.3e} >= {TOLERANCE}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_diffusers(fresh, reference, arch, target, case):
    kwargs = BASE | CASES[case]
    pipe = fresh(arch, target)
    assert pipe.arch == arch and pipe.target == target
    size = (kwargs.get("height", 128), kwargs.get("width", 128))
    _assert_close(_run(pipe, **kwargs), reference(arch, **kwargs), len(PROMPTS), size)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("arch", ("sd15", "sdxl"))
def test_fuse_qkv_matches_untouched_diffusers(fresh, reference, arch, target):
    pipe = fresh(arch, target, "fuse-qkv")
    assert [p["name"] for p in pipe.manifest["passes"]] == ["fuse_qkv"]
    _assert_close(_run(pipe, **BASE), reference(arch, **BASE), len(PROMPTS), (128, 128))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("arch", ("sd15", "sdxl"))
def test_num_images_per_prompt(fresh, reference, arch, target):
    kwargs = BASE | dict(num_images_per_prompt=2)
    got = _run(fresh(arch, target), **kwargs)
    _assert_close(got, reference(arch, **kwargs), 2 * len(PROMPTS), (128, 128))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("arch", ("sd15", "sdxl"))
def test_without_negative_prompt(fresh, reference, arch, target):
    """SDXL: zeroed negative embeddings (force_zeros_for_empty_prompt); SD: the empty-string negative."""
    kwargs = dict(prompt=PROMPTS, num_inference_steps=2, guidance_scale=5.0)
    got = _run(fresh(arch, target), **kwargs)
    _assert_close(got, reference(arch, **kwargs), len(PROMPTS), (128, 128))
    # and it is really a different computation from the explicit-negative case
    assert np.abs(got - reference(arch, **BASE)).max() > 1e-3


@pytest.mark.parametrize("arch", ("sd15", "sdxl"))
def test_non_square_onnx(fresh, reference, arch):
    kwargs = BASE | dict(height=64, width=96)
    _assert_close(_run(fresh(arch, "onnx"), **kwargs), reference(arch, **kwargs), len(PROMPTS), (64, 96))


@pytest.mark.parametrize("target", TARGETS)
def test_no_guidance_matches_diffusers(fresh, reference, target):
    """guidance_scale=1.0: no classifier-free guidance, a batch of one image per prompt (batch 1 through ONNX)."""
    kwargs = dict(prompt="a red cube on a table", num_inference_steps=2, guidance_scale=1.0)
    _assert_close(_run(fresh("sd15", target), **kwargs), reference("sd15", **kwargs), 1, (128, 128))


def test_euler_scheduler_matches_diffusers(compiled, reference):
    """A scheduler whose initial noise is not unit-variance: Euler's init_noise_sigma is sqrt(sigma_max^2 + 1) (1.9
    at 2 steps of the checkpoints' "leading" spacing), and the initial latents must be scaled by it as diffusers
    does. PNDM's, the checkpoints' own, is 1: the tests above cannot tell a sampler that skips the scaling
    (tests/mutations/drop_init_noise_sigma.patch)."""
    recipe = [{"pass": "set_scheduler", "scheduler": "EulerDiscreteScheduler"}]
    pipe = load_compiled(compiled("sd15", "torch", recipe).root, device="cpu")
    scheduler = pipe.components.scheduler_factory()
    scheduler.set_timesteps(BASE["num_inference_steps"])
    assert type(scheduler).__name__ == "EulerDiscreteScheduler" and scheduler.init_noise_sigma > 1.5
    expected = reference("sd15", scheduler="EulerDiscreteScheduler", **BASE)
    _assert_close(_run(pipe, **BASE), expected, len(PROMPTS), (128, 128))
