"""The `quest_w4a4` pass: calibrate, score and finetune, in the order that makes each step's effect
measurable, then hand the fake-quant U-Net to the `torch` target (which packs it).

`run`:

1. record the teacher's trajectories for the calibration and the held-out prompts;
2. switch the U-Net to fake quant (`quantize_modules`) and collect activation statistics;
3. RTN baseline: min-max weight ranges, one min-max activation scale for all timesteps -> `sqnr_rtn_db`;
4. calibrated: MSE-searched weight ranges and (time-wise, unless `dynamic_tokens`) activation scales
   -> `sqnr_calibrated_db`;
5. finetuning (`finetune`): stage 1 (`time_emb_proj`), stage 2 (FFN weights + every activation scale)
   -> `sqnr_finetuned_db`; when it does not beat the calibrated model on the held-out prompts, the
   calibrated weights and scales are restored (`finetune_kept` 0);
6. `sqnr_db`: the deployed model's held-out eps SQNR.

Every metric is a measurement: a design constant is not recorded as one. The attention's q, k, v and
softmax probabilities are always fake-quantized in float, at deployment too (no kernel implements them);
the record's config names their widths (`attn_bits`, `prob_bits`). `stage1_loss_last` /
`stage2_loss_last` appear only when that finetuning stage ran a step.

With ControlNets (`ctx.controlnets`) the trajectories come from diffusers' ControlNet pipeline and every U-Net
forward above takes the nets' residuals; with `quantize_controlnets` step 2 starts with the nets (quantized,
MSE ranges and time-wise scales from their own float activations -> `controlnet_residual_sqnr_db`), and the
U-Net's statistics are then taken fed by the quantized nets.

`rebuild` re-creates the packed deployment structure at load time, `rebuild_controlnet` the nets'.
"""

from __future__ import annotations

import torch

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.quest.calibration import (
    collect_act_stats,
    eps_sqnr,
    residual_sqnr,
    set_act_scales,
    set_weight_ranges,
    trajectory_eps,
)
from sdcompiler.passes.quest.config import QuestConfig
from sdcompiler.passes.quest.finetune import finetune_stage
from sdcompiler.passes.quest.modules import (
    CONTROLNET_FIRST_LAST,
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    pack_quantized,
    quantize_modules,
    quantized_layers,
)
from sdcompiler.passes.teacher_data import calibration_inputs, take_prompts, teacher_trajectories


@register_pass
class QuestW4A4(Pass):
    name = "quest_w4a4"
    config_class = QuestConfig
    stage = "quantize"
    # the U-Net's layers are quantized in place; ControlNets stay float unless `quantize_controlnets`
    controlnet = "keeps_layout"
    changes_structure = True
    targets = ("torch",)
    description = "QuEST low-bit quantization: MSE ranges, time-wise activation scales, selective finetuning"

    def requires(self, pipe, config: QuestConfig, ctx: PassContext) -> None:
        if any(isinstance(m, (QuantLinear, QuantConv2d)) for m in pipe.unet.modules()):
            raise PassError("the U-Net is already quantized")
        if config.guidance_scale <= 1.0:
            raise PassError("calibration samples with classifier-free guidance: guidance_scale must be > 1")
        if config.quantize_controlnets and not ctx.controlnets:
            raise PassError(
                "quantize_controlnets is set but this compile has no ControlNet; pass controlnet=PATH (CLI: "
                "--controlnet PATH) or drop quantize_controlnets"
            )

    def run(self, pipe, config: QuestConfig, ctx: PassContext) -> dict[str, float | str]:
        unet = pipe.unet
        resolution = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
        prompts = take_prompts(config, "calib_prompts")
        nets = list(ctx.controlnets.values())  # the trajectories' ControlNets; the U-Net takes their residuals
        common = dict(
            steps=config.calib_steps,
            guidance=config.guidance_scale,
            resolution=resolution,
            cache_dir=ctx.cache_dir,
            model_key=ctx.model_key,
            controlnets=nets or None,
            controlnets_key=ctx.controlnets_key,
        )
        calib = teacher_trajectories(pipe, prompts[: config.calib_prompts], seed=ctx.seed, **common)
        held = teacher_trajectories(pipe, prompts[config.calib_prompts :], seed=ctx.seed + 1, **common)

        net_metrics = {}
        if config.quantize_controlnets:  # the nets first: their inputs do not depend on the U-Net, its do on them
            for net in nets:
                quantize_modules(net, config, first_last=CONTROLNET_FIRST_LAST)
                net.quant_timesteps.copy_(calib.timesteps)
                net_stats = collect_act_stats(net, calib, seed=ctx.seed)
                set_weight_ranges(net, search=True, grid=config.search_grid)
                set_act_scales(net, net_stats, timewise=not config.dynamic_tokens, search=True, grid=config.search_grid)
                net.eval()
            net_metrics = {
                "controlnet_residual_sqnr_db": residual_sqnr(nets, held),
                "controlnet_quantized_layers": sum(len(quantized_layers(net)) for net in nets),
            }

        quantize_modules(unet, config)
        unet.quant_timesteps.copy_(calib.timesteps)
        # the float model (the U-Net and the nets with quantization off), before any finetuning
        reference = trajectory_eps(unet, held, quantized=False, controlnets=nets)
        stats = collect_act_stats(unet, calib, seed=ctx.seed, controlnets=nets)  # fed by the deployed nets
        grid = config.search_grid

        set_weight_ranges(unet, search=False, grid=grid)  # the RTN baseline
        set_act_scales(unet, stats, timewise=False, search=False, grid=grid)
        sqnr_rtn = eps_sqnr(unet, held, reference, nets)

        set_weight_ranges(unet, search=True, grid=grid)
        set_act_scales(unet, stats, timewise=not config.dynamic_tokens, search=True, grid=grid)
        sqnr_calibrated = eps_sqnr(unet, held, reference, nets)
        metrics = {
            "sqnr_rtn_db": sqnr_rtn,
            "sqnr_calibrated_db": sqnr_calibrated,
            "quantized_layers": len(quantized_layers(unet)),
            "calibrated_timesteps": len(calib.timesteps),
        }
        sqnr_deployed = sqnr_calibrated  # the held-out eps SQNR of the model the pass leaves
        if config.finetune:
            named = dict(unet.named_parameters())
            scales = (
                []
                if config.dynamic_tokens
                else [
                    (n, p)
                    for n, p in named.items()
                    if n.endswith(".scale") and isinstance(unet.get_submodule(n[:-6]), ActQuantizer)
                ]
            )
            temb = [(n, p) for n, p in named.items() if n.endswith("time_emb_proj.weight")]
            temb_scales = [(n, p) for n, p in scales if "time_emb_proj" in n]
            ffn = [
                (n, p)
                for n, p in named.items()
                if ".ff.net." in n and n.endswith(".weight") and isinstance(unet.get_submodule(n[:-7]), QuantLinear)
            ]
            trained = [p for _, p in temb + ffn + scales]
            calibrated = [p.detach().clone() for p in trained]
            args = (config, config.stage1_steps, ctx, "stage1")
            losses1 = finetune_stage(unet, calib, temb, temb_scales, *args, controlnets=nets)
            args = (config, config.stage2_steps, ctx, "stage2")
            losses2 = finetune_stage(unet, calib, ffn, scales, *args, controlnets=nets)
            sqnr_finetuned = eps_sqnr(unet, held, reference, nets)
            kept = sqnr_finetuned >= sqnr_calibrated
            if kept:
                sqnr_deployed = sqnr_finetuned
            else:  # it fit the calibration prompts but lost on the held-out ones: deploy the calibrated model
                with torch.no_grad():
                    for param, value in zip(trained, calibrated):
                        param.copy_(value)
                sqnr_deployed = eps_sqnr(unet, held, reference, nets)  # measured again: the restore must be exact
            metrics |= {"sqnr_finetuned_db": sqnr_finetuned, "finetune_kept": float(kept)}
            # a stage's last loss is a measurement only when the stage ran (0 steps: no loss, no entry)
            for stage, losses in (("stage1", losses1), ("stage2", losses2)):
                if losses:
                    metrics[f"{stage}_loss_last"] = losses[-1]
        metrics["sqnr_db"] = sqnr_deployed
        unet.eval()
        conv_in = unet.conv_in  # the first layer: `first_last_bits` weights and input, mask channels included
        width = conv_in.in_channels
        notes = {"calibration_data": calibration_inputs(pipe, len(nets))}
        if nets:
            notes["controlnets"] = (
                f"W{config.w_bits}A{config.a_bits}, the U-Net's scheme, calibrated first on their own inputs "
                f"({', '.join(CONTROLNET_FIRST_LAST)} at W{config.first_last_bits}A{config.first_last_bits}, "
                f"{', '.join(config.keep_fp)} float; not finetuned)"
                if config.quantize_controlnets
                else "float (quantize_controlnets: false)"
            )
        return (
            metrics
            | net_metrics
            | notes
            | {
                "conv_in": f"W{conv_in.w_bits}A{conv_in.act.bits} over all {width} input channels"
                if isinstance(conv_in, QuantConv2d)
                else f"float ({width} input channels, keep_fp)",
            }
        )

    def rebuild_controlnet(self, controlnet, config: QuestConfig) -> bool:
        """Target torch with `quantize_controlnets`: the net's packed layers, empty (the stored state fills them)."""
        if not config.quantize_controlnets:
            return False
        quantize_modules(controlnet, config, first_last=CONTROLNET_FIRST_LAST)
        pack_quantized(controlnet, from_weights=False)
        return True

    def rebuild(self, pipe, config: QuestConfig) -> None:
        """The deployment structure the `torch` target stores: packed layers (filled by the stored state)."""
        quantize_modules(pipe.unet, config)
        pack_quantized(pipe.unet, from_weights=False)
