"""The trained digits model draws the digit its prompt names, as judged by a classifier it never trained against.

Oracle: `sdcompiler.digits`' judge (an SVM on 8x8 block means, fit on real digits from the judge's share of the
fixed split; the diffusion model trained on the other 70%). The model is `make_checkpoint(size="digits")`, the
weights `benchmarks/train_digits.py` committed; the prompts are the fixed evaluation set (each digit 0-9 as
"a handwritten digit <word>", seeds 0..4: 50 images), 20 steps of the checkpoint's PNDM scheduler at guidance 5.
Floors sit below the measured values (benchmarks/results/digits_model.md measured the same prompts with 20 seeds).
A random-weight model of the same layout is judged too: the judge must not read digits into noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from sdcompiler import digits
from sdcompiler.errors import CheckpointError
from sdcompiler.testing import make_checkpoint

SEEDS_PER_DIGIT = 5
STEPS = 20
GUIDANCE = 5.0
# measured on this 50-image set (results/digits_model.md: 100.0% and FD 34.87 on 200 images; FD shrinks with n)
PROMPT_ACCURACY_FLOOR = 0.90  # measured: 1.00 (50 of 50); the issue asks for >= 0.80
FRECHET_CEILING = 80.0  # measured: 69.66 (50 real training-share digits: 32.06; a random-weight model: > 500)
JUDGE_ACCURACY_FLOOR = 0.95  # measured: 0.983 (177 of 180 held-out real digits)


def _draw(checkpoint) -> tuple[np.ndarray, list[int]]:
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    prompts, prompt_digits, seeds = digits.eval_prompts(SEEDS_PER_DIGIT)
    return digits.generate(pipe, prompts, seeds, steps=STEPS, guidance_scale=GUIDANCE), prompt_digits


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    return _draw(make_checkpoint(tmp_path_factory.mktemp("digits") / "ckpt", arch="sd15", size="digits"))


def test_judge_reads_real_held_out_digits():
    accuracy, _ = digits.judge_accuracy()
    assert accuracy >= JUDGE_ACCURACY_FLOOR


def test_prompt_accuracy_with_guidance(drawn):
    images, prompt_digits = drawn
    assert images.shape == (10 * SEEDS_PER_DIGIT, digits.RESOLUTION, digits.RESOLUTION, 3)
    accuracy, stderr = digits.prompt_accuracy(images, prompt_digits)
    assert accuracy >= PROMPT_ACCURACY_FLOOR, f"prompt accuracy {accuracy:.3f} +- {stderr:.3f}"


def test_frechet_distance_to_real_digits(drawn):
    images, _ = drawn
    assert digits.frechet_distance(images) <= FRECHET_CEILING


def test_random_weights_fail_the_judge(tmp_path):
    checkpoint = make_checkpoint(
        tmp_path / "random", arch="sd15", size="tiny", seed=0, unet={"sample_size": 8}, vae={"sample_size": 64}
    )
    images, prompt_digits = _draw(checkpoint)
    accuracy, _ = digits.prompt_accuracy(images, prompt_digits)
    assert accuracy < 0.3
    assert digits.frechet_distance(images) > 2 * FRECHET_CEILING


@pytest.mark.parametrize("arch", ["sd21", "sdxl"])
def test_digits_size_is_sd15_only(tmp_path, arch):
    with pytest.raises(CheckpointError, match="only arch 'sd15' has size 'digits'"):
        make_checkpoint(tmp_path / "x", arch=arch, size="digits")
