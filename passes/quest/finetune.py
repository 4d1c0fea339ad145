"""Selective finetuning of `quest_w4a4` (one stage per call of `finetune_stage`), on the shared trainer.

The teacher is the same network with quantization switched off (`QuantState.enabled`), so there is no
second model in memory; the layers being trained keep a frozen copy of their original weight
(`teacher_weight`) for the teacher's path. The pass runs two stages over all calibrated timesteps:
stage 1 trains the `time_emb_proj` weights and their activation scales, stage 2 the transformer FFN
weights and every activation scale. Per batch of trajectory inputs::

    loss = MSE(eps_quant, eps_float) + mean over trained layers of MSE(out_quant, out_float)

with straight-through rounding (`scheme.round_ste`); weights learn at `lr`, activation scales at
`scale_lr` (as in LSQ), and scales are clamped to >= 1e-8 afterwards. With ControlNets the U-Net takes
their residuals on both paths (float nets for the teacher, the deployed nets for the student); the nets
themselves are not trained (with `quantize_controlnets` they keep their calibrated weights and scales).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdcompiler.passes.base import PassContext
from sdcompiler.passes.quest.calibration import quantization
from sdcompiler.passes.quest.config import QuestConfig
from sdcompiler.passes.teacher_data import Trajectories
from sdcompiler.passes.training import fit


def finetune_stage(
    unet,
    data: Trajectories,
    weights: list,
    scales: list,
    config: QuestConfig,
    steps: int,
    ctx: PassContext,
    tag: str,
    controlnets=(),
) -> list[float]:
    """Train `weights` (lr) and `scales` (scale_lr) so the quantized U-Net matches the float one; with
    `controlnets` (the trajectories' nets, frozen) the float U-Net takes the float nets' residuals and the
    quantized one the deployed nets' (quantized with `quantize_controlnets`), as `eps_sqnr` scores them."""
    if steps == 0 or not (weights or scales):
        return []
    state = unet.quant_state
    params = [p for _, p in weights] + [p for _, p in scales]
    unet.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    layers = [module for name, module in unet.named_modules() if any(name + ".weight" == w for w, _ in weights)]
    for layer in layers:  # the teacher (quantization off) keeps the original weights while `weight` trains
        if getattr(layer, "teacher_weight", None) is None:
            layer.teacher_weight = layer.weight.detach().clone()
    outputs: dict[str, list] = {"float": [], "quant": []}
    phase = {"name": "float"}
    handles = [m.register_forward_hook(lambda m, a, out: outputs[phase["name"]].append(out)) for m in layers]
    num_rows = data.samples.shape[1]

    def draw(indices, generator):
        return {"step": indices // num_rows, "row": indices % num_rows}

    def loss_fn(model, batch):
        step, row = batch["step"].cpu(), batch["row"].cpu()
        inputs = data.inputs(step, row)
        with torch.no_grad():
            with quantization(controlnets, False):
                float_residuals = data.residual_kwargs(controlnets, inputs, row)
            quantized_nets = any(hasattr(net, "quant_state") for net in controlnets)
            residuals = data.residual_kwargs(controlnets, inputs, row) if quantized_nets else float_residuals
        outputs["float"].clear(), outputs["quant"].clear()
        state.enabled, phase["name"] = False, "float"
        with torch.no_grad():
            target = model(**inputs, **float_residuals).sample
        state.enabled, phase["name"] = True, "quant"
        eps = model(**inputs, **residuals).sample
        eps_loss = F.mse_loss(eps, target)
        layer_loss = sum(F.mse_loss(q, f) for q, f in zip(outputs["quant"], outputs["float"]))
        layer_loss = layer_loss / max(1, len(layers))
        return eps_loss + layer_loss, {"eps_mse": eps_loss.detach(), "layer_mse": torch.as_tensor(layer_loss).detach()}

    groups = [
        {"params": [p for _, p in weights], "lr": config.lr},
        {"params": [p for _, p in scales], "lr": config.scale_lr},
    ]
    try:
        result = fit(
            "quest",
            unet,
            [g for g in groups if g["params"]],
            loss_fn,
            draw,
            len(data.timesteps) * num_rows,
            ctx,
            config,
            key=[ctx.model_key, config.to_dict(), tag],
            steps=steps,
            max_grad_norm=None,
        )
    finally:
        for handle in handles:
            handle.remove()
        unet.requires_grad_(False)
        state.enabled = True
        for layer in layers:
            del layer.teacher_weight
        with torch.no_grad():
            for _, scale in scales:
                scale.clamp_(min=1e-8)
    return result.losses
