"""Parameter and MAC accounting for U-Nets (and VAE decoders).

MACs = FLOPs / 2 as counted by `torch.utils.flop_counter.FlopCounterMode`
(matmuls, convolutions, attention) for one U-Net forward at batch 1 and a
stated pixel resolution, text length 77. The forward runs on the meta device
through `torch.func.functional_call` with meta stand-ins for every parameter
and buffer: no memory for activations, no second copy of the weights, and the
real module is untouched. Custom ops count only if they register a FLOP
formula (the kernels package does).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.flop_counter import FlopCounterMode

TEXT_LENGTH = 77


def count_params(module: torch.nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_layout(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of all parameters: the structure a pass may or may not change."""
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def unet_example_inputs(
    unet: torch.nn.Module,
    batch: int = 1,
    latent_hw: tuple[int, int] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    time_ids: int = 6,
) -> dict[str, torch.Tensor | dict]:
    """Keyword inputs for `UNet2DConditionModel.forward` (random, or empty on meta).

    SDXL U-Nets (`addition_embed_type == "text_time"`) also get
    `added_cond_kwargs = {text_embeds, time_ids}` (`time_ids` of them: 6, the refiner's 5, which end with an
    aesthetic score; the config alone cannot tell them apart); U-Nets with a guidance
    embedding (`time_cond_proj_dim`) get `timestep_cond`.
    """
    config = unet.config
    h, w = latent_hw or (config.sample_size, config.sample_size)
    cross_dim = config.cross_attention_dim
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0]

    def make(*shape, scale=1.0):
        if torch.device(device).type == "meta":
            return torch.empty(*shape, device=device, dtype=dtype)
        return torch.randn(*shape, generator=generator, dtype=torch.float32).mul(scale).to(device, dtype)

    inputs: dict[str, torch.Tensor | dict] = {
        "sample": make(batch, config.in_channels, h, w),
        "timestep": torch.tensor(500.0, device=device, dtype=torch.float32),
        "encoder_hidden_states": make(batch, TEXT_LENGTH, cross_dim),
    }
    if config.get("addition_embed_type") == "text_time":
        text_embeds_dim = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        ids = [h * 8, w * 8, 0, 0] + ([h * 8, w * 8] if time_ids == 6 else [6.0])  # the refiner's aesthetic 6
        inputs["added_cond_kwargs"] = {
            "text_embeds": make(batch, text_embeds_dim),
            "time_ids": torch.tensor([ids] * batch, dtype=torch.float32).to(device=device, dtype=dtype)
            if torch.device(device).type != "meta"
            else torch.empty(batch, len(ids), device=device, dtype=dtype),
        }
    if config.get("time_cond_proj_dim") is not None:  # a guidance embedding (LCM, cfg-distill over a range of w)
        inputs["timestep_cond"] = make(batch, config.time_cond_proj_dim)
    return inputs


def count_macs(unet: torch.nn.Module, resolution: tuple[int, int], vae_scale_factor: int = 8, forward=None) -> int:
    """MACs of one batch-1 U-Net forward at pixel `resolution` (H, W), counted on meta.

    `forward(unet, **inputs)` replaces the plain `unet(**inputs)` call (e.g. a
    partial forward); it receives the U-Net with meta weights.
    """
    latent_hw = (resolution[0] // vae_scale_factor, resolution[1] // vae_scale_factor)
    inputs = unet_example_inputs(unet, 1, latent_hw, device="meta")
    # a pass whose modules cannot run on meta tensors (modelopt's quantizers) leaves a context that makes
    # them pass through for the count
    context = getattr(unet, "cost_counting_context", None)
    with context(unet) if context else contextlib.nullcontext():
        return _macs_on_meta(_Call(unet, forward), kwargs=inputs)


def activation_bytes(unet: torch.nn.Module, resolution: tuple[int, int], vae_scale_factor: int = 8) -> int:
    """Bytes of every tensor one batch-1 fp32 U-Net forward at pixel `resolution` (H, W) produces, on meta.

    An upper bound of what a calibrating ONNX Runtime session holds for one input (its graph returns the
    tensors it calibrates; its arena keeps the rest): the sum of every op's outputs, plus the attention
    probabilities (batch x heads x queries x keys) that a fused attention op hides and the exported
    MatMul / Softmax graph materializes.
    """
    latent_hw = (resolution[0] // vae_scale_factor, resolution[1] // vae_scale_factor)
    inputs = unet_example_inputs(unet, 1, latent_hw, device="meta")
    meta_state = {
        name: torch.empty_like(t, device="meta")
        for name, t in list(unet.named_parameters()) + list(unet.named_buffers())
    }
    counter = _OutputBytes()
    with counter, torch.no_grad():
        torch.func.functional_call(unet, meta_state, args=(), kwargs=inputs, strict=False)
    return counter.total


class _OutputBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes of every op's tensor outputs (views excluded: they share their base's memory)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if "scaled_dot_product" in name:  # (B, H, Lq, E) x (B, H, Lk, E): the probabilities the export writes out
            query, key = args[0], args[1]
            self.total += 4 * query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2]
        if "view" not in name and name not in ("t.default", "transpose.int", "permute.default", "expand.default"):
            for tensor in torch.utils._pytree.tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    self.total += tensor.numel() * 4  # fp32, as exported
        return out


def vae_decoder_macs(vae: torch.nn.Module, resolution: tuple[int, int], vae_scale_factor: int = 8) -> int:
    """MACs of decoding one latent for an image of pixel `resolution` (H, W), counted on meta."""
    latent = torch.empty(
        1,
        vae.config.latent_channels,
        resolution[0] // vae_scale_factor,
        resolution[1] // vae_scale_factor,
        device="meta",
    )
    return _macs_on_meta(VaeDecode(vae), args=(latent,))


def _macs_on_meta(call: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> int:
    """MACs of `call(*args, **kwargs)` with meta stand-ins for every parameter and buffer of `call`."""
    meta_state = {
        name: torch.empty_like(t, device="meta")
        for name, t in list(call.named_parameters()) + list(call.named_buffers())
    }
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        torch.func.functional_call(call, meta_state, args=args, kwargs=kwargs or {}, strict=False)
    return counter.get_total_flops() // 2


class VaeDecode(torch.nn.Module):
    """`vae.decode(latent)` as a module's forward (images in [-1, 1]): for MAC counts and the onnx target's
    `vae_decoder` export."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _Call(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, forward=None):
        super().__init__()
        self.unet, self._forward = unet, forward

    def forward(self, **inputs):
        return self._forward(self.unet, **inputs) if self._forward else self.unet(**inputs)
