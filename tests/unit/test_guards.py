"""Guards that refuse before any work (issue 14, items 3 and 4): YAML limits, the rules every pass config shares,
work budgets, call-argument preflight over a manifest, component-config checks, and the trainer's stop on a
non-finite loss. Each refusal is one line."""

from __future__ import annotations

import json
import time

import pytest
import torch

from sdcompiler.errors import CheckpointError, ConfigError, PipelineArgumentError, RecipeError
from sdcompiler.model_configs import check_component_configs
from sdcompiler.passes.config import BUDGETS, KEY_RANGES
from sdcompiler.preflight import check_call, min_latent_size, unet_parameters
from sdcompiler.recipe import MAX_YAML_NODES, read_yaml, resolve_recipe


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message and message
    return message


# --- YAML ---------------------------------------------------------------------------------------------------


def test_alias_bomb_is_refused_fast(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        read_yaml(tmp_path / "bomb.yaml")
    assert time.perf_counter() - start < 1.0
    assert str(MAX_YAML_NODES) in _one_line(info)


def test_shared_aliases_within_the_limit_load(tmp_path):
    (tmp_path / "ok.yaml").write_text("base: &b {steps: 2}\nitems: [*b, *b, *b]\n")
    assert read_yaml(tmp_path / "ok.yaml")["items"] == [{"steps": 2}] * 3


def test_alias_cycle_and_deep_nesting_and_size(tmp_path):
    (tmp_path / "cycle.yaml").write_text("a: &a [*a]\n")
    with pytest.raises(RecipeError, match="contains itself"):
        read_yaml(tmp_path / "cycle.yaml")
    (tmp_path / "deep.yaml").write_text("[" * 100_000 + "]" * 100_000)
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="deeper than 64") as info:
        read_yaml(tmp_path / "deep.yaml")
    assert time.perf_counter() - start < 5.0
    _one_line(info)
    (tmp_path / "big.yaml").write_text("a: '" + "x" * (1 << 21) + "'\n")
    with pytest.raises(RecipeError, match="byte limit"):
        read_yaml(tmp_path / "big.yaml")
    (tmp_path / "bad.yaml").write_text("a: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")


# --- pass configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, words",
    [
        ({"lr": float("inf")}, ("'lr'", "finite")),
        ({"lr": float("nan")}, ("'lr'", "finite")),
        ({"teacher_guidance": float("-inf")}, ("teacher_guidance", "finite")),
        ({"lr": 0.0}, ("'lr'", "> 0")),
        ({"steps": -5}, ("'steps'", ">= 1")),
        ({"batch_size": 0}, ("'batch_size'", ">= 1")),
        ({"resolution": 4}, ("'resolution'", ">= 8")),
        ({"checkpoint_every": -1}, ("'checkpoint_every'", ">= 0")),
    ],
)
def test_every_config_refuses_non_finite_and_out_of_range_values(override, words):
    with pytest.raises(ConfigError) as info:
        resolve_recipe([{"preset": "distill", **override}])
    message = _one_line(info)
    assert all(word in message for word in words), message


def test_non_finite_floats_inside_lists_are_refused():
    with pytest.raises(ConfigError, match="finite"):
        resolve_recipe([{"pass": "distill_cfg", "guidance_range": [2.0, float("nan")]}])


def test_key_ranges_apply_to_every_pass_that_has_the_key():
    from sdcompiler.passes import available_passes, get_pass

    checked = 0
    for name in available_passes():
        config_class = get_pass(name).config_class
        for key in set(KEY_RANGES) & {f for f in config_class.__dataclass_fields__}:
            low, _, _ = KEY_RANGES[key]
            with pytest.raises(ConfigError, match=key):
                config_class.from_dict({key: low - 1}, owner=name)
            checked += 1
    assert checked >= 20


def test_budgets_refuse_and_a_recipe_raises_them():
    with pytest.raises(ConfigError) as info:
        resolve_recipe(["bk-small", {"preset": "distill", "steps": BUDGETS["steps"] + 1}])
    assert "limits" in _one_line(info)
    raised = {"version": 1, "limits": {"steps": 50_000}, "passes": ["bk-small", {"preset": "distill", "steps": 50_000}]}
    assert resolve_recipe(raised)[1].config.steps == 50_000
    with pytest.raises(RecipeError, match="unknown limit"):
        resolve_recipe({"version": 1, "limits": {"speed": 2}, "passes": []})
    with pytest.raises(RecipeError, match="positive integer"):
        resolve_recipe({"version": 1, "limits": {"steps": -1}, "passes": []})


def test_every_preset_stays_within_the_ranges_and_budgets():
    from sdcompiler.recipe import available_presets

    for name in available_presets():
        resolve_recipe([name])


# --- call preflight (a manifest, no model) ------------------------------------------------------------------

MANIFEST = {
    "model": {"vae_scale_factor": 8, "default_size": 128, "min_latent_size": 8, "decode_bytes_per_pixel": 128},
    "defaults": {"num_inference_steps": 50, "guidance_scale": 7.5},
}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(guidance_scale=float("nan")), ("guidance_scale=nan", "finite")),
        (dict(guidance_scale=float("inf")), ("guidance_scale=inf",)),
        (dict(guidance_scale=-1.0), ("guidance_scale=-1.0", ">= 0")),
        (dict(guidance_scale="7"), ("guidance_scale='7'",)),
        (dict(num_inference_steps=0), ("num_inference_steps=0",)),
        (dict(num_inference_steps=2.5), ("num_inference_steps=2.5",)),
        (dict(num_inference_steps=10**8), ("SDCOMPILER_MAX_STEPS",)),
        (dict(timesteps=list(range(2000))), ("2000 denoising steps",)),
        (dict(strength=0.0, image=torch.zeros(1, 3, 128, 128)), ("strength=0.0", "(0, 1]")),
        (dict(strength=float("nan"), image=torch.zeros(1, 3, 128, 128)), ("strength=nan",)),
        (dict(height=100), ("height=100", "multiple of 8")),
        (dict(height=64.0), ("height=64.0",)),
        (dict(width=32), ("width=32", "64 px")),  # the manifest's U-Net pools over 8 latent pixels
        (dict(height=100_000), ("SDCOMPILER_MAX_IMAGE_SIZE",)),
        (dict(num_images_per_prompt=1_000_000), ("SDCOMPILER_MAX_BATCH",)),
        (dict(num_images_per_prompt=True), ("num_images_per_prompt",)),
        (dict(prompt=[]), ("prompt",)),
        (dict(image=torch.zeros(1, 3, 3, 3)), ("height=0", "image")),
        (dict(image="cat.png"), ("image must be",)),
        (dict(generator=5), ("generator", "int", "manual_seed")),
        (dict(generator=[torch.Generator()] * 3), ("3 generators", "batch of 1")),
        (dict(generator=[torch.Generator(), 5]), ("generator",)),
        (dict(latents=[[0.0]]), ("latents must be a torch.Tensor", "list")),
        (dict(latents=torch.full((1, 4, 16, 16), float("nan"))), ("NaN",)),
    ],
)
def test_call_preflight_refuses(kwargs, words):
    kwargs = {"prompt": "a cat"} | kwargs
    with pytest.raises(PipelineArgumentError) as info:
        check_call(MANIFEST, **kwargs)
    message = _one_line(info)
    assert all(word in message for word in words), message


def test_call_preflight_memory_and_knobs(monkeypatch):
    check_call(MANIFEST, prompt="a cat", height=4096, width=4096)  # 2 GiB at 128 B/px: fits this machine
    monkeypatch.setenv("SDCOMPILER_MEMORY_LIMIT", "1G")
    with pytest.raises(PipelineArgumentError) as info:
        check_call(MANIFEST, prompt="a cat", height=4096, width=4096)
    assert "GiB" in _one_line(info) and "1.0 GiB of SDCOMPILER_MEMORY_LIMIT" in str(info.value)
    check_call(MANIFEST, prompt="a cat", height=512, width=512)
    monkeypatch.setenv("SDCOMPILER_MAX_IMAGE_SIZE", "200000")
    monkeypatch.setenv("SDCOMPILER_MEMORY_LIMIT", "1T")
    check_call(MANIFEST, prompt="a cat", height=100_000, width=64)  # raised bounds let it through
    monkeypatch.setenv("SDCOMPILER_MAX_STEPS", "zero")
    with pytest.raises(ConfigError, match="SDCOMPILER_MAX_STEPS"):
        check_call(MANIFEST, prompt="a cat", num_inference_steps=4)


def test_call_preflight_accepts_good_calls():
    check_call(MANIFEST, prompt=["a", "b"], num_images_per_prompt=2, generator=[torch.Generator()] * 4)
    check_call(MANIFEST, prompt="a", image=torch.zeros(1, 3, 64, 96), strength=1.0, guidance_scale=0)
    check_call({}, prompt="a")  # a manifest from before the recorded model facts


# --- U-Net geometry and component configs -------------------------------------------------------------------


def test_unet_parameters_on_meta_match_the_real_count(tiny_checkpoint):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_checkpoint("sd15") / "unet")
    assert unet_parameters(dict(unet.config)) == sum(p.numel() for p in unet.parameters())
    assert min_latent_size(unet) == 1  # plain downsamplers run down to a 1-wide map
    from sdcompiler.passes.swap_attention import SwapAttentionConfig, apply_gri

    apply_gri(unet, SwapAttentionConfig())
    assert min_latent_size(unet) == 4  # the global pool: window 4 at the full-resolution level
    wide = dict(unet.config) | {"block_out_channels": [100000] * 4}
    start = time.perf_counter()
    assert unet_parameters(wide) > 10**10
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize(
    "file, changes, error",
    [
        ("scheduler/scheduler_config.json", {"beta_start": float("nan")}, "beta_start=nan"),
        ("scheduler/scheduler_config.json", {"beta_end": 0.0}, "beta_end=0.0"),
        ("scheduler/scheduler_config.json", {"trained_betas": [0.1, 2.0]}, "trained_betas"),
        ("vae/config.json", {"scaling_factor": 0}, "scaling_factor=0"),
        ("vae/config.json", {"block_out_channels": []}, "block_out_channels"),
        ("unet/config.json", {"sample_size": [0, 64]}, "sample_size"),
        ("unet/config.json", {"layers_per_block": 1.5}, "layers_per_block"),
        ("unet/config.json", {"block_out_channels": [100000] * 4}, "GiB"),
    ],
)
def test_component_configs_are_checked(tiny_checkpoint, tmp_path, file, changes, error):
    import shutil

    folder = shutil.copytree(tiny_checkpoint("sd15"), tmp_path / "ckpt")
    check_component_configs(folder, "ckpt")  # the shipped tiny checkpoint passes
    config = json.loads((folder / file).read_text()) | changes
    (folder / file).write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        check_component_configs(folder, "ckpt")
    assert error in _one_line(info)


# --- training -----------------------------------------------------------------------------------------------


def test_trainer_stops_on_a_non_finite_loss():
    from sdcompiler.passes.errors import PassError
    from sdcompiler.passes.trainer import Trainer, TrainerSettings

    model = torch.nn.Linear(2, 1)
    calls = []

    def loss_fn(module, batch):
        calls.append(1)
        loss = module(batch["x"]).pow(2).mean()
        return (loss * float("nan") if len(calls) >= 3 else loss), {}

    def draw(indices, generator):
        return {"x": torch.randn(len(indices), 2, generator=generator)}

    trainer = Trainer(
        model, model.parameters(), loss_fn, draw, 8, TrainerSettings(steps=10, batch_size=2), show_progress=False
    )
    with pytest.raises(PassError) as info:
        trainer.fit()
    assert "step 3 of 10" in _one_line(info)
