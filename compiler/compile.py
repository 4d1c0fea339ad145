"""`compile_pipeline`: checkpoint -> passes -> lowering -> artifact -> runtime pipeline.

steps    = resolve_recipe(recipe)                  # strict configs + ordering rules, before any work
target   = get_target(target)                      # and its strict options
loaded   = load_checkpoint(checkpoint)             # diffusers folder | .safetensors | cached HF id
nets     = [load_controlnet(p) for p in controlnet] # optional ControlNets, checked against the U-Net
records  = PassManager(steps).run(pipe, ctx)       # one PassRecord per pass
lowering = target.lower(pipe, staging, options)    # named stages, each timed
manifest = {...}; rename staging -> output_dir     # atomic: never a half-written artifact
return load_compiled(output_dir)                   # compile_pipeline; compile_artifact stops before
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping, Sequence

from sdcompiler import knobs
from sdcompiler.archs import INPAINT_GUIDANCE_SCALE, is_inpainting
from sdcompiler.artifact import check_destination, staged_artifact, write_manifest
from sdcompiler.errors import ConfigError, LoweringError
from sdcompiler.passes import PassContext, PassManager, available_passes, get_pass
from sdcompiler.preflight import decode_bytes_per_pixel, min_latent_size
from sdcompiler.recipe import RecipeLike, recipe_controlnets, recipe_to_manifest, resolve_recipe
from sdcompiler.targets import LowerContext, get_target
from sdcompiler.version import __version__

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "triton",
    "nvidia-modelopt",
    "optimum-onnx",
)


def compile_pipeline(
    checkpoint: str | Path,
    recipe: RecipeLike = "none",
    target: str = "onnx",
    output_dir: str | Path | None = None,
    *,
    device: str | None = None,
    **options,
):
    """Compile a Stable Diffusion / SDXL checkpoint into a deployable artifact and load it.

    Takes the arguments of `compile_artifact` (which documents them) plus `device`,
    where the returned pipeline runs ("cpu" / "cuda"; default: CUDA if available).

    Returns:
        The loaded `CompiledPipeline` (same as `load_compiled(output_dir)`).
    """
    from sdcompiler.runtime import load_compiled

    root = compile_artifact(checkpoint, recipe, target, output_dir, **options)
    return load_compiled(root, device=device)


def compile_artifact(
    checkpoint: str | Path,
    recipe: RecipeLike = "none",
    target: str = "onnx",
    output_dir: str | Path | None = None,
    *,
    target_options: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    macs_resolution: tuple[int, int] | None = None,
    show_progress: bool | None = None,
    seed: int = 0,
    allow_nonfinite: bool = False,
    controlnet: str | Path | Sequence[str | Path] | None = None,
) -> Path:
    """Compile a Stable Diffusion / SDXL checkpoint into an artifact folder (without loading it).

    Args:
        checkpoint: a diffusers folder, a single-file `.safetensors` checkpoint, or a
            Hugging Face id already in the local cache.
        recipe: a preset name, a YAML path, or a list of recipe items (see `sdcompiler.recipe`).
        target: "onnx" (ONNX Runtime), "torch" (PyTorch + Triton kernels) or "tensorrt" (engines; needs the
            [tensorrt] extra). A pass may restrict the targets (`Pass.supported_targets`): checked first.
        output_dir: artifact folder; default: a folder in the cache named by the inputs' hash.
        target_options: options of the target, e.g. `{"precision": "fp16"}` for onnx.
        allow_pickle: allow pickle checkpoints (`.ckpt`, `.bin`, `.pt`), which can run code.
        macs_resolution: pixel (H, W) at which MACs are counted; default: the model's native size.
        show_progress: progress bars (default: on unless SDCOMPILER_QUIET is set).
        seed: seeds everything random in passes.
        allow_nonfinite: compile weights that hold NaN / Inf (refused by default, naming the tensor: in the
            checkpoint before any model is built, and in the models the passes leave before lowering).
        controlnet: a diffusers ControlNetModel folder, or a list of them (called in this order, residuals
            summed as diffusers' MultiControlNetModel), stored in the artifact: target torch stores the
            modules, target onnx exports each as its own graph and the U-Net with residual inputs (see
            `sdcompiler.passes.onnx_export`); not yet tensorrt. Passes that change the U-Net's down / mid
            layout are refused with them, as are passes not yet checked with them (`Pass.controlnet`). A
            mapping recipe may name them instead (`controlnet: PATH` or a list, relative to the recipe file).

    Returns:
        The artifact folder.
    """
    from sdcompiler.loading import load_checkpoint

    show_progress = (not knobs.quiet()) if show_progress is None else show_progress
    knobs.apply_num_threads()
    steps = resolve_recipe(recipe)
    lowering = get_target(target)
    for step in steps:
        supported = step.pass_.supported_targets(step.config)
        if supported is not None and target not in supported:
            raise LoweringError(
                f"pass {step.name!r} produces a model only target(s) {', '.join(supported)} can run "
                f"(target {target!r} has no kernels for it); use target={supported[0]!r}"
            )
    named = recipe_controlnets(recipe)
    if named and controlnet is not None:
        raise ConfigError(
            "the recipe names ControlNets (controlnet: ...) and controlnet= names some too; give them in one place"
        )
    controlnets = controlnet_paths(named or controlnet)
    if controlnets:
        check_controlnet_recipe([step.name for step in steps])
    target_config = lowering.config_class.from_dict(target_options, owner=f"target {target}")
    lowering.check_tools(target_config)  # a missing TensorRT / GPU stops here, not after minutes of export
    if output_dir is None:
        inputs = [str(checkpoint), recipe_to_manifest(steps), target, target_config.to_dict()]
        key = json.dumps(inputs + ([controlnets] if controlnets else []), sort_keys=True)
        output_dir = knobs.cache_dir() / "artifacts" / hashlib.sha256(key.encode()).hexdigest()[:16]
    output_dir = Path(output_dir)
    check_destination(output_dir)

    loaded = load_checkpoint(checkpoint, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite)
    pipe, spec = loaded.pipeline, loaded.arch
    nets = load_controlnets(controlnets, pipe.unet, allow_nonfinite)
    _note_precision(loaded.source.get("unet_dtype"), getattr(target_config, "precision", None), target)
    default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    macs_resolution = tuple(macs_resolution or (default_size, default_size))
    source_unet_config = dict(pipe.unet.config)

    ctx = PassContext(
        arch=spec.name,
        macs_resolution=macs_resolution,
        cache_dir=knobs.cache_dir(),
        seed=seed,
        show_progress=show_progress,
        source_hash=loaded.source.get("sha256", ""),
        target=target,
        controlnets={folder: model for folder, model, _ in nets},
        controlnets_key=json.dumps([source.get("sha256", "") for _, _, source in nets]) if nets else "",
    )
    start = time.perf_counter()
    records = PassManager(steps).run(pipe, ctx)
    passes_seconds = time.perf_counter() - start
    if not allow_nonfinite:
        _refuse_nonfinite_models(pipe, [r.name for r in records])
    if not _is_main_process():  # under accelerate launch / torchrun: training ran on all ranks, rank 0 writes
        return output_dir

    # an inpainting U-Net runs in diffusers' inpainting pipelines, whose default guidance is 7.5 (SDXL's too)
    guidance = INPAINT_GUIDANCE_SCALE if is_inpainting(pipe.unet.config) else spec.default_guidance_scale
    defaults = {"num_inference_steps": 50, "guidance_scale": guidance} | ctx.pipeline_defaults
    with staged_artifact(output_dir) as staging:
        stages = lowering.lower(
            pipe,
            staging,
            target_config,
            LowerContext(
                spec,
                source_unet_config,
                show_progress,
                defaults,
                ctx.products,
                {f: m for f, m, _ in nets},
                macs_resolution,
            ),
        )
        manifest = {
            "sdcompiler_version": __version__,
            "source": loaded.source,
            "arch": spec.name,
            "target": target,
            "recipe": recipe_to_manifest(steps),
            # with ControlNets each record says the pass keeps the U-Net's down / mid layout they feed
            "passes": [r.to_dict() | ({"controlnet": get_pass(r.name).controlnet} if nets else {}) for r in records],
            "macs_resolution": list(macs_resolution),
            "passes_seconds": round(passes_seconds, 3),
            "lowering": {"target": target, "config": target_config.to_dict(), "stages": [vars(s) for s in stages]},
            "model": {
                "latent_channels": pipe.vae.config.latent_channels,
                # 9: an inpainting U-Net (latents + mask + masked-image latents); absent in older manifests: 4
                "unet_in_channels": pipe.unet.config.in_channels,
                "vae_scale_factor": pipe.vae_scale_factor,
                "scaling_factor": pipe.vae.config.scaling_factor,
                "default_size": default_size,
                "force_zeros_for_empty_prompt": bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
                # a U-Net with a guidance embedding (LCM checkpoints, cfg-distill over a range of w) takes w as
                # `timestep_cond` and runs without the unconditional pass
                "guidance_embedding_dim": getattr(pipe.unet.config, "time_cond_proj_dim", None),
                # preflight of a call (sdcompiler.preflight): the smallest latent side, the decoder's memory
                "min_latent_size": min_latent_size(pipe.unet),
                "decode_bytes_per_pixel": decode_bytes_per_pixel(pipe.vae),
            },
            "defaults": defaults,
            "versions": package_versions(),
        }
        if nets:  # folder and source of each, in call order (load_compiled loads them from here)
            manifest["controlnets"] = [{"folder": folder, "source": source} for folder, _, source in nets]
        write_manifest(staging, manifest)
    return output_dir


def controlnet_paths(controlnet) -> list[str]:
    """`controlnet=` as a list of path strings (one path or a list of them; None: none)."""
    if controlnet is None:
        return []
    paths = [controlnet] if isinstance(controlnet, (str, Path)) else list(controlnet)
    if not all(isinstance(p, (str, Path)) for p in paths):
        raise ConfigError("controlnet must be a ControlNetModel folder or a list of them (paths)")
    return [str(p) for p in paths]


def check_controlnet_recipe(passes: list[str]) -> None:
    """Refuse, before the checkpoint loads, passes that cannot run with ControlNets (every target compiles them and
    each allowed pass): those that are not `keeps_layout` (`Pass.controlnet`), naming why; one line."""
    for name in passes:
        kind = get_pass(name).controlnet
        if kind == "changes_layout":
            raise ConfigError(
                f"pass {name!r} removes or reshapes the U-Net's down / mid blocks, so a ControlNet's residuals "
                f"(one per down-block output, plus the mid block's) no longer fit them; drop {name!r} or the ControlNet"
            )
        if kind != "keeps_layout":
            ok = sorted(n for n in available_passes() if get_pass(n).controlnet == "keeps_layout")
            raise ConfigError(
                f"pass {name!r} is not yet checked with ControlNets; passes allowed with them: {', '.join(ok)}; drop "
                f"{name!r} or the ControlNet"
            )


def load_controlnets(paths: list[str], unet, allow_nonfinite: bool) -> list[tuple[str, Any, dict]]:
    """(artifact folder, ControlNetModel, source record) per path: `controlnet/` for one, `controlnet_<i>/` for
    several; each checked to fit `unet`."""
    from sdcompiler.loading import check_controlnet_fits, load_controlnet

    nets = []
    for index, path in enumerate(paths):
        model, source = load_controlnet(path, allow_nonfinite=allow_nonfinite)
        check_controlnet_fits(model, unet, path)
        nets.append(("controlnet" if len(paths) == 1 else f"controlnet_{index}", model, source))
    return nets


def _note_precision(source: str | None, precision: str | None, target: str) -> None:
    """One line when a half-precision checkpoint becomes a float32 artifact (twice the size, no gain in quality)."""
    if source in ("fp16", "bf16") and precision == "fp32":
        log.warning(
            "the checkpoint's U-Net weights are %s and this %s artifact stores fp32 (twice the size); pass "
            "--precision %s (target option precision=%s) to keep them half precision",
            source,
            target,
            source if target == "torch" else "fp16",
            source if target == "torch" else "fp16",
        )


def _refuse_nonfinite_models(pipe, passes: list[str]) -> None:
    """The models the passes leave hold finite weights only (a pass that diverged is named before lowering)."""
    import torch

    from sdcompiler.loading import nonfinite_tensor

    for component, module in pipe.components.items():
        found = nonfinite_tensor(module.state_dict().items()) if isinstance(module, torch.nn.Module) else None
        if found:
            name, bad = found
            after = f"after pass(es) {', '.join(passes)}" if passes else "as loaded"
            raise LoweringError(
                f"the {component} holds {bad} in {name!r} {after}; a pass diverged: check its settings "
                "(e.g. a lower learning rate), or pass allow_nonfinite=True (CLI: --allow-nonfinite) to "
                "lower it anyway"
            )


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def package_versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions
