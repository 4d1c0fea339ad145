"""The fake-quant and packed modules of `quest_w4a4`, and the switches between the forms of a U-Net.

Three forms of one layer:

- float: `nn.Linear` / `nn.Conv2d` / diffusers' `Attention` with `AttnProcessor2_0`;
- fake quant (`quantize_modules`, compile time: calibration and finetuning): `QuantLinear` /
  `QuantConv2d` compute `layer(ste_fake_quant_act(x), ste_fake_quant_weight(W))` with the weight's
  per-channel `w_scale` / `w_zero` buffers and an `ActQuantizer` on the input; `QuantAttnProcessor`
  fake-quantizes q, k, v and the softmax probabilities. All quantizers of one U-Net share a
  `QuantState`: quantization on/off (off = the float teacher) and each sample's nearest calibrated
  timestep, which picks the time-wise static activation scale;
- packed (`pack_quantized`, the `torch` target's deployment form, re-created by the pass's `rebuild`):
  `PackedQuantLinear` / `PackedQuantConv2d` hold the kernels' weight codes (4-bit: two per byte) and
  run `sdcompiler::w4a4_linear` / `w4a4_conv2d` per group of samples that share a timestep: the
  same integers as the fake-quant model.

Which modules are quantized and how (`quantize_modules`): every linear and conv outside `keep_fp`,
`conv_in` / `conv_out` at `first_last_bits`, decoder ResNets' `conv1` / `conv_shortcut` with one input
quantizer per half of the [h, skip] concatenation (`split_skip`, split points from `_skip_split`). A
ControlNet (`quantize_controlnets`) the same way, with its ends (`CONTROLNET_FIRST_LAST`) at `first_last_bits`
and nothing split (it has no decoder); it gets its own `QuantState` and timestep hook.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdcompiler.kernels.w4a4 import (
    pack_weight_codes,
    packed_width,
    per_token_scale,
    quantize_weight,
    w4a4_conv2d,
    w4a4_linear,
)
from sdcompiler.passes.errors import PassError
from sdcompiler.passes.quest.config import QuestConfig
from sdcompiler.passes.quest.scheme import ste_fake_quant_act, ste_fake_quant_probs, ste_fake_quant_weight

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
            scale = per_token_scale(x.detach(), self.bits, dim=self.token_dim, keepdim=True)
        else:
            index = self.state.index if self.state.index is not None else torch.zeros(1, dtype=torch.long)
            scale = self.scale[index.to(self.scale.device)]
            if scale.numel() > 1 and scale.numel() != x.shape[0]:  # CFG doubles the batch: same t per half
                scale = scale.repeat_interleave(x.shape[0] // scale.numel())
            scale = scale.view(-1, *([1] * (x.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
        return ste_fake_quant_act(x, scale.to(x.dtype), self.bits)


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
        return F.linear(x, ste_fake_quant_weight(self.weight, self.w_scale, self.w_zero, self.w_bits), self.bias)


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
            x = torch.cat([self.act(x[:, : self.split]), self.act_skip(x[:, self.split :])], dim=1)
        else:
            x = self.act(x)  # identity while quantization is off (calibration hooks still see x)
        if not self.act.state.enabled:
            return self._conv_forward(x, _float_weight(self), self.bias)
        return self._conv_forward(
            x, ste_fake_quant_weight(self.weight, self.w_scale, self.w_zero, self.w_bits), self.bias
        )

    def _dynamic_patches(self, x):
        w = ste_fake_quant_weight(self.weight, self.w_scale, self.w_zero, self.w_bits)
        halves = (
            [(slice(0, self.split), self.act), (slice(self.split, None), self.act_skip)]
            if self.split
            else [(slice(None), self.act)]
        )
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

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
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
            probs = ste_fake_quant_probs(probs, self.prob_bits)
        out = (probs.to(value.dtype) @ value).transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# --- applying the scheme ---------------------------------------------------------------------------


def _skip_split(unet) -> dict[str, int]:
    """Decoder ResNets reading [h, skip]: module name -> number of channels of h."""
    splits = {}
    previous = (
        unet.mid_block.resnets[-1].out_channels
        if unet.mid_block is not None
        else unet.down_blocks[-1].resnets[-1].out_channels
    )
    for j, block in enumerate(unet.up_blocks):
        for i, resnet in enumerate(block.resnets):
            hidden = previous if i == 0 else resnet.out_channels
            if resnet.in_channels > hidden:
                splits[f"up_blocks.{j}.resnets.{i}"] = hidden
        previous = block.resnets[-1].out_channels
    return splits


# the first and last layers (`first_last_bits`): the U-Net's input and output convs; a ControlNet's two input
# convs (latents; the control image's encoder) and the 1x1 zero convs whose outputs are the residuals it adds to
# the U-Net's skips and mid block (the layers ptq's CONTROLNET_EXCLUDE keeps float, ptq keeping the U-Net's
# conv_in float too: each pass treats a net's ends as it treats the U-Net's)
UNET_FIRST_LAST = ("conv_in", "conv_out")
CONTROLNET_FIRST_LAST = (
    "conv_in",
    "controlnet_cond_embedding.conv_in",
    "controlnet_down_blocks",
    "controlnet_mid_block",
)


def _is_first_last(name: str, first_last: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in first_last)


def quantize_modules(unet, config: QuestConfig, first_last: tuple[str, ...] = UNET_FIRST_LAST) -> QuantState:
    """Switch the U-Net's (or a ControlNet's: `first_last=CONTROLNET_FIRST_LAST`) linears, convs and attention
    processors to their fake-quant forms (idle ranges). A ControlNet has no decoder, so nothing to split."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    steps = config.calib_steps
    unet.register_buffer("quant_timesteps", torch.zeros(steps))
    state = QuantState(unet)
    splits = _skip_split(unet) if config.split_skip and hasattr(unet, "up_blocks") else {}
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
            end = _is_first_last(name, first_last)
            bits = config.first_last_bits if end else config.a_bits
            module.__class__ = QuantConv2d
            _weight_buffers(module, config.first_last_bits if end else config.w_bits)
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


# --- deployment: packed layers --------------------------------------------------------------------


class PackedQuantLinear(torch.nn.Module):
    """Deployment form of `QuantLinear`: packed weight codes through `sdcompiler::w4a4_linear`
    (Triton on CUDA, the integer reference elsewhere): the same integers as the fake-quant model."""

    def forward(self, x):
        return _per_timestep(
            self.act,
            x,
            lambda x, scale: w4a4_linear(
                x,
                self.weight_packed,
                self.w_scale,
                self.w_zero,
                self.bias,
                scale,
                self.act.bits,
                self.w_bits,
                self.in_features,
            ),
        )


class PackedQuantConv2d(torch.nn.Module):
    """Deployment form of `QuantConv2d` through `sdcompiler::w4a4_conv2d`; a split input runs as two
    convolutions over its channel halves (one activation scale each), summed."""

    def forward(self, x):
        def conv(x, scale, packed, quantizer, bias):
            return w4a4_conv2d(
                x,
                packed,
                self.w_scale,
                self.w_zero,
                bias,
                scale,
                a_bits=quantizer.bits,
                w_bits=self.w_bits,
                kernel_size=self.kernel_size,
                stride=self.stride,
                padding=self.padding,
            )

        if not self.split:
            return _per_timestep(self.act, x, lambda x, s: conv(x, s, self.weight_packed, self.act, self.bias))
        main = _per_timestep(
            self.act, x[:, : self.split], lambda x, s: conv(x, s, self.weight_packed, self.act, self.bias)
        )
        skip = _per_timestep(
            self.act_skip, x[:, self.split :], lambda x, s: conv(x, s, self.weight_packed_skip, self.act_skip, None)
        )
        return main + skip


def _per_timestep(quantizer: ActQuantizer, x, run):
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
                packed.append(torch.zeros(weight.shape[0], packed_width(k, layer.w_bits), dtype=torch.uint8))
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
