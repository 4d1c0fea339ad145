"""The SDXL refiner: a tiny refiner checkpoint (diffusers' `StableDiffusionXLImg2ImgPipeline` layout, text_encoder_2
only, 5 time ids ending with an aesthetic score) against diffusers' own pipeline on the same components and seed,
alone and after an SDXL base as diffusers' ensemble of experts (base to `denoising_end` as latents, refiner from
`denoising_start`), for the torch and onnx targets; and the one-line refusals of misuse.

Compiles are shared: the session's `compiled` artifacts (the SDXL base ones are test_img2img's too) and one onnx
refiner per module, compiled without the verify stage (every test here compares outputs with diffusers anyway).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.errors import PipelineArgumentError, RefinerError
from sdcompiler.loading import load_checkpoint

PROMPTS = ["a cat", "a red cube"]
CALL = dict(num_inference_steps=5, output_type="np")
TOLERANCE = {"torch": 1e-5, "onnx": 1e-3}


def _image(size: int = 128, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    """diffusers' own pipelines on the tiny checkpoints: the refiner loads as StableDiffusionXLImg2ImgPipeline."""
    pipes = {arch: load_checkpoint(tiny_checkpoint(arch)).pipeline for arch in ("sdxl", "sdxl-refiner")}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


class _Refiners(dict):
    """target -> the compiled tiny refiner, compiled on first use (torch: the session's; onnx: this module's)."""

    def __init__(self, compiled, checkpoint, folder):
        super().__init__()
        self.compiled, self.checkpoint, self.folder = compiled, checkpoint, folder

    def __missing__(self, target: str):
        if target == "torch":
            self[target] = self.compiled("sdxl-refiner", "torch")
        else:
            self[target] = compile_pipeline(
                self.checkpoint, "none", target, self.folder / target, device="cpu", target_options={"verify": False}
            )
        return self[target]


@pytest.fixture(scope="module")
def refiners(compiled, tiny_checkpoint, tmp_path_factory):
    return _Refiners(compiled, tiny_checkpoint("sdxl-refiner"), tmp_path_factory.mktemp("refiner"))


def test_refiner_checkpoint_layout_and_manifest(tiny_checkpoint, refiners):
    index = json.loads((tiny_checkpoint("sdxl-refiner") / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["requires_aesthetics_score"]
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    unet = json.loads((tiny_checkpoint("sdxl-refiner") / "unet" / "config.json").read_text())
    assert unet["projection_class_embeddings_input_dim"] == 5 * unet["addition_time_embed_dim"] + 32
    for pipe in (refiners["torch"], refiners["onnx"]):
        assert pipe.manifest["arch"] == "sdxl-refiner"
        assert not (pipe.root / "text_encoder").exists() and (pipe.root / "text_encoder_2").is_dir()
        assert (pipe.root / "tokenizer_2").is_dir() and not (pipe.root / "tokenizer").exists()
    import onnx

    graph = onnx.load(refiners["onnx"].root / "unet" / "model.onnx", load_external_data=False).graph
    graph_inputs = {i.name: i for i in graph.input}
    assert graph_inputs["time_ids"].type.tensor_type.shape.dim[1].dim_value == 5


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_refiner_matches_diffusers_img2img(target, refiners, references):
    """The refiner alone: from an image at a strength, and from latents at denoising_start (no noise added)."""
    pipe, reference = refiners[target], references["sdxl-refiner"]
    latents = torch.randn(2, 4, 16, 16, generator=_seed(1))
    cases = [
        dict(image=_image(), strength=0.6),
        dict(image=latents, denoising_start=0.6, aesthetic_score=3.0, negative_aesthetic_score=8.0),
    ]
    for kwargs in cases:
        got = pipe(PROMPTS, generator=_seed(), **CALL, **kwargs).images
        want = reference(PROMPTS, generator=_seed(), **CALL, **kwargs).images
        assert got.shape == (2, 128, 128, 3)
        error = np.abs(got - want).max()
        print(f"refiner {target} {sorted(kwargs)}: max abs diff {error:.2e}")
        assert error < TOLERANCE[target], (kwargs, error)


def test_aesthetic_score_changes_the_output(refiners, references):
    """Agreement with diffusers cannot come from an ignored input: the scores move the image (and diffusers' too)."""
    pipe, kwargs = refiners["torch"], dict(image=_image(seed=2), strength=0.8, **CALL)
    default = pipe(PROMPTS, generator=_seed(), **kwargs).images
    scored = pipe(PROMPTS, generator=_seed(), aesthetic_score=1.0, negative_aesthetic_score=9.0, **kwargs).images
    want = references["sdxl-refiner"](
        PROMPTS, generator=_seed(), aesthetic_score=1.0, negative_aesthetic_score=9.0, **kwargs
    ).images
    assert np.abs(scored - want).max() < TOLERANCE["torch"]
    assert np.abs(scored - default).max() > 1e-2


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_base_and_refiner_match_diffusers_ensemble(target, compiled, refiners, references):
    """load_compiled(base, refiner=DIR): the base to denoising_end as latents, the refiner from there, one generator."""
    base = compiled("sdxl", target)
    pipe = load_compiled(base.root, device="cpu", refiner=refiners[target].root)
    got = pipe(PROMPTS, generator=_seed(), denoising_end=0.7, aesthetic_score=5.0, **CALL).images
    generator = _seed()
    latents = references["sdxl"](PROMPTS, generator=generator, denoising_end=0.7, **CALL | {"output_type": "latent"})
    want = references["sdxl-refiner"](
        PROMPTS, image=latents.images, generator=generator, denoising_start=0.7, aesthetic_score=5.0, **CALL
    ).images
    error = np.abs(got - want).max()
    print(f"base + refiner {target}: max abs diff {error:.2e}")
    assert got.shape == (2, 128, 128, 3) and error < TOLERANCE[target]
    # the base alone stops at denoising_end as diffusers' does
    alone = base(PROMPTS, generator=_seed(), denoising_end=0.7, **CALL | {"output_type": "latent"}).images
    assert (alone - latents.images).abs().max() < TOLERANCE[target]


def test_generate_cli_with_refiner(compiled, refiners, tmp_path, capsys):
    from sdcompiler.cli import main

    base, refiner = compiled("sdxl", "torch"), refiners["torch"]
    out = tmp_path / "out.png"
    command = ["generate", str(base.root), "--prompt", "a cat", "--steps", "4", "--device", "cpu", "--seed", "0"]
    assert main(command + ["--refiner", str(refiner.root), "--high-noise-frac", "0.6", "--out", str(out)]) == 0
    want = load_compiled(base.root, device="cpu", refiner=refiner.root)(
        "a cat", num_inference_steps=4, denoising_end=0.6, generator=_seed()
    ).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(want))
    capsys.readouterr()
    assert main(command + ["--high-noise-frac", "0.6", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "--high-noise-frac applies with --refiner" in err and "\n" not in err


def test_refiner_misuse_is_refused_in_one_line(compiled, refiners):
    base, refiner = compiled("sdxl", "torch"), refiners["torch"]
    pairs = [
        (compiled("sd15", "torch").root, refiner.root, "a refiner runs after an SDXL base; this artifact is sd15"),
        (base.root, base.root, "is a sdxl artifact, not an SDXL refiner"),
        (refiner.root, refiner.root, "this artifact is sdxl-refiner"),
    ]
    for base_root, refiner_root, match in pairs:
        with pytest.raises(RefinerError, match=match) as info:
            load_compiled(base_root, device="cpu", refiner=refiner_root)
        assert "\n" not in str(info.value)
    paired = load_compiled(base.root, device="cpu", refiner=refiner.root)
    image = _image()
    calls = [
        (refiner, dict(image=image, denoising_start=0.0), r"denoising_start=0.0 must be a number in \(0, 1\)"),
        (refiner, dict(image=image, denoising_start=1.5), r"denoising_start=1.5 must be a number in \(0, 1\)"),
        (base, dict(denoising_end=1), r"denoising_end=1 must be a number in \(0, 1\)"),
        (base, dict(image=image, denoising_start=0.8, denoising_end=0.5), "must be below denoising_end"),
        (refiner, dict(), "the SDXL refiner refines an image: pass image="),
        (base, dict(denoising_start=0.5), "denoising_start applies to image-to-image"),
        (
            base,
            dict(aesthetic_score=6.0),
            "only an SDXL refiner's time ids take an aesthetic score; this artifact is sdxl",
        ),
        (refiner, dict(image=image, aesthetic_score=float("nan")), "aesthetic_score=nan must be a finite number"),
        (compiled("sd15", "torch"), dict(denoising_end=0.5), "splitting the schedule is SDXL's"),
        (paired, dict(denoising_start=0.5), "the refiner starts where the base stops"),
        (refiner, dict(image=image, denoising_start=0.999), "denoising_start=0.999 leaves no denoising step"),
    ]
    for pipe, kwargs, match in calls:
        with pytest.raises(PipelineArgumentError, match=match) as info:
            pipe("a cat", generator=_seed(), **CALL | kwargs)
        assert "\n" not in str(info.value)
