"""ONNX artifacts load in optimum's real `ORTDiffusionPipeline` and give the same images.

DESIGN.md promises that an `onnx` artifact uses optimum's diffusers layout
(`model_index.json`, `unet/model.onnx`, `text_encoder[_2]/`, `vae_decoder/`,
`tokenizer[_2]/`, `scheduler/`, a `config.json` per ONNX component, optimum's
input/output names and dtypes), so that `ORTDiffusionPipeline.from_pretrained`
loads it. This checks that with optimum itself (optimum-onnx 0.1.0 /
optimum 2.1.0) on tiny checkpoints: three pipelines (optimum on the
artifact, our `load_compiled` on the artifact, diffusers on the source
checkpoint) must give the same images for the same prompts, negative prompts
and seed.

A deepcache artifact is checked too: its `unet/model.onnx` is the plain U-Net
(the cache's refresh graph lies next to it as `unet/refresh.onnx`), which optimum
runs at every step, knowing nothing of the cache; so there our pipeline runs with
`feature_cache=False` (the cached trajectory is tested in
test_feature_cache_compile.py).
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("SDCOMPILER_QUIET", "1")

import numpy as np
import pytest
import torch

optimum_ort = pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("onnxruntime")

from sdcompiler import load_compiled  # noqa: E402

CASES = (("sd15", "none"), ("sdxl", "none"), ("sd21", "none"), ("sd15", "deepcache"))  # (arch, recipe)
ORT_CLASS = {
    "sd15": "ORTStableDiffusionPipeline",
    "sd21": "ORTStableDiffusionPipeline",
    "sdxl": "ORTStableDiffusionXLPipeline",
}
PROMPTS = ["a red cube on a wooden table", "a blue ball in the grass"]
NEGATIVE = ["blurry", "low quality, watermark"]
CALL = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")
TOLERANCE = 1e-3
OPTIMUM_LOGGER = "optimum.onnxruntime.modeling_diffusion"


def _run(pipe, negative_prompt, **options):
    return pipe(
        prompt=PROMPTS, negative_prompt=negative_prompt, generator=torch.Generator().manual_seed(0), **CALL, **options
    ).images


def _optimum_pipeline(artifact):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    pipe = optimum_ort.ORTDiffusionPipeline.from_pretrained(artifact, session_options=options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on one thread: with 2 intra-op threads on this 2-core machine, any other busy process makes
    torch's OpenMP workers spin (measured: a 2-step tiny pipeline 0.06 s on 1 thread, 10-12 s on 2)."""
    threads, knob = torch.get_num_threads(), os.environ.get("SDCOMPILER_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["SDCOMPILER_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if knob is None:
        os.environ.pop("SDCOMPILER_NUM_THREADS", None)
    else:
        os.environ["SDCOMPILER_NUM_THREADS"] = knob


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c[0] if c[1] == "none" else "-".join(c))
def case(request, tiny_checkpoint, compiled):
    """A tiny checkpoint of `arch` and its onnx artifact for `recipe` (conftest's session fixtures: built once)."""
    arch, recipe = request.param
    artifact = compiled(arch, "onnx", recipe).root
    return {"arch": arch, "recipe": recipe, "checkpoint": tiny_checkpoint(arch), "artifact": artifact}


@pytest.fixture(scope="module")
def diffusers_images(case):
    """Reference images from diffusers' eager pipeline on the source checkpoint, per negative-prompt mode."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(case["checkpoint"])
    pipe.set_progress_bar_config(disable=True)
    return {"negative": _run(pipe, NEGATIVE), "none": _run(pipe, None)}


def test_optimum_loads_artifact_without_warnings(case, caplog):
    """optimum picks the right pipeline class and finds every component; it warns about nothing it had to patch
    (missing `time_cond_proj_dim` / `scaling_factor` in config.json, non-scalar `timestep` input)."""
    with caplog.at_level(logging.WARNING, logger=OPTIMUM_LOGGER):
        pipe = _optimum_pipeline(case["artifact"])
    assert type(pipe).__name__ == ORT_CLASS[case["arch"]]
    encoders = ["text_encoder", "text_encoder_2"] if case["arch"] == "sdxl" else ["text_encoder"]
    for name in ["unet", "vae_decoder", *encoders]:
        assert getattr(pipe, name) is not None, f"optimum did not load {name}"
    assert pipe.unet.input_shapes["timestep"] == [], "optimum expects a scalar timestep"
    patched = [r.getMessage() for r in caplog.records if r.name == OPTIMUM_LOGGER]
    assert not patched, patched


@pytest.mark.parametrize("negative", ["negative", "none"])
def test_optimum_images_match_ours_and_diffusers(case, diffusers_images, negative):
    negative_prompt = NEGATIVE if negative == "negative" else None
    theirs = _run(_optimum_pipeline(case["artifact"]), negative_prompt)
    # optimum runs the whole U-Net at every step: so does ours, with a feature cache switched off
    uncached = {"feature_cache": False} if case["recipe"] == "deepcache" else {}
    ours = _run(load_compiled(case["artifact"], device="cpu"), negative_prompt, **uncached)
    reference = diffusers_images[negative]

    assert theirs.shape == ours.shape == reference.shape == (len(PROMPTS), 128, 128, 3)
    assert np.isfinite(theirs).all()
    # not a degenerate image (a constant image would match trivially)
    assert theirs.std() > 1e-3 and np.abs(theirs[0] - theirs[1]).max() > 1e-3
    errors = {
        "optimum vs ours": np.abs(theirs - ours).max(),
        "optimum vs diffusers": np.abs(theirs - reference).max(),
        "ours vs diffusers": np.abs(ours - reference).max(),
    }
    assert max(errors.values()) < TOLERANCE, errors
