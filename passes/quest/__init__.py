"""quest_w4a4: QuEST-style low-bit quantization of the U-Net with time-wise activation scales and
selective finetuning (presets `quest-w4a4`, `quest-w4a8`, `quest-w8a8`).

Why the package is `quest`, not `quest_w4a4` like its pass: the pass name is public (recipes, manifests)
and stays, but the bit widths are config (`w_bits`, `a_bits`), so the same code serves the W4A8 and W8A8
presets too; the package is named after the method rather than one of its bit widths. The registered pass
itself lives in `pass_`.

One scheme, shared bit for bit with the W4A4 kernels (`sdcompiler.kernels.w4a4`, whose primitives
`scheme` builds on):

- weights W (N, K...) per output channel, asymmetric, `w_bits`:
  q = clamp(floor(W / s + 0.5) + z, 0, 2^b - 1), W ~ s (q - z); the range [lo, hi] per channel is
  chosen by an MSE search over shrink factors of [min, max] (the RTN baseline takes min-max);
- activations (inputs of every quantized linear / conv), symmetric, `a_bits`:
  q = clamp(floor(x * (1/s) + 0.5), -2^(b-1), 2^(b-1) - 1), x ~ s q, one scale per tensor and per
  *calibration timestep* (time-wise static scales; at run time the scale of the nearest calibrated
  timestep, per sample), or per token computed on the fly (`dynamic_tokens`); scales always factor
  out of the GEMM (never per input channel);
- attention: q, k, v fake-quantized at `attn_bits` (time-wise, per tensor) and the softmax
  probabilities at `prob_bits` (unsigned, scale 1 / (2^b - 1)) in every self- and cross-attention
  with diffusers' standard processor; no kernel implements these, so deployment simulates them too
  (a design constant, not a metric: the record's config gives `attn_bits` and `prob_bits`);
- `conv_in` and `conv_out` (first and last layer) at `first_last_bits`; decoder ResNets read the
  concatenation [h, skip]: their `conv1` and `conv_shortcut` inputs get one quantizer per half
  (`split_skip`); `keep_fp` names modules left in floating point (the time and added embeddings by
  default), `keep_shortcut_fp` the 1x1 shortcut convs.

Calibration data are the teacher's own sampling trajectories: `calib_prompts` prompts sampled for
`calib_steps` steps with classifier-free guidance; every U-Net input on the way (the unconditional
and the conditional half) is kept, cached by content hash. Held-out prompts give the eps SQNR.

With ControlNets in the compile (`PassContext.controlnets`) the trajectories are sampled through diffusers'
ControlNet pipeline with seeded synthetic control images (edge maps), and every U-Net forward of the pass
(calibration statistics, SQNR, finetuning) takes the nets' summed residuals, as the deployed pipeline feeds them;
the record's notes say so (`calibration_data`, `controlnets`). The nets stay float unless `quantize_controlnets`:
then each gets the same scheme (w / a bits, MSE weight ranges, time-wise activation scales, attention q / k / v and
probabilities), calibrated first on its own inputs along the same trajectories (a net's inputs do not depend on
the U-Net), then the U-Net on the residuals of the quantized nets. A net's ends get `first_last_bits` as the
U-Net's conv_in / conv_out do (`modules.CONTROLNET_FIRST_LAST`: its latent and control-image input convs, and the
1x1 zero convs whose outputs are the residuals, which go straight into the U-Net's skips and mid block, where
ptq's `CONTROLNET_EXCLUDE` keeps the same layers float as ptq keeps the U-Net's conv_in float); `keep_fp` (the time
embedding) stays float there too. Selective finetuning trains the U-Net only (the nets keep their calibrated
weights and scales). Metrics: `controlnet_residual_sqnr_db` (held-out summed residuals, quantized vs float nets),
`controlnet_quantized_layers`; every eps SQNR is then the quantized U-Net fed by the quantized nets vs both float.
The `torch` target packs the nets' layers as the U-Net's and stores them in the net's folder; `rebuild_controlnet`
makes the packed structure again at load.

Selective finetuning (teacher = the same network with quantization switched off, so there is no
second model in memory; the layers being trained keep a frozen copy of their original weight for the
teacher's path), on the shared trainer: stage 1 trains the `time_emb_proj` weights and their
activation scales, stage 2 the transformer FFN weights and every activation scale, over all
timesteps; loss = MSE of the trained layers' outputs + eps MSE (straight-through rounding; scales
learn as in LSQ).

Metrics (eps SQNR vs the float model on held-out trajectory inputs): `sqnr_rtn_db` (same bits and
granularity, min-max ranges from the same calibration set, one scale for all timesteps, no
finetuning), `sqnr_calibrated_db` (MSE search + time-wise scales), `sqnr_finetuned_db`, and `sqnr_db`,
the deployed model's. Finetuning fits the calibration prompts; when it does not beat the calibrated
model on the held-out ones, the calibrated weights and scales are restored (`finetune_kept` 0), so the
pass never deploys a model that finetuning made worse.

Deployment: the `torch` target packs every quantized layer (`pack_quantized`: 4-bit codes two per
byte, per-channel scale and integer zero point, the activation scales) and drops the float weights;
the packed layers run `sdcompiler::w4a4_linear` / `w4a4_conv2d` (the Triton kernels on CUDA, the
integer reference elsewhere), so the artifact computes the same integers as the fake-quant model.
`rebuild` re-creates that packed structure at load time. ONNX Runtime has no kernels for 4-bit
activations: the pass supports the `torch` target only.

Modules (each imports only the ones listed above it, never the package itself):

- `config`: `QuestConfig`;
- `scheme`: the math on top of the kernels' primitives: straight-through fake quant
  (`ste_fake_quant_*`), weight-range and activation-scale searches;
- `modules`: `QuantState`, `ActQuantizer`, `QuantLinear` / `QuantConv2d` / `QuantAttnProcessor`, the
  packed `PackedQuantLinear` / `PackedQuantConv2d`; `quantize_modules` and `pack_quantized`;
- `calibration`: activation statistics, `set_weight_ranges` / `set_act_scales`, `trajectory_eps` /
  `eps_sqnr` (the data, `Trajectories` from `teacher_trajectories`, is the shared teacher data of
  `sdcompiler.passes.teacher_data`, which the `ptq` pass calibrates on too);
- `finetune`: `finetune_stage`;
- `pass_`: the registered pass `QuestW4A4` (`quest_w4a4`).

This package re-exports the names other layers use (the `torch` target packs through
`pack_quantized`).
"""

from sdcompiler.passes.quest.config import QuestConfig
from sdcompiler.passes.quest.modules import pack_quantized, quantize_modules
from sdcompiler.passes.quest.pass_ import QuestW4A4

__all__ = ["QuestConfig", "QuestW4A4", "pack_quantized", "quantize_modules"]
