"""distill_steps (preset `lcm`): latent consistency distillation of an LCM-LoRA; a 4-step, guidance-1 pipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdcompiler import compile_pipeline
from sdcompiler.errors import ConfigError
from sdcompiler.loading import load_checkpoint
from sdcompiler.passes import PassContext, PassManager
from sdcompiler.passes.trainer import Trainer
from sdcompiler.recipe import resolve_recipe

# A few-second budget for the checks that are about mechanics, not quality.
SMALL = {
    "steps": 4,
    "batch_size": 2,
    "num_prompts": 2,
    "held_out_prompts": 1,
    "teacher_steps": 2,
    "reference_steps": 2,
    "checkpoint_every": 2,
}


def _run_pass(checkpoint: Path, cache_dir: Path, **overrides) -> tuple[object, dict[str, float]]:
    """The `lcm` preset on a freshly loaded checkpoint, with its own cache (training checkpoints, teacher data)."""
    loaded = load_checkpoint(checkpoint)
    ctx = PassContext(
        arch=loaded.arch.name,
        macs_resolution=(128, 128),
        cache_dir=cache_dir,
        show_progress=False,
        source_hash=loaded.source["sha256"],
    )
    (record,) = PassManager(resolve_recipe([{"preset": "lcm", **overrides}]), count_cost=False).run(
        loaded.pipeline, ctx
    )
    return loaded.pipeline, record.metrics


def test_lcm_student_is_closer_to_the_teacher_than_the_base_model_in_four_steps(tiny_checkpoint, tmp_path):
    pipe = compile_pipeline(tiny_checkpoint("sd15"), "lcm", "torch", tmp_path / "out", show_progress=False)
    (record,) = pipe.manifest["passes"]
    metrics = record["metrics"]
    print(
        f"sd15 lcm: image PSNR vs the 50-step guided teacher {metrics['psnr_before_db']:.2f} (base, 4 LCM steps) "
        f"-> {metrics['psnr_after_db']:.2f} dB (distilled); LCD SQNR {metrics['sqnr_before_db']:.2f} -> "
        f"{metrics['sqnr_after_db']:.2f} dB"
    )
    assert metrics["psnr_after_db"] > metrics["psnr_before_db"]
    assert metrics["psnr_db"] == metrics["psnr_after_db"]
    assert metrics["sqnr_after_db"] > metrics["sqnr_before_db"]
    assert (metrics["nfe_per_image_before"], metrics["nfe_per_image_after"]) == (100, 4)  # 50 x CFG 2 -> 4 x 1
    assert metrics["train_steps"] == record["config"]["steps"]
    assert record["params_after"] == record["params_before"]  # the LoRA is merged, nothing is added
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    assert pipe.manifest["defaults"]["num_inference_steps"] == 4
    assert pipe.manifest["defaults"]["guidance_scale"] == 1.0
    scheduler = pipe.components.scheduler_factory()
    assert type(scheduler).__name__ == "LCMScheduler" and scheduler.config.original_inference_steps == 50

    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        images = pipe("a red cube", output_type="np").images  # the artifact's defaults
    finally:
        handle.remove()
    assert calls == [1, 1, 1, 1]  # 4 steps, batch 1: no unconditional pass
    assert images.std() > 0.01


def test_interrupted_distillation_resumes_to_the_same_weights(tiny_checkpoint, tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint("sd15")

    class Interrupted(Exception):
        pass

    save = Trainer._save

    def save_then_stop(self, step, losses, terms):
        save(self, step, losses, terms)
        raise Interrupted(f"stopped after the checkpoint of step {step}")

    monkeypatch.setattr(Trainer, "_save", save_then_stop)
    with pytest.raises(Interrupted):
        _run_pass(checkpoint, tmp_path / "cache", **SMALL)
    monkeypatch.undo()
    resumed, resumed_metrics = _run_pass(checkpoint, tmp_path / "cache", **SMALL)
    clean, clean_metrics = _run_pass(checkpoint, tmp_path / "fresh-cache", **SMALL)
    assert resumed_metrics["resumed_from_step"] == 2 and clean_metrics["resumed_from_step"] == 0
    assert resumed_metrics["loss_last"] == pytest.approx(clean_metrics["loss_last"], rel=1e-5)
    clean_weights = clean.unet.state_dict()
    for name, value in resumed.unet.state_dict().items():
        torch.testing.assert_close(value, clean_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(
        not torch.equal(value, weight)
        for value, weight in zip(
            clean_weights.values(), load_checkpoint(checkpoint).pipeline.unet.state_dict().values()
        )
    )  # it trained


@pytest.mark.parametrize(
    "override,message",
    [
        ({"w_min": 10.0, "w_max": 5.0}, "w_min <= w_max"),
        ({"num_inference_steps": 8, "num_ddim_timesteps": 4}, "exceeds the num_ddim_timesteps"),
        ({"rank": 0}, "key 'rank' must be >= 1, got 0"),
        ({"huber_c": -1.0}, "huber_c must be positive"),
        ({"stpes": 10}, "unknown key"),
    ],
)
def test_bad_config_is_a_one_line_config_error_before_any_work(override, message, tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        compile_pipeline(
            tiny_checkpoint("sd15"),
            [{"pass": "distill_steps", **override}],
            "torch",
            tmp_path / "out",
            show_progress=False,
        )
    assert "\n" not in str(info.value) and "distill_steps" in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["sd21", "sdxl"])
def test_runs_for_v_prediction_and_sdxl(arch, tiny_checkpoint, tmp_path):
    pipe, metrics = _run_pass(tiny_checkpoint(arch), tmp_path / "cache", **(SMALL | {"steps": 2}))
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert not hasattr(pipe.unet, "peft_config")
    assert metrics["train_steps"] == 2 and metrics["nfe_per_image_after"] == 4
