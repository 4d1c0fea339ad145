"""The compiled pipeline's call: supported arguments, output types, validation, latents, guidance, repr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdcompiler.errors import PipelineArgumentError
from sdcompiler.runtime import SUPPORTED_ARGUMENTS

TARGETS = ("onnx", "torch")
FAST = dict(num_inference_steps=2, guidance_scale=5.0)


@pytest.fixture(params=TARGETS)
def pipe(request, compiled):
    return compiled("sd15", request.param)


def _call(pipe, prompt="a red cube", seed=0, **kwargs):
    return pipe(prompt, **(FAST | kwargs), generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize(
    "extra",
    [
        {"callback": print},
        {"cross_attention_kwargs": {"scale": 0.5}},
        {"ip_adapter_image": None},
    ],
)
def test_unsupported_argument_is_named(pipe, extra):
    with pytest.raises(PipelineArgumentError) as info:
        pipe("a red cube", **extra)
    message = str(info.value)
    assert next(iter(extra)) in message
    for name in SUPPORTED_ARGUMENTS:
        assert name in message
    assert "\n" not in message


def test_supported_arguments_are_diffusers_common_ones_plus_the_feature_cache_switch():
    # diffusers' text-to-image arguments (tests/integration/test_diffusers_dropin.py checks them against
    # diffusers), its image-to-image ones (image, strength), its ControlNet ones (tests/integration/
    # test_controlnet.py; control_image only to refuse it), its inpainting ones (tests/integration/
    # test_inpaint.py), the SDXL refiner's (tests/integration/test_refiner.py), and the feature-cache switch
    assert set(SUPPORTED_ARGUMENTS) == {
        "prompt",
        "negative_prompt",
        "num_inference_steps",
        "guidance_scale",
        "height",
        "width",
        "generator",
        "latents",
        "num_images_per_prompt",
        "output_type",
        "timesteps",
        "feature_cache",
        "image",
        "strength",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "clip_skip",
        "eta",
        "callback_on_step_end",
        "callback_on_step_end_tensor_inputs",
        "return_dict",
        "controlnet_conditioning_scale",
        "control_guidance_start",
        "control_guidance_end",
        "guess_mode",
        "control_image",
        "mask_image",
        "masked_image_latents",
        "padding_mask_crop",
        "aesthetic_score",
        "negative_aesthetic_score",
        "denoising_start",
        "denoising_end",
    }


def test_negative_prompt_at_guidance_one_warns(pipe):
    with pytest.warns(UserWarning, match="negative_prompt has no effect at guidance_scale=1.0"):
        _call(pipe, "a red cube", negative_prompt="blurry", guidance_scale=1.0, num_inference_steps=1)


def test_output_type_pil(pipe):
    images = _call(pipe, ["a red cube", "a fox"], output_type="pil", height=64, width=96)
    assert isinstance(images, list) and len(images) == 2
    for image in images:
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert image.size == (96, 64)  # PIL: (width, height)
    array = _call(pipe, ["a red cube", "a fox"], output_type="np", height=64, width=96)
    np.testing.assert_array_equal(np.asarray(images[0]), (array[0] * 255).round().astype(np.uint8))


def test_output_type_np(pipe):
    images = _call(pipe, output_type="np", height=64, width=96)
    assert isinstance(images, np.ndarray) and images.shape == (1, 64, 96, 3)
    assert images.dtype == np.float32 and 0 <= images.min() and images.max() <= 1 and images.std() > 0.01


def test_output_type_latent(pipe):
    latents = _call(pipe, ["a", "b"], output_type="latent", height=64, width=96, num_images_per_prompt=2)
    assert isinstance(latents, torch.Tensor) and tuple(latents.shape) == (4, 4, 8, 12)
    assert torch.isfinite(latents).all()


def test_default_output_type_is_pil(pipe):
    images = pipe("a red cube", **FAST, height=64, width=64).images
    assert isinstance(images, list) and isinstance(images[0], Image.Image)


@pytest.mark.parametrize("bad", ["torch", "tensor", None])
def test_unknown_output_type(pipe, bad):
    with pytest.raises(PipelineArgumentError, match="output_type"):
        _call(pipe, output_type=bad)


@pytest.mark.parametrize("size", [dict(height=100), dict(width=60), dict(height=-8), dict(width=12)])
def test_size_must_be_a_positive_multiple_of_8(pipe, size):
    with pytest.raises(PipelineArgumentError, match=next(iter(size))):
        _call(pipe, **size)


def test_negative_prompt_count_mismatch(pipe):
    with pytest.raises(PipelineArgumentError, match="negative_prompt"):
        _call(pipe, ["a", "b", "c"], negative_prompt=["x", "y"])


def test_single_negative_prompt_is_broadcast(pipe):
    a = _call(pipe, ["a red cube", "a fox"], negative_prompt="blurry", output_type="np")
    b = _call(pipe, ["a red cube", "a fox"], negative_prompt=["blurry", "blurry"], output_type="np")
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [dict(prompt=None), dict(prompt=3), dict(prompt=["ok", 3]), dict(num_images_per_prompt=0), dict(negative_prompt=5)],
)
def test_bad_values(pipe, kwargs):
    kwargs = {"prompt": "a red cube"} | kwargs
    with pytest.raises(PipelineArgumentError):
        pipe(**kwargs, **FAST, output_type="np")


def test_given_latents_reproduce_the_generator_result(pipe):
    from diffusers.utils.torch_utils import randn_tensor

    expected = _call(pipe, ["a red cube", "a fox"], seed=3, output_type="np", height=64, width=96)
    noise = randn_tensor((2, 4, 8, 12), generator=torch.Generator().manual_seed(3))
    got = pipe(["a red cube", "a fox"], **FAST, output_type="np", height=64, width=96, latents=noise.clone()).images
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    other = pipe(["a red cube", "a fox"], **FAST, output_type="np", height=64, width=96, latents=noise + 1).images
    assert np.abs(other - expected).max() > 1e-3  # the latents are really used


def test_latents_with_the_wrong_shape(pipe):
    with pytest.raises(PipelineArgumentError, match="latents"):
        _call(pipe, latents=torch.randn(1, 4, 8, 8), height=128, width=128)


def test_same_seed_same_image_different_seed_different_image(pipe):
    a, b, c = (_call(pipe, seed=s, output_type="np", height=64, width=64) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def _n_calls(pipe, steps: int) -> int:
    """U-Net calls per image for `steps` (PNDM, the SD1.5 scheduler, evaluates one timestep twice)."""
    scheduler = pipe.components.scheduler_factory()
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def _count_unet_batches(pipe, monkeypatch) -> list[int]:
    batches = []
    unet = pipe.components.unet

    def counting_unet(sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
        batches.append(sample.shape[0])
        assert encoder_hidden_states.shape[0] == sample.shape[0]
        return unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids)

    monkeypatch.setattr(pipe.components, "unet", counting_unet)
    return batches


def test_guidance_scale_1_skips_the_unconditional_batch(pipe, monkeypatch):
    batches = _count_unet_batches(pipe, monkeypatch)
    images = _call(pipe, ["a red cube", "a fox"], guidance_scale=1.0, output_type="np", height=64, width=64)
    assert images.shape == (2, 64, 64, 3) and images.std() > 0.01
    assert batches == [2] * _n_calls(pipe, 2)  # one conditional batch of two images per call
    batches.clear()
    _call(pipe, ["a red cube", "a fox"], guidance_scale=5.0, output_type="np", height=64, width=64)
    assert batches == [4] * _n_calls(pipe, 2)  # unconditional + conditional
    batches.clear()
    _call(
        pipe,
        "a red cube",
        guidance_scale=3.0,
        num_images_per_prompt=3,
        num_inference_steps=3,
        output_type="latent",
        height=64,
        width=64,
    )
    assert batches == [6] * _n_calls(pipe, 3)


def test_manifest_defaults_apply(pipe, monkeypatch):
    """Without num_inference_steps / guidance_scale the manifest's defaults (50 steps, 7.5 for SD) are used."""
    batches = _count_unet_batches(pipe, monkeypatch)
    pipe("a red cube", output_type="latent", height=64, width=64, generator=torch.Generator().manual_seed(0))
    assert batches == [2] * _n_calls(pipe, 50)
    assert pipe.manifest["defaults"] == {"num_inference_steps": 50, "guidance_scale": 7.5}


def test_sdxl_guidance_scale_1(compiled, monkeypatch):
    pipe = compiled("sdxl", "onnx")
    batches = _count_unet_batches(pipe, monkeypatch)
    images = _call(pipe, "a red cube", guidance_scale=1.0, output_type="np", height=64, width=64)
    assert images.shape == (1, 64, 64, 3) and images.std() > 0.01 and batches == [1] * _n_calls(pipe, 2)


def test_manifest_and_repr(pipe, compiled):
    assert isinstance(pipe.manifest, dict)
    assert pipe.manifest["arch"] == "sd15" and pipe.manifest["target"] == pipe.target
    text = repr(pipe)
    assert "sd15" in text and pipe.target in text
    fused = compiled("sd15", "torch", "fuse-qkv")
    assert "fuse_qkv" in repr(fused) and "torch" in repr(fused)
    assert "sdxl" in repr(compiled("sdxl", "onnx"))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(latents=np.zeros((1, 4, 16, 16), dtype=np.float32)), ("latents must be a torch.Tensor", "ndarray")),
        (dict(generator=5), ("generator", "int")),
        (dict(generator=[torch.Generator()] * 3), ("3 generators", "batch of 1")),
        (dict(generator=[torch.Generator()] * 2, num_images_per_prompt=3), ("2 generators", "batch of 3")),
        (dict(image=Image.new("RGB", (3, 3))), ("height=0", "image")),
        (dict(image=np.zeros((3, 3, 3), dtype=np.float32)), ("height=0",)),
        (dict(image=torch.zeros(1, 3, 3, 3)), ("height=0",)),
        (dict(guidance_scale=float("nan")), ("guidance_scale=nan", "finite")),
        (dict(guidance_scale=float("inf")), ("guidance_scale=inf", "finite")),
        (dict(height=100_000), ("height=100000", "SDCOMPILER_MAX_IMAGE_SIZE")),
        (dict(num_images_per_prompt=1_000_000), ("SDCOMPILER_MAX_BATCH",)),
        (dict(num_inference_steps=10**8), ("SDCOMPILER_MAX_STEPS",)),
    ],
)
def test_python_api_mistakes_are_one_line_argument_errors(pipe, kwargs, words):
    kwargs = {"num_inference_steps": 2, "output_type": "np"} | kwargs
    with pytest.raises(PipelineArgumentError) as info:
        pipe("a red cube", **kwargs)
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_one_generator_per_image_is_accepted(pipe):
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    images = pipe("a red cube", num_images_per_prompt=2, generator=generators, **FAST, output_type="np").images
    assert images.shape[0] == 2


def test_latents_turning_non_finite_stop_naming_the_step(pipe, monkeypatch):
    from sdcompiler.errors import GenerationError

    unet, calls = pipe.components.unet, []

    def failing_unet(sample, *args):
        calls.append(1)
        eps = unet(sample, *args)
        return eps * float("nan") if len(calls) == 2 else eps

    monkeypatch.setattr(pipe.components, "unet", failing_unet)
    with pytest.raises(GenerationError) as info:
        pipe("a red cube", num_inference_steps=4, guidance_scale=5.0, output_type="np", height=64, width=64)
    message = str(info.value)
    assert "\n" not in message and "NaN/Inf at step 2 of" in message
    assert len(calls) == 2  # stopped at once, nothing decoded
