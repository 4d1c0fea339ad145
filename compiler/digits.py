"""Real digits for a real model: the data split, the captions and a judge that no pass can fool.

scikit-learn ships 1,797 real 8x8 handwritten digits (`load_digits`, ink 0..16). They are split once
with a fixed seed: 70% train the tiny SD1.5-layout pipeline (`benchmarks/train_digits.py`, committed
under `data/digits-sd15/`), 30% are the judge's and the diffusion model never sees them. The judge's
share is split again: two thirds train a scikit-learn classifier on the fly (well under a second; nothing
pickled is stored), one third is held out for its own accuracy and as the real reference of the Fréchet
distance.

Images reach the judge the same way whether real or generated: a real digit is upscaled bilinearly to
64x64 (`upscale`, the pipeline's resolution: the VAE's 8x down-sampling gives an 8x8 latent, which the
U-Net's three down-samplings take to 1x1); a 64x64 RGB image in [0, 1] is averaged over its channels and
over 8x8 pixel blocks back to 8x8 on the 0..16 scale (`judge_pixels`).

Metrics:
- prompt accuracy: share p of n generated images the classifier reads as the prompt's digit, with
  standard error sqrt(p (1 - p) / n);
- Fréchet distance ||mu_g - mu_r||^2 + tr(S_g + S_r - 2 (S_g S_r)^(1/2)) between Gaussians fitted to
  generated and real digits in a fixed feature space: the first `FEATURE_DIMS` principal components of the
  judge-training pixels.

Which folders hold the digits model (`is_digits_model`, for `sdcompiler demo` and `sdcompiler bench`): a
diffusers folder whose U-Net config and weights (rounded to fp16, as shipped) equal the shipped model's, or a
compiled artifact whose manifest names such a folder as its source (while that folder exists). Configs are
compared first, so another checkpoint costs a few small JSON reads; the digits model's weights are 5 MB.
Which digit a prompt asks for (`digit_of_prompt`): the one digit it names, as a word or a numeral.

scikit-learn is imported when a split or judge is first built (the `digits` extra).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

SPLIT_SEED = 0
TRAIN_SHARE = 0.7  # the diffusion model's share; the rest is the judge's
JUDGE_FIT_SHARE = 2 / 3  # of the judge's share: classifier and PCA training; the rest is held out
RESOLUTION = 64
FEATURE_DIMS = 8

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Training captions: the digit named as a word and as a numeral, in several phrasings.
PHRASINGS = (
    "a handwritten digit {word}",
    "the number {n}",
    "digit {n}",
    "a handwritten {n}",
    "the digit {word}",
    "number {word}",
)
# The fixed evaluation prompts: one per digit, in the first phrasing; seeds 0..n-1 for each.
EVAL_PHRASING = PHRASINGS[0]


def caption(digit: int, phrasing: str = EVAL_PHRASING) -> str:
    """The caption of `digit` in `phrasing` (a PHRASINGS entry)."""
    return phrasing.format(word=WORDS[digit], n=digit)


def eval_prompts(seeds_per_digit: int) -> tuple[list[str], list[int], list[int]]:
    """The fixed evaluation set: (prompts, digits, seeds), digit-major, seeds 0..seeds_per_digit-1."""
    digits = [d for d in range(10) for _ in range(seeds_per_digit)]
    seeds = [s for _ in range(10) for s in range(seeds_per_digit)]
    return [caption(d) for d in digits], digits, seeds


_DIGIT_NAME = re.compile(r"\b(" + "|".join(WORDS) + r"|[0-9])\b", re.IGNORECASE)


def digit_of_prompt(prompt: str) -> int | None:
    """The digit `prompt` names (as a word or a lone numeral), or None when it names none or several."""
    named = {int(m) if m.isdigit() else WORDS.index(m.lower()) for m in _DIGIT_NAME.findall(prompt)}
    return named.pop() if len(named) == 1 else None


def is_digits_model(source: Any) -> bool:
    """Whether `source` is the shipped digits model: a diffusers folder (path) holding its U-Net config and
    its weights, or a compiled artifact (folder or CompiledPipeline) compiled from such a folder.

    Weights count as the same when they equal the shipped fp16 tensors after rounding to fp16, so the fp32
    copy `make_checkpoint(size="digits")` writes and a folder saved again from it both count.
    """
    manifest = getattr(source, "manifest", None)
    if manifest is None:
        if not isinstance(source, (str, os.PathLike)) or not Path(source).is_dir():
            return False
        folder = Path(source)
        if (folder / "manifest.json").is_file():
            try:
                manifest = json.loads((folder / "manifest.json").read_text())
            except (OSError, ValueError):
                return False
    if manifest is not None:  # an artifact: judge its source checkpoint, where it still is
        path = (manifest.get("source") or {}).get("path")
        return isinstance(path, str) and Path(path).is_dir() and _same_weights(Path(path))
    return _same_weights(Path(source))


def _same_weights(folder: Path) -> bool:
    from sdcompiler.testing import DIGITS_MODEL

    def public_config(path: Path) -> dict | None:
        try:
            return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        except (OSError, ValueError):
            return None

    shipped_config = public_config(DIGITS_MODEL / "unet" / "config.json")
    if shipped_config is None or public_config(folder / "unet" / "config.json") != shipped_config:
        return False
    return all(
        _same_tensors(shipped, folder / shipped.relative_to(DIGITS_MODEL))
        for shipped in sorted(DIGITS_MODEL.rglob("*.safetensors"))
    )


def _same_tensors(shipped: Path, candidate: Path) -> bool:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        ours, theirs = load_file(shipped), load_file(candidate)
    except (OSError, SafetensorError):
        return False
    return ours.keys() == theirs.keys() and all(
        ours[k].shape == theirs[k].shape
        and bool((ours[k] == (theirs[k].to(ours[k].dtype) if ours[k].is_floating_point() else theirs[k])).all())
        for k in ours
    )


def _require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:  # the digits extra
        raise ImportError("the digits data set and judge need scikit-learn: pip install 'sd-compiler[digits]'") from exc


@dataclass(frozen=True)
class DigitSplit:
    """The fixed split of the 1,797 real digits; images are 8x8 on the 0..16 ink scale."""

    train_images: np.ndarray  # the diffusion model's share
    train_labels: np.ndarray
    judge_fit_images: np.ndarray  # the classifier's and PCA's training digits
    judge_fit_labels: np.ndarray
    held_out_images: np.ndarray  # never trained on by anything: judge accuracy, Fréchet reference
    held_out_labels: np.ndarray


@functools.lru_cache(maxsize=1)
def load_split() -> DigitSplit:
    """Split sklearn's digits once with `SPLIT_SEED` (the same split on every machine)."""
    _require_sklearn()
    import sklearn.datasets

    data = sklearn.datasets.load_digits()
    images = data.images.astype(np.float32)
    labels = data.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_train = int(round(TRAIN_SHARE * len(labels)))
    n_fit = int(round(JUDGE_FIT_SHARE * (len(labels) - n_train)))
    parts = np.split(order, [n_train, n_train + n_fit])
    return DigitSplit(*(x for part in parts for x in (images[part], labels[part])))


def upscale(digits: np.ndarray, resolution: int = RESOLUTION) -> np.ndarray:
    """(N, 8, 8) digits on 0..16 -> (N, 3, R, R) float32 in [-1, 1] (bilinear), the VAE's input."""
    import torch

    x = torch.from_numpy(np.asarray(digits, np.float32))[:, None] / 8.0 - 1.0
    x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous().numpy()


def judge_pixels(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) images in [0, 1] (a pipeline's output_type="np") -> (N, 64) pixels on 0..16.

    H and W must be multiples of 8: each of the 8x8 output pixels is the mean of an (H/8, W/8) block.
    """
    images = np.asarray(images, np.float64)
    if images.ndim != 4 or images.shape[1] % 8 or images.shape[2] % 8:
        raise ValueError(f"expected (N, H, W, C) images with H and W multiples of 8, got {images.shape}")
    n, h, w, _ = images.shape
    gray = images.mean(axis=3).reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return (np.clip(gray, 0.0, 1.0) * 16.0).reshape(n, 64)


def real_as_generated(digits: np.ndarray) -> np.ndarray:
    """Real 8x8 digits as the pipeline would show them: upscaled, as (N, R, R, 3) images in [0, 1]."""
    return (upscale(digits).transpose(0, 2, 3, 1) + 1.0) / 2.0


class DigitJudge:
    """A digit classifier and a PCA feature space, fit on the judge's share of the split.

    The classifier is an RBF support-vector machine on the 64 pixels (deterministic, fit in ~0.1 s).
    """

    def __init__(self) -> None:
        _require_sklearn()
        import sklearn.decomposition
        import sklearn.svm

        split = load_split()
        fit_x = judge_pixels(real_as_generated(split.judge_fit_images))
        self.classifier = sklearn.svm.SVC(C=10.0, gamma=0.002).fit(fit_x, split.judge_fit_labels)
        self.pca = sklearn.decomposition.PCA(n_components=FEATURE_DIMS, svd_solver="full").fit(fit_x)
        self.held_out_images = real_as_generated(split.held_out_images)
        self.held_out_labels = split.held_out_labels

    def classify(self, images: np.ndarray) -> np.ndarray:
        """The digit each (N, H, W, 3) image in [0, 1] shows, as the classifier reads it."""
        return self.classifier.predict(judge_pixels(images)).astype(np.int64)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.pca.transform(judge_pixels(images))

    def prompt_accuracy(self, images: np.ndarray, digits: Sequence[int]) -> tuple[float, float]:
        """(share of images read as their prompt's digit, its standard error)."""
        digits = np.asarray(digits, np.int64)
        if len(digits) != len(images) or not len(digits):
            raise ValueError(f"need one digit per image, got {len(digits)} digits for {len(images)} images")
        p = float(np.mean(self.classify(images) == digits))
        return p, float(np.sqrt(p * (1.0 - p) / len(digits)))

    def real_accuracy(self) -> tuple[float, float]:
        """The classifier's own accuracy on the held-out real digits, with its standard error."""
        return self.prompt_accuracy(self.held_out_images, self.held_out_labels)

    def frechet_distance(self, images: np.ndarray, real: np.ndarray | None = None) -> float:
        """Fréchet distance between `images` and `real` (default: the held-out real digits) in PCA features."""
        return frechet(self.features(images), self.features(self.held_out_images if real is None else real))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of `a` and of `b`."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((A B)^(1/2)) = sum of sqrt of the eigenvalues of A^(1/2) B A^(1/2) (symmetric, PSD)
    vals, vecs = np.linalg.eigh(cov_a)
    root_a = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = float(np.sum(np.sqrt(np.clip(cross, 0.0, None))))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


@functools.lru_cache(maxsize=1)
def judge() -> DigitJudge:
    """The judge, built once per process."""
    return DigitJudge()


def prompt_accuracy(images: np.ndarray, digits: Sequence[int]) -> tuple[float, float]:
    """Share of generated images the judge reads as their prompt's digit, and its standard error."""
    return judge().prompt_accuracy(images, digits)


def frechet_distance(images: np.ndarray, real: np.ndarray | None = None) -> float:
    """Fréchet distance of generated images to `real` ones (default: the held-out real digits)."""
    return judge().frechet_distance(images, real)


def judge_accuracy() -> tuple[float, float]:
    """The judge's accuracy on real held-out digits, with its standard error."""
    return judge().real_accuracy()


def generate(
    pipe: Callable[..., Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 50,
) -> np.ndarray:
    """Images for `prompts` (one seed each) from a diffusers-like pipeline: (N, 64, 64, 3) in [0, 1].

    Each image's initial noise comes from its own `torch.Generator().manual_seed(seed)`, so an image does
    not depend on the batch it is drawn in.
    """
    import torch

    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        result = pipe(
            list(prompts[chunk]),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=RESOLUTION,
            width=RESOLUTION,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds[chunk]],
            output_type="np",
        )
        out.append(np.asarray(result.images, np.float32))
    return np.concatenate(out)
