"""Text-to-image sampling over component callables: the one denoising loop every target runs.

The loop reproduces diffusers' `StableDiffusionPipeline` and
`StableDiffusionXLPipeline` step for step (tokenization, prompt encoding,
classifier-free guidance `eps = eps_u + w (eps_c - eps_u)`, SDXL's added time
ids and pooled embeddings, zeroed negative embeddings when SDXL has no
negative prompt, latent scaling, decoding), but calls components through a
narrow interface, so ONNX Runtime sessions, torch modules, TensorRT engines
or Triton Inference Server BLS calls plug in unchanged:

- text encoder: `encode(input_ids: LongTensor) -> TextEncoding`
- U-Net: `unet(sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None) -> eps`
- VAE decoder: `decode(latents) -> images in [-1, 1]`
- the SDXL refiner (`aesthetic_time_ids`): time ids end with `aesthetic_score` (the negative half of the CFG
  batch `negative_aesthetic_score`) instead of the target size, as diffusers' `StableDiffusionXLImg2ImgPipeline`
  with `requires_aesthetics_score`; `denoising_end` / `denoising_start` split one schedule between a base and
  a refiner (diffusers' ensemble of experts), the refiner taking the base's latents as its `image`
- optionally a VAE encoder for image-to-image: `encode_image(images in [-1, 1]) -> latent distribution
  parameters` (mean and log-variance stacked on the channel axis, as diffusers' `DiagonalGaussianDistribution`
  holds them), sampled here with the caller's generator exactly as diffusers' img2img pipelines do; or, for
  a VAE without a posterior (a tiny VAE), the latents themselves (`latent_channels` wide), taken as they are
- optionally ControlNets (`ControlNets`): `residuals(sample, timestep, encoder_hidden_states, images, scales,
  guess_mode, text_embeds, time_ids) -> (down residuals, mid residual)`, summed over the nets as diffusers'
  `MultiControlNetModel`; the loop passes them to `unet(..., down_residuals=, mid_residual=)` as diffusers'
  `StableDiffusion[XL]ControlNetPipeline` does (per-net `controlnet_conditioning_scale` times the
  `control_guidance_start` / `_end` keep of the step, `guess_mode`: the nets see the conditional half of the CFG
  batch only and the unconditional half gets zero residuals, the control images doubled for CFG otherwise)
- inpainting (`generate(mask=...)`, as diffusers' `StableDiffusion[XL]InpaintPipeline`): an inpainting U-Net
  (`unet_in_channels` 9) takes the latents concatenated with the latent-size mask and the masked image's latents
  on every step; a plain U-Net keeps the unmasked region by blending the re-noised image latents back in after
  each step (diffusers' `num_channels_unet == 4` path)
- optionally a feature cache (`sdcompiler.targets.components.FeatureCache`):
  `full(...) -> (eps, deep)` and `shallow(..., deep) -> eps`, used on the
  steps its plan marks (full / shallow) instead of `unet`; with ControlNets the
  nets run on every step and both calls take their residuals (a shallow step
  adds those of the shallow skips).

All tensors are torch tensors on the CPU (or the components' device).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from sdcompiler.errors import GenerationError


@dataclass
class TextEncoding:
    last_hidden_state: torch.Tensor
    pooled: torch.Tensor | None = None  # pooler_output (CLIPTextModel) or text_embeds (WithProjection)
    penultimate_hidden_state: torch.Tensor | None = None


class TextEncoder(Protocol):
    def __call__(self, input_ids: torch.Tensor, clip_skip: int | None = None) -> TextEncoding:
        """`clip_skip` (diffusers' meaning): SD's `last_hidden_state` becomes the final layer norm of
        `hidden_states[-(clip_skip + 1)]`, SDXL's `penultimate_hidden_state` is `hidden_states[-(clip_skip + 2)]`;
        ValueError where the encoder cannot (too few layers, no hidden-state outputs)."""


class UNet(Protocol):
    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        down_residuals: Sequence[torch.Tensor] | None = None,  # ControlNet residuals (backends that take them)
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


@dataclass
class ControlNets:
    """The ControlNets of an artifact, as the loop calls them.

    `residuals(sample, timestep, encoder_hidden_states, images, scales, guess_mode, text_embeds, time_ids)` runs
    each net on its control image (`images[i]`, (B, 3, H, W) in [0, 1]) with its scale (`scales[i]`, the keep of
    the step already applied), and returns the residuals summed over the nets in order (diffusers'
    `MultiControlNetModel`): a list of down-block residuals and the mid-block residual.
    `shallow_residuals(skips, <the same inputs>)`, where a backend has it: the first `skips` down residuals only
    (a feature cache's shallow step), without running the nets' deeper blocks.
    """

    residuals: Callable
    count: int
    global_pool_conditions: bool = False  # the first net's config: forces guess mode, as diffusers
    shallow_residuals: Callable | None = None


@dataclass(eq=False)
class Components(Mapping):
    """What the loop needs: callables plus the static facts about the model.

    It also reads as diffusers' `pipe.components` dict (`components["unet"]`, `SomePipeline(**components)`):
    the diffusers pipeline's own modules behind torch components, the ONNX Runtime sessions / engines
    (`backends`) and tokenizers otherwise, and a fresh scheduler of the current class and config.
    """

    tokenizers: Sequence  # one per text encoder
    text_encoders: Sequence[TextEncoder]
    unet: UNet
    decode: Callable[[torch.Tensor], torch.Tensor]
    scheduler_factory: Callable[[], object]  # a fresh scheduler per call: calls do not share state
    is_sdxl: bool
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    default_size: int  # pixels
    force_zeros_for_empty_prompt: bool = True
    aesthetic_time_ids: bool = False  # the SDXL refiner's time ids: (size, crop, aesthetic score), not target size
    dtype: torch.dtype = torch.float32
    modules: dict = field(default_factory=dict)  # torch modules behind the callables (torch target only)
    feature_cache: object | None = None  # sdcompiler.targets.components.FeatureCache, when the artifact has one
    # the U-Net takes the guidance scale as an embedding (`timestep_cond`, this wide) instead of a CFG pass
    guidance_embedding_dim: int | None = None
    pipeline: object | None = None  # the diffusers pipeline behind torch components (run-time LoRA switching)
    encode_image: Callable[[torch.Tensor], torch.Tensor] | None = None  # VAE encoder (image-to-image)
    embedding_width: int | None = None  # the U-Net's cross-attention width (checks caller-made prompt_embeds)
    backends: dict = field(default_factory=dict)  # by component name: the OrtModel / engine behind each callable
    controlnets: ControlNets | None = None  # the artifact's ControlNets (compile_pipeline(controlnet=...))
    unet_in_channels: int | None = None  # None: latent_channels; 9 for an inpainting U-Net (+ mask, masked latents)

    __eq__ = object.__eq__  # the same components, not equal contents (the mapping view builds a scheduler)
    __hash__ = object.__hash__

    def _named(self) -> dict:
        if self.pipeline is not None:
            named = dict(self.pipeline.components)
        else:
            sessions = {name: getattr(model, "session", model) for name, model in self.backends.items()}
            named = sessions | dict(zip(("tokenizer", "tokenizer_2"), self.tokenizers))
        return named | {"scheduler": self.scheduler_factory()}

    def __getitem__(self, name: str):
        return self._named()[name]

    def __iter__(self):
        return iter(self._named())

    def __len__(self) -> int:
        return len(self._named())


# the tensors a step callback may read and replace (diffusers' names; SDXL's pooled and time ids as
# `add_text_embeds` / `add_time_ids`, both halves of the CFG batch in `prompt_embeds`)
STEP_TENSORS = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")


def _as_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a string or a list of strings")


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _check_embeds(name: str, value, width: int | None = None, ndim: int = 3) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim != ndim or not value.is_floating_point():
        shape = "(batch, tokens, width)" if ndim == 3 else "(batch, width)"
        raise ValueError(f"{name} must be a float tensor shaped {shape}; got {_describe(value)}")
    if width is not None and value.shape[-1] != width:
        raise ValueError(f"{name} is {value.shape[-1]} wide; this model's text embeddings are {width} wide")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} holds NaN/Inf values; pass finite embeddings")
    return value


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def encode_prompts(
    c: Components,
    prompts: list[str] | None,
    negative: list[str] | None,
    guidance: bool,
    per_prompt: int,
    *,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    clip_skip: int | None = None,
):
    """Prompt embeddings as diffusers' `encode_prompt` builds them: returns (embeds, pooled or None), the CFG
    batch's first half unconditional.

    `prompt_embeds` (SDXL: with `pooled_prompt_embeds`) replace encoding `prompts`; `negative_prompt_embeds`
    (SDXL: with `negative_pooled_prompt_embeds`) the negative prompts. `clip_skip` takes the prompt's (not the
    negative's, as diffusers) embeddings that many layers before the last: SD the final layer norm of
    `hidden_states[-(clip_skip + 1)]`, SDXL `hidden_states[-(clip_skip + 2)]`.
    """

    def encode(texts: list[str], skip: int | None):
        hidden, pooled = [], None
        for tokenizer, encoder in zip(c.tokenizers, c.text_encoders):
            ids = _tokenize(tokenizer, texts)
            out = encoder(ids) if skip is None else encoder(ids, clip_skip=skip)
            if c.is_sdxl:
                hidden.append(out.penultimate_hidden_state)
                pooled = out.pooled  # the last encoder's projection is the pooled embedding
            else:
                hidden.append(out.last_hidden_state)
        return torch.cat(hidden, dim=-1).to(c.dtype), (pooled.to(c.dtype) if pooled is not None else None)

    width = c.embedding_width
    if prompt_embeds is None:
        embeds, pooled = encode(prompts, clip_skip)
    else:
        embeds = _check_embeds("prompt_embeds", prompt_embeds, width).to(c.dtype)
        pooled = None
        if c.is_sdxl:
            if pooled_prompt_embeds is None:
                raise ValueError("SDXL needs pooled_prompt_embeds with prompt_embeds (as diffusers' pipeline)")
            pooled = _check_embeds("pooled_prompt_embeds", pooled_prompt_embeds, ndim=2).to(c.dtype)
            if pooled.shape[0] != embeds.shape[0]:
                raise ValueError(f"pooled_prompt_embeds has {pooled.shape[0]} rows for {embeds.shape[0]} prompt_embeds")
    batch = embeds.shape[0]
    if guidance:
        if negative_prompt_embeds is not None:
            neg_embeds = _check_embeds("negative_prompt_embeds", negative_prompt_embeds, width).to(c.dtype)
            if neg_embeds.shape != embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds has shape {tuple(neg_embeds.shape)}, prompt_embeds "
                    f"{tuple(embeds.shape)}; they must match"
                )
            neg_pooled = None
            if c.is_sdxl:
                if negative_pooled_prompt_embeds is None:
                    raise ValueError(
                        "SDXL needs negative_pooled_prompt_embeds with negative_prompt_embeds (as diffusers' pipeline)"
                    )
                neg_pooled = _check_embeds("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, ndim=2)
                if neg_pooled.shape != pooled.shape:
                    raise ValueError(
                        f"negative_pooled_prompt_embeds has shape {tuple(neg_pooled.shape)}, pooled_prompt_embeds "
                        f"{tuple(pooled.shape)}; they must match"
                    )
                neg_pooled = neg_pooled.to(c.dtype)
        elif c.is_sdxl and negative is None and c.force_zeros_for_empty_prompt:
            neg_embeds, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            neg_embeds, neg_pooled = encode(negative if negative is not None else [""] * batch, None)
        embeds = torch.cat([neg_embeds.repeat_interleave(per_prompt, 0), embeds.repeat_interleave(per_prompt, 0)])
        if pooled is not None:
            pooled = torch.cat([neg_pooled.repeat_interleave(per_prompt, 0), pooled.repeat_interleave(per_prompt, 0)])
    else:
        embeds = embeds.repeat_interleave(per_prompt, 0)
        pooled = pooled.repeat_interleave(per_prompt, 0) if pooled is not None else None
    return embeds, pooled


def control_schedule(count: int, scale, start, end, num_steps: int) -> list[list[float]]:
    """Per step, the scale each of `count` ControlNets runs at: `controlnet_conditioning_scale` times the step's
    keep (1 while `i / steps >= start` and `(i + 1) / steps <= end`, else 0), exactly as diffusers' ControlNet
    pipelines compute them; checks the arguments as their `check_inputs` does (ValueError, one line)."""
    if not isinstance(start, (list, tuple)) and isinstance(end, (list, tuple)):
        start = [start] * len(end)
    elif not isinstance(end, (list, tuple)) and isinstance(start, (list, tuple)):
        end = [end] * len(start)
    elif not isinstance(start, (list, tuple)):
        start, end = [start] * count, [end] * count
    if isinstance(scale, (list, tuple)):
        if count == 1:
            raise ValueError("controlnet_conditioning_scale must be a number for one ControlNet")
        if len(scale) != count:
            raise ValueError(f"controlnet_conditioning_scale has {len(scale)} values for {count} ControlNets")
        scales = list(scale)
    else:
        scales = [scale] * count
    if len(start) != count or len(end) != count:
        raise ValueError(
            f"control_guidance_start / _end have {len(start)} / {len(end)} values for {count} ControlNet(s); "
            "give one each"
        )
    for value in (*scales, *start, *end):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"ControlNet scales and guidance bounds must be finite numbers; got {value!r}")
    for s, e in zip(start, end):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"control_guidance_start={s} / control_guidance_end={e} need 0 <= start < end <= 1")
    keeps = [
        [1.0 - float(i / num_steps < s or (i + 1) / num_steps > e) for s, e in zip(start, end)]
        for i in range(num_steps)
    ]
    return [[c * k for c, k in zip(scales, keep)] for keep in keeps]


def _control_batch(images: Sequence[torch.Tensor], prompts: int, per_prompt: int, doubled: bool, dtype):
    """The control images as the nets take them (diffusers' `prepare_image` after preprocessing): one image spread
    over the batch, or one per prompt repeated per image; doubled for the CFG batch unless in guess mode."""
    prepared = []
    for index, image in enumerate(images):
        if image.shape[0] not in (1, prompts):
            raise ValueError(
                f"control image {index} holds {image.shape[0]} images for {prompts} prompt(s); pass 1 or one per prompt"
            )
        image = image.to(torch.float32).repeat_interleave(
            prompts * per_prompt if image.shape[0] == 1 else per_prompt, 0
        )
        image = image.to(dtype)
        prepared.append(torch.cat([image] * 2) if doubled else image)
    return prepared


def _strength_timesteps(scheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule an image-to-image call runs (diffusers' `get_timesteps`)."""
    start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    if num_inference_steps - start < 1:
        raise ValueError(
            f"strength={strength} leaves no denoising step of {num_inference_steps}; raise strength "
            "or num_inference_steps"
        )
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * scheduler.order)
    return scheduler.timesteps[start * scheduler.order :]


def _draw(c: Components, encoded: torch.Tensor, generator) -> torch.Tensor:
    """A sample of the VAE posterior whose parameters `encode_image` returned (diffusers' `retrieve_latents`)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if encoded.shape[1] == c.latent_channels:  # a VAE without a posterior (tiny VAE): its latents, no draw
        return encoded
    return DiagonalGaussianDistribution(encoded).sample(generator)


def check_denoising_bounds(denoising_start, denoising_end) -> None:
    """`denoising_start` / `denoising_end` are None or numbers in (0, 1), start before end (ValueError, one line).
    diffusers ignores values outside (0, 1) silently; here they are refused."""
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(
                f"{name}={value!r} must be a number in (0, 1), the share of the schedule at which to "
                f"{'start' if name == 'denoising_start' else 'stop'} (e.g. 0.8)"
            )
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start={denoising_start} must be below denoising_end={denoising_end}")


def _cutoff(scheduler, fraction: float) -> int:
    """The training timestep at `fraction` of the schedule (diffusers' `discrete_timestep_cutoff`)."""
    steps = scheduler.config.num_train_timesteps
    return int(round(steps - (fraction * steps)))


def _denoising_start_timesteps(scheduler, denoising_start: float) -> torch.Tensor:
    """The tail of the schedule below `denoising_start` (diffusers' SDXL img2img `get_timesteps`: strength is
    ignored; a second-order scheduler gets one more step so it never stops between its two evaluations)."""
    steps = int((scheduler.timesteps < _cutoff(scheduler, denoising_start)).sum().item())
    if scheduler.order == 2 and steps % 2 == 0:
        steps += 1
    if steps < 1:
        raise ValueError(f"denoising_start={denoising_start} leaves no denoising step; lower it or add steps")
    start = len(scheduler.timesteps) - steps
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def _denoising_end_timesteps(scheduler, timesteps: torch.Tensor, denoising_end: float) -> torch.Tensor:
    """The head of `timesteps` at or above `denoising_end` (diffusers' SDXL pipelines' `denoising_end`)."""
    cutoff = _cutoff(scheduler, denoising_end)
    steps = len([t for t in timesteps if t >= cutoff])
    if steps < 1:
        raise ValueError(f"denoising_end={denoising_end} leaves no denoising step; raise it or add steps")
    return timesteps[:steps]


def _image_latents(
    c: Components,
    scheduler,
    image: torch.Tensor,
    timestep: torch.Tensor,
    batch: int,
    generator,
    add_noise: bool = True,
):
    """Noised latents of `image` at `timestep`, drawing from `generator` as diffusers' `prepare_latents` does:
    the VAE posterior sample first, then the noise (none with `add_noise=False`: a refiner's `denoising_start`).
    An `image` `latent_channels` wide is latents already (a base's `output_type="latent"`): taken as they are."""
    from diffusers.utils.torch_utils import randn_tensor

    image = image.to(c.dtype)
    if image.shape[1] == c.latent_channels:
        init = image
    else:
        if isinstance(generator, list):  # one generator per image: each image of the batch encoded on its own
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for a batch of {batch}; pass one per image")
            if image.shape[0] < batch:
                if batch % image.shape[0]:
                    raise ValueError(f"cannot spread {image.shape[0]} images over a batch of {batch}")
                image = torch.cat([image] * (batch // image.shape[0]))
        init = _encode_images(c, image, generator)
    if batch > init.shape[0]:
        if batch % init.shape[0]:
            raise ValueError(f"cannot spread {init.shape[0]} images over a batch of {batch}; pass 1 or {batch}")
        init = torch.cat([init] * (batch // init.shape[0]))
    if not add_noise:
        return init
    noise = randn_tensor(init.shape, generator=generator, dtype=c.dtype)
    return scheduler.add_noise(init, noise, timestep)


def _encode_images(c: Components, images: torch.Tensor, generator) -> torch.Tensor:
    """Scaled latents of `images` as diffusers' pipelines draw them (img2img's `prepare_latents`, inpainting's
    `_encode_vae_image`): with a list of generators, image i with generator i (over the images given)."""
    images = images.to(c.dtype)
    if isinstance(generator, list):
        if len(generator) < images.shape[0]:
            raise ValueError(f"{len(generator)} generators for {images.shape[0]} images; pass one per image")
        encoded = torch.cat([_draw(c, c.encode_image(images[i : i + 1]), generator[i]) for i in range(images.shape[0])])
    else:
        encoded = _draw(c, c.encode_image(images), generator)
    return c.scaling_factor * encoded.to(c.dtype)


def _spread(tensor: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """`tensor` repeated over a batch of `batch` (diffusers' `.repeat(batch // n, 1, 1, 1)`), or a one-line error."""
    if batch % tensor.shape[0]:
        raise ValueError(f"cannot spread {tensor.shape[0]} {what} over a batch of {batch}; pass 1 or {batch}")
    return tensor.repeat(batch // tensor.shape[0], 1, 1, 1)


@dataclass
class Inpainting:
    """What the denoising loop of an inpainting call carries (diffusers' inpaint pipelines' loop state).

    `concat` (an inpainting U-Net): `mask` (1 channel, latent size) and `masked` (the masked image's latents),
    both doubled for CFG, join the U-Net's input. Otherwise (a plain U-Net) after each step the unmasked region
    is replaced by `image_latents` noised with `noise` to the next timestep: `latents = (1 - m) x_img + m x`.
    """

    concat: bool
    mask: torch.Tensor  # (B or 2B, 1, h, w)
    masked: torch.Tensor  # (B or 2B, C, h, w)
    init_mask: torch.Tensor  # (B, 1, h, w): the mask of one CFG half
    noise: torch.Tensor
    image_latents: torch.Tensor | None  # the plain U-Net's blend target

    def unet_input(self, model_input: torch.Tensor) -> torch.Tensor:
        return torch.cat([model_input, self.mask, self.masked], dim=1) if self.concat else model_input

    def after_step(self, scheduler, latents: torch.Tensor, timesteps, i: int) -> torch.Tensor:
        if self.concat:
            return latents
        proper = self.image_latents
        if i < len(timesteps) - 1:
            proper = scheduler.add_noise(proper, self.noise, torch.tensor([timesteps[i + 1]]))
        return (1 - self.init_mask) * proper + self.init_mask * latents


def _inpaint_start(
    c: Components,
    scheduler,
    image: torch.Tensor,
    mask: torch.Tensor,
    masked_image_latents: torch.Tensor | None,
    strength: float,
    timestep: torch.Tensor,
    shape: tuple,
    generator,
    guidance: bool,
) -> tuple[torch.Tensor, Inpainting]:
    """Initial latents and loop state of an inpainting call, drawing from `generator` in diffusers' order: the
    image's posterior sample (a plain U-Net, or strength < 1), the noise, then the masked image's sample."""
    from diffusers.utils.torch_utils import randn_tensor

    batch = shape[0]
    concat = c.unet_in_channels == c.latent_channels + 1 + c.latent_channels
    if not concat and c.unet_in_channels not in (None, c.latent_channels):
        raise ValueError(f"a U-Net with {c.unet_in_channels} input channels cannot inpaint; it takes 4 or 9")
    if image.shape[1] != 3 or mask.shape[1] != 1:
        raise ValueError(
            f"inpainting needs an RGB image and a one-channel mask; got {image.shape[1]} and {mask.shape[1]}"
        )
    strength_max = strength == 1.0
    image_latents = None
    if not concat or not strength_max:
        image_latents = _spread(_encode_images(c, image, generator), batch, "images")
    noise = randn_tensor(shape, generator=generator, dtype=c.dtype)
    if strength_max:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(image_latents, noise, timestep)

    small = torch.nn.functional.interpolate(mask, size=shape[-2:]).to(c.dtype)
    if masked_image_latents is None:
        masked = _encode_images(c, image * (mask < 0.5), generator)
    else:
        masked = masked_image_latents.to(c.dtype)
        if masked.ndim != 4 or tuple(masked.shape[1:]) != tuple(shape[1:]):
            raise ValueError(
                f"masked_image_latents have shape {tuple(masked.shape)}; this call's latents are "
                f"(N, {', '.join(map(str, shape[1:]))}) (the masked image's scaled VAE latents)"
            )
    small, masked = _spread(small, batch, "masks"), _spread(masked, batch, "masked images")
    state = Inpainting(
        concat=concat,
        mask=torch.cat([small] * 2) if guidance else small,
        masked=torch.cat([masked] * 2) if guidance else masked,
        init_mask=small,
        noise=noise,
        image_latents=image_latents,
    )
    return latents, state


def _control_residuals(
    c: Components,
    scheduler,
    latents,
    model_input,
    t,
    embeds,
    pooled,
    time_ids,
    images,
    scales,
    conditional_only,
    guess_mode,
    skips: int | None = None,
) -> dict:
    """The U-Net's residual inputs of one step (diffusers' ControlNet pipelines' loop body): in guess mode with
    CFG the nets see the conditional half only and the unconditional half gets zeros. `skips`: a feature
    cache's shallow step, which takes that many down residuals only (no mid one), where the nets can stop there."""
    if conditional_only:
        sample = scheduler.scale_model_input(latents, t)
        half = lambda x: None if x is None else x.chunk(2)[1]  # noqa: E731
        inputs = (sample, t, half(embeds), images, scales, guess_mode, half(pooled), half(time_ids))
    else:
        inputs = (model_input, t, embeds, images, scales, guess_mode, pooled, time_ids)
    if skips is not None and c.controlnets.shallow_residuals is not None:
        down, mid = c.controlnets.shallow_residuals(skips, *inputs), None
    else:
        down, mid = c.controlnets.residuals(*inputs)
    if conditional_only:
        down = [torch.cat([torch.zeros_like(d), d]) for d in down]
        mid = None if mid is None else torch.cat([torch.zeros_like(mid), mid])
    return {"down_residuals": down, "mid_residual": mid}


def generate(
    c: Components,
    prompt: str | list[str],
    *,
    negative_prompt: str | list[str] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    num_images_per_prompt: int = 1,
    output_type: str = "pil",
    progress: Callable | None = None,
    timesteps: Sequence[int] | None = None,
    feature_cache: bool = True,
    image: torch.Tensor | None = None,
    strength: float = 0.8,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    pooled_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    clip_skip: int | None = None,
    eta: float = 0.0,
    on_step_end: Callable[[int, torch.Tensor, dict], dict] | None = None,
    step_tensors: Sequence[str] = ("latents",),
    interrupted: Callable[[], bool] | None = None,
    control_images: Sequence[torch.Tensor] | None = None,
    controlnet_conditioning_scale: float | Sequence[float] = 1.0,
    control_guidance_start: float | Sequence[float] = 0.0,
    control_guidance_end: float | Sequence[float] = 1.0,
    guess_mode: bool = False,
    mask: torch.Tensor | None = None,
    masked_image_latents: torch.Tensor | None = None,
    aesthetic_score: float = 6.0,
    negative_aesthetic_score: float = 2.5,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
):
    """Run text-to-image (or, with `image`, image-to-image; with `image` and `mask`, inpainting) sampling; returns a numpy array (N, H, W, 3), a PIL
    list, an (N, 3, H, W) tensor in [0, 1] (`output_type="pt"`), or latents.

    `prompt` may be None when `prompt_embeds` are given (see `encode_prompts`, also for `clip_skip`); `eta`
    goes to schedulers that take it (DDIM), as diffusers passes it. `on_step_end(i, t, tensors) -> dict`
    runs after each step with the `step_tensors` named (`STEP_TENSORS`), and the tensors it returns replace
    them, as diffusers' `callback_on_step_end`; once `interrupted()` is true the remaining steps are
    skipped (the latents so far are decoded), as diffusers' `pipe._interrupt`.

    `feature_cache=False` runs the whole U-Net every step even when the
    components carry a feature cache. `image`: (B, 3, H, W) in [-1, 1] (as diffusers' `VaeImageProcessor`
    preprocesses it; B is 1 or the batch); sampling then starts from its noised latents at the step `strength`
    of the way into the schedule, as diffusers' SD / SDXL img2img pipelines do.

    `mask`: (B, 1, H, W) in {0, 1} (1: repaint; as diffusers' mask processor binarizes it; B is 1 or the batch)
    with `image` inpaints as diffusers' `StableDiffusion[XL]InpaintPipeline` (see `Inpainting`); `strength` 1
    starts from pure noise. `masked_image_latents` (B, 4, h, w), the masked image's scaled latents, replace
    encoding `image * (mask < 0.5)`.

    `control_images`: one (B, 3, H, W) tensor in [0, 1] per ControlNet of the components (as diffusers'
    control `VaeImageProcessor` preprocesses them; B is 1 or the number of prompts; they set the image size),
    run with `controlnet_conditioning_scale`, `control_guidance_start` / `_end` (a number, or one per net) and
    `guess_mode` as diffusers' ControlNet pipelines (see `ControlNets`).

    SDXL: `denoising_end` stops the schedule that share of the way through (a base's half of diffusers' ensemble
    of experts, with `output_type="latent"`); `denoising_start` (image-to-image only; `image` may be latents,
    `latent_channels` wide) starts there without adding noise, `strength` ignored (the refiner's half). The
    refiner's time ids take `aesthetic_score` / `negative_aesthetic_score` (diffusers' defaults 6 / 2.5).
    """
    from diffusers.utils.torch_utils import randn_tensor

    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("pass prompt or prompt_embeds (one of them)")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
    unknown = sorted(set(step_tensors) - set(STEP_TENSORS))
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs {', '.join(unknown)} are not available; "
            f"choose from {', '.join(STEP_TENSORS)}"
        )
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 0):
        raise ValueError(f"clip_skip={clip_skip!r} must be a non-negative integer (layers skipped from the end)")
    prompts = None if prompt is None else _as_list(prompt, "prompt")
    n_prompts = len(prompts) if prompts is not None else _check_embeds("prompt_embeds", prompt_embeds).shape[0]
    negative = None if negative_prompt is None else _as_list(negative_prompt, "negative_prompt")
    if negative is not None and len(negative) == 1 and n_prompts > 1:
        negative = negative * n_prompts
    if negative is not None and len(negative) != n_prompts:
        raise ValueError(f"negative_prompt has {len(negative)} entries for {n_prompts} prompts; give one each")
    check_denoising_bounds(denoising_start, denoising_end)
    if (denoising_start is not None or denoising_end is not None) and not c.is_sdxl:
        raise ValueError("denoising_start / denoising_end are SDXL's (diffusers' ensemble of experts); this is SD")
    if denoising_start is not None and image is None:
        raise ValueError("denoising_start applies to image-to-image: pass image= (e.g. a base's output latents)")
    latent_image = image is not None and image.ndim == 4 and image.shape[1] == c.latent_channels
    if image is not None:
        if c.encode_image is None and not latent_image:
            raise ValueError(
                "this artifact has no VAE encoder for image-to-image; recompile it with this "
                "sd-compiler (the onnx target exports vae_encoder unless vae_encoder=false)"
            )
        if latents is not None:
            raise ValueError("pass image (image-to-image) or latents, not both")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength} must be in [0, 1]")
        height, width = image.shape[-2:]
        if latent_image:  # diffusers' size of latents given as the image
            height, width = height * c.vae_scale_factor, width * c.vae_scale_factor
    if mask is not None:
        if denoising_start is not None or denoising_end is not None:
            raise ValueError("inpainting with denoising_start / denoising_end is not supported yet")
        if image is None:
            raise ValueError("mask needs image, the picture to inpaint")
        if tuple(mask.shape[-2:]) != (height, width):
            raise ValueError(f"the mask is {tuple(mask.shape[-2:])} and the image {(height, width)}; they must match")
    elif masked_image_latents is not None:
        raise ValueError("masked_image_latents apply to inpainting only; pass mask (and image) too")
    elif c.unet_in_channels not in (None, c.latent_channels):
        raise ValueError(
            f"this U-Net inpaints ({c.unet_in_channels} input channels: latents, mask, masked image): pass image "
            "and mask_image"
        )
    if (control_images is None) != (c.controlnets is None):
        raise ValueError(
            "this artifact has no ControlNet: control images need one (compile_pipeline(controlnet=...))"
            if c.controlnets is None
            else f"this artifact has {c.controlnets.count} ControlNet(s): pass image=, one control image each"
        )
    if control_images is not None:
        if mask is not None:
            raise ValueError("inpainting with ControlNet is not supported yet; pass control images only")
        if len(control_images) != c.controlnets.count:
            raise ValueError(
                f"{len(control_images)} control image(s) for {c.controlnets.count} ControlNet(s); pass one each"
            )
        size = tuple(control_images[0].shape[-2:])
        if any(tuple(im.shape[-2:]) != size for im in control_images):
            raise ValueError("the control images differ in size; pass height / width to resize them alike")
        if image is not None and (height, width) != size:
            raise ValueError(
                f"the control image is {size[0]}x{size[1]} and the image {height}x{width}; pass height / width to "
                "resize both alike"
            )
        height, width = size
        guess_mode = bool(guess_mode) or c.controlnets.global_pool_conditions
    height = c.default_size if height is None else height
    width = c.default_size if width is None else width
    for name, value in (("height", height), ("width", width)):
        if value % (c.vae_scale_factor) != 0 or value <= 0:
            raise ValueError(f"{name}={value} must be a positive multiple of {c.vae_scale_factor}")
    if timesteps is not None:
        if not timesteps or not all(isinstance(t, int) for t in timesteps):
            raise ValueError("timesteps must be a non-empty list of integers")
        num_inference_steps = len(timesteps)
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be a positive integer")
    embedded = c.guidance_embedding_dim is not None
    guidance = guidance_scale > 1.0 and not embedded  # an embedded w needs no unconditional pass
    embeds, pooled = encode_prompts(
        c,
        prompts,
        negative,
        guidance,
        num_images_per_prompt,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        clip_skip=clip_skip,
    )
    batch = embeds.shape[0] // 2 if guidance else embeds.shape[0]
    timestep_cond = None
    if embedded:  # (compile refuses a feature cache for such U-Nets)
        from sdcompiler.passes.distill_cfg import guidance_embedding

        scales = torch.full((batch,), float(guidance_scale))
        timestep_cond = guidance_embedding(scales, c.guidance_embedding_dim, c.dtype)

    time_ids = None
    if c.is_sdxl:  # original size, crop top-left, then the target size, or the refiner's aesthetic score
        size = [height, width, 0, 0]
        if c.aesthetic_time_ids:
            positive = torch.tensor([size + [aesthetic_score]], dtype=c.dtype).repeat(batch, 1)
            negative = torch.tensor([size + [negative_aesthetic_score]], dtype=c.dtype).repeat(batch, 1)
        else:
            positive = negative = torch.tensor([size + [height, width]], dtype=c.dtype).repeat(batch, 1)
        time_ids = torch.cat([negative, positive]) if guidance else positive

    scheduler = c.scheduler_factory()
    if timesteps is not None:  # as diffusers' retrieve_timesteps
        if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(f"{type(scheduler).__name__} does not accept explicit timesteps")
        scheduler.set_timesteps(timesteps=list(timesteps))
    else:
        scheduler.set_timesteps(num_inference_steps)
    shape = (batch, c.latent_channels, height // c.vae_scale_factor, width // c.vae_scale_factor)
    timesteps = scheduler.timesteps
    inpainting = None
    if mask is not None:
        timesteps = _strength_timesteps(scheduler, num_inference_steps, strength)
        start = timesteps[:1].repeat(batch)
        latents, inpainting = _inpaint_start(
            c, scheduler, image, mask, masked_image_latents, strength, start, shape, generator, guidance
        )
    elif image is not None:
        if denoising_start is not None:
            timesteps = _denoising_start_timesteps(scheduler, denoising_start)
        else:
            timesteps = _strength_timesteps(scheduler, num_inference_steps, strength)
        start = timesteps[:1].repeat(batch)
        latents = _image_latents(c, scheduler, image, start, batch, generator, add_noise=denoising_start is None)
    elif latents is None:
        latents = randn_tensor(shape, generator=generator, dtype=c.dtype) * scheduler.init_noise_sigma
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
    else:
        latents = latents.to(c.dtype) * scheduler.init_noise_sigma
    if denoising_end is not None:
        timesteps = _denoising_end_timesteps(scheduler, timesteps, denoising_end)

    control_scales = None
    if control_images is not None:
        control_scales = control_schedule(
            c.controlnets.count,
            controlnet_conditioning_scale,
            control_guidance_start,
            control_guidance_end,
            len(timesteps),
        )
        control_images = _control_batch(
            control_images, n_prompts, num_images_per_prompt, guidance and not guess_mode, c.dtype
        )

    step_params = set(inspect.signature(scheduler.step).parameters)
    step_kwargs = {}
    if "eta" in step_params:
        step_kwargs["eta"] = eta
    if "generator" in step_params:
        step_kwargs["generator"] = generator

    cache = c.feature_cache if feature_cache else None
    plan = cache.plan(len(timesteps)) if cache is not None else None
    deep = None
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        if interrupted is not None and interrupted():
            continue
        model_input = torch.cat([latents] * 2) if guidance else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if inpainting is not None:
            model_input = inpainting.unet_input(model_input)
        residuals = {}
        shallow_step = cache is not None and not embedded and not (plan[i] or deep is None)
        if control_scales is not None:
            residuals = _control_residuals(
                c,
                scheduler,
                latents,
                model_input,
                t,
                embeds,
                pooled,
                time_ids,
                control_images,
                control_scales[i],
                guess_mode and guidance,
                guess_mode,
                skips=cache.skips if shallow_step else None,
            )
        if embedded:
            eps = c.unet(model_input, t, embeds, pooled, time_ids, timestep_cond, **residuals)
        elif cache is None:
            eps = c.unet(model_input, t, embeds, pooled, time_ids, **residuals)
        elif plan[i] or deep is None:
            eps, deep = cache.full(model_input, t, embeds, pooled, time_ids, **residuals)
        else:  # the nets ran on this step too: the shallow skips take their residuals
            eps = cache.shallow(model_input, t, embeds, pooled, time_ids, deep, **residuals)
        if guidance:
            eps_uncond, eps_text = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        if inpainting is not None:
            latents = inpainting.after_step(scheduler, latents, timesteps, i)
        if on_step_end is not None:
            tensors = {"latents": latents, "prompt_embeds": embeds, "add_text_embeds": pooled, "add_time_ids": time_ids}
            returned = on_step_end(i, t, {name: tensors[name] for name in step_tensors}) or {}
            latents = returned.get("latents", latents)
            embeds = returned.get("prompt_embeds", embeds)
            pooled = returned.get("add_text_embeds", pooled)
            time_ids = returned.get("add_time_ids", time_ids)
        if not torch.isfinite(latents).all():  # one sync per step: never decode NaN into a black image
            raise GenerationError(
                f"the latents became NaN/Inf at step {i + 1} of {len(timesteps)} (guidance_scale={guidance_scale}, "
                f"{c.dtype}): lower guidance_scale, or use fp32 if the artifact runs in lower precision"
            )

    if output_type == "latent":
        return latents
    image = (c.decode(latents / c.scaling_factor) / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return image
    image = image.permute(0, 2, 3, 1).float().numpy()
    if output_type == "np":
        return image
    from PIL import Image

    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in image]
