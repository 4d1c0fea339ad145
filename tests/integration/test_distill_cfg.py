"""distill_cfg: guidance distilled into the weights; one U-Net call per step afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdcompiler import compile_pipeline
from sdcompiler.errors import PassError
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
    "checkpoint_every": 2,
}


def _run_pass(checkpoint: Path, cache_dir: Path, **overrides) -> tuple[object, dict[str, float]]:
    """The `cfg-distill` preset on a freshly loaded checkpoint, with its own cache (training checkpoints, data)."""
    loaded = load_checkpoint(checkpoint)
    ctx = PassContext(
        arch=loaded.arch.name,
        macs_resolution=(128, 128),
        cache_dir=cache_dir,
        show_progress=False,
        source_hash=loaded.source["sha256"],
    )
    (record,) = PassManager(resolve_recipe([{"preset": "cfg-distill", **overrides}]), count_cost=False).run(
        loaded.pipeline, ctx
    )
    return loaded.pipeline, record.metrics


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_distill_cfg_halves_unet_calls_and_approaches_the_guided_teacher(arch, tiny_checkpoint, tmp_path):
    pipe = compile_pipeline(tiny_checkpoint(arch), "cfg-distill", "torch", tmp_path / "out", show_progress=False)
    (record,) = pipe.manifest["passes"]
    metrics = record["metrics"]
    print(
        f"{arch} cfg-distill: eps SQNR vs guided teacher {metrics['sqnr_before_db']:.2f} -> "
        f"{metrics['sqnr_after_db']:.2f} dB"
    )
    assert metrics["sqnr_after_db"] > metrics["sqnr_before_db"]
    print(
        f"{arch} cfg-distill: image PSNR vs guided teacher {metrics['psnr_before_db']:.2f} -> "
        f"{metrics['psnr_after_db']:.2f} dB"
    )
    assert metrics["psnr_db"] == metrics["psnr_after_db"] > metrics["psnr_before_db"]
    assert metrics["nfe_per_step_after"] * 2 <= metrics["nfe_per_step_before"]
    assert metrics["nfe_per_image_after"] * 2 <= metrics["nfe_per_image_before"]
    assert pipe.manifest["defaults"]["guidance_scale"] == 1.0
    assert record["params_after"] == record["params_before"]  # the LoRA is merged, nothing is added
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())

    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        images = pipe("a red cube", num_inference_steps=3, output_type="np").images
    finally:
        handle.remove()
    scheduler = pipe.components.scheduler_factory()
    scheduler.set_timesteps(3)
    assert len(calls) == len(scheduler.timesteps)  # one call per step (PNDM adds a warm-up step)
    assert all(batch == 1 for batch in calls)  # batch 1: no unconditional pass
    assert images.std() > 0.01


def test_distill_cfg_needs_guidance_above_one(tiny_checkpoint, tmp_path):
    with pytest.raises(PassError, match="no guidance to distill"):
        compile_pipeline(
            tiny_checkpoint("sd15"),
            [{"pass": "distill_cfg", "guidance_scale": 1.0}],
            "torch",
            tmp_path / "out",
            show_progress=False,
        )


def test_interrupted_distill_cfg_resumes_to_the_same_weights(tiny_checkpoint, tmp_path, monkeypatch):
    """Stopped right after its step-2 checkpoint and run again, it ends where an uninterrupted run ends."""
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
    assert [p.name for p in (tmp_path / "cache" / "train").glob("cfg-*/step-*")] == ["step-000002"]
    resumed, resumed_metrics = _run_pass(checkpoint, tmp_path / "cache", **SMALL)
    clean, clean_metrics = _run_pass(checkpoint, tmp_path / "fresh-cache", **SMALL)
    assert resumed_metrics["resumed_from_step"] == 2 and clean_metrics["resumed_from_step"] == 0
    for metric in ("loss_first", "loss_last", "sqnr_before_db", "sqnr_after_db"):
        assert resumed_metrics[metric] == pytest.approx(clean_metrics[metric], rel=1e-5), metric
    clean_weights = clean.unet.state_dict()
    assert resumed.unet.state_dict().keys() == clean_weights.keys()  # merged: no adapter left in either
    for name, value in resumed.unet.state_dict().items():
        torch.testing.assert_close(value, clean_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(
        not torch.equal(value, weight)
        for value, weight in zip(
            clean_weights.values(), load_checkpoint(checkpoint).pipeline.unet.state_dict().values()
        )
    )  # it trained


def test_distill_cfg_over_a_guidance_range_takes_w_as_an_embedding(tiny_checkpoint, tmp_path):
    recipe = [{"preset": "cfg-distill", "guidance_range": [2.0, 8.0], "guidance_scale": 5.0}]
    pipe = compile_pipeline(tiny_checkpoint("sd15"), recipe, "torch", tmp_path / "out", show_progress=False)
    (record,) = pipe.manifest["passes"]
    metrics = record["metrics"]
    print(
        f"sd15 cfg-distill w in [2, 8]: eps SQNR vs guided teacher {metrics['sqnr_before_db']:.2f} -> "
        f"{metrics['sqnr_after_db']:.2f} dB, image PSNR at w=5 {metrics['psnr_before_db']:.2f} -> "
        f"{metrics['psnr_after_db']:.2f} dB"
    )
    assert metrics["sqnr_after_db"] > metrics["sqnr_before_db"]
    assert (metrics["guidance_min"], metrics["guidance_max"]) == (2.0, 8.0)
    assert metrics["nfe_per_image_after"] * 2 <= metrics["nfe_per_image_before"]
    embedding = pipe.unet.time_embedding.cond_proj
    assert pipe.unet.config.time_cond_proj_dim == 256 == pipe.manifest["model"]["guidance_embedding_dim"]
    assert record["params_after"] == record["params_before"] + embedding.weight.numel()  # only the embedding added
    assert embedding.weight.abs().sum() > 0  # trained from zero
    assert pipe.manifest["defaults"]["guidance_scale"] == 5.0  # w is an input now, with the range's default

    calls = []
    handle = pipe.unet.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((args[0].shape[0], kwargs.get("timestep_cond"))),
        with_kwargs=True,
    )
    try:
        low = pipe("a red cube", num_inference_steps=3, guidance_scale=3.0, output_type="np").images
        steps = len(calls)
        high = pipe("a red cube", num_inference_steps=3, guidance_scale=7.0, output_type="np").images
    finally:
        handle.remove()
    scheduler = pipe.components.scheduler_factory()
    scheduler.set_timesteps(3)
    assert steps == len(scheduler.timesteps) and len(calls) == 2 * steps  # one call per step
    assert all(batch == 1 and cond is not None and cond.shape == (1, 256) for batch, cond in calls)  # no uncond pass
    assert not torch.equal(calls[0][1], calls[-1][1])  # w = 3 and w = 7 embed differently
    assert abs(low - high).max() > 1e-3  # and the trained embedding makes them different images

    # diffusers' own pipeline feeds the embedding the same way (w - 1, no CFG): the same images
    from sdcompiler.targets.torch_target import rebuild_pipeline

    reference = rebuild_pipeline(pipe.root, pipe.manifest)
    reference.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = pipe("a red cube", num_inference_steps=3, guidance_scale=7.0, latents=latents.clone(), output_type="np")
    theirs = reference(
        "a red cube", num_inference_steps=3, guidance_scale=7.0, latents=latents.clone(), output_type="np"
    )
    assert abs(ours.images - theirs.images).max() < 1e-5


def test_guidance_range_compiles_to_onnx_with_a_timestep_cond_input(tiny_checkpoint, tmp_path):
    import onnx

    recipe = [{"preset": "cfg-distill", "guidance_range": [2.0, 8.0], "guidance_scale": 5.0}]
    torch_pipe = compile_pipeline(tiny_checkpoint("sd15"), recipe, "torch", tmp_path / "torch", show_progress=False)
    onnx_pipe = compile_pipeline(tiny_checkpoint("sd15"), recipe, "onnx", tmp_path / "onnx", show_progress=False)
    graph = onnx.load(str(onnx_pipe.root / "unet" / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert inputs["timestep_cond"] == ["batch_size", 256]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    images = {}
    for name, pipe in (("torch", torch_pipe), ("onnx", onnx_pipe)):
        for w in (3.0, 7.0):
            images[name, w] = pipe(
                "a red cube", num_inference_steps=3, guidance_scale=w, latents=latents.clone(), output_type="np"
            ).images
    for w in (3.0, 7.0):  # the same model in ONNX Runtime: w reaches the graph
        assert abs(images["onnx", w] - images["torch", w]).max() < 1e-3
    assert abs(images["onnx", 3.0] - images["onnx", 7.0]).max() > 1e-3


def test_guidance_range_settings_and_combinations_are_one_line_errors(tiny_checkpoint, tmp_path):
    from sdcompiler.errors import ConfigError

    for options, match in (
        ({"guidance_range": [8.0, 2.0]}, "1 <= w_min < w_max"),
        ({"guidance_range": [2.0, 4.0], "guidance_scale": 5.0}, "must lie in guidance_range"),
    ):
        with pytest.raises((ConfigError, ValueError), match=match):
            resolve_recipe([{"preset": "cfg-distill", **options}])
    small = {"preset": "cfg-distill", "guidance_range": [2.0, 8.0], **SMALL}
    out = tmp_path / "out"
    with pytest.raises(PassError, match="does not pass a guidance embedding") as info:
        compile_pipeline(tiny_checkpoint("sd15"), [small, "deepcache"], "torch", out, show_progress=False)
    assert "\n" not in str(info.value) and not out.exists()
    with pytest.raises(PassError, match="guidance_range adds a guidance embedding .* drop deepcache") as info:
        compile_pipeline(tiny_checkpoint("sd15"), ["deepcache", small], "torch", out, show_progress=False)
    assert "\n" not in str(info.value) and not out.exists()
    with pytest.raises(PassError, match="ptq calibrates on inputs without a guidance embedding"):
        compile_pipeline(
            tiny_checkpoint("sd15"),
            [small, {"preset": "int8", "calib_prompts": 1, "calib_steps": 1}],
            "onnx",
            out,
            show_progress=False,
        )
    assert not out.exists()
