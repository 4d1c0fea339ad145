"""set_scheduler: the artifact carries the new scheduler and call defaults, and samples like diffusers with it.

Oracle: diffusers' own pipeline loaded from the same tiny checkpoint, its
scheduler replaced by `Cls.from_config(pipe.scheduler.config, **options)` and
called with the steps / guidance the pass records; the compiled pipeline,
freshly loaded and called without steps or guidance, must agree to 1e-3 (max
abs, pixels in [0, 1]). Counts for structure: the LCM preset runs one U-Net
batch per prompt (no CFG) at timesteps [999, 759, 499, 259].
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sdcompiler.passes.set_scheduler  # noqa: F401  (registers set_scheduler)
from sdcompiler import load_compiled
from sdcompiler.compile import compile_artifact
from sdcompiler.passes.errors import ConfigError, PassError
from sdcompiler.recipe import resolve_recipe

TOLERANCE = 1e-3
PROMPTS = ["a red cube on a table", "a watercolor fox in the snow"]
DPM = [
    {
        "pass": "set_scheduler",
        "scheduler": "DPMSolverMultistepScheduler",
        "options": {"algorithm_type": "dpmsolver++"},
        "num_inference_steps": 3,
        "guidance_scale": 4.0,
    }
]
EULER_A = [
    {
        "pass": "set_scheduler",
        "scheduler": "EulerAncestralDiscreteScheduler",
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
    }
]
LCM_TIMESTEPS = [999, 759, 499, 259]


@pytest.fixture(scope="module")
def diffusers_images(tiny_checkpoint):
    """Factory: (arch, scheduler, options, steps, guidance) -> images of diffusers' pipeline with that scheduler."""
    import diffusers

    pipes = {}

    def run(arch: str, scheduler: str, options: dict, steps: int, guidance: float) -> np.ndarray:
        if arch not in pipes:
            pipes[arch] = diffusers.DiffusionPipeline.from_pretrained(tiny_checkpoint(arch))
            pipes[arch].set_progress_bar_config(disable=True)
        pipe = pipes[arch]
        original = pipe.scheduler
        pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config, **options)
        try:
            return pipe(
                PROMPTS,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        finally:
            pipe.scheduler = original

    return run


def _run_with_defaults(pipe) -> np.ndarray:
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="np").images


def _assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape and np.isfinite(got).all()
    assert min(image.std() for image in expected) > 0.01  # non-degenerate, so agreement means something
    assert np.abs(expected[0] - expected[1]).max() > 0.01
    error = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
    assert error < TOLERANCE, f"max abs error {error:.3e} >= {TOLERANCE}"


def _read(root, name: str) -> dict:
    return json.loads((root / name).read_text())


@pytest.mark.parametrize("target", ["onnx", "torch"])
def test_dpm_solver_artifact_and_defaults(compiled, diffusers_images, target):
    root = compiled("sd15", target, DPM).root
    scheduler_config = _read(root, "scheduler/scheduler_config.json")
    assert scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
    assert scheduler_config["algorithm_type"] == "dpmsolver++"
    assert _read(root, "model_index.json")["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    manifest = _read(root, "manifest.json")
    assert manifest["defaults"]["num_inference_steps"] == 3 and manifest["defaults"]["guidance_scale"] == 4.0
    assert manifest["passes"][0]["metrics"] == {"num_inference_steps": 3.0, "guidance_scale": 4.0}

    pipe = load_compiled(root, device="cpu")
    expected = diffusers_images("sd15", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, 3, 4.0)
    _assert_close(_run_with_defaults(pipe), expected)


class CountingUNet:
    """Wraps a component U-Net and records (batch, timestep) per call."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, sample, timestep, *args, **kwargs):
        self.calls.append((sample.shape[0], int(timestep)))
        return self.unet(sample, timestep, *args, **kwargs)


def test_lcm_preset_runs_without_cfg(compiled, diffusers_images):
    root = compiled("sd15", "torch", "lcm-scheduler").root
    assert _read(root, "manifest.json")["defaults"] == {"num_inference_steps": 4, "guidance_scale": 1.0}
    assert _read(root, "scheduler/scheduler_config.json")["original_inference_steps"] == 50

    pipe = load_compiled(root, device="cpu")
    counter = CountingUNet(pipe.components.unet)
    pipe.components.unet = counter
    got = _run_with_defaults(pipe)
    assert counter.calls == [(len(PROMPTS), t) for t in LCM_TIMESTEPS]  # one batch per prompt: no uncond half
    _assert_close(got, diffusers_images("sd15", "LCMScheduler", {"original_inference_steps": 50}, 4, 1.0))


def test_sdxl_euler_ancestral_matches_diffusers(compiled, diffusers_images):
    # The ancestral step draws noise from the call's generator: the loop must pass it, in diffusers' order.
    pipe = load_compiled(compiled("sdxl", "torch", EULER_A).root, device="cpu")
    _assert_close(_run_with_defaults(pipe), diffusers_images("sdxl", "EulerAncestralDiscreteScheduler", {}, 3, 5.0))


def test_explicit_timesteps_recorded(compiled):
    recipe = [
        {
            "pass": "set_scheduler",
            "scheduler": "LCMScheduler",
            "options": {"original_inference_steps": 50},
            "timesteps": LCM_TIMESTEPS,
            "guidance_scale": 1.0,
        }
    ]
    root = compiled("sd15", "torch", recipe).root
    defaults = _read(root, "manifest.json")["defaults"]
    assert defaults == {"num_inference_steps": 4, "guidance_scale": 1.0, "timesteps": LCM_TIMESTEPS}


@pytest.mark.parametrize(
    "config, words",
    [
        ({"scheduler": "LCMSchedular"}, "unknown scheduler 'LCMSchedular'; did you mean LCMScheduler"),
        ({"scheduler": "NotAScheduler"}, "unknown scheduler 'NotAScheduler'"),
        ({"scheduler": "FlaxDDIMScheduler"}, "unknown scheduler 'FlaxDDIMScheduler'"),
        ({}, "'scheduler' is required"),
        (
            {"scheduler": "LCMScheduler", "options": {"original_steps": 50}},
            "option(s) original_steps is not LCMScheduler config key(s)",
        ),
        (
            {"scheduler": "DDIMScheduler", "timesteps": [999, 499]},
            "DDIMScheduler.set_timesteps takes no explicit timesteps",
        ),
        (
            {"scheduler": "LCMScheduler", "timesteps": [999, 499], "num_inference_steps": 4},
            "disagrees with the 2 timesteps",
        ),
        ({"scheduler": "LCMScheduler", "options": ["original_inference_steps"]}, "key 'options' must be a mapping"),
        ({"scheduler": "LCMScheduler", "num_inference_steps": 0}, "key 'num_inference_steps' must be >= 1, got 0"),
    ],
)
def test_bad_config_fails_at_resolution(config, words):
    with pytest.raises(ConfigError) as info:
        resolve_recipe([{"pass": "set_scheduler", **config}])
    message = str(info.value)
    assert words in message and "\n" not in message, message


@pytest.mark.parametrize(
    "config, words",
    [
        (
            {"scheduler": "DPMSolverMultistepScheduler", "options": {"algorithm_type": "bogus"}},
            "DPMSolverMultistepScheduler rejects options {'algorithm_type': 'bogus'}",
        ),
        ({"scheduler": "LCMScheduler", "timesteps": [1500, 500]}, "LCMScheduler cannot schedule timesteps [1500, 500]"),
    ],
)
def test_bad_values_fail_before_any_change(tiny_checkpoint, tmp_path, config, words):
    out = tmp_path / "artifact"
    with pytest.raises(PassError) as info:
        compile_artifact(tiny_checkpoint("sd15"), [{"pass": "set_scheduler", **config}], "torch", out)
    message = str(info.value)
    assert "pass 'set_scheduler'" in message and words in message and "\n" not in message, message
    assert not out.exists()


def test_recorded_explicit_timesteps_drive_the_runtime(tiny_checkpoint, tmp_path):
    """A timestep list that set_timesteps(n) would not produce reaches the U-Net, and callers can override it."""
    from sdcompiler import compile_pipeline

    recipe = [
        {
            "pass": "set_scheduler",
            "scheduler": "LCMScheduler",
            "options": {"original_inference_steps": 50},
            "timesteps": [999, 700, 300],
            "guidance_scale": 1.0,
        }
    ]
    pipe = compile_pipeline(tiny_checkpoint("sd15"), recipe, "torch", tmp_path / "out", show_progress=False)
    seen = []
    unet = pipe.components.unet

    def counting(sample, t, *args):
        seen.append(int(t))
        return unet(sample, t, *args)

    pipe.components.unet = counting
    pipe("a cat", output_type="latent")
    assert seen == [999, 700, 300]
    seen.clear()
    pipe("a cat", num_inference_steps=2, output_type="latent")
    assert len(seen) == 2
