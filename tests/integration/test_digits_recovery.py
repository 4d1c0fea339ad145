"""Recovery passes on the trained digits model, judged by what it draws (issue 18, item 5).

Oracle: `sdcompiler.digits`' judge (a classifier fit on real digits the diffusion model never saw) reading each
image as the digit its prompt names, over the fixed evaluation prompts ("a handwritten digit <word>", each
digit x seeds 0..4: 50 images). A recovery pass must beat the same recipe without it by more than two standard
errors of the difference (binomial standard errors of the two accuracies, combined):

`distill` after `bk-small`: block removal alone draws one shape for every prompt (the judge reads 10%), the
distilled student draws the digits again (measured 19 standard errors apart).

The other recovery passes cannot show a gain here: on this model the recipes without them already keep the
digits (50 images: the model at guidance 1, one call per step as after `cfg-distill`, reads 98% against
cfg-distill's 100%, 0.7 standard errors; benchmarks/bench_quality_digits.py on 200 images: QuEST W4A4 without
finetuning and the plain LCMScheduler keep their accuracy and have a lower Fréchet distance than with QuEST's
finetuning or LCM distillation). results/quality_digits.md says so per row.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdcompiler import compile_pipeline, digits
from sdcompiler.testing import make_checkpoint

SEEDS_PER_DIGIT = 5
STEPS = 20
TRAINING = {"num_prompts": 18, "held_out_prompts": 2, "teacher_steps": STEPS}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-recovery")
    checkpoint = make_checkpoint(root / "ckpt", "sd15", "digits")
    captions = root / "captions.txt"
    captions.write_text("".join(digits.caption(d, p) + "\n" for p in digits.PHRASINGS for d in range(10)))
    return root, checkpoint, str(captions)


def _accuracy(root, checkpoint, name: str, recipe, guidance: float) -> tuple[float, float]:
    pipe = compile_pipeline(checkpoint, recipe, "torch", root / name, device="cpu", show_progress=False)
    pipe.set_progress_bar_config(disable=True)
    prompts, expected, seeds = digits.eval_prompts(SEEDS_PER_DIGIT)
    images = digits.generate(pipe, prompts, seeds, steps=STEPS, guidance_scale=guidance)
    assert np.isfinite(images).all()
    return digits.prompt_accuracy(images, expected)


def _improves(better: tuple[float, float], worse: tuple[float, float]) -> float:
    """The accuracy gain in standard errors of the difference (each SE at least that of one miss in 50, so a
    100% row does not claim zero uncertainty)."""
    floor = math.sqrt(0.02 * 0.98 / 50)
    se = math.hypot(max(better[1], floor), max(worse[1], floor))
    return (better[0] - worse[0]) / se


@pytest.mark.slow
def test_distill_recovers_the_digits_after_block_removal(setup):
    root, checkpoint, captions = setup
    distill = {"pass": "distill", "steps": 100, "prompts_file": captions, **TRAINING}
    pruned = _accuracy(root, checkpoint, "pruned", ["bk-small"], 5.0)
    recovered = _accuracy(root, checkpoint, "recovered", ["bk-small", distill], 5.0)
    gain = _improves(recovered, pruned)
    print(f"bk-small {pruned[0]:.2f} -> + distill {recovered[0]:.2f}: {gain:.1f} standard errors")
    assert recovered[0] >= 0.9  # measured 1.00 (50 of 50); bk-small alone 0.10
    assert gain > 2
