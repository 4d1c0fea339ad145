"""Calibration of `quest_w4a4`: the teacher's trajectories as data, activation statistics, the range
and scale settings, and the eps SQNR that scores them.

Data (`teacher_data.Trajectories`, `teacher_data.teacher_trajectories`): `calib_prompts` prompts sampled
by the float pipeline for `calib_steps` steps with classifier-free guidance; every U-Net input on the way
(the unconditional and the conditional half) is kept, cached by content hash. Held-out prompts give the
eps SQNR. (The `ptq` pass calibrates on the same data.) An inpainting U-Net is sampled through the inpainting
pipeline with seeded synthetic images and masks (its inputs carry the mask and masked-image channels, which
conv_in quantizes at `first_last_bits`), the refiner image-to-image (`teacher_data.teacher_task`).

Settings, from the float model's activations on the calibration inputs (`collect_act_stats`: |x| max
and a random sample of |x| per quantizer and calibrated timestep):

- weights (`set_weight_ranges`): min-max per output channel (RTN), or `search_weight_range`;
- activations (`set_act_scales`): one scale per calibrated timestep (time-wise) or one for all,
  `max(|x|) / (2^(b-1) - 1)` (min-max) or `search_act_scale`.

With ControlNets the data carry their control images: the U-Net's statistics are taken fed by the nets' residuals
(the deployed nets: quantized ones with `quantize_controlnets`), a net's on its own inputs (`collect_act_stats`).

Score (`eps_sqnr`): 10 log10(|eps_float|^2 / |eps_quant - eps_float|^2) in dB over every held-out
trajectory input, against the float model's eps computed once (`trajectory_eps`, quantization off in the U-Net
and the nets); `residual_sqnr` the same for the nets' summed residuals.
"""

from __future__ import annotations

import contextlib

import torch

from sdcompiler.kernels.w4a4 import minmax_weight_params
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.quest.modules import act_quantizers, quantized_layers
from sdcompiler.passes.quest.scheme import search_act_scale, search_weight_range
from sdcompiler.passes.teacher_data import Trajectories
from sdcompiler.passes.training import sqnr_db

# --- calibration -----------------------------------------------------------------------------------


def collect_act_stats(model, data: Trajectories, sample_size: int = 4096, seed: int = 0, controlnets=()) -> dict:
    """Per quantizer and calibrated timestep: |x| max and a random sample of |x| (float model). `model` is a U-Net,
    fed the residuals of `controlnets` (as they are: the deployed nets, quantized or not), or a ControlNet, run
    alone on the trajectories' control images (its inputs do not depend on the U-Net)."""
    stats: dict[str, list] = {}
    quantizers = act_quantizers(model)
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
    state = model.quant_state
    state.enabled = False
    rows = torch.arange(data.samples.shape[1])
    try:
        with torch.no_grad():
            for step in range(len(data.timesteps)):
                current["step"] = step
                inputs = data.inputs(torch.tensor(step), rows)
                if is_controlnet(model):
                    data.residual_kwargs([model], inputs)
                else:
                    model(**inputs, **data.residual_kwargs(controlnets, inputs))
    finally:
        for handle in handles:
            handle.remove()
        state.enabled = True
    return stats


def is_controlnet(model) -> bool:
    return hasattr(model, "controlnet_cond_embedding")


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


@contextlib.contextmanager
def quantization(models, enabled: bool):
    """Quantization on or off in every model of `models` that has quantizers (float nets have none)."""
    states = [m.quant_state for m in models if hasattr(m, "quant_state")]
    for state in states:
        state.enabled = enabled
    try:
        yield
    finally:
        for state in states:
            state.enabled = True


def trajectory_eps(unet, data: Trajectories, quantized: bool, controlnets=()) -> torch.Tensor:
    """The U-Net's eps on every trajectory input, fed the residuals of `controlnets`, with quantization on or off
    (in the nets too)."""
    with quantization([unet, *controlnets], quantized):
        return data.eps(unet, controlnets=list(controlnets))


def eps_sqnr(unet, data: Trajectories, reference: torch.Tensor, controlnets=()) -> float:
    """eps SQNR (dB) of the quantized U-Net (fed by the deployed `controlnets`) vs `reference`, the float model's
    eps (computed once, before finetuning changes any weight)."""
    return sqnr_db(reference, trajectory_eps(unet, data, quantized=True, controlnets=controlnets))


def residual_sqnr(controlnets, data: Trajectories) -> float:
    """SQNR (dB) of the nets' summed residuals, quantized vs float, on every trajectory input."""
    with quantization(controlnets, False):
        reference = data.residuals(list(controlnets))
    return sqnr_db(reference, data.residuals(list(controlnets)))
