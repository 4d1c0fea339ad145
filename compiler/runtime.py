"""Run compiled artifacts: `load_compiled(dir) -> CompiledPipeline`, called like a diffusers pipeline.

    pipe = load_compiled("out/")
    out = pipe("a red cube", num_inference_steps=4, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np")
    out.images        # (N, H, W, 3) float array, a list of PIL images, or latents

The target recorded in the manifest picks the component backends (ONNX
Runtime sessions or torch modules); the denoising loop is
`sdcompiler.sampling.generate` for every target.

An SDXL base and an SDXL refiner artifact run as one unit (diffusers'
ensemble of experts): `load_compiled(base, refiner=refiner_dir)`; each call
runs the base to `denoising_end` (default 0.8) with `output_type="latent"`,
then the refiner from `denoising_start` = that fraction on those latents,
with the same prompts, steps, guidance and generator.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdcompiler import knobs
from sdcompiler.artifact import read_manifest, verify_files
from sdcompiler.errors import ArtifactError, PipelineArgumentError, RefinerError, SDCompilerError
from sdcompiler.passes.errors import resolved_path
from sdcompiler.preflight import check_call
from sdcompiler.sampling import Components, check_denoising_bounds, generate

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
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "clip_skip",
    "eta",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "return_dict",
    "controlnet_conditioning_scale",
    "control_guidance_start",
    "control_guidance_end",
    "guess_mode",
    "control_image",
    "mask_image",
    "masked_image_latents",
    "padding_mask_crop",
    "aesthetic_score",
    "negative_aesthetic_score",
    "denoising_start",
    "denoising_end",
)
# the arguments only an artifact with ControlNets takes (and their defaults, diffusers')
CONTROLNET_ARGUMENTS = {
    "controlnet_conditioning_scale": 1.0,
    "control_guidance_start": 0.0,
    "control_guidance_end": 1.0,
    "guess_mode": False,
}
# the SDXL refiner's arguments and the ensemble's split (diffusers' StableDiffusionXL[Img2Img]Pipeline)
REFINER_ARGUMENTS = ("aesthetic_score", "negative_aesthetic_score", "denoising_start", "denoising_end")
HIGH_NOISE_FRAC = 0.8  # the base's share of the schedule in a base + refiner call, diffusers' documented default
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def unsupported_arguments_message(names) -> str:
    """The one line a call with arguments outside SUPPORTED_ARGUMENTS gets (the served model's too)."""
    hint = ""
    if {"callback", "callback_steps"} & set(names):
        hint = " (diffusers' deprecated callback: use callback_on_step_end)"
    return (
        f"unsupported argument(s) {', '.join(sorted(names))} for a compiled pipeline{hint}; "
        f"supported: {', '.join(SUPPORTED_ARGUMENTS)}"
    )


@dataclass
class CompiledPipelineOutput:
    images: Any
    nsfw_content_detected: list[bool] | None = None  # diffusers' SD output field: no safety checker runs here


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
        self._progress_bar_config: dict[str, Any] = {}
        self._scheduler = None  # the instance `pipe.scheduler` shows; each call samples with a fresh copy
        self._interrupt = False  # diffusers' flag: a step callback sets it to skip the remaining steps
        self._num_timesteps = 0
        self._guidance_scale = None
        self.refiner: CompiledPipeline | None = None  # an SDXL refiner run after this base (`attach_refiner`)

    @property
    def arch(self) -> str:
        return self.manifest["arch"]

    def attach_refiner(self, refiner: "CompiledPipeline | None") -> None:
        """Run `refiner` (an SDXL refiner artifact) after this SDXL base on every call, as diffusers' ensemble of
        experts (None detaches it). Refuses a pair that does not fit (RefinerError, one line)."""
        if refiner is not None:
            check_refiner_pair(self.manifest, refiner.manifest, refiner.root)
        self.refiner = refiner

    @property
    def controlnet_count(self) -> int:
        """How many ControlNets the artifact holds (0: a plain text-to-image / image-to-image pipeline)."""
        return len(self.manifest.get("controlnets", []))

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
        the diffusers / peft or kohya layouts, as `merge_lora` reads them), on artifacts whose U-Net keeps the
        source's layout. Torch artifacts: weights change in place, so CUDA graphs and torch.compile'd code keep
        running without recapture or recompile. Onnx artifacts: the U-Net and text-encoder sessions are rebuilt
        with the fused weights as initializer overrides (`sdcompiler.targets.onnx_loras`); the files stay as
        they are. Tensorrt artifacts compiled with `refit=true`: the engines are refitted with the same fused
        weights (`sdcompiler.targets.tensorrt.refit`, UNVERIFIED on a real TensorRT). A LoRA that does not fit
        raises and leaves the artifact's own weights.
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

    # --- diffusers' pipeline interface -------------------------------------------------------------------

    @property
    def scheduler(self):
        """The scheduler calls sample with (a fresh copy per call). Assign another diffusers scheduler to swap
        it at run time, as with diffusers (`pipe.scheduler = X.from_config(pipe.scheduler.config)`): it must
        keep the U-Net's prediction type and training timesteps."""
        if self._scheduler is None:
            self._scheduler = self.components.scheduler_factory()
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler) -> None:
        for needed in ("set_timesteps", "step", "scale_model_input", "config", "from_config"):
            if not hasattr(scheduler, needed):
                raise PipelineArgumentError(
                    f"pipe.scheduler must be a diffusers scheduler (no {needed} on {type(scheduler).__name__})"
                )
        current = self.scheduler
        for key in ("prediction_type", "num_train_timesteps"):
            had, has = current.config.get(key), scheduler.config.get(key)
            if had is not None and has != had:
                raise PipelineArgumentError(
                    f"{type(scheduler).__name__} has {key}={has!r}, this artifact's U-Net was trained for {had!r}; "
                    f"build it with from_config(pipe.scheduler.config)"
                )
        recorded = self.manifest.get("defaults", {}).get("timesteps")
        if recorded and type(scheduler) is not type(current):
            warnings.warn(
                f"this artifact's U-Net was distilled for {type(current).__name__}'s timesteps {recorded}; "
                f"{type(scheduler).__name__} samples its own spacing, which the U-Net was not trained for",
                stacklevel=2,
            )
            self.manifest = {**self.manifest, "defaults": {**self.manifest["defaults"], "timesteps": None}}
        cls, config = type(scheduler), dict(scheduler.config)
        self.components.scheduler_factory = lambda: cls.from_config(config)
        self._scheduler = scheduler

    def to(self, *args, **kwargs) -> "CompiledPipeline":
        """Move to a device (`"cpu"`, `"cuda"`, a torch.device), as diffusers' `pipe.to`: the components are
        loaded again there (ONNX Runtime sessions with that device's providers; run-time LoRAs kept). A dtype
        other than the compiled precision is refused: precision is fixed at compile time (`--precision`)."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        if kwargs:
            raise PipelineArgumentError(f"to() takes a device and/or a dtype; got {', '.join(sorted(kwargs))}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
            else:
                raise PipelineArgumentError(f"to() takes a device and/or a dtype; got {arg!r}")
        if dtype is not None:
            precision = self.target_config.get("precision", "fp32")
            if dtype != DTYPES.get(precision):
                raise PipelineArgumentError(
                    f"this artifact was compiled at {precision}; a compiled pipeline keeps its precision, "
                    f"recompile with --precision for {dtype}"
                )
        if device is None:
            return self
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError) as exc:
            raise PipelineArgumentError(f"to({device!r}): not a device ({exc})") from None
        if kind not in ("cpu", "cuda"):
            raise PipelineArgumentError(f"to({device!r}): compiled pipelines run on cpu or cuda")
        if kind == "cuda" and not torch.cuda.is_available():
            raise PipelineArgumentError(f"to({device!r}): torch sees no CUDA device here")
        if kind == self.device:
            return self
        from sdcompiler.targets import get_target

        effective = {**self.manifest, "lowering": {**self.manifest["lowering"], "config": self.target_config}}
        components = get_target(self.target).load(self.root, effective, kind, None)
        components.scheduler_factory = self.components.scheduler_factory  # keep a swapped scheduler
        self.components, self.device = components, kind
        if self.loras:
            loras, self.loras, self._lora_params = self.loras, [], {}
            self.set_loras(loras)
        return self

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the denoising progress bar, as diffusers' (`disable=True` turns it off)."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar with the configured options, as diffusers' `pipe.progress_bar`."""
        from tqdm.auto import tqdm

        config = {"desc": "denoise", "leave": False, "disable": knobs.quiet()} | self._progress_bar_config
        if iterable is not None:
            return tqdm(iterable, **config)
        if total is not None:
            return tqdm(total=total, **config)
        raise PipelineArgumentError("progress_bar() needs an iterable or a total")

    @property
    def num_timesteps(self) -> int:
        """The steps of the current (or last) call, as diffusers' (step callbacks read it)."""
        return self._num_timesteps

    @property
    def guidance_scale(self):
        """The guidance scale of the current (or last) call."""
        return self._guidance_scale

    @property
    def interrupt(self) -> bool:
        return self._interrupt

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
        prompt_embeds=None,
        eta=0.0,
        callback_on_step_end=None,
        control_image=None,
        mask_image=None,
        masked_image_latents=None,
        padding_mask_crop=None,
        **unsupported,
    ) -> None:
        """Refuse the arguments `__call__` refuses before it runs anything, with the same one-line
        PipelineArgumentError, and run nothing (a server checks each request of a batch this way before it
        runs the batch)."""
        control = {k: unsupported.pop(k) for k in CONTROLNET_ARGUMENTS if k in unsupported}
        refine = {k: unsupported.pop(k) for k in REFINER_ARGUMENTS if k in unsupported}
        if unsupported:
            raise PipelineArgumentError(unsupported_arguments_message(unsupported))
        self._check_refine(image, prompt_embeds, callback_on_step_end, control, **refine)
        if self.controlnet_count and mask_image is not None:
            raise PipelineArgumentError("inpainting with ControlNet (mask_image=) is not supported yet")
        if mask_image is not None and (self.refiner is not None or any(v is not None for v in refine.values())):
            raise PipelineArgumentError(
                "inpainting (mask_image=) with the SDXL refiner, denoising_start / _end or aesthetic scores is not "
                "supported yet; inpaint without them"
            )
        image = self._check_control(image, strength, control_image, control)
        if prompt is None and prompt_embeds is None:
            raise PipelineArgumentError("prompt is required (a string or a list of strings), or prompt_embeds")
        if not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
            raise PipelineArgumentError(f"eta={eta!r} must be a finite number >= 0 (DDIM's; 0 is deterministic)")
        if callback_on_step_end is not None:
            self._step_callback(callback_on_step_end)  # refuses what it cannot run
        if output_type not in OUTPUT_TYPES:
            raise PipelineArgumentError(
                f"output_type={output_type!r} is not supported; use one of {', '.join(OUTPUT_TYPES)}"
            )
        if padding_mask_crop is not None and output_type != "pil":
            raise PipelineArgumentError(
                f"padding_mask_crop pastes the result into the original PIL image: use output_type='pil', not "
                f"{output_type!r} (as diffusers)"
            )
        check_call(
            self.manifest,
            prompt=prompt,
            prompt_embeds=prompt_embeds,
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
            mask_image=mask_image,
            masked_image_latents=masked_image_latents,
            padding_mask_crop=padding_mask_crop,
        )

    def _check_refine(
        self,
        image,
        prompt_embeds,
        callback_on_step_end,
        control: dict,
        aesthetic_score=None,
        negative_aesthetic_score=None,
        denoising_start=None,
        denoising_end=None,
    ) -> None:
        """Refuse refiner and ensemble arguments this artifact cannot take (one line each)."""
        scores = {"aesthetic_score": aesthetic_score, "negative_aesthetic_score": negative_aesthetic_score}
        given = [name for name, value in scores.items() if value is not None]
        refiner = self.refiner is not None
        if given and self.arch != "sdxl-refiner" and not refiner:
            raise PipelineArgumentError(
                f"{', '.join(given)}: only an SDXL refiner's time ids take an aesthetic score; this artifact is "
                f"{self.arch} (load_compiled(base, refiner=DIR) runs a refiner after it)"
            )
        for name in given:
            value = scores[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise PipelineArgumentError(f"{name}={value!r} must be a finite number (diffusers' 6 / 2.5)")
        try:
            check_denoising_bounds(denoising_start, denoising_end)
        except ValueError as exc:
            raise PipelineArgumentError(str(exc)) from None
        bounds = {"denoising_start": denoising_start, "denoising_end": denoising_end}
        split = [name for name, value in bounds.items() if value is not None]
        if split and not self.components.is_sdxl:
            raise PipelineArgumentError(
                f"{' / '.join(split)}: splitting the schedule is SDXL's (base + refiner); this artifact is {self.arch}"
            )
        if split and (self.controlnet_count or any(v is not None for v in control.values())):
            raise PipelineArgumentError(f"{' / '.join(split)} with ControlNet is not supported yet")
        if refiner:
            if denoising_start is not None:
                raise PipelineArgumentError(
                    "denoising_start: with a refiner attached the refiner starts where the base stops; pass "
                    f"denoising_end (default {HIGH_NOISE_FRAC})"
                )
            if prompt_embeds is not None or callback_on_step_end is not None:
                raise PipelineArgumentError(
                    "prompt_embeds / callback_on_step_end with a refiner attached: the base and the refiner encode "
                    "prompts differently; pass prompt strings, or call the two artifacts one after the other"
                )
        elif self.arch == "sdxl-refiner" and image is None:
            raise PipelineArgumentError(
                "the SDXL refiner refines an image: pass image= (an image, or a base's output_type='latent' "
                "latents with denoising_start)"
            )
        elif denoising_start is not None and image is None:
            raise PipelineArgumentError(
                "denoising_start applies to image-to-image: pass image= (e.g. a base's output_type='latent' latents)"
            )

    def _check_control(self, image, strength, control_image, control: dict):
        """Refuse ControlNet arguments the artifact cannot take; returns the image that sets the size (the first
        control image on a ControlNet artifact)."""
        count = self.controlnet_count
        if not count:
            given = sorted(k for k, v in control.items() if v is not None)
            if control_image is not None:
                given.append("control_image")
            if given:
                raise PipelineArgumentError(
                    f"{', '.join(given)}: this artifact has no ControlNet; compile one with "
                    "compile_pipeline(..., controlnet=PATH) (CLI: --controlnet PATH)"
                )
            return image
        from sdcompiler.sampling import control_schedule

        # every setting (`check` may get some of them only: a served row names what it sets)
        settings = {k: CONTROLNET_ARGUMENTS[k] if control.get(k) is None else control[k] for k in CONTROLNET_ARGUMENTS}
        if not isinstance(settings["guess_mode"], bool):
            raise PipelineArgumentError(f"guess_mode={settings['guess_mode']!r} must be True or False")
        try:
            control_schedule(
                count,
                settings["controlnet_conditioning_scale"],
                settings["control_guidance_start"],
                settings["control_guidance_end"],
                1,
            )
        except ValueError as exc:
            raise PipelineArgumentError(str(exc)) from None
        if control_image is not None:  # image-to-image: image= is the init image, control_image= the control
            if image is None:
                raise PipelineArgumentError(
                    "control_image= is ControlNet image-to-image: pass image=, the image to start from, too (or "
                    "pass the control image as image= for text-to-image)"
                )
            self._check_control_images(control_image, "control_image")
            return image
        if strength is not None:
            raise PipelineArgumentError(
                "strength= is for ControlNet image-to-image: pass the control image(s) as control_image= and the "
                "image to start from as image= (text-to-image takes the control image as image=)"
            )
        if image is None:
            raise PipelineArgumentError(
                f"this artifact has {count} ControlNet(s): pass image=, the control image"
                + ("s as a list, one per ControlNet" if count > 1 else "")
            )
        return self._check_control_images(image, "image")

    def _check_control_images(self, images, name: str):
        """One control image per ControlNet (a list for several); returns the first."""
        count = self.controlnet_count
        if count > 1:
            if not isinstance(images, (list, tuple)) or len(images) != count:
                raise PipelineArgumentError(
                    f"this artifact has {count} ControlNets: pass {name}= as a list of {count} control images, one "
                    "per ControlNet"
                )
            return images[0]
        return images

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
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        clip_skip=None,
        eta=0.0,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
        return_dict=True,
        controlnet_conditioning_scale=None,
        control_guidance_start=None,
        control_guidance_end=None,
        guess_mode=None,
        control_image=None,
        mask_image=None,
        masked_image_latents=None,
        padding_mask_crop=None,
        aesthetic_score=None,
        negative_aesthetic_score=None,
        denoising_start=None,
        denoising_end=None,
        **unsupported,
    ) -> CompiledPipelineOutput | tuple:
        """Text-to-image; with `image` (PIL image(s), an (H, W, 3) / (N, H, W, 3) array in [0, 1], or an
        (N, 3, H, W) tensor in [-1, 1]) image-to-image as diffusers' img2img pipelines, `strength` (default 0.8;
        SDXL 0.3) of the schedule; height / width then resize the image (default: its own size, rounded down to
        a multiple of 8).

        As diffusers' pipelines also: `prompt_embeds` / `negative_prompt_embeds` (SDXL with their pooled
        embeddings) instead of prompts, `clip_skip`, `eta` (DDIM), `output_type="pt"` ((N, 3, H, W) in [0, 1]),
        `callback_on_step_end(pipe, i, t, tensors) -> dict` with `callback_on_step_end_tensor_inputs` (latents,
        prompt_embeds, add_text_embeds, add_time_ids; setting `pipe._interrupt = True` skips the remaining
        steps), `return_dict=False` (a tuple: SD `(images, None)`, SDXL `(images,)`).

        On an artifact compiled with ControlNets, `image` is the control image (one per ControlNet, a list for
        several; each a PIL image, an array in [0, 1] or a tensor, preprocessed by diffusers' control
        `VaeImageProcessor`: resized by height / width, not normalized), with `controlnet_conditioning_scale`,
        `control_guidance_start`, `control_guidance_end` (a number or one per net) and `guess_mode`, as
        diffusers' `StableDiffusion[XL]ControlNetPipeline`. Image-to-image with ControlNet as diffusers'
        `StableDiffusion[XL]ControlNetImg2ImgPipeline`: `image` the image to start from, `control_image` the
        control image(s), `strength` (default 0.8), `controlnet_conditioning_scale` default 0.8.

        Inpainting, as diffusers' `StableDiffusion[XL]InpaintPipeline`: `image` with `mask_image` (a PIL image,
        an (H, W) / (N, H, W, 1) array or an (N, 1, H, W) tensor in [0, 1], the image's size; white / >= 0.5:
        repaint, binarized by diffusers' mask processor), `strength` (default 1.0; SDXL 0.9999), optionally
        `masked_image_latents` (the masked image's scaled VAE latents) and `padding_mask_crop` (inpaint a crop
        around the mask, this many pixels wider, and paste it back; PIL inputs and output). height / width default
        to the model's size, as diffusers'. An inpainting U-Net (9 input channels) needs the mask; a plain U-Net
        with a mask blends the unmasked region back each step (diffusers' 4-channel path).

        SDXL, as diffusers' `StableDiffusionXL[Img2Img]Pipeline`: `denoising_end` stops the schedule that share
        of the way through (with `output_type="latent"`: a base's half of an ensemble of experts);
        `denoising_start` (image-to-image; `image` may be those latents) starts there, `strength` ignored. An
        SDXL refiner artifact takes `aesthetic_score` / `negative_aesthetic_score` (default 6 / 2.5) and needs
        `image`. With a refiner attached (`load_compiled(base, refiner=DIR)`) a call runs the base to
        `denoising_end` (default 0.8), then the refiner from there (its aesthetic scores as given), and returns
        the refiner's output."""
        control = {
            "controlnet_conditioning_scale": controlnet_conditioning_scale,
            "control_guidance_start": control_guidance_start,
            "control_guidance_end": control_guidance_end,
            "guess_mode": guess_mode,
        }
        self.check(
            prompt=prompt,
            prompt_embeds=prompt_embeds,
            eta=eta,
            callback_on_step_end=callback_on_step_end,
            output_type=output_type,
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
            control_image=control_image,
            mask_image=mask_image,
            masked_image_latents=masked_image_latents,
            padding_mask_crop=padding_mask_crop,
            aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score,
            denoising_start=denoising_start,
            denoising_end=denoising_end,
            **control,
            **unsupported,
        )
        if self.refiner is not None:
            shared = dict(
                prompt=prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                num_images_per_prompt=num_images_per_prompt,
                timesteps=timesteps,
                feature_cache=feature_cache,
                clip_skip=clip_skip,
                eta=eta,
            )
            split = HIGH_NOISE_FRAC if denoising_end is None else denoising_end
            base = dict(height=height, width=width, latents=latents, image=image, strength=strength)
            latent = self._call_alone(**shared, **base, denoising_end=split, output_type="latent").images
            return self.refiner(
                **shared,
                image=latent,
                denoising_start=split,
                aesthetic_score=aesthetic_score,
                negative_aesthetic_score=negative_aesthetic_score,
                output_type=output_type,
                return_dict=return_dict,
            )
        control_defaults = dict(CONTROLNET_ARGUMENTS)
        if control_image is not None:
            control_defaults["controlnet_conditioning_scale"] = 0.8  # diffusers' ControlNet image-to-image default
        control = {k: control_defaults[k] if v is None else v for k, v in control.items()}
        on_step_end = None if callback_on_step_end is None else self._step_callback(callback_on_step_end)
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
        control_images = None
        if self.controlnet_count and control_image is not None:  # image-to-image: image= is the init image
            control_images = [control_image] if self.controlnet_count == 1 else list(control_image)
        elif self.controlnet_count:
            control_images, image = ([image] if self.controlnet_count == 1 else list(image)), None
        if strength is None and mask_image is not None:
            strength = 0.9999 if self.components.is_sdxl else 1.0  # diffusers' inpainting defaults
        elif strength is None and control_images is not None:
            strength = 0.8  # diffusers' ControlNet image-to-image default (SDXL too)
        elif strength is None:
            strength = 0.3 if self.components.is_sdxl else 0.8  # diffusers' img2img defaults
        self._interrupt, self._guidance_scale = False, guidance
        self._num_timesteps = (
            len(timesteps) if timesteps else num_inference_steps or defaults.get("num_inference_steps", 50)
        )
        mask, original_image, crop = None, image, None  # crop: padding_mask_crop's region
        try:
            if mask_image is not None:
                mask, image, crop = self._inpainting_inputs(image, mask_image, height, width, padding_mask_crop)
            elif image is not None:  # (latents, latent_channels wide, pass as they are)
                from diffusers.image_processor import VaeImageProcessor

                image = VaeImageProcessor(
                    vae_scale_factor=self.components.vae_scale_factor,
                    vae_latent_channels=self.components.latent_channels,
                ).preprocess(image, height=height, width=width)
            if control_images is not None:  # as diffusers' ControlNet pipelines' control_image_processor
                from diffusers.image_processor import VaeImageProcessor

                processor = VaeImageProcessor(
                    vae_scale_factor=self.components.vae_scale_factor, do_convert_rgb=True, do_normalize=False
                )
                control_images = [
                    processor.preprocess(im, height=height, width=width).to(torch.float32) for im in control_images
                ]
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
                progress=self.progress_bar,
                timesteps=timesteps,
                feature_cache=bool(feature_cache),
                image=image,
                strength=strength,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=pooled_prompt_embeds,
                negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                clip_skip=clip_skip,
                eta=float(eta),
                on_step_end=on_step_end,
                step_tensors=tuple(callback_on_step_end_tensor_inputs),
                interrupted=lambda: self._interrupt,
                control_images=control_images,
                mask=mask,
                masked_image_latents=masked_image_latents,
                aesthetic_score=6.0 if aesthetic_score is None else float(aesthetic_score),
                negative_aesthetic_score=2.5 if negative_aesthetic_score is None else float(negative_aesthetic_score),
                denoising_start=denoising_start,
                denoising_end=denoising_end,
                **control,
            )
        except (ValueError, TypeError) as exc:
            raise PipelineArgumentError(str(exc)) from None
        if crop is not None:  # paste the inpainted crop into the original image, as diffusers
            from diffusers.image_processor import VaeImageProcessor

            overlay = VaeImageProcessor(vae_scale_factor=self.components.vae_scale_factor).apply_overlay
            images = [overlay(mask_image, original_image, im, crop) for im in images]
        if not return_dict:
            return (images,) if self.components.is_sdxl else (images, None)
        return CompiledPipelineOutput(images=images)

    def _inpainting_inputs(self, image, mask_image, height, width, padding_mask_crop):
        """(mask, image, crop) as diffusers' inpainting pipelines preprocess them: the image by its
        `VaeImageProcessor` and the mask by its mask processor (grayscale, binarized at 0.5, not normalized), both
        resized to height / width (default: the model's size) or, with `padding_mask_crop`, cropped to the mask's
        padded region and fitted in; `crop` is that region (None without padding_mask_crop)."""
        from diffusers.image_processor import VaeImageProcessor

        scale = self.components.vae_scale_factor
        height = height or self.components.default_size
        width = width or self.components.default_size
        image_processor = VaeImageProcessor(vae_scale_factor=scale)
        mask_processor = VaeImageProcessor(
            vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        coords, mode = None, "default"
        if padding_mask_crop is not None:
            coords = mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            mode = "fill"
        image = image_processor.preprocess(image, height=height, width=width, crops_coords=coords, resize_mode=mode)
        mask = mask_processor.preprocess(mask_image, height=height, width=width, resize_mode=mode, crops_coords=coords)
        return mask, image.to(torch.float32), coords

    def _call_alone(self, **kwargs):
        """This artifact's own call, without the attached refiner."""
        refiner, self.refiner = self.refiner, None
        try:
            return self(**kwargs)
        finally:
            self.refiner = refiner

    def _step_callback(self, callback):
        """diffusers' `callback_on_step_end(pipe, i, t, tensors)` as the sampling loop's `(i, t, tensors)`."""
        try:
            from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
        except ImportError:  # an older diffusers: no callback classes to refuse
            MultiPipelineCallbacks = PipelineCallback = ()
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            raise PipelineArgumentError(
                f"{type(callback).__name__} changes guidance mid-run, which a compiled pipeline cannot follow; "
                "pass a function (pipe, i, t, tensors) -> dict"
            )
        if not callable(callback):
            raise PipelineArgumentError(f"callback_on_step_end must be callable; got {type(callback).__name__}")

        def on_step_end(i, t, tensors):
            returned = callback(self, i, t, tensors)
            if returned is not None and not isinstance(returned, dict):
                raise TypeError(f"callback_on_step_end returned {type(returned).__name__}; return a dict")
            return returned

        return on_step_end


def load_compiled(
    path: str | Path,
    device: str | None = None,
    providers: list[str] | None = None,
    options: dict[str, Any] | None = None,
    verify: bool = True,
    refiner: "str | Path | CompiledPipeline | None" = None,
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
        refiner: an SDXL refiner artifact folder (or a loaded one) to run after this SDXL base on every call, as
            diffusers' ensemble of experts (see the module docstring); loaded with the same device, providers
            and `verify`. A pair that does not fit is refused (RefinerError) before the refiner loads.
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
    pipe = CompiledPipeline(root, manifest, components, device, config)
    if refiner is not None:
        if not isinstance(refiner, CompiledPipeline):
            refiner_root = resolved_path(refiner, ArtifactError, "pass a refiner artifact folder")
            check_refiner_pair(manifest, read_manifest(refiner_root), refiner_root)  # before loading it
            refiner = load_compiled(refiner_root, device=device, providers=providers, verify=verify)
        pipe.attach_refiner(refiner)
    return pipe


def check_refiner_pair(base: dict[str, Any], refiner: dict[str, Any], where) -> None:
    """Refuse a base + refiner pair that cannot run as one (RefinerError, one line): the base must be an SDXL
    base without ControlNets, the refiner an SDXL refiner artifact, both in the same latent space."""
    if base["arch"] != "sdxl":
        raise RefinerError(
            f"a refiner runs after an SDXL base; this artifact is {base['arch']} (compile the SDXL base, e.g. "
            "stabilityai/stable-diffusion-xl-base-1.0)"
        )
    if base.get("controlnets"):
        raise RefinerError("a refiner after a ControlNet base is not supported yet; load the base without refiner")
    if refiner["arch"] != "sdxl-refiner":
        raise RefinerError(
            f"{where} is a {refiner['arch']} artifact, not an SDXL refiner; compile the refiner checkpoint "
            "(e.g. stabilityai/stable-diffusion-xl-refiner-1.0) and pass that artifact"
        )
    for key in ("latent_channels", "vae_scale_factor"):
        if base["model"][key] != refiner["model"][key]:
            raise RefinerError(
                f"the refiner {where} has {key}={refiner['model'][key]} and the base {base['model'][key]}: their "
                "latents do not fit; pair a refiner made for this base"
            )
