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

`rebuild` re-creates the packed deployment structure at load time.
"""

from __future__ import annotations

import torch

from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.quest.calibration import (
    collect_act_stats,
    eps_sqnr,
    set_act_scales,
    set_weight_ranges,
    trajectory_eps,
)
from sdcompiler.passes.quest.config import QuestConfig
from sdcompiler.passes.quest.finetune import finetune_stage
from sdcompiler.passes.quest.modules import (
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    pack_quantized,
    quantize_modules,
    quantized_layers,
)
from sdcompiler.passes.teacher_data import take_prompts, teacher_trajectories


@register_pass
class QuestW4A4(Pass):
    name = "quest_w4a4"
    text_to_image_teacher = True  # refused on inpainting U-Nets and the refiner (`PassManager`)
    config_class = QuestConfig
    stage = "quantize"
    controlnet = "keeps_layout"  # the U-Net's layers are quantized in place; ControlNets stay float
    changes_structure = True
    targets = ("torch",)
    description = "QuEST low-bit quantization: MSE ranges, time-wise activation scales, selective finetuning"

    def requires(self, pipe, config: QuestConfig, ctx: PassContext) -> None:
        if any(isinstance(m, (QuantLinear, QuantConv2d)) for m in pipe.unet.modules()):
            raise PassError("the U-Net is already quantized")
        if config.guidance_scale <= 1.0:
            raise PassError("calibration samples with classifier-free guidance: guidance_scale must be > 1")

    def run(self, pipe, config: QuestConfig, ctx: PassContext) -> dict[str, float]:
        unet = pipe.unet
        resolution = config.resolution or unet.config.sample_size * pipe.vae_scale_factor
        prompts = take_prompts(config, "calib_prompts")
        common = dict(
            steps=config.calib_steps,
            guidance=config.guidance_scale,
            resolution=resolution,
            cache_dir=ctx.cache_dir,
            model_key=ctx.model_key,
        )
        calib = teacher_trajectories(pipe, prompts[: config.calib_prompts], seed=ctx.seed, **common)
        held = teacher_trajectories(pipe, prompts[config.calib_prompts :], seed=ctx.seed + 1, **common)

        quantize_modules(unet, config)
        unet.quant_timesteps.copy_(calib.timesteps)
        stats = collect_act_stats(unet, calib, seed=ctx.seed)
        grid = config.search_grid

        set_weight_ranges(unet, search=False, grid=grid)  # the RTN baseline
        set_act_scales(unet, stats, timewise=False, search=False, grid=grid)
        reference = trajectory_eps(unet, held, quantized=False)  # the float model, before any finetuning
        sqnr_rtn = eps_sqnr(unet, held, reference)

        set_weight_ranges(unet, search=True, grid=grid)
        set_act_scales(unet, stats, timewise=not config.dynamic_tokens, search=True, grid=grid)
        sqnr_calibrated = eps_sqnr(unet, held, reference)
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
            losses1 = finetune_stage(unet, calib, temb, temb_scales, config, config.stage1_steps, ctx, "stage1")
            losses2 = finetune_stage(unet, calib, ffn, scales, config, config.stage2_steps, ctx, "stage2")
            sqnr_finetuned = eps_sqnr(unet, held, reference)
            kept = sqnr_finetuned >= sqnr_calibrated
            if kept:
                sqnr_deployed = sqnr_finetuned
            else:  # it fit the calibration prompts but lost on the held-out ones: deploy the calibrated model
                with torch.no_grad():
                    for param, value in zip(trained, calibrated):
                        param.copy_(value)
                sqnr_deployed = eps_sqnr(unet, held, reference)  # measured again: the restore must be exact
            metrics |= {"sqnr_finetuned_db": sqnr_finetuned, "finetune_kept": float(kept)}
            # a stage's last loss is a measurement only when the stage ran (0 steps: no loss, no entry)
            for stage, losses in (("stage1", losses1), ("stage2", losses2)):
                if losses:
                    metrics[f"{stage}_loss_last"] = losses[-1]
        metrics["sqnr_db"] = sqnr_deployed
        unet.eval()
        return metrics

    def rebuild(self, pipe, config: QuestConfig) -> None:
        """The deployment structure the `torch` target stores: packed layers (filled by the stored state)."""
        quantize_modules(pipe.unet, config)
        pack_quantized(pipe.unet, from_weights=False)
