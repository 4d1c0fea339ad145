"""Inpainting with compiled pipelines: `pipe(prompt, image=, mask_image=, ...)` against diffusers' own
`StableDiffusionInpaintPipeline` / `StableDiffusionXLInpaintPipeline` on the same tiny checkpoint and seed (torch
within 1e-5, ONNX Runtime within 1e-3): 9-channel inpainting U-Nets (SD1.5, SDXL) and the 4-channel latent-blending
path (SD1.5); passes on an inpainting U-Net; the CLI; one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdcompiler import compile_pipeline
from sdcompiler.errors import CheckpointError, PassError, PipelineArgumentError
from sdcompiler.loading import load_checkpoint
from sdcompiler.testing import make_checkpoint

CALL = dict(num_inference_steps=3, output_type="np")
TOLERANCE = {"torch": 1e-5, "onnx": 1e-3}


def _image(size: int = 128, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask(size: int = 128, box=(32, 24, 96, 80)) -> Image.Image:
    """White (repaint) inside `box` (left, top, right, bottom), black elsewhere; grey edges test binarizing."""
    pixels = np.zeros((size, size), dtype=np.uint8)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = 255
    pixels[top, left:right] = 100  # below 0.5: kept
    return Image.fromarray(pixels, mode="L")


@pytest.fixture(scope="module")
def inpaint_checkpoint(tmp_path_factory, tiny_checkpoint):
    """Factory: "sd15" / "sdxl" (9-channel inpainting variants) or "sd15-plain" (the session's text-to-image one)."""
    root = tmp_path_factory.mktemp("inpaint_checkpoints")
    built = {}

    def get(name: str):
        if name == "sd15-plain":
            return tiny_checkpoint("sd15")
        if name not in built:
            built[name] = make_checkpoint(root / name, name, "tiny", seed=0, variant="inpaint")
        return built[name]

    return get


@pytest.fixture(scope="module")
def inpaint_compiled(inpaint_checkpoint, compiled, tmp_path_factory):
    """Factory: (model, target, recipe) -> CompiledPipeline, compiled once per module (the plain SD1.5 ones are
    the session's `compiled` artifacts)."""
    root = tmp_path_factory.mktemp("inpaint_artifacts")
    built = {}

    def get(name: str, target: str, recipe="none"):
        if name == "sd15-plain" and recipe == "none":
            return compiled("sd15", target, "none")
        key = (name, target, str(recipe))
        if key not in built:
            out = root / f"{name}-{target}-{len(built)}"
            built[key] = compile_pipeline(inpaint_checkpoint(name), recipe, target, out, device="cpu")
        return built[key]

    return get


def _reference(checkpoint):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    loaded = load_checkpoint(checkpoint)
    components = loaded.pipeline.components
    if loaded.arch.is_sdxl:
        pipe = StableDiffusionXLInpaintPipeline(**components, add_watermarker=False)
    else:
        components |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        pipe = StableDiffusionInpaintPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("target", ["torch", "onnx"])
@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd15-plain"])
def test_inpaint_matches_diffusers(name, target, inpaint_compiled, inpaint_checkpoint):
    pipe = inpaint_compiled(name, target)
    assert pipe.manifest["model"]["unet_in_channels"] == (4 if name == "sd15-plain" else 9)
    reference = _reference(inpaint_checkpoint(name))
    image, mask = _image(), _mask()
    prompts = ["a cat", "a red cube"]
    for strength in (None, 0.6):  # diffusers' default (1.0; SDXL 0.9999), and from the noised image
        kwargs = dict(image=image, mask_image=mask, **CALL) | ({} if strength is None else {"strength": strength})
        got = pipe(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
        want = reference(prompts, generator=torch.Generator().manual_seed(0), **kwargs).images
        assert got.shape == (2, 128, 128, 3)
        error = np.abs(got - want).max()
        print(f"{name} {target} strength={strength}: max abs diff vs diffusers {error:.2e}")
        assert error < TOLERANCE[target], (strength, error)
    other = pipe(
        prompts, generator=torch.Generator().manual_seed(0), **(kwargs | {"mask_image": _mask(box=(0, 0, 64, 128))})
    )
    assert np.abs(other.images - got).max() > 1e-2  # the mask matters
    if name == "sd15-plain":  # the blend keeps the unmasked region's latents: far from the mask, the image stays
        inside = pipe(prompts[:1], generator=torch.Generator().manual_seed(1), **kwargs).images[0]
        assert np.abs(inside[:, :8] - got[0, :, :8]).max() < np.abs(inside[40:64, 48:80] - got[0, 40:64, 48:80]).max()


def test_inpaint_batching_generators_and_masked_latents(inpaint_compiled, inpaint_checkpoint):
    pipe = inpaint_compiled("sd15", "torch")
    reference = _reference(inpaint_checkpoint("sd15"))
    image, mask = _image(seed=1), _mask(box=(16, 16, 80, 112))
    # two images per prompt, one generator per image, a mask as an array, guidance off
    array_mask = np.asarray(mask, dtype=np.float32)[None, :, :, None] / 255
    kwargs = dict(image=image, mask_image=array_mask, num_images_per_prompt=2, strength=0.8, guidance_scale=1.0)
    got = pipe("a cat", generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs, **CALL).images
    want = reference("a cat", generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs, **CALL)
    assert np.abs(got - want.images).max() < 1e-5
    assert np.abs(got[0] - got[1]).max() > 1e-2  # different noise per image
    # caller-made masked-image latents replace encoding the masked image (and its draw from the generator)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    kwargs = dict(image=image, mask_image=mask, masked_image_latents=latents, **CALL)
    got = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    want = reference("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(got - want).max() < 1e-5
    # padding_mask_crop: inpaint a padded crop around the mask, paste it back (PIL in and out)
    kwargs = dict(image=image, mask_image=_mask(box=(40, 40, 60, 56)), padding_mask_crop=8, num_inference_steps=3)
    got = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    want = reference("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
    assert got.size == image.size
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_inpaint_errors(inpaint_compiled):
    pipe = inpaint_compiled("sd15", "torch")
    plain = inpaint_compiled("sd15-plain", "torch")
    image, mask = _image(), _mask()
    cases = [
        (pipe, dict(), "U-Net inpaints .*pass image= .* and mask_image="),
        (pipe, dict(image=image), "U-Net inpaints"),
        (plain, dict(mask_image=mask), "mask_image needs image="),
        (plain, dict(image=image, mask_image=_mask(size=64)), "mask_image is 64x64 and image 128x128"),
        (plain, dict(image=image, masked_image_latents=torch.zeros(1, 4, 16, 16)), "apply to inpainting only"),
        (plain, dict(image=image, padding_mask_crop=8, output_type="pil"), "apply to inpainting only"),
        (pipe, dict(image=image, mask_image=mask, padding_mask_crop=8, output_type="np"), "output_type='pil'"),
        (pipe, dict(image=np.asarray(image) / 255, mask_image=mask, padding_mask_crop=8, output_type="pil"), "as PIL"),
        (pipe, dict(image=image, mask_image="mask.png"), "mask_image must be a PIL image"),
        (
            pipe,
            dict(image=image, mask_image=mask, masked_image_latents=torch.zeros(1, 4, 8, 8)),
            "masked_image_latents",
        ),
        (pipe, dict(image=image, mask_image=mask, strength=0.1), "leaves no denoising step"),
        (pipe, dict(image=image, mask_image=mask, latents=torch.zeros(1, 4, 16, 16)), "or latents, not both"),
    ]
    for target, kwargs, match in cases:
        with pytest.raises(PipelineArgumentError, match=match) as caught:
            target("a cat", **({"num_inference_steps": 3, "output_type": "np"} | kwargs))
        assert "\n" not in str(caught.value)


def test_passes_on_an_inpainting_unet(inpaint_compiled, inpaint_checkpoint, tmp_path):
    """Structural passes keep conv_in's 9 input channels (their records say so); passes that sample the teacher
    as a text-to-image model (distillation) are refused before any work, in one line (calibration passes run:
    test_inpaint_refiner_passes.py)."""
    pipe = inpaint_compiled("sd15", "torch", ["bk-small", "fuse-qkv"])
    for record in pipe.manifest["passes"]:
        assert record["metrics"]["unet_in_channels"] == 9
    assert pipe.unet.conv_in.in_channels == 9
    out = pipe("a cat", image=_image(), mask_image=_mask(), generator=torch.Generator().manual_seed(0), **CALL)
    assert out.images.shape == (1, 128, 128, 3) and np.isfinite(out.images).all()
    for recipe in ("distill", "cfg-distill"):
        with pytest.raises(PassError, match="inpainting U-Net") as caught:
            compile_pipeline(inpaint_checkpoint("sd15"), ["bk-small", recipe], "torch", tmp_path / recipe)
        assert "\n" not in str(caught.value) and "ptq, quest_w4a4" in str(caught.value)


def test_depth_and_upscale_unets_are_refused(inpaint_checkpoint, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(inpaint_checkpoint("sd15-plain"), tmp_path / "depth")
    config = json.loads((folder / "unet/config.json").read_text()) | {"in_channels": 5}
    (folder / "unet/config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="in_channels=5 .*depth/upscale"):
        load_checkpoint(folder)


def test_generate_cli_mask(inpaint_compiled, tmp_path, capsys):
    from sdcompiler.cli import main

    pipe = inpaint_compiled("sd15", "torch")
    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    _image(seed=4).save(source)
    _mask().save(mask)
    common = ["generate", str(pipe.root), "--prompt", "a cat", "--steps", "3", "--device", "cpu", "--seed", "0"]
    args = ["--image", str(source), "--mask", str(mask), "--strength", "0.7", "--out", str(tmp_path / "out.png")]
    assert main(common + args) == 0
    want = pipe(
        "a cat",
        image=Image.open(source),
        mask_image=Image.open(mask),
        strength=0.7,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(want))
    capsys.readouterr()
    assert main(common + ["--out", str(tmp_path / "x.png")]) == 1  # this artifact needs a mask
    err = capsys.readouterr().err.strip()
    assert "mask_image" in err and "\n" not in err
    assert main(common + ["--mask", str(mask), "--out", str(tmp_path / "x.png")]) == 1  # a mask needs an image
    err = capsys.readouterr().err.strip()
    assert "--image" in err and "\n" not in err


def test_tensorrt_onnx_and_serving_of_an_inpainting_unet(inpaint_checkpoint, inpaint_compiled, tmp_path):
    """tensorrt (no TensorRT here: `engines=false`) optimizes the 9-channel U-Net graph and sizes its profile from
    it; export-server refuses inpainting artifacts (served models take no mask yet) in one line."""
    from sdcompiler.artifact import read_manifest
    from sdcompiler.compile import compile_artifact
    from sdcompiler.errors import ArtifactError
    from sdcompiler.serving import export_server
    from sdcompiler.targets.tensorrt.build import built_engines

    root = compile_artifact(
        inpaint_checkpoint("sd15"), target="tensorrt", output_dir=tmp_path / "trt", target_options={"engines": False}
    )
    profile = built_engines(read_manifest(root))["unet"]["build"]["profile"]["sample"]
    assert [shape[1] for shape in profile] == [9, 9, 9]
    with pytest.raises(ArtifactError, match="inpainting U-Net .*components layout takes no mask yet") as caught:
        export_server(inpaint_compiled("sd15", "onnx").root, tmp_path / "repo", layout="components")
    assert "\n" not in str(caught.value)
    repo = export_server(inpaint_compiled("sd15", "torch").root, tmp_path / "repo")  # the pipeline layout
    assert 'name: "mask_image"' in (repo / "pipeline" / "config.pbtxt").read_text()


def test_served_rows_inpaint_as_the_python_api_does(inpaint_compiled):
    """The `pipeline` model's request (uint8 `image` and `mask_image` per row, rows grouped into one call) gives the
    images of the Python call, row by row; the same prompt and seed with another mask gives other images."""
    from sdcompiler.serving import request_rows, serve_rows

    pipe = inpaint_compiled("sd15", "torch")
    image, mask = np.asarray(_image(seed=3)), np.asarray(_mask())[..., None]
    other = np.asarray(_mask(box=(0, 0, 64, 128)))[..., None]
    inputs = {
        "prompt": np.array([[b"a red cube"], [b"a red cube"]], dtype=object),
        "seed": np.array([[1], [1]], dtype=np.int64),
        "num_inference_steps": np.array([[3], [3]], dtype=np.int32),
        "image": np.stack([image, image]),
        "mask_image": np.stack([mask, other]),
    }
    (served,) = serve_rows(pipe, [request_rows(inputs.get)])
    assert served.shape == (2, 1, 128, 128, 3)
    for row, (prompt, seed, m) in enumerate([("a red cube", 1, mask), ("a red cube", 1, other)]):
        direct = pipe(
            prompt,
            image=image.astype(np.float32)[None] / 255.0,
            mask_image=m.astype(np.float32)[None] / 255.0,
            num_inference_steps=3,
            generator=[torch.Generator().manual_seed(seed)],
            output_type="np",
        ).images
        expected = (direct * 255).round().astype(np.uint8)
        # grouped rows run as one batch of 2: float rounding of batched kernels moves a pixel by one level at most
        assert np.abs(served[row].astype(int) - expected.astype(int)).max() <= 1  # measured: 1 (0 for a lone row)
    assert np.abs(served[0].astype(int) - served[1].astype(int)).max() > 10
