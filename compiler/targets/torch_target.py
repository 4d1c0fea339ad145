"""`target="torch"`: the transformed pipeline's weights as safetensors, rebuilt at load time.

Layout: the diffusers folder layout, except that `unet/config.json` holds the
U-Net config *before* the recipe ran and `unet/diffusion_pytorch_model.safetensors`
the weights *after* it. Loading builds the original U-Net without memory
for weights (meta device), replays each structural pass's `rebuild` from the
manifest's recipe, then assigns the stored weights (strict: every parameter
must be present and no extra one). No training or calibration reruns.

Stages: `save_weights`, then `lower_kernels`, which records which modules
the fused Triton kernels replace (`sdcompiler.kernels.lowering`: ResNet
GroupNorm+SiLU, GEGLU). `cuda_graphs` (default off) replays the U-Net from
CUDA graphs captured per input shape (`sdcompiler.cuda_graphs`); it applies
on CUDA only, and not to the shallow/full calls of a feature cache.
`compile` (default off) wraps the U-Net call (and a feature cache's full and
shallow calls) in `torch.compile` with `compile_mode`, on any device: the
first call per input shape compiles (seconds for a tiny U-Net on CPU, minutes
for a full one), later calls reuse the compiled code (inductor's on-disk
cache makes the next process faster). These options only change how an
artifact runs: `load_compiled(dir, options={...})` overrides them. The
module swap happens at load time inside CUDA graphs only (`fused_kernels`,
default on, needs Triton): on an H200 the fused ops are 1.5-8x faster than
eager in device time, but one eager call costs more in dispatch and launch
than the kernels save, so without graphs the modules stay diffusers' own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from sdcompiler.archs import get_arch
from sdcompiler.artifact import confined
from sdcompiler.errors import ArtifactError, LoweringError
from sdcompiler.kernels._common import triton_available
from sdcompiler.kernels.lowering import lower_unet, unlower_unet
from sdcompiler.passes import PassConfig, QuantizedUNet
from sdcompiler.passes.ptq_lowp import check_device as check_lowp_device
from sdcompiler.passes.quest import pack_quantized
from sdcompiler.targets.base import LowerContext, Stage, StageRecord, Target, check_runtime_loras, write_pipeline_files
from sdcompiler.targets.components import (
    cache_settings,
    make_components,
    torch_controlnets,
    torch_feature_cache,
    torch_text_encoder,
    torch_unet,
    torch_vae_decoder,
    torch_vae_encoder,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class TorchTargetConfig(PassConfig):
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    fused_kernels: bool = True  # with cuda_graphs and Triton: GroupNorm+SiLU and GEGLU as fused kernels
    cuda_graphs: bool = False  # on CUDA: replay U-Net calls from captured CUDA graphs
    compile: bool = False  # torch.compile (inductor) the U-Net calls at load; the first call per shape compiles
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"

    def __post_init__(self):
        if self.compile and self.cuda_graphs:
            raise ValueError(
                "cuda_graphs and compile exclude each other; for CUDA graphs under torch.compile use "
                "compile_mode='reduce-overhead' (inductor's own graphs) with cuda_graphs=false"
            )


class TorchTarget(Target):
    name = "torch"
    config_class = TorchTargetConfig
    load_options = ("fused_kernels", "cuda_graphs", "compile", "compile_mode")

    def lower(self, pipe, out: Path, config: TorchTargetConfig, ctx: LowerContext) -> list[StageRecord]:
        from safetensors.torch import save_file

        records: list[StageRecord] = []
        dtype = DTYPES[config.precision]
        quantized = ctx.products.unet_quantization
        fixed: set[str] = set()
        if quantized is not None:
            fixed = low_precision_stage(records, pipe, quantized, ctx)
        with Stage(records, "save_weights", {"precision": config.precision}) as stage:
            for name in ctx.arch.text_encoders:
                getattr(pipe, name).to(dtype).save_pretrained(out / name, safe_serialization=True)
                getattr(pipe, name).to(torch.float32)
            pipe.vae.save_pretrained(out / "vae", safe_serialization=True)  # VAE stays fp32
            for folder, controlnet in ctx.controlnets.items():  # at the U-Net's precision
                # quest_w4a4's quantize_controlnets: packed codes, like the U-Net's (floats: its precision, too)
                packed_net = pack_quantized(controlnet)
                if packed_net:
                    stage.results.setdefault("controlnet_packed_quantized_layers", {})[folder] = packed_net
                if dtype != torch.float32:  # (the nets are not used after lowering)
                    controlnet.to(dtype)
                controlnet.save_pretrained(out / folder, safe_serialization=True)
                scrub_source_path(out / folder / "config.json")
            (out / "unet").mkdir()
            (out / "unet" / "config.json").write_text(
                json.dumps(
                    {k: v for k, v in ctx.source_unet_config.items() if k != "_name_or_path"}, indent=2, sort_keys=True
                )
            )
            packed = pack_quantized(pipe.unet)  # QuEST: packed integer weights instead of float ones
            state = {  # INT8 / FP8 codes and their fp32 scales keep their dtypes
                k: (v.detach().to(dtype) if v.is_floating_point() and k not in fixed else v.detach()).contiguous()
                for k, v in pipe.unet.state_dict().items()
            }
            save_file(state, str(out / UNET_WEIGHTS), metadata={"format": "pt"})
            for config_file in [out / n / "config.json" for n in (*ctx.arch.text_encoders, "vae")]:
                scrub_source_path(config_file)
            components = {name: ["transformers", type(getattr(pipe, name)).__name__] for name in ctx.arch.text_encoders}
            # the VAE's own class: AutoencoderKL, or AutoencoderTiny after swap_vae
            components |= {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", type(pipe.vae).__name__]}
            write_pipeline_files(pipe, out, components)
            stage.results["unet_tensors"] = len(state)
            stage.results["packed_quantized_layers"] = packed
        settings = {"fused_kernels": config.fused_kernels, "applies_on": "cuda graphs + triton"}
        with Stage(records, "lower_kernels", settings) as stage:
            for name in ("unet", "vae"):
                stage.results[name] = lower_unet(getattr(pipe, name))  # counted here, applied at load
                unlower_unet(getattr(pipe, name))
        return records

    def load(self, root: Path, manifest: dict[str, Any], device: str, providers: list[str] | None):
        spec = get_arch(manifest["arch"])
        dtype = DTYPES[manifest["lowering"]["config"]["precision"]]
        config = manifest["lowering"]["config"]
        pipe = rebuild_pipeline(root, manifest, device, dtype)
        check_lowp_device(pipe.unet, device)
        for name in (*spec.text_encoders, "unet", "vae"):  # inference only; and a LoRA switch (peft freezes the
            getattr(pipe, name).requires_grad_(False)  # layers it wraps) must not change what dynamo guards
        graphs = device == "cuda" and config.get("cuda_graphs", False)
        if graphs and config.get("fused_kernels", True) and triton_available():
            lower_unet(pipe.unet)
            lower_unet(pipe.vae)
        encoders = [torch_text_encoder(getattr(pipe, name), spec.is_sdxl) for name in spec.text_encoders]
        modules = {name: getattr(pipe, name) for name in (*spec.text_encoders, "unet", "vae")}
        compile_mode = config.get("compile_mode", "default") if config.get("compile", False) else None
        settings = cache_settings(manifest)
        cache = None
        if settings is not None:
            cache = torch_feature_cache(pipe.unet, device, settings, compile_mode=compile_mode)
        unet = torch_unet(pipe.unet, device, cuda_graphs=graphs, compile_mode=compile_mode)
        controlnets = load_controlnets(root, manifest, device, dtype)
        modules |= {entry["folder"]: net for entry, net in zip(manifest.get("controlnets", []), controlnets)}
        return make_components(
            root,
            manifest,
            encoders,
            unet,
            torch_vae_decoder(pipe.vae, device),
            modules,
            cache,
            pipeline=pipe,
            encode_image=torch_vae_encoder(pipe.vae, device),
            controlnets=torch_controlnets(controlnets, device, compile_mode) if controlnets else None,
        )

    def check_loras(self, manifest: dict[str, Any], loras: list[tuple[str, float]]) -> None:
        check_runtime_loras(manifest, loras)

    def switch_loras(
        self,
        components,
        root: Path,
        manifest: dict[str, Any],
        loras: list[tuple[str, float]],
        touched: dict[str, list[str]],
    ) -> dict[str, list[str]]:
        """Restore the parameters the previous LoRAs changed from the artifact's files, then fuse `loras`, all in
        place: CUDA graphs and torch.compile'd code keep running (no recapture, no recompile)."""
        from sdcompiler.passes.merge_lora import fuse_loras

        pipe = components.pipeline
        restore_weights(pipe, root, touched)
        if not loras:
            return {}
        try:
            _, changed = fuse_loras(pipe, loras, manifest["arch"])
        except Exception:
            # a LoRA that did not fit may have left earlier ones fused: back to the artifact's weights
            restore_weights(
                pipe,
                root,
                {
                    name: [n for n, _ in getattr(pipe, name).named_parameters()]
                    for name in ("unet", *get_arch(manifest["arch"]).text_encoders)
                },
            )
            raise
        return changed


def low_precision_stage(records: list[StageRecord], pipe, quantized: QuantizedUNet, ctx: LowerContext) -> set[str]:
    """The ptq pass's calibrated modelopt U-Net -> INT8 / FP8 layers (`ptq_lowp`), in place; returns the state
    names that keep their dtype. Records the layers, the kernel each runs on CPU and CUDA, and the share of the
    U-Net's MACs that runs in low precision."""
    if quantized.backend != "modelopt":
        raise LoweringError(
            f"the torch target runs modelopt's calibrated U-Net as INT8 / FP8 layers, not a {quantized.backend} "
            "graph; use ptq backend modelopt (the default for target torch)"
        )
    from sdcompiler.passes import count_macs
    from sdcompiler.passes.ptq_lowp import fixed_dtype_tensors, layer_kernels, layer_macs, lowp_modules

    settings = {"precision": quantized.precision, "from": "modelopt fake quantizers"}
    with Stage(records, "quantize_layers", settings) as stage:
        resolution = ctx.macs_resolution
        low, total = layer_macs(
            pipe.unet, quantized.layers, lambda unet: count_macs(unet, resolution, pipe.vae_scale_factor)
        )
        smoothed = quantized.settings["smoothquant"]
        stage.results["layers"] = lowp_modules(pipe.unet, quantized.layers, quantized.precision, smoothed)
        stage.results["kernels"] = {device: layer_kernels(pipe.unet, device) for device in ("cpu", "cuda")}
        stage.results["low_precision_macs_share"] = round(low / total, 4)
        stage.results["macs_resolution"] = list(resolution)
        for folder, layers in quantized.controlnet_layers.items():  # ptq's quantize_controlnets
            net = ctx.controlnets[folder]
            stage.results.setdefault("controlnets", {})[folder] = lowp_modules(
                net, layers, quantized.precision, smoothed
            )
    return fixed_dtype_tensors(pipe.unet)


def load_controlnets(root: Path, manifest: dict[str, Any], device: str, dtype) -> list:
    """The artifact's ControlNets (manifest `controlnets`, in call order) as diffusers `ControlNetModel`s; nets a
    pass deployed its own modules in (`quantize_controlnets`: ptq's INT8 / FP8 layers, quest_w4a4's packed
    layers) are built weightless, the pass's `rebuild_controlnet` applied, then filled from the stored state."""
    from diffusers import ControlNetModel

    from sdcompiler.recipe import resolve_recipe

    steps = resolve_recipe(manifest["recipe"]) if manifest.get("controlnets") else []
    nets = []
    for entry in manifest.get("controlnets", []):
        folder = confined(root, entry["folder"], "a ControlNet folder")
        net = _rebuilt_controlnet(folder, steps)
        if net is None:
            net = ControlNetModel.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True)
        elif net.dtype != dtype:
            net.to(dtype=dtype)  # the low-precision layers keep their codes' and scales' dtypes
        check_lowp_device(net, device)
        nets.append(net.to(device).eval().requires_grad_(False))
    return nets


def _rebuilt_controlnet(folder: Path, steps):
    """The ControlNet in `folder` rebuilt by the recipe's passes and filled from its safetensors, or None when no
    pass changed its modules (then `from_pretrained` loads it as stored)."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    with init_empty_weights():
        net = ControlNetModel.from_config(ControlNetModel.load_config(folder))
    if not [step for step in steps if step.pass_.rebuild_controlnet(net, step.config)]:
        return None
    weights = folder / "diffusion_pytorch_model.safetensors"
    try:
        net.load_state_dict(load_file(str(weights)), strict=True, assign=True)
    except (RuntimeError, OSError) as exc:
        first = str(exc).splitlines()[0]
        raise ArtifactError(
            f"ControlNet weights in {folder} do not match its rebuilt layers ({first}); recompile"
        ) from None
    return net


def restore_weights(pipe, root: Path, names: dict[str, list[str]]) -> None:
    """Copy the named parameters of `pipe`'s components back from the artifact's safetensors files, in place."""
    from safetensors import safe_open

    for component, params in names.items():
        if not params:
            continue
        module = getattr(pipe, component)
        if component == "unet":
            files = {name: root / UNET_WEIGHTS for name in params}
        else:
            index = root / component / "model.safetensors.index.json"
            weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
            files = {name: confined(root / component, weight_map.get(name, "model.safetensors")) for name in params}
        current = dict(module.named_parameters())
        with torch.no_grad():
            for file in sorted(set(files.values())):
                with safe_open(str(file), framework="pt") as stored:
                    for name in (n for n, f in files.items() if f == file):
                        current[name].copy_(stored.get_tensor(name))


def scrub_source_path(config_file: Path) -> None:
    """Drop `_name_or_path` (the source checkpoint's path): an artifact refers to nothing outside itself."""
    config = json.loads(config_file.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def rebuild_pipeline(root: Path, manifest: dict[str, Any], device: str = "cpu", dtype=torch.float32):
    """The transformed diffusers pipeline of a torch artifact: original structure + rebuild + stored weights."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from sdcompiler.archs import assemble_pipeline
    from sdcompiler.passes import rebuild
    from sdcompiler.recipe import resolve_recipe
    from sdcompiler.targets.base import load_tokenizers, scheduler_factory

    spec = get_arch(manifest["arch"])
    index = json.loads((root / "model_index.json").read_text())
    components: dict[str, Any] = {}
    for name, tokenizer_name, tokenizer in zip(spec.text_encoders, spec.tokenizers, load_tokenizers(root, spec)):
        encoder_cls = getattr(transformers, index[name][1])
        components[name] = encoder_cls.from_pretrained(root / name, dtype=dtype).eval()
        components[tokenizer_name] = tokenizer
    components["vae"] = getattr(diffusers, index["vae"][1]).from_pretrained(root / "vae").eval()
    components["scheduler"] = scheduler_factory(root)()
    with init_empty_weights():
        components["unet"] = diffusers.UNet2DConditionModel.from_config(
            diffusers.UNet2DConditionModel.load_config(root / "unet")
        )
    pipe = assemble_pipeline(spec, components, index)
    rebuild(pipe, resolve_recipe(manifest["recipe"]))
    state = load_file(str(root / UNET_WEIGHTS))
    try:
        pipe.unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ArtifactError(
            f"U-Net weights in {root} do not match the rebuilt structure ({first}); recompile"
        ) from None
    leftover = [n for n, p in pipe.unet.named_parameters() if p.is_meta]
    if leftover:
        raise ArtifactError(f"U-Net parameters {leftover[:3]} have no stored weights in {root}; recompile")
    if pipe.unet.dtype != dtype:
        pipe.unet.to(dtype=dtype)
    pipe.unet.to(device=device).eval()
    for name in spec.text_encoders:
        getattr(pipe, name).to(device)
    pipe.vae.to(device)
    return pipe
