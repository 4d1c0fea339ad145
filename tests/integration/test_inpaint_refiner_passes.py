"""Calibration passes on inpainting U-Nets and the SDXL refiner (issue 20): `ptq` (INT8, modelopt, real INT8
layers on the torch target) and `quest_w4a4` (selective finetuning included) calibrate on the model as it runs,
an inpainting U-Net through diffusers' inpainting pipeline with seeded synthetic images and masks, the refiner
image-to-image at its pipeline's default strength and aesthetic scores (`teacher_data.teacher_task`).

Oracles: the calibration data itself (every U-Net input has the mask and masked-image channels, the masks mix
rectangles and repaint-all, the refiner's time ids carry its aesthetic scores and its timesteps stay in its
strength's range); and diffusers' own `StableDiffusionInpaintPipeline` / `StableDiffusionXLImg2ImgPipeline` built
on the loaded artifact's (quantized) modules, same seed: the compiled pipeline must run the quantized U-Net as
diffusers runs it. The quantized images differ from the float model's (quantization happened), and each record
names its calibration inputs and how conv_in's extra channels were quantized.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcompiler import compile_pipeline, load_compiled
from sdcompiler.loading import load_checkpoint
from sdcompiler.testing import make_checkpoint

TOLERANCE = 1e-5  # images in [0, 1]; measured: 0 (torch's reference kernels on both sides)
CALIBRATION = {"calib_prompts": 2, "held_out_prompts": 1, "calib_steps": 2, "resolution": 64}
RECIPES = {
    "int8": [{"pass": "ptq", "precision": "int8", **CALIBRATION}],
    "quest-w4a4": [
        {"pass": "quest_w4a4", **CALIBRATION, "search_grid": 4, "stage1_steps": 1, "stage2_steps": 1, "batch_size": 2}
    ],
}
# images of the quantized model vs the float one (dB): a floor well below the measured value (in brackets)
PSNR_FLOOR = {"int8": 30.0, "quest-w4a4": 12.0}  # int8 [39.1 inpainting, 39.1 refiner]; quest-w4a4 [21.1, 20.5]
# the conv_in note of each recipe on a 9-channel U-Net: modelopt keeps conv_in float, QuEST quantizes it at 8 bits
CONV_IN = {"int8": "float (9 input channels)", "quest-w4a4": "W8A8 over all 9 input channels"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_checkpoint):
    """Factory: "sd15-inpaint" (a 9-channel inpainting U-Net) or "sdxl-refiner" (the session's tiny refiner)."""
    root = tmp_path_factory.mktemp("inpaint_refiner")
    built = {}

    def get(name: str):
        if name == "sdxl-refiner":
            return tiny_checkpoint("sdxl-refiner")
        if name not in built:
            built[name] = make_checkpoint(root / name, name.split("-")[0], "tiny", seed=0, variant="inpaint")
        return built[name]

    return get


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 64, 64, 3)).astype(np.float32)


def _mask() -> np.ndarray:
    mask = np.zeros((1, 64, 64, 1), dtype=np.float32)
    mask[:, 16:48, 8:40] = 1.0
    return mask


def _call(name: str) -> dict:
    """One call both pipelines take: inpainting (image + mask), or the refiner's image-to-image."""
    call = dict(prompt=["a red cube on a table", "a fox"], num_inference_steps=4, output_type="np", image=_image())
    if name == "sdxl-refiner":
        return call | {"strength": 0.6}
    return call | {"mask_image": _mask(), "guidance_scale": 7.5, "height": 64, "width": 64}


def _diffusers_pipeline(name: str, pipeline, scheduler):
    """diffusers' own inpainting / refiner pipeline on `pipeline`'s modules with `scheduler`."""
    import diffusers

    names = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")
    parts = {k: v for k, v in pipeline.components.items() if k in names} | {"scheduler": scheduler}
    if name == "sdxl-refiner":
        zeros = pipeline.config.get("force_zeros_for_empty_prompt", True)  # the tiny refiner's: False
        reference = diffusers.StableDiffusionXLImg2ImgPipeline(
            **parts, requires_aesthetics_score=True, force_zeros_for_empty_prompt=zeros, add_watermarker=False
        )
    else:
        reference = diffusers.StableDiffusionInpaintPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    reference.set_progress_bar_config(disable=True)
    return reference


def test_calibration_samples_the_model_as_it_runs(checkpoint, tmp_path):
    """The trajectories ptq and quest_w4a4 calibrate on: 9-channel inputs with real masks (a rectangle, then
    repaint-all) for inpainting; the refiner's aesthetic time ids and low-noise timesteps (strength 0.3)."""
    from sdcompiler.passes.teacher_data import calibration_inputs, teacher_trajectories

    common = dict(steps=2, guidance=5.0, resolution=64, seed=0, cache_dir=tmp_path)
    inpaint = load_checkpoint(checkpoint("sd15-inpaint")).pipeline
    assert calibration_inputs(inpaint).startswith("inpainting: seeded synthetic images (upsampled noise) + masks")
    data = teacher_trajectories(inpaint, ["a cat", "a dog"], model_key="inpaint", **common)
    assert data.samples.shape == (2, 4, 9, 8, 8)  # steps, CFG rows (uncond, uncond, cond, cond), channels
    mask = data.samples[:, :, 4]
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    rectangle, repaint_all = mask[:, [0, 2]], mask[:, [1, 3]]
    assert 0 < rectangle.mean() < 1 and (repaint_all == 1).all()
    masked = data.samples[0, :, 5:]  # the masked image's latents: the image, except where it is repainted
    assert masked[0].std() > 0.05 and (masked[0] - masked[1]).abs().max() > 0.05
    again = teacher_trajectories(inpaint, ["a cat", "a dog"], model_key="inpaint-again", **common)
    torch.testing.assert_close(again.samples, data.samples, rtol=0, atol=0)  # seeded: the same data

    refiner = load_checkpoint(checkpoint("sdxl-refiner")).pipeline
    assert calibration_inputs(refiner).startswith("refiner: image-to-image") and "strength 0.3" in (
        calibration_inputs(refiner)
    )
    data = teacher_trajectories(refiner, ["a cat"], model_key="refiner", **common)
    assert data.samples.shape == (2, 2, 4, 8, 8) and data.time_ids.shape == (2, 5)
    assert data.time_ids[:, 4].tolist() == [2.5, 6.0]  # negative, then positive aesthetic score
    assert data.timesteps.max() < 0.3 * 1000  # image-to-image at strength 0.3: the low-noise end only


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,recipe",
    [
        ("sd15-inpaint", "int8"),
        ("sd15-inpaint", "quest-w4a4"),
        ("sdxl-refiner", "int8"),
        ("sdxl-refiner", "quest-w4a4"),
    ],
)
def test_quantized_inpainting_and_refiner_run_as_diffusers_does(name, recipe, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SDCOMPILER_DISABLE_TRITON", "1")  # the kernels' torch references on both sides
    compiled = compile_pipeline(
        checkpoint(name), recipe=RECIPES[recipe], target="torch", output_dir=tmp_path / "out", device="cpu"
    )
    record = compiled.manifest["passes"][-1]
    kind = "refiner" if name == "sdxl-refiner" else "inpainting"
    assert record["notes"]["calibration_data"].startswith(f"{kind}: ")
    if kind == "inpainting":
        assert record["metrics"]["unet_in_channels"] == 9 and record["notes"]["conv_in"] == CONV_IN[recipe]
    assert np.isfinite(record["metrics"]["sqnr_db"])

    pipe = load_compiled(compiled.root, device="cpu")
    unet = pipe.components.pipeline.unet
    quantized = {type(m).__name__ for m in unet.modules()} & {"LowpLinear", "LowpConv2d", "PackedQuantLinear"}
    assert quantized, "the loaded U-Net holds no quantized layer"
    call = _call(name)
    got = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    reference = _diffusers_pipeline(name, pipe.components.pipeline, pipe.components.scheduler_factory())
    expected = reference(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.isfinite(got).all() and got.shape == (2, 64, 64, 3)
    error = float(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64)).max())

    source = load_checkpoint(checkpoint(name)).pipeline  # the float model, as diffusers runs it
    scheduler = type(source.scheduler).from_config(source.scheduler.config)
    floats = _diffusers_pipeline(name, source, scheduler)(**call, generator=torch.Generator().manual_seed(0)).images
    psnr = float(10 * np.log10(1.0 / np.mean((np.asarray(got, np.float64) - floats) ** 2)))
    print(f"{name} {recipe}: max abs error vs diffusers {error:.2e}; PSNR vs the float model {psnr:.1f} dB")
    assert error < TOLERANCE
    assert np.abs(got - floats).max() > 1e-3, "the quantized model gives the float model's images"
    assert psnr > PSNR_FLOOR[recipe]
