"""`sdcompiler demo` and `sdcompiler bench` on the trained digits model: the digits judge's prompt accuracy.

Oracle: `sdcompiler.digits`' classifier (trained on held-out real digits) reading each image as the digit its
prompt names. The demo's default (no --checkpoint) is the digits model with its own recipe (bk-small, recovery
distillation on digit captions, fuse-qkv), 20 steps at guidance 5 over the judge's ten prompts (one per digit,
seed 0). Floors sit a miss below the values measured here (10 images: one miss is 10 points).
A random-weight tiny model gets no judge, and prompts that name no digit get "not available", not a number.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from sdcompiler import compile_pipeline, digits
from sdcompiler.bench import benchmark
from sdcompiler.cli import main
from sdcompiler.testing import make_checkpoint

# measured by test_default_demo_draws_digits: uncompiled 100% (10 of 10), compiled (bk-small + distill) 100%
DEMO_ACCURACY_FLOOR = 0.9
# measured by test_bench_reports_prompt_accuracy_for_the_digits_model: 100% for both subjects
BENCH_ACCURACY_FLOOR = 0.9


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("digits") / "ckpt", "sd15", "digits")


def test_digits_model_is_detected_and_others_are_not(digits_checkpoint, tiny_checkpoint, tmp_path):
    assert digits.is_digits_model(digits_checkpoint)
    assert digits.is_digits_model(str(digits_checkpoint))
    assert not digits.is_digits_model(tiny_checkpoint("sd15"))
    assert not digits.is_digits_model(tmp_path / "missing")
    assert digits.digit_of_prompt("a handwritten digit seven") == 7
    assert digits.digit_of_prompt("the number 3") == 3
    assert digits.digit_of_prompt("a red cube") is None
    assert digits.digit_of_prompt("a 3 next to a four") is None


def test_default_demo_draws_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDCOMPILER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SDCOMPILER_NUM_THREADS", "1")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--target", "onnx", "--quiet"]) == 0
    text = capsys.readouterr().out
    print(text)
    match = re.search(r"prompt accuracy \(10 digits\)\s+(\d+)% ± \d+\s+->\s+(\d+)% ± \d+", text)
    assert match, text
    reference, compiled = (int(g) / 100 for g in match.groups())
    assert reference >= DEMO_ACCURACY_FLOOR and compiled >= DEMO_ACCURACY_FLOOR, text
    assert "prune_blocks" in text and "distill" in text and "PSNR" in text
    with Image.open(out / "demo-grid.png") as image:
        grid = np.asarray(image)
    assert grid.shape == (2 * 128 + 2, 10 * 130 - 2, 3)  # two rows of ten 64x64 images shown 2x, 2 px apart
    assert grid[:128].std() > 10 and grid[130:].std() > 10


@pytest.fixture(scope="module")
def fused(digits_checkpoint, tmp_path_factory):
    return compile_pipeline(digits_checkpoint, "fuse-qkv", "torch", tmp_path_factory.mktemp("fused") / "art")


def test_bench_reports_prompt_accuracy_for_the_digits_model(fused, digits_checkpoint):
    report = benchmark(fused.root, digits_checkpoint, num_inference_steps=20, guidance_scale=5.0, warmup=0, repeats=1)
    data = report.to_dict()
    assert data["settings"]["prompts"] == digits.eval_prompts(1)[0]  # the judge's own prompts by default
    assert data["judge"]["images"] == 10
    for name in ("candidate", "baseline"):
        assert report.quality[f"prompt_accuracy_{name}"] >= BENCH_ACCURACY_FLOOR, report.quality
    assert "digits judge" in report.markdown() and "prompt_accuracy_candidate" in report.markdown()
    assert report.check(["prompt_accuracy_candidate>=0.9"]) == []
    # the artifact alone: its source is the digits model
    alone = benchmark(fused.root, prompts=["the number 4"], num_inference_steps=2, warmup=0, repeats=1)
    assert set(alone.quality) == {"prompt_accuracy_candidate"}


def test_bench_says_why_prompts_without_digits_get_no_accuracy(fused, digits_checkpoint):
    report = benchmark(fused.root, digits_checkpoint, prompts=["a red cube"], num_inference_steps=2, repeats=1)
    assert not any(k.startswith("prompt_accuracy") for k in report.quality)
    assert "names no digit" in report.to_dict()["judge"]["unavailable"]
    assert "prompt accuracy not available" in report.markdown()
    assert (
        "prompt_accuracy_candidate>=0.9: prompt_accuracy_candidate was not measured"
        in report.check(["prompt_accuracy_candidate>=0.9"])[0]
    )


def test_bench_has_no_judge_for_a_random_model(tiny_checkpoint, compiled):
    report = benchmark(compiled("sd15", "torch"), tiny_checkpoint("sd15"), num_inference_steps=2, repeats=1)
    assert "judge" not in report.to_dict() and "digits judge" not in report.markdown()
    assert not any(k.startswith("prompt_accuracy") for k in report.quality)
