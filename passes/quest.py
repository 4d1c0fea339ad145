"""quest_w4a4: QuEST-style low-bit quantization of the U-Net with time-wise activation scales and
selective finetuning (presets `quest-w4a4`, `quest-w4a8`, `quest-w8a8`).

One scheme, shared bit for bit with the W4A4 kernels (`sdcompiler.kernels.w4a4`):

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
  (the record's `simulated_attention_*` metrics say so);
- `conv_in` and `conv_out` (first and last layer) at `first_last_bits`; decoder ResNets read the
  concatenation [h, skip]: their `conv1` and `conv_shortcut` inputs get one quantizer per half
  (`split_skip`); `keep_fp` names modules left in floating point (the time and added embeddings by
  default), `keep_shortcut_fp` the 1x1 shortcut convs.

Calibration data are the teacher's own sampling trajectories: `calib_prompts` prompts sampled for
`calib_steps` steps with classifier-free guidance; every U-Net input on the way (the unconditional
and the conditional half) is kept, cached by content hash. Held-out prompts give the eps SQNR.

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
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from sdcompiler.kernels.w4a4 import AMAX_FLOOR
from sdcompiler.passes.base import Pass, PassContext, register_pass
from sdcompiler.passes.config import PassConfig
from sdcompiler.passes.distill import sqnr_db
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.teacher_data import load_prompts
from sdcompiler.passes.trainer import Trainer, TrainerSettings


@dataclass(frozen=True)
class QuestConfig(PassConfig):
    w_bits: int = 4
    a_bits: int = 4
    attn_bits: int = 8  # q, k, v
    prob_bits: int = 8  # softmax probabilities
    first_last_bits: int = 8  # conv_in, conv_out
    dynamic_tokens: bool = False  # per-token scales computed at run time instead of time-wise static ones
    split_skip: bool = True
    keep_fp: tuple[str, ...] = ("time_embedding", "add_embedding")
    keep_shortcut_fp: bool = False
    calib_prompts: int = 4
    held_out_prompts: int = 2
    calib_steps: int = 8  # sampling steps per trajectory = calibrated timesteps
    guidance_scale: float = 7.5
    resolution: int | None = None
    search_grid: int = 16  # shrink factors tried by the range searches
    finetune: bool = True
    stage1_steps: int = 20
    stage2_steps: int = 40
    batch_size: int = 4
    lr: float = 5e-4  # weights
    scale_lr: float = 1e-3  # activation scales
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = 0

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "attn_bits", "prob_bits", "first_last_bits"):
            if getattr(self, name) not in (4, 8):
                raise ValueError(f"{name} must be 4 or 8, got {getattr(self, name)}")
        if self.calib_prompts < 1 or self.held_out_prompts < 1 or self.calib_steps < 1:
            raise ValueError("calib_prompts, held_out_prompts and calib_steps must be >= 1")


# --- the scheme ------------------------------------------------------------------------------------


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """floor(x + 0.5) forward, identity gradient."""
    return x + (torch.floor(x + 0.5) - x).detach()


def weight_params(w: torch.Tensor, bits: int, lo: torch.Tensor, hi: torch.Tensor):
    """Per-channel (scale, zero) for the range [lo, hi] (which always contains 0)."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel
    zero = torch.floor(-lo / scale + 0.5).clamp(0, levels)
    return scale, zero


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    shape = (-1,) + (1,) * (w.dim() - 1)
    s, z = scale.view(shape), zero.view(shape)
    q = torch.clamp(_round_ste(w / s) + z, 0, 2 ** bits - 1)
    return s * (q - z)


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric signed fake quantization; `scale` broadcasts against x (scalar, per sample or per token)."""
    top = 2 ** (bits - 1)
    q = torch.clamp(_round_ste(x * (1.0 / scale)), -top, top - 1)
    return q * scale


def search_weight_range(w: torch.Tensor, bits: int, grid: int):
    """Per-channel MSE search over shrink factors of [min, max]; returns (scale, zero)."""
    flat = w.detach().flatten(1).float()
    wmin, wmax = flat.min(1).values, flat.max(1).values
    best_err = torch.full_like(wmin, float("inf"))
    best_scale, best_zero = weight_params(flat, bits, wmin, wmax)
    for i in range(grid):
        ratio = 1.0 - 0.5 * i / grid  # 1.0 down to ~0.5
        scale, zero = weight_params(flat, bits, wmin * ratio, wmax * ratio)
        err = (fake_quant_weight(flat, scale, zero, bits) - flat).pow(2).sum(1)
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


# --- time context and quantizers -------------------------------------------------------------------


class QuantState:
    """Shared by one U-Net's quantizers: on/off, and the calibrated-timestep index of each sample.

    The calibrated timesteps live in the U-Net's `quant_timesteps` buffer (saved with the weights).
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.enabled = True
        self.index: torch.Tensor | None = None  # (B,) nearest calibrated timestep per sample

    def set_timestep(self, timestep) -> None:
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
        if t.device.type == "meta":  # shape-only runs (MAC counting): any step's scales will do
            self.index = None
            return
        t = t.cpu()
        calibrated = self.unet.quant_timesteps.float().cpu()
        self.index = (t[:, None] - calibrated[None, :]).abs().argmin(1)


class ActQuantizer(torch.nn.Module):
    """Symmetric activation quantizer: time-wise static per-tensor scales, or per-token dynamic ones."""

    def __init__(self, state: QuantState, bits: int, num_steps: int, dynamic: bool, token_dim: int):
        super().__init__()
        self.state, self.bits, self.dynamic, self.token_dim = state, bits, dynamic, token_dim
        self.scale = torch.nn.Parameter(torch.ones(num_steps), requires_grad=False)  # per calibrated timestep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.state.enabled:
            return x
        if self.dynamic:
            top = 2 ** (self.bits - 1) - 1
            amax = x.detach().float().abs().amax(dim=self.token_dim, keepdim=True).clamp_min(AMAX_FLOOR)
            scale = amax / torch.full_like(amax, top)
        else:
            index = self.state.index if self.state.index is not None else torch.zeros(1, dtype=torch.long)
            scale = self.scale[index.to(self.scale.device)]
            if scale.numel() > 1 and scale.numel() != x.shape[0]:  # CFG doubles the batch: same t per half
                scale = scale.repeat_interleave(x.shape[0] // scale.numel())
            scale = scale.view(-1, *([1] * (x.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
        return fake_quant_act(x, scale.to(x.dtype), self.bits)


def _weight_buffers(module: torch.nn.Module, bits: int) -> None:
    out = module.weight.shape[0]
    module.register_buffer("w_scale", torch.ones(out))
    module.register_buffer("w_zero", torch.zeros(out))
    module.w_bits = bits


class QuantLinear(torch.nn.Linear):
    """nn.Linear with fake-quantized weight and input (the class an `nn.Linear` is switched to)."""

    def forward(self, x):
        x = self.act(x)  # identity while quantization is off (calibration hooks still see x)
        if not self.act.state.enabled:
            return F.linear(x, _float_weight(self), self.bias)
        return F.linear(x, fake_quant_weight(self.weight, self.w_scale, self.w_zero, self.w_bits), self.bias)


def _float_weight(layer) -> torch.Tensor:
    """The weight of the float (teacher) path: the original one while finetuning trains `weight`."""
    frozen = getattr(layer, "teacher_weight", None)
    return layer.weight if frozen is None else frozen


class QuantConv2d(torch.nn.Conv2d):
    """nn.Conv2d with fake-quantized weight and input; `split` > 0 quantizes channels [:split] and
    [split:] of the input with separate quantizers (decoder skip concatenations).

    Dynamic per-token scales belong to the im2col rows the kernels multiply (one output pixel's
    receptive field, per input half), so that case runs as a fake-quant GEMM over unfolded patches.
    """

    def forward(self, x):
        if self.act.dynamic and self.act.state.enabled and self.kernel_size != (1, 1):
            return self._dynamic_patches(x)
        if self.split:
            x = torch.cat([self.act(x[:, :self.split]), self.act_skip(x[:, self.split:])], dim=1)
        else:
            x = self.act(x)  # identity while quantization is off (calibration hooks still see x)
        if not self.act.state.enabled:
            return self._conv_forward(x, _float_weight(self), self.bias)
        return self._conv_forward(x, fake_quant_weight(self.weight, self.w_scale, self.w_zero, self.w_bits),
                                  self.bias)

    def _dynamic_patches(self, x):
        w = fake_quant_weight(self.weight, self.w_scale, self.w_zero, self.w_bits)
        halves = [(slice(0, self.split), self.act), (slice(self.split, None), self.act_skip)] if self.split \
            else [(slice(None), self.act)]
        out = 0
        for channels, quantizer in halves:
            patches = F.unfold(x[:, channels], self.kernel_size, padding=self.padding, stride=self.stride)
            patches = quantizer(patches).transpose(1, 2)  # scales over dim 1 (C_half*kh*kw): one per output pixel
            out = out + patches @ w[:, channels].flatten(1).t()
        height = (x.shape[2] + 2 * self.padding[0] - self.kernel_size[0]) // self.stride[0] + 1
        out = out + self.bias if self.bias is not None else out
        return out.transpose(1, 2).reshape(x.shape[0], -1, height, out.shape[1] // height)


class QuantAttnProcessor:
    """Attention with q, k, v and the softmax probabilities fake-quantized (explicit softmax)."""

    def __init__(self, q: ActQuantizer, k: ActQuantizer, v: ActQuantizer, prob_bits: int):
        self.q, self.k, self.v, self.prob_bits = q, k, v, prob_bits

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise PassError("quantized attention supports plain (self/cross) attention only")
        residual = hidden_states
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads

        def heads(t):
            return t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(self.q(query)), heads(self.k(key)), heads(self.v(value))
        probs = torch.softmax((query @ key.transpose(-1, -2)).float() * attn.scale, dim=-1)
        if self.q.state.enabled:
            levels = 2 ** self.prob_bits - 1
            probs = _round_ste(probs * levels) / levels
        out = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PackedQuantLinear(torch.nn.Module):
    """Deployment form of `QuantLinear`: packed weight codes through `sdcompiler::w4a4_linear`
    (Triton on CUDA, the integer reference elsewhere): the same integers as the fake-quant model."""

    def forward(self, x):
        from sdcompiler.kernels.w4a4 import w4a4_linear

        return _per_timestep(self.act, x, lambda x, scale: w4a4_linear(
            x, self.weight_packed, self.w_scale, self.w_zero, self.bias, scale, self.act.bits, self.w_bits,
            self.in_features))


class PackedQuantConv2d(torch.nn.Module):
    """Deployment form of `QuantConv2d` through `sdcompiler::w4a4_conv2d`; a split input runs as two
    convolutions over its channel halves (one activation scale each), summed."""

    def forward(self, x):
        from sdcompiler.kernels.w4a4 import w4a4_conv2d

        def conv(x, scale, packed, quantizer, bias):
            return w4a4_conv2d(x, packed, self.w_scale, self.w_zero, bias, scale, a_bits=quantizer.bits,
                               w_bits=self.w_bits, kernel_size=self.kernel_size, stride=self.stride,
                               padding=self.padding)

        if not self.split:
            return _per_timestep(self.act, x, lambda x, s: conv(x, s, self.weight_packed, self.act, self.bias))
        main = _per_timestep(self.act, x[:, :self.split],
                             lambda x, s: conv(x, s, self.weight_packed, self.act, self.bias))
        skip = _per_timestep(self.act_skip, x[:, self.split:],
                             lambda x, s: conv(x, s, self.weight_packed_skip, self.act_skip, None))
        return main + skip


def _per_timestep(quantizer: "ActQuantizer", x, run):
    """Call `run(x_part, static scale or None)` per group of samples that share a calibrated timestep."""
    if quantizer.dynamic:
        return run(x, None)
    index = quantizer.state.index
    if index is None or index.numel() == 1 or bool((index == index[0]).all()):
        step = 0 if index is None else int(index.reshape(-1)[0])
        return run(x, quantizer.scale[step].detach().reshape(1).float())
    per_sample = index.repeat_interleave(x.shape[0] // index.numel())
    out = None
    for step in per_sample.unique().tolist():
        rows = (per_sample == step).nonzero().flatten()
        part = run(x[rows], quantizer.scale[step].detach().reshape(1).float())
        out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
        out[rows] = part
    return out


def pack_quantized(unet, from_weights: bool = True) -> int:
    """Switch fake-quant layers to their packed deployment form, in place; returns how many.

    `from_weights`: quantize and pack the float weights (compile time); False builds empty packed
    buffers of the right shapes (load time, before the stored state is assigned).
    """
    from sdcompiler.kernels.w4a4 import pack_weight_codes, quantize_weight

    count = 0
    for _, layer in quantized_layers(unet):
        weight = layer.weight
        halves = [slice(None)] if not getattr(layer, "split", 0) else [slice(0, layer.split), slice(layer.split, None)]
        packed = []
        for channels in halves:
            part = weight[:, channels] if weight.dim() > 2 else weight
            k = part[0].numel()
            if from_weights:
                codes = quantize_weight(part.detach().float(), layer.w_scale.float(), layer.w_zero, layer.w_bits)
                packed.append(pack_weight_codes(codes, layer.w_bits))
            else:
                width = (k + 1) // 2 if layer.w_bits == 4 else k
                packed.append(torch.zeros(weight.shape[0], width, dtype=torch.uint8))
        bias = None if layer.bias is None else layer.bias.detach().float().clone()
        if bias is not None and bias.is_meta:
            bias = torch.zeros(bias.shape)
        conv = isinstance(layer, QuantConv2d)
        del layer.weight
        layer.__class__ = PackedQuantConv2d if conv else PackedQuantLinear
        if bias is not None:
            del layer.bias
            layer.register_buffer("bias", bias)
        layer.register_buffer("weight_packed", packed[0])
        if len(packed) > 1:
            layer.register_buffer("weight_packed_skip", packed[1])
        layer.w_zero = layer.w_zero.to(torch.int32)
        count += 1
    return count


# --- applying the scheme ---------------------------------------------------------------------------


def _skip_split(unet) -> dict[str, int]:
    """Decoder ResNets reading [h, skip]: module name -> number of channels of h."""
    splits = {}
    previous = unet.mid_block.resnets[-1].out_channels if unet.mid_block is not None else \
        unet.down_blocks[-1].resnets[-1].out_channels
    for j, block in enumerate(unet.up_blocks):
        for i, resnet in enumerate(block.resnets):
            hidden = previous if i == 0 else resnet.out_channels
            if resnet.in_channels > hidden:
                splits[f"up_blocks.{j}.resnets.{i}"] = hidden
        previous = block.resnets[-1].out_channels
    return splits


def quantize_modules(unet, config: QuestConfig) -> QuantState:
    """Switch the U-Net's linears, convs and attention processors to their fake-quant forms (idle ranges)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    steps = config.calib_steps
    unet.register_buffer("quant_timesteps", torch.zeros(steps))
    state = QuantState(unet)
    splits = _skip_split(unet) if config.split_skip else {}
    for name, module in list(unet.named_modules()):
        if any(part in name for part in config.keep_fp) or not name:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Linear) and type(module) is torch.nn.Linear:
            module.__class__ = QuantLinear
            _weight_buffers(module, config.w_bits)
            module.act = ActQuantizer(state, config.a_bits, steps, config.dynamic_tokens, -1)
        elif isinstance(module, torch.nn.Conv2d) and type(module) is torch.nn.Conv2d:
            if leaf == "conv_shortcut" and config.keep_shortcut_fp:
                continue
            first_last = name in ("conv_in", "conv_out")
            bits = config.first_last_bits if first_last else config.a_bits
            module.__class__ = QuantConv2d
            _weight_buffers(module, config.first_last_bits if first_last else config.w_bits)
            module.act = ActQuantizer(state, bits, steps, config.dynamic_tokens, 1)
            parent = name.rsplit(".", 1)[0]
            module.split = splits.get(parent, 0) if leaf in ("conv1", "conv_shortcut") else 0
            if module.split:
                module.act_skip = ActQuantizer(state, bits, steps, config.dynamic_tokens, 1)
        elif isinstance(module, Attention) and type(module.processor) is AttnProcessor2_0:
            make = lambda: ActQuantizer(state, config.attn_bits, steps, config.dynamic_tokens, -1)  # noqa: E731
            module.quant_q, module.quant_k, module.quant_v = make(), make(), make()
            module.set_processor(QuantAttnProcessor(module.quant_q, module.quant_k, module.quant_v, config.prob_bits))
    unet.register_forward_pre_hook(_timestep_hook(state), with_kwargs=True)
    unet.quant_state = state
    return state


def _timestep_hook(state: QuantState):
    def hook(module, args, kwargs):
        state.set_timestep(args[1] if len(args) > 1 else kwargs["timestep"])
    return hook


def quantized_layers(unet):
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def act_quantizers(unet):
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, ActQuantizer)]


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
            scale, zero = weight_params(flat, layer.w_bits, flat.min(1).values, flat.max(1).values)
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


def finetune_stage(unet, data: Trajectories, weights: list, scales: list, config: QuestConfig, steps: int,
                   ctx: PassContext, tag: str) -> list[float]:
    """Train `weights` (lr) and `scales` (scale_lr) so the quantized U-Net matches the float one."""
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
        outputs["float"].clear(), outputs["quant"].clear()
        state.enabled, phase["name"] = False, "float"
        with torch.no_grad():
            target = model(**inputs).sample
        state.enabled, phase["name"] = True, "quant"
        eps = model(**inputs).sample
        eps_loss = F.mse_loss(eps, target)
        layer_loss = sum(F.mse_loss(q, f) for q, f in zip(outputs["quant"], outputs["float"]))
        layer_loss = layer_loss / max(1, len(layers))
        return eps_loss + layer_loss, {"eps_mse": eps_loss.detach(), "layer_mse": torch.as_tensor(layer_loss).detach()}

    groups = [{"params": [p for _, p in weights], "lr": config.lr}, {"params": [p for _, p in scales],
                                                                    "lr": config.scale_lr}]
    settings = TrainerSettings(steps=steps, batch_size=config.batch_size, lr=config.lr, seed=ctx.seed,
                               mixed_precision=config.mixed_precision, checkpoint_every=config.checkpoint_every,
                               max_grad_norm=None)
    key = hashlib.sha256(json.dumps([ctx.model_key, config.to_dict(), tag]).encode()).hexdigest()[:20]
    try:
        trainer = Trainer(unet, [g for g in groups if g["params"]], loss_fn, draw,
                          len(data.timesteps) * num_rows, settings,
                          checkpoint_dir=ctx.cache_dir / "train" / f"quest-{key}", show_progress=ctx.show_progress,
                          cpu=next(unet.parameters()).device.type == "cpu")
        result = trainer.fit()
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


@register_pass
class QuestW4A4(Pass):
    name = "quest_w4a4"
    config_class = QuestConfig
    stage = "quantize"
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
        prompts = load_prompts()[: config.calib_prompts + config.held_out_prompts]
        common = dict(steps=config.calib_steps, guidance=config.guidance_scale, resolution=resolution,
                      cache_dir=ctx.cache_dir, model_key=ctx.model_key)
        calib = teacher_trajectories(pipe, prompts[: config.calib_prompts], seed=ctx.seed, **common)
        held = teacher_trajectories(pipe, prompts[config.calib_prompts:], seed=ctx.seed + 1, **common)

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
        metrics = {"sqnr_rtn_db": sqnr_rtn, "sqnr_calibrated_db": sqnr_calibrated,
                   "quantized_layers": len(quantized_layers(unet)),
                   "calibrated_timesteps": len(calib.timesteps)}
        if config.finetune:
            named = dict(unet.named_parameters())
            scales = [] if config.dynamic_tokens else [(n, p) for n, p in named.items() if n.endswith(".scale")
                                                       and isinstance(unet.get_submodule(n[:-6]), ActQuantizer)]
            temb = [(n, p) for n, p in named.items() if n.endswith("time_emb_proj.weight")]
            temb_scales = [(n, p) for n, p in scales if "time_emb_proj" in n]
            ffn = [(n, p) for n, p in named.items() if ".ff.net." in n and n.endswith(".weight")
                   and isinstance(unet.get_submodule(n[:-7]), QuantLinear)]
            trained = [p for _, p in temb + ffn + scales]
            calibrated = [p.detach().clone() for p in trained]
            losses1 = finetune_stage(unet, calib, temb, temb_scales, config, config.stage1_steps, ctx, "stage1")
            losses2 = finetune_stage(unet, calib, ffn, scales, config, config.stage2_steps, ctx, "stage2")
            sqnr_finetuned = eps_sqnr(unet, held, reference)
            kept = sqnr_finetuned >= sqnr_calibrated
            if not kept:  # it fit the calibration prompts but lost on the held-out ones: deploy the calibrated model
                with torch.no_grad():
                    for param, value in zip(trained, calibrated):
                        param.copy_(value)
            metrics |= {"sqnr_finetuned_db": sqnr_finetuned, "finetune_kept": float(kept),
                        "stage1_loss_last": losses1[-1] if losses1 else 0.0,
                        "stage2_loss_last": losses2[-1] if losses2 else 0.0}
        # the deployed model's held-out eps SQNR: the finetuned one, or the calibrated one it did not beat
        # (measured again: the restore must give back exactly the calibrated model)
        kept = metrics.get("finetune_kept", 0.0) == 1.0
        metrics["sqnr_db"] = metrics["sqnr_finetuned_db"] if kept else eps_sqnr(unet, held, reference)
        unet.eval()
        # what no kernel implements: fake-quantized in float at deployment too (1 = simulated)
        metrics |= {"simulated_attention_qkv": 1.0, "simulated_attention_probs": 1.0}
        return metrics

    def rebuild(self, pipe, config: QuestConfig) -> None:
        """The deployment structure the `torch` target stores: packed layers (filled by the stored state)."""
        quantize_modules(pipe.unet, config)
        pack_quantized(pipe.unet, from_weights=False)
