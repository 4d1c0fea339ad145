"""Image-to-image with compiled pipelines: `pipe(prompt, image=..., strength=...)` against diffusers' own
`StableDiffusionImg2ImgPipeline` / `StableDiffusionXLImg2ImgPipeline` on the same tiny checkpoint (torch and
onnx targets), image inputs, batching, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.errors import PipelineArgumentError
from sdcompiler.loading import load_checkpoint

CALL = dict(num_inference_steps=4, output_type="np")


def _image(size: int = 128, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _reference(checkpoint, arch: str):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    cls = StableDiffusionXLImg2ImgPipeline if arch == "sdxl" else StableDiffusionImg2ImgPipeline
    components = load_checkpoint(checkpoint).pipeline.components
    if arch != "sdxl":
        components |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_img2img_matches_diffusers(arch, target, compiled, tiny_checkpoint):
    pipe = compiled(arch, target, "none")
    reference = _reference(tiny_checkpoint(arch), arch)
    image = _image()
    for strength in (0.5, 1.0):
        kwargs = dict(image=image, strength=strength, **CALL)
        got = pipe(["a cat", "a red cube"], generator=torch.Generator().manual_seed(0), **kwargs).images
        want = reference(["a cat", "a red cube"], generator=torch.Generator().manual_seed(0), **kwargs).images
        assert got.shape == (2, 128, 128, 3)
        assert np.abs(got - want).max() < 1e-3, (strength, np.abs(got - want).max())
    text2img = pipe("a cat", generator=torch.Generator().manual_seed(0), **CALL).images
    assert np.abs(got[:1] - text2img).max() > 1e-2  # the start image matters


def test_img2img_default_strength_per_generator_and_batching(compiled, tiny_checkpoint):
    pipe = compiled("sd15", "torch", "none")
    reference = _reference(tiny_checkpoint("sd15"), "sd15")
    image = _image(seed=1)
    # default strength (0.8, as diffusers), two images per prompt, one generator per image
    kwargs = dict(image=image, num_images_per_prompt=2, **CALL)
    got = pipe("a cat", generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    want = reference("a cat", generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    assert got.shape == (2, 128, 128, 3) and np.abs(got - want).max() < 1e-3
    assert np.abs(got[0] - got[1]).max() > 1e-2  # different noise per image


def test_img2img_image_formats_and_resizing(compiled):
    pipe = compiled("sd15", "torch", "none")
    image = _image(seed=2)
    array = np.asarray(image).astype(np.float32) / 255
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1
    outputs = [
        pipe("a cat", image=x, strength=0.5, generator=torch.Generator().manual_seed(0), **CALL).images
        for x in (image, array[None], tensor)
    ]
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5)
    np.testing.assert_allclose(outputs[2], outputs[0], atol=1e-5)
    small = pipe(
        "a cat", image=image, height=64, width=64, strength=0.5, generator=torch.Generator().manual_seed(0), **CALL
    ).images
    assert small.shape == (1, 64, 64, 3)


def test_img2img_with_feature_cache(compiled, tiny_checkpoint):
    pipe = compiled("sd15", "torch", "deepcache")
    image = _image(seed=3)
    kwargs = dict(image=image, strength=0.8, num_inference_steps=10, output_type="np")
    cached = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    full = pipe("a cat", generator=torch.Generator().manual_seed(0), feature_cache=False, **kwargs).images
    want = _reference(tiny_checkpoint("sd15"), "sd15")(
        "a cat", generator=torch.Generator().manual_seed(0), **kwargs
    ).images
    assert np.abs(full - want).max() < 1e-3  # without the cache: diffusers exactly
    assert 0 < np.abs(cached - full).max() < 0.2  # the cache changes the result, a little


def test_img2img_errors(compiled, tiny_checkpoint, tmp_path):
    pipe = compiled("sd15", "torch", "none")
    image = _image()
    cases = [
        (dict(strength=0.5), "strength applies to image-to-image only"),
        (dict(image=image, strength=1.5), r"strength=1.5 must be a number in \(0, 1\]"),
        (dict(image=image, strength=0.1), "leaves no denoising step"),
        (dict(image=image, latents=torch.zeros(1, 4, 16, 16)), "image .* or latents, not both"),
        (dict(image="not an image"), ""),
    ]
    for kwargs, match in cases:
        with pytest.raises(PipelineArgumentError, match=match):
            pipe("a cat", **(CALL | kwargs))
    # an onnx artifact compiled without the VAE encoder says how to get one
    out = compile_pipeline(
        tiny_checkpoint("sd15"),
        "none",
        "onnx",
        tmp_path / "no-encoder",
        show_progress=False,
        target_options={"vae_encoder": False},
    )
    assert not (out.root / "vae_encoder").exists()
    with pytest.raises(PipelineArgumentError, match="no VAE encoder"):
        load_compiled(out.root, device="cpu")("a cat", image=image, **CALL)


def test_onnx_artifact_has_a_verified_vae_encoder(compiled):
    pipe = compiled("sd15", "onnx", "none")
    assert (pipe.root / "vae_encoder" / "model.onnx").is_file()
    assert (pipe.root / "vae_encoder" / "config.json").is_file()
    verify = next(s for s in pipe.manifest["lowering"]["stages"] if s["name"] == "verify")
    assert verify["results"]["vae_encoder"]["max_abs_error"] < 1e-3


def test_generate_cli_image(compiled, tmp_path, capsys):
    from sdcompiler.cli import main

    pipe = compiled("sd15", "torch", "none")
    source = tmp_path / "in.png"
    _image(seed=4).save(source)
    common = ["generate", str(pipe.root), "--prompt", "a cat", "--steps", "4", "--device", "cpu", "--seed", "0"]
    assert main(common + ["--image", str(source), "--strength", "0.5", "--out", str(tmp_path / "out.png")]) == 0
    want = pipe(
        "a cat",
        image=Image.open(source),
        strength=0.5,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(want))
    capsys.readouterr()
    assert main(common + ["--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read image") and "\n" not in err
