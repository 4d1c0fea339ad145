"""Compiled pipelines as drop-ins for diffusers code: the arguments, attributes and methods diffusers' own
pipelines have, each checked against `DiffusionPipeline.from_pretrained` on the same tiny checkpoint.

Torch artifacts run the checkpoint's own modules (images within 1e-5 of diffusers'), onnx artifacts ONNX
Runtime graphs (within 1e-3). Each case also checks that its argument changes the images, so agreement
cannot come from an argument that is silently ignored.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch

from sdcompiler import load_compiled
from sdcompiler.errors import PipelineArgumentError

TOLERANCE = {"torch": 1e-5, "onnx": 1e-3}
CALL = dict(prompt=["a red cube on a table", "a fox"], num_inference_steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_checkpoint):
    """Factory: arch -> diffusers' pipeline on the untouched checkpoint (its scheduler restored after each use)."""
    import diffusers

    pipes = {}

    def get(arch: str):
        if arch not in pipes:
            pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_checkpoint(arch))
            pipe.set_progress_bar_config(disable=True)
            pipes[arch] = pipe
        return pipes[arch]

    return get


@pytest.fixture
def fresh(compiled):
    """Factory: (arch, target) -> a CompiledPipeline loaded anew (tests here change its scheduler and options)."""

    def get(arch: str, target: str):
        return load_compiled(compiled(arch, target).root, device="cpu")

    return get


def _seed():
    return torch.Generator().manual_seed(0)


def _close(got, expected, target: str) -> float:
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    expected = expected.numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert got.shape == expected.shape
    assert np.isfinite(got).all() and expected.std() > 0.01  # real images, not a constant
    error = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
    assert error < TOLERANCE[target], f"max abs error {error:.2e} >= {TOLERANCE[target]:.0e} ({target})"
    return error


def _differs(a, b) -> None:
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert np.abs(a - b).max() > 1e-3, "the argument changed nothing"


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_output_type_pt(compiled, diffusers_pipe, target):
    got = compiled("sd15", target)(**CALL, generator=_seed(), output_type="pt").images
    expected = diffusers_pipe("sd15")(**CALL, generator=_seed(), output_type="pt").images
    assert isinstance(got, torch.Tensor) and got.shape == (2, 3, 128, 128) and got.dtype == torch.float32
    assert 0.0 <= float(got.min()) and float(got.max()) <= 1.0
    _close(got, expected, target)


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_scheduler_swap_and_eta(fresh, diffusers_pipe, target):
    """`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)` and DDIM's eta, as in diffusers."""
    from diffusers import DDIMScheduler

    pipe, reference = fresh("sd15", target), diffusers_pipe("sd15")
    original = reference.scheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    reference.scheduler = DDIMScheduler.from_config(original.config)
    try:
        got = pipe(**CALL, eta=0.7, generator=_seed(), output_type="np").images
        expected = reference(**CALL, eta=0.7, generator=_seed(), output_type="np").images
        without_eta = pipe(**CALL, generator=_seed(), output_type="np").images
        pndm = load_compiled(pipe.root, device="cpu")(**CALL, generator=_seed(), output_type="np").images
    finally:
        reference.scheduler = original
    _close(got, expected, target)
    _differs(got, without_eta)  # eta reaches the scheduler
    _differs(without_eta, pndm)  # and the swapped scheduler is the one sampling


def test_scheduler_swap_keeps_prediction_type(fresh):
    from diffusers import DDIMScheduler

    pipe = fresh("sd15", "torch")
    config = dict(pipe.scheduler.config) | {"prediction_type": "v_prediction"}
    with pytest.raises(PipelineArgumentError, match="prediction_type='v_prediction'") as info:
        pipe.scheduler = DDIMScheduler.from_config(config)
    assert "\n" not in str(info.value)
    with pytest.raises(PipelineArgumentError, match="must be a diffusers scheduler"):
        pipe.scheduler = object()


@pytest.mark.parametrize("target", ["torch", "onnx"])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_prompt_embeds(compiled, diffusers_pipe, arch, target):
    """Embeddings made by diffusers' own `encode_prompt`, passed instead of prompts (SDXL: with the pooled ones)."""
    reference = diffusers_pipe(arch)
    prompts, negative = CALL["prompt"], ["blurry", "dark"]
    with torch.no_grad():
        if arch == "sdxl":
            embeds, neg, pooled, neg_pooled = reference.encode_prompt(
                prompts, device="cpu", num_images_per_prompt=1, negative_prompt=negative
            )
            given = dict(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=neg_pooled)
        else:
            embeds, neg = reference.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negative)
            given = {}
    given |= dict(prompt_embeds=embeds * 1.5, negative_prompt_embeds=neg)  # scaled: not what the prompts give
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, num_images_per_prompt=2, output_type="np")
    pipe = compiled(arch, target)
    got = pipe(**given, **kwargs, generator=_seed()).images
    expected = reference(**given, **kwargs, generator=_seed()).images
    _close(got, expected, target)
    from_prompts = pipe(prompts, negative_prompt=negative, **kwargs, generator=_seed()).images
    _differs(got, from_prompts)


def test_prompt_embeds_refusals(compiled):
    pipe = compiled("sdxl", "torch")
    embeds = torch.zeros(1, 77, 64)
    for kwargs, words in (
        (dict(prompt_embeds=embeds), "needs pooled_prompt_embeds"),
        (dict(prompt_embeds=torch.zeros(1, 77, 40), pooled_prompt_embeds=torch.zeros(1, 32)), "40 wide"),
        (dict(prompt="a", prompt_embeds=embeds), "pass prompt or prompt_embeds"),
        (dict(prompt_embeds=embeds * float("nan"), pooled_prompt_embeds=torch.zeros(1, 32)), "NaN"),
    ):
        with pytest.raises(PipelineArgumentError, match=words) as info:
            pipe(**kwargs, num_inference_steps=1)
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("target", ["torch", "onnx"])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_clip_skip(compiled, diffusers_pipe, arch, target):
    pipe, reference = compiled(arch, target), diffusers_pipe(arch)
    kwargs = CALL | dict(negative_prompt=["blurry", "dark"], output_type="np")
    got = pipe(**kwargs, clip_skip=1, generator=_seed()).images
    _close(got, reference(**kwargs, clip_skip=1, generator=_seed()).images, target)
    _differs(got, pipe(**kwargs, generator=_seed()).images)
    with pytest.raises(PipelineArgumentError, match="clip_skip=9 is more than this"):
        pipe(**kwargs, clip_skip=9)


@pytest.mark.parametrize("target", ["torch", "onnx"])
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_callback_on_step_end(compiled, diffusers_pipe, arch, target):
    """A step callback that reads the embeddings, scales the latents after step 0 and stops after step 1."""
    pipe, reference = compiled(arch, target), diffusers_pipe(arch)
    calls = {"ours": [], "diffusers": []}

    def callback(key):
        def run(p, i, t, tensors):
            calls[key].append((i, int(t), tuple(tensors["prompt_embeds"].shape), sorted(tensors)))
            if i == 1:
                p._interrupt = True
            return {"latents": tensors["latents"] * 0.8} if i == 0 else {}

        return run

    inputs = ["latents", "prompt_embeds"]
    got = pipe(**CALL, callback_on_step_end=callback("ours"), callback_on_step_end_tensor_inputs=inputs,
               generator=_seed(), output_type="np").images  # fmt: skip
    expected = reference(**CALL, callback_on_step_end=callback("diffusers"), callback_on_step_end_tensor_inputs=inputs,
                         generator=_seed(), output_type="np").images  # fmt: skip
    assert calls["ours"] == calls["diffusers"] and len(calls["ours"]) == 2  # step 2 skipped by the interrupt
    assert not pipe.interrupt or pipe._interrupt  # the flag is the pipeline's, reset by the next call
    _close(got, expected, target)
    _differs(got, pipe(**CALL, generator=_seed(), output_type="np").images)
    assert not pipe.interrupt


def test_callback_refusals(compiled):
    pipe = compiled("sd15", "torch")
    with pytest.raises(PipelineArgumentError, match="negative_prompt_embeds are not available"):
        pipe("a", callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["negative_prompt_embeds"])
    with pytest.raises(PipelineArgumentError, match="deprecated callback: use callback_on_step_end"):
        pipe("a", callback=print, callback_steps=1)
    from diffusers.callbacks import SDCFGCutoffCallback

    with pytest.raises(PipelineArgumentError, match="SDCFGCutoffCallback changes guidance"):
        pipe("a", callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_return_dict_false(compiled, diffusers_pipe, arch):
    got = compiled(arch, "torch")(**CALL, generator=_seed(), output_type="np", return_dict=False)
    expected = diffusers_pipe(arch)(**CALL, generator=_seed(), output_type="np", return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(expected)
    if arch == "sd15":
        assert got[1] is None  # diffusers' nsfw flags: no safety checker runs in a compiled pipeline
    _close(got[0], expected[0], "torch")


def test_components_build_a_diffusers_pipeline(compiled, diffusers_pipe):
    """Torch artifacts: `SomePipeline(**pipe.components)` is a working diffusers pipeline on the same modules."""
    from diffusers import StableDiffusionPipeline

    pipe = compiled("sd15", "torch")
    rebuilt = StableDiffusionPipeline(**pipe.components)
    rebuilt.set_progress_bar_config(disable=True)
    assert rebuilt.unet is pipe.unet
    got = rebuilt(**CALL, generator=_seed(), output_type="np").images
    _close(got, pipe(**CALL, generator=_seed(), output_type="np").images, "torch")


def test_components_of_an_onnx_artifact(compiled):
    import onnxruntime

    components = compiled("sdxl", "onnx").components
    assert {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "tokenizer", "tokenizer_2", "scheduler"} <= set(
        components
    )
    assert isinstance(components["unet"], onnxruntime.InferenceSession)
    assert components["tokenizer_2"] is components.tokenizers[1]


def test_to(compiled):
    pipe = compiled("sd15", "onnx")
    assert pipe.to("cpu") is pipe and pipe.to(torch.device("cpu"), torch.float32) is pipe
    with pytest.raises(PipelineArgumentError, match="compiled at fp32.*--precision") as info:
        pipe.to(torch.float16)
    assert "\n" not in str(info.value)
    if not torch.cuda.is_available():
        with pytest.raises(PipelineArgumentError, match="no CUDA device"):
            pipe.to("cuda")
    with pytest.raises(PipelineArgumentError, match="not a device"):
        pipe.to("floppy")


def test_progress_bar_config(fresh, monkeypatch):
    pipe = fresh("sd15", "onnx")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    pipe.set_progress_bar_config(disable=False, desc="my steps")
    pipe("a", num_inference_steps=2, output_type="latent")
    assert "my steps:   0%" in sys.stderr.getvalue()  # (leave=False clears the finished bar)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    pipe.set_progress_bar_config(disable=True)
    pipe("a", num_inference_steps=2, output_type="latent")
    assert sys.stderr.getvalue() == ""
    assert list(pipe.progress_bar(range(3))) == [0, 1, 2]
    assert pipe.progress_bar(total=4).total == 4


def test_generate_cli_scheduler_eta_clip_skip(compiled, tmp_path):
    """`generate --scheduler DDIMScheduler --eta 0.5 --clip-skip 1` writes what the Python call gives."""
    from diffusers import DDIMScheduler
    from PIL import Image

    from sdcompiler.cli import main

    root = compiled("sd15", "torch").root
    args = ["--steps", "3", "--guidance", "5", "--seed", "0", "--eta", "0.5", "--clip-skip", "1"]
    rc = main(["generate", str(root), "--prompt", "a fox", *args, "--scheduler", "DDIMScheduler",
               "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert rc == 0
    pipe = load_compiled(root, device="cpu")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    expected = pipe("a fox", num_inference_steps=3, guidance_scale=5.0, eta=0.5, clip_skip=1, generator=_seed())
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), np.asarray(expected.images[0]))
    assert (
        main(["generate", str(root), "--prompt", "a", "--scheduler", "Floppy", "--out", str(tmp_path / "y.png")]) == 1
    )
