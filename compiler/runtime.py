"""Run compiled artifacts: `load_compiled(dir) -> CompiledPipeline`, called like a diffusers pipeline.

    pipe = load_compiled("out/")
    out = pipe("a red cube", num_inference_steps=4, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    out.images        # (N, H, W, 3) float array, a list of PIL images, or latents

The target recorded in the manifest picks the component backends (ONNX
Runtime sessions or torch modules); the denoising loop is
`sdcompiler.sampling.generate` for every target.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdcompiler import knobs
from sdcompiler.artifact import read_manifest, verify_files
from sdcompiler.errors import ArtifactError, PipelineArgumentError, SDCompilerError
from sdcompiler.passes.errors import resolved_path
from sdcompiler.preflight import check_call
from sdcompiler.sampling import Components, generate

SUPPORTED_ARGUMENTS = (
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "generator",
    "latents",
    "num_images_per_prompt",
    "output_type",
    "timesteps",
    "feature_cache",
    "image",
    "strength",
)
OUTPUT_TYPES = ("pil", "np", "latent")


def unsupported_arguments_message(names) -> str:
    """The one line a call with arguments outside SUPPORTED_ARGUMENTS gets (the served model's too)."""
    return (
        f"unsupported argument(s) {', '.join(sorted(names))} for a compiled pipeline; "
        f"supported: {', '.join(SUPPORTED_ARGUMENTS)}"
    )


@dataclass
class CompiledPipelineOutput:
    images: Any


class CompiledPipeline:
    """A compiled text-to-image pipeline; `__call__` accepts diffusers' common arguments."""

    def __init__(
        self,
        root: Path,
        manifest: dict[str, Any],
        components: Components,
        device: str,
        target_config: dict[str, Any] | None = None,
    ):
        self.root = root
        self.manifest = manifest
        self.components = components
        self.device = device
        # the target config in effect: the recorded one with load-time options applied
        self.target_config = manifest["lowering"]["config"] if target_config is None else target_config
        self.loras: list[tuple[str, float]] = []  # fused at run time by set_loras
        self._lora_params: dict[str, list[str]] = {}

    @property
    def arch(self) -> str:
        return self.manifest["arch"]

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def unet(self):
        """The U-Net torch module (target "torch"); None where the U-Net is an ONNX Runtime session."""
        return self.components.modules.get("unet")

    def set_loras(self, loras) -> None:
        """Fuse these LoRAs (replacing the ones set before; `[]` restores the artifact's weights), in place.

        `loras`: a list of paths, `(path, scale)` pairs or `{"path": ..., "scale": ...}` dicts (.safetensors in
        the diffusers / peft or kohya layouts, as `merge_lora` reads them). Torch artifacts whose U-Net keeps the
        source's layout only; weights change in place, so CUDA graphs and torch.compile'd code keep running
        without recapture or recompile. A LoRA that does not fit raises and leaves the artifact's own weights.
        """
        from sdcompiler.targets import get_target

        items = []
        for entry in loras:
            if isinstance(entry, (str, Path)):
                items.append((str(entry), 1.0))
            elif isinstance(entry, dict) and set(entry) <= {"path", "scale"} and "path" in entry:
                items.append((str(entry["path"]), float(entry.get("scale", 1.0))))
            elif isinstance(entry, (tuple, list)) and len(entry) == 2:
                items.append((str(entry[0]), float(entry[1])))
            else:
                raise PipelineArgumentError(
                    f"each LoRA must be a path, (path, scale) or {{'path', 'scale'}}; got {entry!r}"
                )
        target = get_target(self.target)
        target.check_loras(self.manifest, items)  # refusals change nothing
        previous, self._lora_params, self.loras = self._lora_params, {}, []  # on an error: the artifact's weights
        self._lora_params = target.switch_loras(self.components, self.root, self.manifest, items, previous)
        self.loras = items

    def __repr__(self) -> str:
        passes = ", ".join(p["name"] for p in self.manifest["passes"]) or "no passes"
        return f"CompiledPipeline({self.arch}, target={self.target}, {passes}, root={str(self.root)!r})"

    def check(
        self,
        prompt=None,
        num_images_per_prompt=1,
        output_type="pil",
        num_inference_steps=None,
        timesteps=None,
        guidance_scale=None,
        height=None,
        width=None,
        image=None,
        strength=None,
        generator=None,
        latents=None,
        negative_prompt=None,
        feature_cache=True,
        **unsupported,
    ) -> None:
        """Refuse the arguments `__call__` refuses before it runs anything, with the same one-line
        PipelineArgumentError, and run nothing (a server checks each request of a batch this way before it
        runs the batch)."""
        if unsupported:
            raise PipelineArgumentError(unsupported_arguments_message(unsupported))
        if prompt is None:
            raise PipelineArgumentError("prompt is required (a string or a list of strings)")
        if output_type not in OUTPUT_TYPES:
            raise PipelineArgumentError(
                f"output_type={output_type!r} is not supported; use one of {', '.join(OUTPUT_TYPES)}"
            )
        check_call(
            self.manifest,
            prompt=prompt,
            num_images_per_prompt=num_images_per_prompt,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            image=image,
            strength=strength,
            generator=generator,
            latents=latents,
            device=self.device,
        )

    def __call__(
        self,
        prompt=None,
        negative_prompt=None,
        num_inference_steps=None,
        guidance_scale=None,
        height=None,
        width=None,
        generator=None,
        latents=None,
        num_images_per_prompt=1,
        output_type="pil",
        timesteps=None,
        feature_cache=True,
        image=None,
        strength=None,
        **unsupported,
    ) -> CompiledPipelineOutput:
        """Text-to-image; with `image` (PIL image(s), an (H, W, 3) / (N, H, W, 3) array in [0, 1], or an
        (N, 3, H, W) tensor in [-1, 1]) image-to-image as diffusers' img2img pipelines, `strength` (default 0.8;
        SDXL 0.3) of the schedule; height / width then resize the image (default: its own size, rounded down to
        a multiple of 8)."""
        self.check(
            prompt=prompt,
            num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            image=image,
            strength=strength,
            generator=generator,
            latents=latents,
            **unsupported,
        )
        defaults = self.manifest.get("defaults", {})
        guidance = defaults.get("guidance_scale", 7.5) if guidance_scale is None else guidance_scale
        if negative_prompt is not None and self.components.guidance_embedding_dim is not None:
            warnings.warn(
                "negative_prompt has no effect: this U-Net takes the guidance scale as an embedding and runs "
                "no unconditional pass",
                stacklevel=2,
            )
        elif negative_prompt is not None and guidance <= 1.0:
            warnings.warn(
                f"negative_prompt has no effect at guidance_scale={guidance} (no unconditional pass; "
                "CFG- and step-distilled artifacts default to 1.0)",
                stacklevel=2,
            )
        if timesteps is None and num_inference_steps is None:
            timesteps = defaults.get("timesteps")  # a recorded schedule, unless the caller names one
        if strength is None:
            strength = 0.3 if self.components.is_sdxl else 0.8  # diffusers' img2img defaults
        try:
            if image is not None:
                from diffusers.image_processor import VaeImageProcessor

                image = VaeImageProcessor(vae_scale_factor=self.components.vae_scale_factor).preprocess(
                    image, height=height, width=width
                )
            images = generate(
                self.components,
                prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=defaults.get("num_inference_steps", 50)
                if num_inference_steps is None
                else num_inference_steps,
                guidance_scale=guidance,
                height=height,
                width=width,
                generator=generator,
                latents=latents,
                num_images_per_prompt=num_images_per_prompt,
                output_type=output_type,
                progress=None if knobs.quiet() else _progress_bar,
                timesteps=timesteps,
                feature_cache=bool(feature_cache),
                image=image,
                strength=strength,
            )
        except (ValueError, TypeError) as exc:
            raise PipelineArgumentError(str(exc)) from None
        return CompiledPipelineOutput(images=images)


def _progress_bar(iterable):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="denoise", leave=False)


def load_compiled(
    path: str | Path,
    device: str | None = None,
    providers: list[str] | None = None,
    options: dict[str, Any] | None = None,
    verify: bool = True,
) -> CompiledPipeline:
    """Load an artifact folder written by `compile_pipeline` / `sdcompiler compile`.

    Args:
        path: the artifact folder (holds manifest.json).
        device: "cpu" or "cuda"; default: CUDA when torch sees a GPU.
        providers: ONNX Runtime execution providers (onnx target), overriding `device`.
        options: target options that only change how the artifact runs, overriding the recorded ones
            (torch target: `compile`, `compile_mode`, `cuda_graphs`, `fused_kernels`); others are refused.
        verify: check every file's sha256 against the manifest before loading (the default; a few seconds per
            GB, see `sdcompiler verify`); False skips the hashes for a faster start (presence, confinement and
            the ONNX graph checks still run).
    """
    from sdcompiler.targets import get_target

    root = resolved_path(path, ArtifactError, "pass an artifact folder")
    manifest = read_manifest(root)
    verify_files(root, manifest, hashes=verify)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    knobs.apply_num_threads()  # SDCOMPILER_NUM_THREADS, for torch and (the target's) ONNX Runtime sessions
    target = get_target(manifest["target"])
    config = target.load_config(manifest, options)
    effective = manifest if not options else {**manifest, "lowering": {**manifest["lowering"], "config": config}}
    try:
        components = target.load(root, effective, device, providers)
    except SDCompilerError:
        raise
    except Exception as exc:  # a weight file whose header or protobuf does not parse, a config that does not read
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ArtifactError(
            f"artifact {root} could not be loaded ({type(exc).__name__}: {first}): a file in it is damaged; "
            "recompile it"
        ) from exc
    return CompiledPipeline(root, manifest, components, device, config)
