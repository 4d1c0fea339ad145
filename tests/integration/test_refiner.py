"""The SDXL refiner: a tiny refiner checkpoint (diffusers' `StableDiffusionXLImg2ImgPipeline` layout, text_encoder_2
only, 5 time ids ending with an aesthetic score) against diffusers' own pipeline on the same components and seed,
alone and after an SDXL base as diffusers' ensemble of experts (base to `denoising_end` as latents, refiner from
`denoising_start`), for the torch and onnx targets; and the one-line refusals of misuse.

Compiles are shared: the session's `compiled` artifacts (the SDXL base ones are test_img2img's too) and one onnx
refiner per module, compiled without the verify stage (every test here compares outputs with diffusers anyway).
"""

from __future__ import annotations

import json
import re

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


# --- serving: the `pipeline` model with a refiner attached, and a refiner alone ----------------------------------

SERVED = dict(num_inference_steps=4, height=64, width=64)


def _served_model_pipeline(repo, monkeypatch):
    """What the repository's model.py loads in Triton's Python backend (its `initialize`, run here with a stand-in
    for the backend's utilities module, which `initialize` does not use)."""
    import importlib.util
    import sys
    import types

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("served_refiner_model", repo / "pipeline" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_repository": str(repo / "pipeline"), "model_version": "1"})
    return model.pipeline


def _request(prompts: list[str], **settings):
    """A served request's rows (`request_rows`) from its tensors as Triton hands them over: [rows, 1] per setting
    (one value for every row), images [rows, H, W, C] uint8."""
    from sdcompiler.serving import request_rows

    types = {"seed": np.int64, "num_inference_steps": np.int32, "height": np.int32, "width": np.int32}
    tensors = {"prompt": np.array([[p.encode()] for p in prompts], dtype=object)}
    for name, value in settings.items():
        if name == "image":
            tensors[name] = value
        else:
            values = value if isinstance(value, list) else [value] * len(prompts)
            tensors[name] = np.array(values, dtype=types.get(name, np.float32)).reshape(-1, 1)
    return request_rows(tensors.get)


def _uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)  # as the served model rounds


def test_served_base_and_refiner_rows_match_load_compiled(compiled, refiners, tmp_path, monkeypatch):
    """export_server(base, refiner=DIR): a self-contained repository (served after both source artifacts are gone)
    whose pipeline model runs the base to `denoising_end`, then the refiner, row by row as
    `load_compiled(base, refiner=DIR)` does with the same arguments and seed; bad rows fail alone, in one line."""
    import shutil

    from sdcompiler.serving import export_server, one_line, serve_rows

    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")
    base, refiner = compiled("sdxl", "torch"), refiners["torch"]
    copies = {name: shutil.copytree(pipe.root, tmp_path / name) for name, pipe in (("base", base), ("ref", refiner))}
    repo = export_server(copies["base"], tmp_path / "repo", refiner=copies["ref"])
    version = repo / "pipeline" / "1"
    assert sorted(p.name for p in repo.iterdir()) == ["pipeline"]
    assert (version / "artifact" / "manifest.json").is_file() and (version / "refiner" / "manifest.json").is_file()
    assert "refiner=folder / 'refiner'" in (version / "model.py").read_text()
    for folder in copies.values():
        shutil.rmtree(folder)
    served = _served_model_pipeline(repo, monkeypatch)

    scores = dict(denoising_end=0.5, aesthetic_score=3.0, negative_aesthetic_score=8.0)
    split = _request(["a cat", "a red cube"], seed=[1, 2], **scores, **SERVED)  # one grouped call of two rows
    default = _request(["a cat"], seed=1, **SERVED)  # diffusers' split 0.8 and scores 6 / 2.5
    bad_split = _request(["a cat"], denoising_end=1.5, **SERVED)
    bad_score = _request(["a cat"], aesthetic_score=float("nan"), **SERVED)
    results = serve_rows(served, [split, default, bad_split, bad_score])
    assert results[0].shape == (2, 1, 64, 64, 3) and results[1].shape == (1, 1, 64, 64, 3)

    paired = load_compiled(base.root, device="cpu", refiner=refiner.root)
    worst = 0
    for got, prompt, seed, kwargs in [
        (results[0][0], "a cat", 1, scores),
        (results[0][1], "a red cube", 2, scores),
        (results[1][0], "a cat", 1, {}),
    ]:
        want = _uint8(paired(prompt, generator=_seed(seed), output_type="np", **SERVED, **kwargs).images)
        worst = max(worst, int(np.abs(got.astype(int) - want.astype(int)).max()))
    print(f"served base + refiner vs load_compiled: max diff {worst} uint8 levels")
    assert worst <= 1
    # the split and the scores reach the served call: the same prompt and seed with diffusers' defaults differs
    assert np.abs(results[0][0].astype(int) - results[1][0].astype(int)).max() > 8

    for result, match in [
        (results[2], r"denoising_end=1.5 must be a number in \(0, 1\)"),
        (results[3], "aesthetic_score=nan must be a finite number"),
    ]:
        assert isinstance(result, Exception) and re.search(match, one_line(result)) and "\n" not in one_line(result)
    # the base served alone takes no aesthetic score: the Python API's message
    (alone,) = serve_rows(base, [_request(["a cat"], aesthetic_score=6.0, **SERVED)])
    assert "only an SDXL refiner's time ids take an aesthetic score" in one_line(alone)


def test_served_refiner_alone_refines_images(refiners):
    """An SDXL refiner artifact served alone (its pipeline model: image-to-image): rows with `image` give the
    Python call's images; a row without one gets the Python API's message."""
    from sdcompiler.serving import one_line, serve_rows

    refiner = refiners["torch"]
    picture = np.random.default_rng(4).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    rows = _request(["a cat"], image=picture, strength=0.6, seed=3, aesthetic_score=4.0, num_inference_steps=4)
    served, refused = serve_rows(refiner, [rows, _request(["a cat"], num_inference_steps=4)])
    want = refiner(
        "a cat",
        image=picture.astype(np.float32) / 255.0,
        strength=0.6,
        aesthetic_score=4.0,
        num_inference_steps=4,
        generator=_seed(3),
        output_type="np",
    ).images
    assert served.shape == (1, 1, 64, 64, 3)
    assert np.abs(served[0].astype(int) - _uint8(want).astype(int)).max() <= 1
    assert one_line(refused).startswith("the SDXL refiner refines an image: pass image=")


def test_export_server_with_a_refiner_refuses_what_cannot_serve_in_one_line(compiled, refiners, tmp_path, capsys):
    from sdcompiler.cli import main
    from sdcompiler.errors import ConfigError
    from sdcompiler.serving import export_server

    base, refiner = compiled("sdxl", "torch"), refiners["torch"]
    refusals = [
        (compiled("sd15", "torch").root, dict(refiner=refiner.root), RefinerError, "a refiner runs after an SDXL base"),
        (base.root, dict(refiner=base.root), RefinerError, "is a sdxl artifact, not an SDXL refiner"),
        (base.root, dict(refiner=refiner.root, layout="components"), ConfigError, "does not serve a base \\+ refiner"),
        (refiners["onnx"].root, dict(layout="components"), ConfigError, "does not serve an SDXL refiner"),
    ]
    for artifact, kwargs, error, match in refusals:
        with pytest.raises(error, match=match) as info:
            export_server(artifact, tmp_path / "never", **kwargs)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "never").exists()
    # an onnx refiner alone: layout pipeline by default (the components layout has no VAE encoder)
    alone = export_server(refiners["onnx"].root, tmp_path / "alone")
    assert sorted(p.name for p in alone.iterdir()) == ["pipeline"]
    assert (alone / "pipeline" / "1" / "artifact" / "manifest.json").is_file()

    out = tmp_path / "cli"
    assert main(["export-server", str(base.root), "--refiner", str(refiner.root), "--out", str(out)]) == 0
    assert (out / "pipeline" / "1" / "refiner" / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["export-server", str(refiner.root), "--refiner", str(refiner.root), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert "a refiner runs after an SDXL base; this artifact is sdxl-refiner" in err and "\n" not in err
