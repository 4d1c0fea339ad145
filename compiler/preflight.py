"""Preflight: refuse a request that cannot run before anything is loaded or allocated.

- `check_call(manifest, ...)`: the arguments of a compiled pipeline's call (guidance, strength, steps, sizes,
  batch, generators, latents) and whether the generation fits in memory; `CompiledPipeline.__call__` runs it
  first, and `sdcompiler generate` runs it before loading the artifact at all.
- `unet_parameters(config)`: the parameter count of a U-Net config, built on the meta device (no weights);
  `sdcompiler.loading` refuses a config whose weights cannot fit before diffusers allocates them.
- `available_memory(device)`: MemAvailable (psutil, else /proc/meminfo), CUDA's free memory, or
  SDCOMPILER_MEMORY_LIMIT.

The memory estimates are rough on purpose: they catch requests off by orders of magnitude (a 100,000 px side,
a million images, a U-Net a hundred times too wide), not by 20 %:

    weights    = parameters x bytes per element
    generation = images x H x W x decode_bytes_per_pixel     (the VAE decoder's full-resolution activations,
                 which dominate: two live tensors as wide as the decoder's widest convolution, fp32)
                 + the artifact's files when it is not loaded yet

Bounds that do not depend on the machine (steps, image side, images per call) are knobs that a caller can
raise: SDCOMPILER_MAX_STEPS, SDCOMPILER_MAX_IMAGE_SIZE, SDCOMPILER_MAX_BATCH (`sdcompiler.knobs`).
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Mapping

import torch

from sdcompiler import knobs
from sdcompiler.errors import PipelineArgumentError, SDCompilerError

# an SD VAE decoder (512 channels at most) for manifests written before the estimate was recorded
DEFAULT_DECODE_BYTES_PER_PIXEL = 2 * 512 * 4


def available_memory(device: str = "cpu") -> tuple[int, str]:
    """Bytes a new allocation may use on `device`, and where the number comes from."""
    limit = knobs.memory_limit()
    if limit is not None:
        return limit, "SDCOMPILER_MEMORY_LIMIT"
    if str(device).startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free), "free GPU memory"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available memory"
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available memory"
    except OSError:
        pass
    return 1 << 62, "unknown free memory"  # no way to tell: do not refuse


def require_memory(needed: int, what: str, fix: str, error: type[SDCompilerError], device: str = "cpu") -> None:
    """Raise `error` (one line with both numbers and `fix`) when `needed` bytes exceed what `device` has free."""
    free, source = available_memory(device)
    if needed > free:
        raise error(f"{what} needs about {_gib(needed)}, more than the {_gib(free)} of {source}; {fix}")


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


def unet_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of the U-Net a diffusers config describes, built on the meta device (no memory, milliseconds
    for SD-sized configs); a config diffusers cannot build raises its own error."""
    from diffusers import UNet2DConditionModel

    keys = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(keys)
    return sum(p.numel() for p in unet.parameters())


def decode_bytes_per_pixel(vae: torch.nn.Module) -> int:
    """Peak bytes per output pixel and image of decoding: two fp32 tensors as wide as the decoder's widest conv."""
    decoder = getattr(vae, "decoder", vae)
    widths = [m.out_channels for m in decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    return 2 * 4 * max(widths, default=512)


def min_latent_size(unet: torch.nn.Module) -> int:
    """The smallest latent side the U-Net runs at. Its downsamplers do not bound it (a stride-2 convolution
    with padding maps a 1-wide map to a 1-wide map; diffusers passes the skip sizes up), but a module that pools
    over the map declares the latent side it needs (`min_latent_size`, e.g. GRI attention's global pool, which
    fails below its window with "Kernel size can't be greater than actual input size")."""
    modules = list(unet.modules())
    declared = [getattr(m, "min_latent_size", 1) for m in modules]
    declared += [getattr(getattr(m, "processor", None), "min_latent_size", 1) for m in modules]
    return max([1, *[d for d in declared if isinstance(d, int)]])


def artifact_bytes(root: Path) -> int:
    """Bytes of the artifact's files: what loading it takes, roughly."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink())


def check_call(
    manifest: Mapping[str, Any],
    *,
    prompt: Any,
    prompt_embeds: Any = None,
    num_images_per_prompt: Any = 1,
    num_inference_steps: Any = None,
    timesteps: Any = None,
    guidance_scale: Any = None,
    height: Any = None,
    width: Any = None,
    image: Any = None,
    strength: Any = None,
    generator: Any = None,
    latents: Any = None,
    device: str = "cpu",
    unloaded_bytes: int = 0,
    mask_image: Any = None,
    masked_image_latents: Any = None,
    padding_mask_crop: Any = None,
) -> None:
    """Refuse call arguments that cannot give an image, before any work: one-line PipelineArgumentError.

    Arguments are the pipeline call's (None: the manifest's default). `unloaded_bytes`: memory the artifact
    still needs to load (the CLI checks before loading).
    """
    model, defaults = manifest.get("model", {}), manifest.get("defaults", {})
    if prompt is None and isinstance(prompt_embeds, torch.Tensor) and prompt_embeds.ndim == 3:
        prompts = prompt_embeds.shape[0]  # caller-made embeddings, checked in full by the sampling loop
    elif isinstance(prompt, str):
        prompts = 1
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = len(prompt)
    else:
        raise PipelineArgumentError(
            "prompt must be a string or a non-empty list of strings (or pass prompt_embeds, a (batch, tokens, "
            "width) tensor)"
        )
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise PipelineArgumentError(f"num_images_per_prompt={num_images_per_prompt!r} must be a positive integer")
    batch = prompts * num_images_per_prompt
    if batch > knobs.max_batch():
        raise PipelineArgumentError(
            f"{prompts} prompt(s) x {num_images_per_prompt} image(s) = {batch} images in one call, above the limit "
            f"{knobs.max_batch()}; split the call or raise SDCOMPILER_MAX_BATCH"
        )
    guidance = defaults.get("guidance_scale", 7.5) if guidance_scale is None else guidance_scale
    if not _is_real(guidance) or not math.isfinite(guidance) or guidance < 0:
        raise PipelineArgumentError(
            f"guidance_scale={guidance_scale!r} must be a finite number >= 0 (1 turns classifier-free guidance off)"
        )
    _check_steps(num_inference_steps, timesteps)
    _check_inpainting(model, image, mask_image, masked_image_latents, padding_mask_crop)
    if strength is not None and image is None:
        raise PipelineArgumentError("strength applies to image-to-image only; pass image too")
    if strength is not None and (not _is_real(strength) or not (0 < strength <= 1)):
        raise PipelineArgumentError(f"strength={strength!r} must be a number in (0, 1] (the share of the schedule run)")

    scale, default_size = model.get("vae_scale_factor", 8), model.get("default_size", 512)
    if image is not None and mask_image is None:  # inpainting defaults to the model's size, as diffusers
        image_h, image_w = _image_size(image)
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == model.get("latent_channels", 4):
            image_h, image_w = image_h * scale, image_w * scale  # latents (a refiner's input): the image they make
        height = image_h // scale * scale if height is None else height
        width = image_w // scale * scale if width is None else width
    height = default_size if height is None else height
    width = default_size if width is None else width
    smallest = model.get("min_latent_size", 1) * scale
    largest = knobs.max_image_size()
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value <= 0 or value % scale:
            shown = f"{value!r}" + (" (from the image's size)" if image is not None else "")
            raise PipelineArgumentError(f"{name}={shown} must be a positive multiple of {scale}")
        if value < smallest:
            raise PipelineArgumentError(
                f"{name}={value} is below the {smallest} px this U-Net needs (a layer pools over "
                f"{model.get('min_latent_size')} latent pixels); use {name} >= {smallest}"
            )
        if value > largest:
            raise PipelineArgumentError(
                f"{name}={value} is above the {largest} px limit; lower it or raise SDCOMPILER_MAX_IMAGE_SIZE"
            )
    _check_generator(generator, batch)
    if latents is not None:
        if not isinstance(latents, torch.Tensor):
            raise PipelineArgumentError(
                f"latents must be a torch.Tensor, got {type(latents).__name__} (use torch.from_numpy for arrays)"
            )
        if latents.is_floating_point() and not torch.isfinite(latents).all():
            raise PipelineArgumentError("latents hold NaN or Inf values; pass finite noise")
    per_pixel = model.get("decode_bytes_per_pixel", DEFAULT_DECODE_BYTES_PER_PIXEL)
    needed = batch * height * width * per_pixel + unloaded_bytes
    require_memory(
        needed,
        f"generating {batch} image(s) of {height}x{width}",
        "lower height / width or the number of images (SDCOMPILER_MEMORY_LIMIT sets the budget)",
        PipelineArgumentError,
        device,
    )


def _check_inpainting(model: Mapping, image: Any, mask_image: Any, masked_image_latents: Any, crop: Any) -> None:
    """Inpainting's arguments: a mask goes with an image of its size; the inpainting-only arguments go with a
    mask; an inpainting U-Net (9 input channels) needs both."""
    in_channels = model.get("unet_in_channels", model.get("latent_channels", 4))
    if mask_image is None:
        given = [
            n for n, v in (("masked_image_latents", masked_image_latents), ("padding_mask_crop", crop)) if v is not None
        ]
        if given:
            raise PipelineArgumentError(f"{', '.join(given)} apply to inpainting only; pass image= and mask_image= too")
        if in_channels != model.get("latent_channels", 4):
            raise PipelineArgumentError(
                f"this artifact's U-Net inpaints ({in_channels} input channels: latents, mask, masked image); pass "
                "image= (the picture) and mask_image= (white: repaint) too (CLI: --image, --mask)"
            )
        return
    if image is None:
        raise PipelineArgumentError("mask_image needs image=, the picture to inpaint (white mask pixels are repainted)")
    image_size, mask_size = _image_size(image), _mask_size(mask_image)
    if image_size != mask_size:
        raise PipelineArgumentError(
            f"mask_image is {mask_size[1]}x{mask_size[0]} and image {image_size[1]}x{image_size[0]} (width x "
            "height); pass a mask of the image's size"
        )
    if crop is not None:
        from PIL import Image

        if not _is_int(crop) or crop < 0:
            raise PipelineArgumentError(f"padding_mask_crop={crop!r} must be a non-negative integer (pixels)")
        if not isinstance(image, Image.Image) or not isinstance(mask_image, Image.Image):
            raise PipelineArgumentError("padding_mask_crop needs image and mask_image as PIL images (as diffusers)")


def _check_steps(num_inference_steps: Any, timesteps: Any) -> None:
    if timesteps is not None:
        if not isinstance(timesteps, (list, tuple)) or not timesteps or not all(_is_int(t) for t in timesteps):
            raise PipelineArgumentError("timesteps must be a non-empty list of integers")
        count = len(timesteps)
    elif num_inference_steps is None:
        return  # the manifest's default (or its recorded schedule)
    elif not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise PipelineArgumentError(f"num_inference_steps={num_inference_steps!r} must be a positive integer")
    else:
        count = num_inference_steps
    if count > knobs.max_steps():
        raise PipelineArgumentError(
            f"{count} denoising steps is above the limit {knobs.max_steps()}; lower the steps or raise "
            "SDCOMPILER_MAX_STEPS"
        )


def _check_generator(generator: Any, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise PipelineArgumentError("generator must be a torch.Generator or a list of them")
        if len(generator) != batch:
            raise PipelineArgumentError(
                f"{len(generator)} generators for a batch of {batch} images; pass one generator or one per image"
            )
        return
    raise PipelineArgumentError(
        f"generator must be a torch.Generator or a list of them, got {type(generator).__name__} "
        "(for a seed: torch.Generator().manual_seed(seed))"
    )


def _mask_size(mask: Any) -> tuple[int, int]:
    """(H, W) of a mask argument, in the layouts diffusers' mask processor reads: a PIL image (or a list), an
    (H, W) / (H, W, 1) / (N, H, W) / (N, H, W, 1) array in [0, 1], an (H, W) / (N, H, W) / (N, 1, H, W) tensor."""
    import numpy as np
    from PIL import Image

    first = mask[0] if isinstance(mask, (list, tuple)) and mask else mask
    if isinstance(first, Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray) and 2 <= first.ndim <= 4:
        if first.ndim == 3 and first.shape[-1] == 1 or first.ndim == 4:
            return tuple(first.shape[-3:-1])
        return tuple(first.shape[-2:])
    if isinstance(first, torch.Tensor) and 2 <= first.ndim <= 4:
        return tuple(first.shape[-2:])
    raise PipelineArgumentError(
        "mask_image must be a PIL image, an (H, W) / (N, H, W, 1) array in [0, 1] or an (N, 1, H, W) tensor in "
        f"[0, 1] (white / 1: repaint), got {type(first).__name__}"
        + (f" of {first.ndim} dimensions" if hasattr(first, "ndim") else "")
    )


def _image_size(image: Any) -> tuple[int, int]:
    """(H, W) of an image argument: a PIL image, an (H, W, 3) / (N, H, W, 3) array, an (N, 3, H, W) tensor, or
    a list of PIL images."""
    import numpy as np
    from PIL import Image

    first = image[0] if isinstance(image, (list, tuple)) and image else image
    if isinstance(first, Image.Image):
        return first.height, first.width
    if isinstance(first, np.ndarray) and first.ndim in (3, 4):
        return first.shape[-3], first.shape[-2]
    if isinstance(first, torch.Tensor) and first.ndim in (3, 4):
        return first.shape[-2], first.shape[-1]
    raise PipelineArgumentError(
        "image must be a PIL image, an (H, W, 3) / (N, H, W, 3) array in [0, 1] or an (N, 3, H, W) tensor in "
        f"[-1, 1], got {type(first).__name__}" + (f" of {first.ndim} dimensions" if hasattr(first, "ndim") else "")
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
