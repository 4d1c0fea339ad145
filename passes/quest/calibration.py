"""Calibration of `quest_w4a4`: the teacher's trajectories as data, activation statistics, the range
and scale settings, and the eps SQNR that scores them.

Data (`Trajectories`, `teacher_trajectories`): `calib_prompts` prompts sampled by the float pipeline for
`calib_steps` steps with classifier-free guidance; every U-Net input on the way (the unconditional and
the conditional half) is kept, cached by content hash. Held-out prompts give the eps SQNR. (The
`ptq` pass calibrates on the same data.)

Settings, from the float model's activations on the calibration inputs (`collect_act_stats`: |x| max
and a random sample of |x| per quantizer and calibrated timestep):

- weights (`set_weight_ranges`): min-max per output channel (RTN), or `search_weight_range`;
- activations (`set_act_scales`): one scale per calibrated timestep (time-wise) or one for all,
  `max(|x|) / (2^(b-1) - 1)` (min-max) or `search_act_scale`.

Score (`eps_sqnr`): 10 log10(|eps_float|^2 / |eps_quant - eps_float|^2) in dB over every held-out
trajectory input, against the float model's eps computed once (`trajectory_eps`, quantization off).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sdcompiler.kernels.w4a4 import minmax_weight_params
from sdcompiler.passes.distill import sqnr_db
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.quest.modules import act_quantizers, quantized_layers
from sdcompiler.passes.quest.scheme import search_act_scale, search_weight_range


# --- calibration data ------------------------------------------------------------------------------


@dataclass
class Trajectories:
    """U-Net inputs along the teacher's sampling trajectories (CFG batch: uncond half, then cond half)."""

    samples: torch.Tensor  # (S, B, C, h, w)
    timesteps: torch.Tensor  # (S,)
    context: torch.Tensor  # (B, 77, D)
    text_embeds: torch.Tensor | None = None  # SDXL (B, D_pooled)
    time_ids: torch.Tensor | None = None  # SDXL (B, 6)

    def inputs(self, step: torch.Tensor, rows: torch.Tensor) -> dict:
        kwargs = {"sample": self.samples[step, rows], "timestep": self.timesteps[step],
                  "encoder_hidden_states": self.context[rows]}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds[rows], "time_ids": self.time_ids[rows]}
        return kwargs

    def eps(self, unet, desc: str | None = None) -> torch.Tensor:
        """The U-Net's eps on every input (one batch of all rows per step, on the U-Net's device), float32 on
        the CPU; also a calibration forward loop. `desc`: show a progress bar with this label."""
        from tqdm.auto import tqdm

        device = next(unet.parameters()).device
        rows = torch.arange(self.samples.shape[1])
        out = []
        with torch.no_grad():
            for step in tqdm(range(len(self.timesteps)), desc=desc, disable=desc is None, leave=False):
                inputs = self.inputs(torch.tensor(step), rows)
                added = inputs.pop("added_cond_kwargs", None)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                if added is not None:
                    inputs["added_cond_kwargs"] = {k: v.to(device) for k, v in added.items()}
                out.append(unet(**inputs).sample.float().cpu())
        return torch.cat(out)


def teacher_trajectories(pipe, prompts: list[str], *, steps: int, guidance: float, resolution: int, seed: int,
                         cache_dir: Path, model_key: str) -> Trajectories:
    """Record every U-Net input while the (float) pipeline samples `prompts`; cached by content hash."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps([model_key, prompts, steps, guidance, resolution, seed,
                                     type(pipe.scheduler).__name__, "trajectories-v1"]).encode()).hexdigest()[:24]
    file = Path(cache_dir) / "calibration" / f"{key}.safetensors"
    if file.exists():
        return Trajectories(**load_file(str(file)))
    records: list[dict] = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs") or {}
        records.append({"sample": args[0].detach().float().cpu(), "timestep": args[1],
                        "context": kwargs["encoder_hidden_states"].detach().float().cpu(),
                        "text_embeds": added.get("text_embeds"), "time_ids": added.get("time_ids")})

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    try:
        with torch.no_grad():
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=resolution, width=resolution,
                 generator=torch.Generator().manual_seed(seed), output_type="latent")
    finally:
        handle.remove()
    if not records or records[0]["sample"].shape[0] != 2 * len(prompts):
        raise PassError("calibration needs classifier-free guidance sampling (guidance_scale > 1)")
    unique: dict[float, dict] = {}  # PNDM, e.g., visits one timestep twice: keep its first visit
    for record in records:
        unique.setdefault(float(torch.as_tensor(record["timestep"]).reshape(-1)[0]), record)
    if len(unique) < steps:
        raise PassError(f"the scheduler visited {len(unique)} distinct timesteps for {steps} steps; "
                        "lower calib_steps")
    keep = torch.linspace(0, len(unique) - 1, steps).round().long().tolist()
    records = [list(unique.values())[i] for i in keep]
    first = records[0]
    tensors = {
        "samples": torch.stack([r["sample"] for r in records]),
        "timesteps": torch.tensor([float(torch.as_tensor(r["timestep"]).reshape(-1)[0]) for r in records]),
        "context": first["context"],
    }
    if first["text_embeds"] is not None:
        tensors["text_embeds"] = first["text_embeds"].detach().float().cpu()
        tensors["time_ids"] = first["time_ids"].detach().float().cpu()
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_suffix(f".{os.getpid()}.partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    partial.rename(file)
    return Trajectories(**tensors)


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
                    quantizer.scale[i] = search_act_scale(absmax, values, quantizer.bits, grid) if search \
                        else max(absmax, 1e-8) / top
            else:
                absmax = max(entry[0] for entry in per_step)
                values = torch.cat([entry[1] for entry in per_step])
                quantizer.scale.fill_(search_act_scale(absmax, values, quantizer.bits, grid) if search
                                      else max(absmax, 1e-8) / top)


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
