"""Calibration of `quest_w4a4`: the teacher's trajectories as data, activation statistics, the range
and scale settings, and the eps SQNR that scores them.

Data (`teacher_data.Trajectories`, `teacher_data.teacher_trajectories`): `calib_prompts` prompts sampled
by the float pipeline for `calib_steps` steps with classifier-free guidance; every U-Net input on the way
(the unconditional and the conditional half) is kept, cached by content hash. Held-out prompts give the
eps SQNR. (The `ptq` pass calibrates on the same data.)

Settings, from the float model's activations on the calibration inputs (`collect_act_stats`: |x| max
and a random sample of |x| per quantizer and calibrated timestep):

- weights (`set_weight_ranges`): min-max per output channel (RTN), or `search_weight_range`;
- activations (`set_act_scales`): one scale per calibrated timestep (time-wise) or one for all,
  `max(|x|) / (2^(b-1) - 1)` (min-max) or `search_act_scale`.

Score (`eps_sqnr`): 10 log10(|eps_float|^2 / |eps_quant - eps_float|^2) in dB over every held-out
trajectory input, against the float model's eps computed once (`trajectory_eps`, quantization off).
"""

from __future__ import annotations

import torch

from sdcompiler.kernels.w4a4 import minmax_weight_params
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.quest.modules import act_quantizers, quantized_layers
from sdcompiler.passes.quest.scheme import search_act_scale, search_weight_range
from sdcompiler.passes.teacher_data import Trajectories
from sdcompiler.passes.training import sqnr_db

# --- calibration -----------------------------------------------------------------------------------


def collect_act_stats(unet, data: Trajectories, sample_size: int = 4096, seed: int = 0) -> dict:
    """Per quantizer and calibrated timestep: |x| max and a random sample of |x| (float model)."""
    stats: dict[str, list] = {}
    quantizers = act_quantizers(unet)
    generator = torch.Generator().manual_seed(seed)
    current = {"step": 0}
    handles = []
    for name, quantizer in quantizers:
        stats[name] = [None] * len(data.timesteps)

        def hook(module, args, name=name):
            x = args[0].detach().float().abs().flatten()
            pick = torch.randint(0, x.numel(), (min(sample_size, x.numel()),), generator=generator)
            stats[name][current["step"]] = (float(x.max()), x[pick])

        handles.append(quantizer.register_forward_pre_hook(hook))
    state = unet.quant_state
    state.enabled = False
    rows = torch.arange(data.samples.shape[1])
    try:
        with torch.no_grad():
            for step in range(len(data.timesteps)):
                current["step"] = step
                unet(**data.inputs(torch.tensor(step), rows))
    finally:
        for handle in handles:
            handle.remove()
        state.enabled = True
    return stats


def set_weight_ranges(unet, search: bool, grid: int) -> None:
    """Min-max (RTN) or MSE-searched per-channel weight ranges."""
    for _, layer in quantized_layers(unet):
        flat = layer.weight.detach().flatten(1).float()
        if search:
            scale, zero = search_weight_range(flat, layer.w_bits, grid)
        else:
            scale, zero = minmax_weight_params(flat, layer.w_bits)
        layer.w_scale.copy_(scale)
        layer.w_zero.copy_(zero)


def set_act_scales(unet, stats: dict, *, timewise: bool, search: bool, grid: int) -> None:
    """Time-wise (one per calibrated timestep) or shared scales; MSE-searched or min-max."""
    for name, quantizer in act_quantizers(unet):
        top = 2 ** (quantizer.bits - 1) - 1
        per_step = stats[name]
        if any(entry is None for entry in per_step):
            raise PassError(f"calibration never reached {name}")
        with torch.no_grad():
            if timewise:
                for i, (absmax, values) in enumerate(per_step):
                    quantizer.scale[i] = (
                        search_act_scale(absmax, values, quantizer.bits, grid) if search else max(absmax, 1e-8) / top
                    )
            else:
                absmax = max(entry[0] for entry in per_step)
                values = torch.cat([entry[1] for entry in per_step])
                quantizer.scale.fill_(
                    search_act_scale(absmax, values, quantizer.bits, grid) if search else max(absmax, 1e-8) / top
                )


def trajectory_eps(unet, data: Trajectories, quantized: bool) -> torch.Tensor:
    """The U-Net's eps on every trajectory input, with quantization on or off."""
    state = unet.quant_state
    state.enabled = quantized
    try:
        return data.eps(unet)
    finally:
        state.enabled = True


def eps_sqnr(unet, data: Trajectories, reference: torch.Tensor) -> float:
    """eps SQNR (dB) of the quantized U-Net vs `reference`, the float model's eps (computed once, before
    finetuning changes any weight)."""
    return sqnr_db(reference, trajectory_eps(unet, data, quantized=True))
