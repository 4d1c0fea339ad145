"""Component callables for the sampling loop: torch modules and ONNX Runtime sessions.

Each adapter hides its backend behind `sampling`'s narrow interface; ONNX
Runtime adapters cast inputs to the dtypes the session declares (fp16 and
bf16 artifacts) and return float32 torch tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdcompiler.archs import get_arch
from sdcompiler.passes.feature_cache import CacheSettings, SplitUNet, full_steps, shallow_controlnet_residuals
from sdcompiler.passes.onnx_export import MID_RESIDUAL, down_residual_names, vae_encoding
from sdcompiler.sampling import Components, ControlNets, TextEncoding

FINAL_NORM = "final_layer_norm.safetensors"  # next to SD text encoder graphs (clip_skip), onnx layout
LORA_MAP = "lora_map.json"  # next to U-Net and text encoder graphs: the initializer of each LoRA-addressable weight


def lora_component(graph: str, text_encoders) -> str | None:
    """The diffusers component whose LoRA-addressable weights the graph named `graph` holds ("unet" for every
    U-Net graph: unet, unet_refresh, unet_shallow; a text encoder's own name), or None (VAE graphs)."""
    if graph.startswith("unet"):
        return "unet"
    return graph if graph in text_encoders else None


def lora_map_path(graph: Path) -> Path:
    """The LoRA weight map of the graph at `graph`: `lora_map.json` next to a `model.onnx`, `<stem>.lora_map.json`
    next to another graph of the folder (deepcache's `unet/refresh.onnx`)."""
    return graph.with_name(LORA_MAP if graph.name == "model.onnx" else f"{graph.stem}.{LORA_MAP}")


def make_components(
    root: Path,
    manifest: dict[str, Any],
    text_encoders,
    unet,
    decode,
    modules: dict | None = None,
    feature_cache=None,
    pipeline=None,
    encode_image=None,
    backends: dict | None = None,
    controlnets: ControlNets | None = None,
) -> Components:
    from sdcompiler.targets.base import load_tokenizers, scheduler_factory

    spec = get_arch(manifest["arch"])
    model = manifest["model"]
    return Components(
        tokenizers=load_tokenizers(root, spec),
        text_encoders=text_encoders,
        unet=unet,
        decode=decode,
        scheduler_factory=scheduler_factory(root),
        is_sdxl=spec.is_sdxl,
        aesthetic_time_ids=spec.aesthetic_time_ids,
        latent_channels=model["latent_channels"],
        unet_in_channels=model.get("unet_in_channels", model["latent_channels"]),
        vae_scale_factor=model["vae_scale_factor"],
        scaling_factor=model["scaling_factor"],
        default_size=model["default_size"],
        force_zeros_for_empty_prompt=model.get("force_zeros_for_empty_prompt", True),
        guidance_embedding_dim=model.get("guidance_embedding_dim"),
        modules=dict(modules or {}),
        feature_cache=feature_cache,
        pipeline=pipeline,
        encode_image=encode_image,
        embedding_width=_cross_attention_dim(root),
        backends=dict(backends or {}),
        controlnets=controlnets,
    )


def _cross_attention_dim(root: Path) -> int | None:
    """The U-Net's cross-attention width from the artifact's `unet/config.json` (None where it is absent)."""
    try:
        width = json.loads((root / "unet" / "config.json").read_text()).get("cross_attention_dim")
    except (OSError, ValueError):
        return None
    return width if isinstance(width, int) else None


def pipeline_components(pipe, spec, device: str = "cpu") -> Components:
    """Components over an in-memory diffusers pipeline (a checkpoint as loaded): the reference the compiled
    artifacts are measured against. Moves the pipeline's modules to `device`."""
    text_encoders = []
    for name in spec.text_encoders:
        getattr(pipe, name).to(device)
        text_encoders.append(torch_text_encoder(getattr(pipe, name), spec.is_sdxl))
    tokenizers = [getattr(pipe, name) for name in spec.tokenizers]
    vae = pipe.vae.to(device)
    pipe.unet.to(device)
    scheduler_cls, scheduler_config = type(pipe.scheduler), dict(pipe.scheduler.config)
    return Components(
        encode_image=torch_vae_encoder(vae, device),
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        unet=torch_unet(pipe.unet, device),
        decode=torch_vae_decoder(vae, device),
        scheduler_factory=lambda: scheduler_cls.from_config(scheduler_config),
        is_sdxl=spec.is_sdxl,
        aesthetic_time_ids=spec.aesthetic_time_ids,
        latent_channels=vae.config.latent_channels,
        unet_in_channels=pipe.unet.config.in_channels,
        vae_scale_factor=pipe.vae_scale_factor,
        scaling_factor=vae.config.scaling_factor,
        default_size=pipe.unet.config.sample_size * pipe.vae_scale_factor,
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        guidance_embedding_dim=getattr(pipe.unet.config, "time_cond_proj_dim", None),
        modules={name: getattr(pipe, name) for name in (*spec.text_encoders, "unet", "vae")},
        embedding_width=pipe.unet.config.cross_attention_dim,
    )


def torch_vae_decoder(vae: torch.nn.Module, device: str):
    """The sampling loop's decoder: latents (already divided by the scaling factor) -> images in [-1, 1]."""

    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return vae.decode(latents.to(device, vae.dtype), return_dict=False)[0].float().cpu()

    return decode


def torch_vae_encoder(vae: torch.nn.Module, device: str):
    """Image-to-image's encoder: images in [-1, 1] -> the VAE posterior's parameters (mean, log-variance), or
    the latents themselves for a VAE without a posterior (AutoencoderTiny)."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return vae_encoding(vae.encode(images.to(device, vae.dtype))).float().cpu()

    return encode


def cache_settings(manifest: dict[str, Any]):
    """The artifact's feature-cache settings, or None when it has none."""
    recorded = manifest.get("defaults", {}).get("feature_cache")
    return CacheSettings.from_dict(recorded) if recorded else None


# --- feature cache (the feature_cache pass's runtime half) ----------------------------------------


@dataclass
class FeatureCache:
    """The sampling loop's view: two U-Net callables and the step plan. Both take ControlNet residuals as the
    U-Net does (`down_residuals=`, `mid_residual=`); the shallow call uses the shallow skips' down residuals
    only (the rest live in the cached deep features)."""

    settings: CacheSettings
    full: Callable  # (sample, t, embeds, text_embeds, time_ids[, down_residuals, mid_residual]) -> (eps, deep)
    shallow: Callable  # (sample, t, embeds, text_embeds, time_ids, deep[, down_residuals, mid_residual]) -> eps
    skips: int | None = None  # the down residuals the shallow call takes (`SplitUNet.shallow_skips`)

    def plan(self, num_steps: int) -> list[bool]:
        return full_steps(num_steps, self.settings)


def torch_feature_cache(unet, device: str, settings: CacheSettings, compile_mode: str | None = None) -> FeatureCache:
    """FeatureCache over a torch U-Net (inputs and outputs as the sampling loop passes them); `compile_mode`:
    torch.compile the full and shallow calls (with ControlNet residuals too: dynamo guards on their shapes)."""
    split = SplitUNet(unet, settings.branch)
    dtype = unet.dtype
    run_full, run_shallow = split.full, split.shallow
    if compile_mode is not None:
        from sdcompiler.cuda_graphs import compiled

        run_full, run_shallow = compiled(run_full, compile_mode), compiled(run_shallow, compile_mode)

    def prepare(sample, text_embeds, time_ids, embeds):
        cast = lambda x: None if x is None else x.to(device, dtype)
        return cast(sample), cast(embeds), cast(text_embeds), cast(time_ids)

    def cast_residuals(down_residuals, mid_residual):
        if down_residuals is None:
            return None, None
        mid = None if mid_residual is None else mid_residual.to(device, dtype)  # a shallow step's: none
        return [d.to(device, dtype) for d in down_residuals], mid

    def full(sample, timestep, embeds, text_embeds=None, time_ids=None, down_residuals=None, mid_residual=None):
        sample, embeds, text_embeds, time_ids = prepare(sample, text_embeds, time_ids, embeds)
        down, mid = cast_residuals(down_residuals, mid_residual)
        with torch.inference_mode():
            eps, deep = run_full(sample, timestep, embeds, text_embeds, time_ids, down, mid)
        return eps.float().cpu(), deep

    def shallow(
        sample, timestep, embeds, text_embeds=None, time_ids=None, deep=None, down_residuals=None, mid_residual=None
    ):
        sample, embeds, text_embeds, time_ids = prepare(sample, text_embeds, time_ids, embeds)
        down, _ = cast_residuals(down_residuals, mid_residual)
        with torch.inference_mode():
            eps = run_shallow(sample, timestep, embeds, text_embeds, time_ids, deep, down)
        return eps.float().cpu()

    return FeatureCache(settings, full, shallow, skips=split.shallow_skips())


# --- torch -----------------------------------------------------------------------------------


def skipped_index(clip_skip: int, layers: int, sdxl: bool) -> int:
    """The index into a CLIP encoder's `hidden_states` (embeddings + one per layer) that `clip_skip` selects,
    as diffusers indexes it; ValueError when the encoder has too few layers."""
    index = -(clip_skip + (2 if sdxl else 1))
    if -index > layers + 1:  # hidden_states: the embeddings, then one per layer
        most = layers - 1 if sdxl else layers
        raise ValueError(f"clip_skip={clip_skip} is more than this {layers}-layer text encoder allows (at most {most})")
    return index


def torch_text_encoder(model: torch.nn.Module, sdxl: bool):
    device = model.device
    layers = model.config.num_hidden_layers

    def encode(input_ids: torch.Tensor, clip_skip: int | None = None) -> TextEncoding:
        index = None if clip_skip is None else skipped_index(clip_skip, layers, sdxl)
        with torch.inference_mode():
            out = model(input_ids.to(device), output_hidden_states=sdxl or index is not None)
            last = out.last_hidden_state
            if index is not None and not sdxl:
                last = model.text_model.final_layer_norm(out.hidden_states[index])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return TextEncoding(
            last_hidden_state=last.float().cpu(),
            pooled=pooled.float().cpu(),
            penultimate_hidden_state=out.hidden_states[-2 if index is None else index].float().cpu() if sdxl else None,
        )

    return encode


def torch_unet(unet: torch.nn.Module, device: str, cuda_graphs: bool = False, compile_mode: str | None = None):
    """The sampling loop's U-Net callable over a torch module: optionally replayed from CUDA graphs, or
    `torch.compile`d with `compile_mode` (the two exclude each other)."""
    dtype = unet.dtype

    def call(
        sample,
        timestep,
        encoder_hidden_states,
        text_embeds=None,
        time_ids=None,
        timestep_cond=None,
        mid=None,
        *down,
    ):
        # ControlNet residuals as flat tensor arguments (the mid block's, then the down blocks'), so that a CUDA
        # graph has a static buffer for each and torch.compile guards on their shapes; none: no ControlNet
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return unet(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs=added,
            timestep_cond=timestep_cond,
            down_block_additional_residuals=list(down) if down else None,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]

    forward = call
    if cuda_graphs:
        from sdcompiler.cuda_graphs import GraphedCallable

        forward = GraphedCallable(call)
    elif compile_mode is not None:
        from sdcompiler.cuda_graphs import compiled

        forward = compiled(call, compile_mode)

    def run(
        sample,
        timestep,
        encoder_hidden_states,
        text_embeds=None,
        time_ids=None,
        timestep_cond=None,
        down_residuals=None,
        mid_residual=None,
    ):
        cast = lambda x: None if x is None else x.to(device, dtype)
        residuals = () if down_residuals is None else (cast(mid_residual), *(cast(d) for d in down_residuals))
        # the timestep as a device tensor: a CUDA graph replays whatever the buffer holds
        t = torch.as_tensor(timestep, dtype=torch.float32).to(device) if cuda_graphs else timestep
        with torch.inference_mode():
            out = forward(
                cast(sample),
                t,
                cast(encoder_hidden_states),
                cast(text_embeds),
                cast(time_ids),
                cast(timestep_cond),
                *residuals,
            )
        return out.float().cpu()

    return run


def torch_controlnets(nets: list[torch.nn.Module], device: str, compile_mode: str | None = None) -> ControlNets:
    """The sampling loop's ControlNets over diffusers `ControlNetModel`s: each net's residuals scaled by its
    scale, summed over the nets in order as diffusers' `MultiControlNetModel` sums them; kept on `device` for
    the U-Net call. `compile_mode`: each net's whole forward under torch.compile (a deepcache step's stopped nets
    run eagerly)."""
    dtype = nets[0].dtype
    forwards = list(nets)
    if compile_mode is not None:
        from sdcompiler.cuda_graphs import compiled

        forwards = [compiled(net, compile_mode) for net in nets]

    def residuals(sample, timestep, encoder_hidden_states, images, scales, guess_mode, text_embeds, time_ids):
        cast = lambda x: None if x is None else x.to(device, dtype)  # noqa: E731
        added = None if text_embeds is None else {"text_embeds": cast(text_embeds), "time_ids": cast(time_ids)}
        down = mid = None
        with torch.inference_mode():
            for net, image, scale in zip(forwards, images, scales):
                down_i, mid_i = net(
                    cast(sample),
                    timestep,
                    encoder_hidden_states=cast(encoder_hidden_states),
                    controlnet_cond=cast(image),
                    conditioning_scale=scale,
                    guess_mode=guess_mode,
                    added_cond_kwargs=added,
                    return_dict=False,
                )
                if down is None:
                    down, mid = list(down_i), mid_i
                else:
                    down = [previous + current for previous, current in zip(down, down_i)]
                    mid = mid + mid_i
        return down, mid

    def shallow_residuals(skips, sample, timestep, encoder_hidden_states, images, scales, guess_mode, *added):
        """The first `skips` down residuals, each net stopped after the down block that makes them."""
        cast = lambda x: None if x is None else x.to(device, dtype)  # noqa: E731
        text_embeds, time_ids = added
        extra = None if text_embeds is None else {"text_embeds": cast(text_embeds), "time_ids": cast(time_ids)}
        total = None
        with torch.inference_mode():
            for net, image, scale in zip(nets, images, scales):
                down = shallow_controlnet_residuals(
                    net,
                    skips,
                    cast(sample),
                    timestep,
                    cast(encoder_hidden_states),
                    cast(image),
                    scale,
                    guess_mode,
                    extra,
                )
                total = down if total is None else [a + b for a, b in zip(total, down)]
        return total

    global_pool = bool(getattr(nets[0].config, "global_pool_conditions", False))
    return ControlNets(
        residuals=residuals, count=len(nets), global_pool_conditions=global_pool, shallow_residuals=shallow_residuals
    )


# --- ONNX Runtime ----------------------------------------------------------------------------

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OrtModel:
    """One ONNX Runtime session called with torch tensors by input name."""

    def __init__(self, path: Path, providers: list[str], threads: int | None = None):
        # torch's count by default (SDCOMPILER_NUM_THREADS where set): one setting for both runtimes
        self.path, self.providers, self.threads = path, providers, threads or torch.get_num_threads()
        self.overridden: list[str] = []
        self._build({})

    def _build(self, overrides: dict[str, np.ndarray]) -> None:
        from sdcompiler.errors import require

        ort = require("onnxruntime", "cpu", "the onnx target")  # or [gpu]: onnxruntime-gpu
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        if overrides:
            # ORT 1.32's CPU layout transform (NCHWc, level ALL) reads conv weights from the file, ignoring
            # overrides: sessions with overridden weights stop one level below it
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for name, a in overrides.items()}
        for name, value in values.items():
            options.add_initializer(name, value)
        self.session = self._values = None  # the old session's memory goes before the new one is built
        session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        self.session, self._values, self.overridden = session, values, sorted(values)  # values outlive the session
        self.inputs = {i.name: i.type for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def override(self, overrides: dict[str, np.ndarray]) -> None:
        """A new session whose initializers named in `overrides` hold those arrays instead of the file's (`{}`:
        the file's own weights again); the files are not touched."""
        self._build(overrides)

    def __call__(self, outputs: list[str] | None = None, **inputs) -> dict[str, torch.Tensor]:
        feed = {}
        for name, value in inputs.items():
            if name not in self.inputs:
                continue
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            # np.require keeps 0-d arrays 0-d (ascontiguousarray would make the scalar timestep 1-d)
            feed[name] = np.require(array.astype(_ORT_TYPES[self.inputs[name]], copy=False), requirements="C")
        names = outputs or self.outputs
        results = self.session.run(names, feed)
        return {n: torch.from_numpy(np.asarray(r, dtype=np.float32)) for n, r in zip(names, results)}


def ort_text_encoder(model: OrtModel, sdxl: bool, final_norm: Path | None = None):
    """The sampling loop's text encoder over an ONNX Runtime session; `final_norm`: the encoder's final layer
    norm (`final_layer_norm.safetensors`, written next to SD graphs), which SD's `clip_skip` applies to an
    earlier hidden state."""
    pooled_name = "text_embeds" if "text_embeds" in model.outputs else "pooler_output"
    hidden = sorted((o for o in model.outputs if o.startswith("hidden_states.")), key=lambda o: int(o.split(".")[1]))
    wanted = ["last_hidden_state", pooled_name] + ([hidden[-2]] if sdxl else [])
    norm = {}

    def encode(input_ids: torch.Tensor, clip_skip: int | None = None) -> TextEncoding:
        if clip_skip is None:
            out = model(wanted, input_ids=input_ids)
            return TextEncoding(out["last_hidden_state"], out[pooled_name], out[hidden[-2]] if sdxl else None)
        if not hidden or (not sdxl and (final_norm is None or not final_norm.is_file())):
            raise ValueError(
                "this artifact's text encoder graph has no hidden-state outputs for clip_skip (compiled by an "
                "older sd-compiler); recompile it"
            )
        chosen = hidden[skipped_index(clip_skip, len(hidden) - 1, sdxl)]
        out = model(["last_hidden_state", pooled_name, chosen], input_ids=input_ids)
        if sdxl:
            return TextEncoding(out["last_hidden_state"], out[pooled_name], out[chosen])
        if not norm:
            from safetensors.torch import load_file

            norm.update({k: v.float() for k, v in load_file(final_norm).items()})
        state = out[chosen]
        last = torch.nn.functional.layer_norm(state, state.shape[-1:], norm["weight"], norm["bias"], float(norm["eps"]))
        return TextEncoding(last, out[pooled_name], None)

    return encode


def ort_unet(model: OrtModel):
    """The sampling loop's U-Net over an ONNX Runtime session; ControlNet residuals go to the graph's residual
    inputs by name (`down_block_<i>_additional_residual`, `mid_block_additional_residual`)."""

    def run(
        sample,
        timestep,
        encoder_hidden_states,
        text_embeds=None,
        time_ids=None,
        timestep_cond=None,
        down_residuals=None,
        mid_residual=None,
    ):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(())
        residuals = {}
        if down_residuals is not None:
            residuals = dict(zip(down_residual_names(len(down_residuals)), down_residuals))
            residuals[MID_RESIDUAL] = mid_residual
        return model(
            ["out_sample"],
            sample=sample,
            timestep=t,
            encoder_hidden_states=encoder_hidden_states,
            text_embeds=text_embeds,
            time_ids=time_ids,
            timestep_cond=timestep_cond,
            **residuals,
        )["out_sample"]

    return run


def ort_controlnets(nets: list[OrtModel], configs: list[dict], shallow: list[OrtModel] | None = None) -> ControlNets:
    """The sampling loop's ControlNets over ControlNet graphs (`sdcompiler.passes.onnx_export`) and their diffusers
    configs: each graph returns its residuals times its `conditioning_scale`; in guess mode (for a net without
    `global_pool_conditions`) the graph runs at scale 1 and its residuals get diffusers' per-block scales,
    `logspace(-1, 0, n) * scale`; the residuals are summed over the nets in order, as `MultiControlNetModel`.
    `shallow` (a feature cache's artifact): each net's graph cut down to the first down residuals, which the
    loop's shallow steps take (`ControlNets.shallow_residuals`)."""
    outputs = nets[0].outputs  # down_block_<i>_additional_residual..., mid_block_additional_residual

    def run(graphs, sample, timestep, encoder_hidden_states, images, scales, guess_mode, text_embeds, time_ids):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(())
        total = None
        for net, config, image, scale in zip(graphs, configs, images, scales):
            per_block = guess_mode and not config.get("global_pool_conditions", False)
            out = net(
                net.outputs,
                sample=sample,
                timestep=t,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=torch.tensor(1.0 if per_block else float(scale)),
                text_embeds=text_embeds,
                time_ids=time_ids,
            )
            result = [out[name] for name in net.outputs]
            if per_block:  # as diffusers' ControlNetModel in guess mode (scales over all of the net's residuals)
                block_scales = torch.logspace(-1, 0, len(outputs)) * scale
                result = [r * s for r, s in zip(result, block_scales)]
            total = result if total is None else [a + b for a, b in zip(total, result)]
        return total

    def residuals(*inputs):
        total = run(nets, *inputs)
        return total[:-1], total[-1]

    def shallow_residuals(skips, *inputs):
        if len(shallow[0].outputs) != skips:
            raise ValueError(f"the ControlNets' shallow graphs return {len(shallow[0].outputs)} residuals, not {skips}")
        return run(shallow, *inputs)

    pooled = bool(configs[0].get("global_pool_conditions", False))
    return ControlNets(
        residuals=residuals,
        count=len(nets),
        global_pool_conditions=pooled,
        shallow_residuals=shallow_residuals if shallow else None,
    )


def ort_feature_cache(refresh: OrtModel, shallow: OrtModel, settings):
    """FeatureCache over the refresh graph (the U-Net with a second output, the deep features) and the
    shallow-branch graph; ControlNet residuals go to the graphs' residual inputs by name (the shallow graph
    declares the shallow skips' down residuals only; `OrtModel` feeds the inputs a graph declares)."""

    def feed(sample, timestep, encoder_hidden_states, text_embeds, time_ids, down_residuals, mid_residual):
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(())
        residuals = {}
        if down_residuals is not None:
            residuals = dict(zip(down_residual_names(len(down_residuals)), down_residuals))
            residuals[MID_RESIDUAL] = mid_residual
        return dict(
            sample=sample,
            timestep=t,
            encoder_hidden_states=encoder_hidden_states,
            text_embeds=text_embeds,
            time_ids=time_ids,
            **residuals,
        )

    def full(
        sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None, down_residuals=None, mid_residual=None
    ):
        inputs = feed(sample, timestep, encoder_hidden_states, text_embeds, time_ids, down_residuals, mid_residual)
        out = refresh(["out_sample", "deep_features"], **inputs)
        return out["out_sample"], out["deep_features"]

    def run_shallow(
        sample,
        timestep,
        encoder_hidden_states,
        text_embeds=None,
        time_ids=None,
        deep=None,
        down_residuals=None,
        mid_residual=None,
    ):
        inputs = feed(sample, timestep, encoder_hidden_states, text_embeds, time_ids, down_residuals, mid_residual)
        return shallow(["out_sample"], deep_features=deep, **inputs)["out_sample"]

    skips = sum(name.startswith("down_block_") for name in shallow.inputs)  # the ControlNet residuals it takes
    return FeatureCache(settings, full, run_shallow, skips=skips or None)


def ort_vae_decoder(model: OrtModel):
    return lambda latents: model(["sample"], latent_sample=latents)["sample"]


def ort_vae_encoder(model: OrtModel):
    """`latent_parameters` (AutoencoderKL's posterior) or `latent_sample` (a tiny VAE's latents)."""
    name = model.outputs[0]
    return lambda images: model([name], sample=images)[name]
