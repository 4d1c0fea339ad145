"""sdcompiler.digits without a diffusion model: the fixed split, the pixel path and the Fréchet distance.

Oracles: set arithmetic for the split (disjoint, complete, the same every call); exact values for the pixel
path (a constant image gives a constant 8x8 digit; real digits survive upscale -> judge_pixels closely); the
Fréchet distance of Gaussians with known moments (0 for a set against itself, ||mu_a - mu_b||^2 for a shift).
"""

from __future__ import annotations

import numpy as np
import pytest

from sdcompiler import digits


def test_split_is_fixed_disjoint_and_complete():
    split = digits.load_split()
    sizes = [len(split.train_labels), len(split.judge_fit_labels), len(split.held_out_labels)]
    assert sizes == [1258, 359, 180]
    rows = lambda images: {image.tobytes() for image in images}
    train, fit, held = rows(split.train_images), rows(split.judge_fit_images), rows(split.held_out_images)
    # sklearn's digits hold a few exact duplicates; almost none may straddle the split
    assert len(train & held) + len(fit & held) + len(train & fit) <= 3
    assert set(split.held_out_labels.tolist()) == set(range(10))


def test_judge_pixels_inverts_the_upscale():
    split = digits.load_split()
    real = split.held_out_images[:20]
    back = digits.judge_pixels(digits.real_as_generated(real)).reshape(-1, 8, 8)
    assert np.abs(back - real).mean() < 1.5  # bilinear blur only
    assert np.allclose(digits.judge_pixels(np.full((2, 64, 64, 3), 0.5)), 8.0)
    with pytest.raises(ValueError, match="multiples of 8"):
        digits.judge_pixels(np.zeros((1, 60, 64, 3)))


def test_frechet_of_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert digits.frechet(a, a) == pytest.approx(0.0, abs=1e-6)
    assert digits.frechet(a, a + np.array([3.0, 0, 0, 4.0])) == pytest.approx(25.0, rel=1e-6)


def test_prompts_name_their_digits():
    prompts, prompt_digits, seeds = digits.eval_prompts(2)
    assert prompts[:2] == ["a handwritten digit zero"] * 2 and prompts[-1] == "a handwritten digit nine"
    assert prompt_digits[::2] == list(range(10)) and seeds[:4] == [0, 1, 0, 1]
    for d in range(10):
        assert all(digits.WORDS[d] in c or str(d) in c for c in (digits.caption(d, p) for p in digits.PHRASINGS))
