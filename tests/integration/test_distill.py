"""distill: recovery training after structural passes, its teacher, data cache and record."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sdcompiler import compile_pipeline
from sdcompiler.errors import PassError
from sdcompiler.passes.teacher_data import load_prompts


def _distill_record(pipe) -> dict:
    (record,) = [r for r in pipe.manifest["passes"] if r["name"] == "distill"]
    return record


def test_distill_raises_student_teacher_sqnr(tiny_checkpoint, tmp_path):
    pipe = compile_pipeline(
        tiny_checkpoint("sd15"), ["bk-small", "distill"], "torch", tmp_path / "out", show_progress=False
    )
    record = _distill_record(pipe)
    metrics = record["metrics"]
    assert metrics["train_steps"] == 40 and metrics["feature_pairs"] >= 6
    assert metrics["loss_last"] < 0.5 * metrics["loss_first"]
    assert metrics["sqnr_after_db"] > metrics["sqnr_before_db"] + 3.0, metrics
    assert record["params_after"] == record["params_before"]  # training changes weights, not structure
    images = pipe("a cube", num_inference_steps=2, output_type="np").images
    assert images.std() > 0.01


def test_teacher_data_is_cached_by_content(tiny_checkpoint, tmp_path):
    recipe = ["bk-base", {"pass": "distill", "steps": 2, "checkpoint_every": 0}]
    cache = Path(os.environ["SDCOMPILER_CACHE_DIR"]) / "teacher-data"
    compile_pipeline(tiny_checkpoint("sd15"), recipe, "torch", tmp_path / "a", show_progress=False)
    files = set(cache.glob("*.safetensors"))
    compile_pipeline(tiny_checkpoint("sd15"), recipe, "torch", tmp_path / "b", show_progress=False)
    assert set(cache.glob("*.safetensors")) == files  # reused, not regenerated
    other = ["bk-base", {"pass": "distill", "steps": 2, "checkpoint_every": 0, "teacher_steps": 3}]
    compile_pipeline(tiny_checkpoint("sd15"), other, "torch", tmp_path / "c", show_progress=False)
    assert len(set(cache.glob("*.safetensors")) - files) == 1  # a changed setting makes new data


@pytest.mark.parametrize("arch,preset", [("sd21", "bk-small"), ("sdxl", "koala-700m")])
def test_distill_runs_for_v_prediction_and_sdxl(arch, preset, tiny_checkpoint, tmp_path):
    recipe = [preset, {"pass": "distill", "steps": 6, "num_prompts": 4, "checkpoint_every": 0}]
    pipe = compile_pipeline(tiny_checkpoint(arch), recipe, "onnx", tmp_path / "out", show_progress=False)
    metrics = _distill_record(pipe)["metrics"]
    assert metrics["train_steps"] == 6 and metrics["loss_last"] < metrics["loss_first"]


def test_distill_without_a_structural_pass_is_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(PassError, match="needs a structural pass before it"):
        compile_pipeline(tiny_checkpoint("sd15"), ["distill"], "torch", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_prompt_list_and_user_file(tmp_path):
    prompts = load_prompts()
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    user = tmp_path / "p.txt"
    user.write_text("# mine\na red cube\n\na blue sphere\n")
    assert load_prompts(str(user)) == ["a red cube", "a blue sphere"]
    with pytest.raises(PassError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_koala_self_attention_kd_pairs_inherited_layers(tiny_checkpoint, tmp_path):
    """feature_kd: attn1 pairs every student self-attention with the teacher layer it inherited."""
    recipe = [
        "koala-1b",
        {"pass": "distill", "feature_kd": "attn1", "steps": 6, "num_prompts": 4, "checkpoint_every": 0},
    ]
    pipe = compile_pipeline(tiny_checkpoint("sdxl"), recipe, "torch", tmp_path / "out", show_progress=False)
    metrics = _distill_record(pipe)["metrics"]
    student_attn1 = sum(1 for name, _ in pipe.unet.named_modules() if name.endswith(".attn1"))
    assert metrics["feature_pairs"] == student_attn1 > 0
    assert metrics["loss_last"] < metrics["loss_first"]


def test_progressive_incubation_trains_each_stage_inside_the_teacher(tiny_checkpoint, tmp_path):
    import torch

    from sdcompiler.loading import load_checkpoint
    from sdcompiler.passes import PassContext, PassManager
    from sdcompiler.passes.distill import hybrid_unet, incubation_units
    from sdcompiler.recipe import resolve_recipe

    pipe = load_checkpoint(tiny_checkpoint("sd15")).pipeline
    teacher_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ctx = PassContext(arch="sd15", macs_resolution=(128, 128), cache_dir=tmp_path, show_progress=False)
    recipe = ["bk-small", {"pass": "distill", "steps": 10, "incubation_steps": 10, "checkpoint_every": 0}]
    manager = PassManager(resolve_recipe(recipe))
    records = manager.run(pipe, ctx)
    metrics = records[-1].metrics
    # bk-small changes every stage pair (4) and removes the mid-block (nothing to train there)
    assert metrics["incubation_units"] == 4
    assert metrics["sqnr_incubated_db"] > metrics["sqnr_before_db"] + 1.0, metrics
    assert metrics["sqnr_after_db"] > metrics["sqnr_before_db"] + 1.0, metrics

    # a hybrid shares the student's modules and leaves the teacher as it was
    teacher = load_checkpoint(tiny_checkpoint("sd15")).pipeline.unet
    units = incubation_units(pipe.unet, teacher)
    hybrid = hybrid_unet(teacher, units[0][1])
    assert hybrid.down_blocks[0] is pipe.unet.down_blocks[0] and teacher.down_blocks[0] is not hybrid.down_blocks[0]
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())


def test_incubation_needs_the_teachers_stage_count(tiny_checkpoint, tmp_path):
    recipe = ["bk-tiny", {"pass": "distill", "steps": 1, "incubation_steps": 1, "checkpoint_every": 0}]
    with pytest.raises(PassError, match="incubation needs the teacher's number of stages"):
        compile_pipeline(tiny_checkpoint("sd15"), recipe, "torch", tmp_path / "out", show_progress=False)
