"""The quantization math of `quest_w4a4`, built on the W4A4 kernels' scheme (`sdcompiler.kernels.w4a4`).

Weights W (N, K...) per output channel, asymmetric, b bits (`w4a4.range_weight_params` for a range
[lo, hi] that contains 0)::

    s = (hi - lo) / (2^b - 1),  z = clamp(floor(-lo / s + 0.5), 0, 2^b - 1)
    q = clamp(floor(W / s + 0.5) + z, 0, 2^b - 1),  W ~ s (q - z)

Activations, symmetric, b bits: `q = clamp(floor(x * (1/s) + 0.5), -2^(b-1), 2^(b-1) - 1)`, x ~ s q, with
a static scale s, or per token `s = max(absmax, 2^-30) / (2^(b-1) - 1)` (`w4a4.per_token_scale`).
Softmax probabilities, unsigned: `round(p (2^b - 1)) / (2^b - 1)` (no kernel; simulated at deployment).

The kernels own the parameters, the codes and the fp32 reference `w4a4.fake_quant_act`. What this
module adds is what training and calibration need on top:

- the straight-through forms `ste_fake_quant_weight` / `ste_fake_quant_act` / `ste_fake_quant_probs`
  (prefix `ste_`): the same forward values as the kernels' fake quant in fp32 (tests/unit/test_quest.py
  checks it), computed in x's dtype, with rounding as identity in the backward pass and gradients to x
  and to the scale (learned as in LSQ). `w4a4.fake_quant_act` is the kernels' non-differentiable fp32
  reference, which also computes per-token scales itself (`scale=None`); the two are different
  functions, hence different names;
- the range searches: per-channel MSE search over shrink factors of [min, max] for the weights
  (`search_weight_range`; the RTN baseline takes min-max), and an MSE search over clip levels for an
  activation scale (`search_act_scale`).
"""

from __future__ import annotations

import torch

from sdcompiler.kernels.w4a4 import fake_quant_act, range_weight_params


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """floor(x + 0.5) forward, identity gradient."""
    return x + (torch.floor(x + 0.5) - x).detach()


def ste_fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """s (q - z) per output channel (dim 0) of w, any shape; straight-through rounding (trains w)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    s, z = scale.view(shape), zero.view(shape)
    q = torch.clamp(round_ste(w / s) + z, 0, 2**bits - 1)
    return s * (q - z)


def ste_fake_quant_act(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric signed s q in x's dtype; `scale` broadcasts against x (scalar, per sample or per token).
    Straight-through rounding: gradients reach x and `scale` (a learnable activation scale)."""
    top = 2 ** (bits - 1)
    q = torch.clamp(round_ste(x * (1.0 / scale)), -top, top - 1)
    return q * scale


def ste_fake_quant_probs(probs: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned probabilities in [0, 1] on the grid 1 / (2^b - 1); straight-through rounding."""
    levels = 2**bits - 1
    return round_ste(probs * levels) / levels


def search_weight_range(w: torch.Tensor, bits: int, grid: int):
    """Per-channel MSE search over shrink factors of [min, max]; returns (scale fp32, zero int32)."""
    flat = w.detach().flatten(1).float()
    wmin, wmax = flat.min(1).values, flat.max(1).values
    best_err = torch.full_like(wmin, float("inf"))
    best_scale, best_zero = range_weight_params(wmin, wmax, bits)
    for i in range(grid):
        ratio = 1.0 - 0.5 * i / grid  # 1.0 down to ~0.5
        scale, zero = range_weight_params(wmin * ratio, wmax * ratio, bits)
        err = (ste_fake_quant_weight(flat, scale, zero, bits) - flat).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def search_act_scale(absmax: float, values: torch.Tensor, bits: int, grid: int) -> float:
    """Scale minimising the fake-quant MSE of `values` over clip levels c = absmax * r, r in (0.3, 1]."""
    top = 2 ** (bits - 1) - 1
    best, best_err = absmax / top, float("inf")
    for i in range(grid):
        scale = max(absmax * (1.0 - 0.7 * i / grid), 1e-8) / top
        err = float((fake_quant_act(values, torch.tensor(scale), bits) - values).pow(2).mean())
        if err < best_err:
            best, best_err = scale, err
    return best
