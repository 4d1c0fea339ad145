"""The ONNX component interface: what each pipeline component looks like as an ONNX graph, and its export.

Passes and targets share it: the onnx and tensorrt targets export every component through it, and the ptq
pass exports the float U-Net exactly as the onnx target would before quantizing it. Names, dtypes and
dynamic axes follow optimum's exporter, so `ORTDiffusionPipeline` loads the graphs too: U-Net `sample,
timestep (float scalar), encoder_hidden_states [, text_embeds, time_ids] [, timestep_cond] -> out_sample`;
text encoders `input_ids -> last_hidden_state, pooler_output | text_embeds, hidden_states.0..N`; VAE
decoder `latent_sample -> sample`; VAE encoder `sample -> latent_parameters` (a tiny VAE: `latent_sample`).

With a feature cache (`feature_cache` pass) the U-Net has three graphs. `unet_refresh`, the graph of a
cache-refresh step, is the whole U-Net returning `out_sample, deep_features`: it is the one U-Net export,
written as `unet/refresh.onnx` with its weights always in `unet/model.onnx.data`. `unet/model.onnx` is not
traced again: it is that graph with `out_sample` as its only output (`write_graph_view`), reading the same
weights file, so the artifact holds the U-Net's weights once and `unet/model.onnx` is the plain U-Net that
optimum runs (ONNX Runtime reads external data only from the graph's own folder, hence the shared folder).
`unet_shallow/model.onnx` runs the shallow branch from the deep features (an extra input). With ControlNets,
each net's `<folder>/shallow.onnx` is its graph cut down to the residuals the shallow graph takes (a view,
`write_graph_view`: the deeper blocks and the mid block are not in it).

With ControlNets (`compile_pipeline(controlnet=...)`) each net is its own graph, `<folder>/model.onnx`
(`controlnet/`, or `controlnet_<i>/` for several): `sample, timestep, encoder_hidden_states, controlnet_cond,
conditioning_scale (float scalar) [, text_embeds, time_ids] -> down_block_<i>_additional_residual (one per
down-block output), mid_block_additional_residual`, the residuals already times `conditioning_scale`. The
U-Net graph then takes those residuals as extra inputs of the same names after its own, so a net's outputs
feed the U-Net by name. Optimum exports no ControlNet; these names are ONNX Runtime's (Olive's ControlNet
U-Net: one input per down residual, as ONNX inputs cannot be tuples). Guess mode's per-block scales are the
runtime's (it passes `conditioning_scale=1` and scales the outputs), so one graph serves both modes.

The exporter is TorchScript's (`dynamo=False`): faster and leaner than the dynamo exporter for these
models. The U-Net is traced at a latent size that is not a multiple of its overall down-sampling factor, so
diffusers takes its explicit-upsample-size path and the graph computes every skip shape from its input: any
latent size then runs, not only multiples of 8. Models over ~1.8 GB are saved with one `model.onnx.data`
file next to `model.onnx`.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

import torch

from sdcompiler.passes.accounting import VaeDecode, unet_example_inputs
from sdcompiler.passes.architectures import ArchSpec
from sdcompiler.passes.errors import LoweringError
from sdcompiler.passes.feature_cache import CacheSettings, SplitUNet, shallow_controlnet_residuals

OPSET = 18  # the default opset of the onnx and tensorrt targets (and of the ptq pass's export)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB: leave room for the graph itself
TRACE_LATENT = 10  # not a multiple of 4 or 8: forces diffusers' shape-generic upsampling path


def vae_encoding(output) -> torch.Tensor:
    """What `sampling` takes from a VAE encoder: posterior parameters (AutoencoderKL) or latents (tiny VAEs)."""
    return output.latent_dist.parameters if hasattr(output, "latent_dist") else output.latents


MID_RESIDUAL = "mid_block_additional_residual"  # a ControlNet graph's output and the U-Net graph's input


def down_residual_names(count: int) -> list[str]:
    """The names of a ControlNet's `count` down-block residuals: its graph's outputs, the U-Net graph's inputs."""
    return [f"down_block_{i}_additional_residual" for i in range(count)]


class UNetForExport(torch.nn.Module):
    """The U-Net with positional inputs: sample, timestep, encoder_hidden_states, then `extra` by name
    (SDXL: text_embeds, time_ids; a guidance embedding: timestep_cond), then, with `residuals` > 0, that many
    ControlNet down-block residuals and the mid-block residual."""

    def __init__(self, unet, extra: list[str], residuals: int = 0):
        super().__init__()
        self.unet, self.extra, self.residuals = unet, list(extra), residuals

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        named = dict(zip(self.extra, rest))
        control = rest[len(self.extra) :]
        added = {"text_embeds": named["text_embeds"], "time_ids": named["time_ids"]} if "time_ids" in named else None
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs=added,
            timestep_cond=named.get("timestep_cond"),
            down_block_additional_residuals=tuple(control[: self.residuals]) if self.residuals else None,
            mid_block_additional_residual=control[self.residuals] if self.residuals else None,
            return_dict=False,
        )[0]


class ControlNetForExport(torch.nn.Module):
    """A diffusers `ControlNetModel` with positional inputs: sample, timestep, encoder_hidden_states,
    controlnet_cond, conditioning_scale [, text_embeds, time_ids]; returns the down-block residuals then the
    mid-block residual as one flat tuple (not guess mode: the runtime applies its per-block scales)."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *added):
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond,
            conditioning_scale=conditioning_scale,
            added_cond_kwargs={"text_embeds": added[0], "time_ids": added[1]} if added else None,
            return_dict=False,
        )
        return (*down, mid)


class ShallowControlNetForExport(torch.nn.Module):
    """`ControlNetForExport` returning only its first `skips` down residuals (a feature cache's shallow step):
    the module the onnx target verifies the ControlNet's shallow graph (a view of its graph) against."""

    def __init__(self, controlnet, skips: int):
        super().__init__()
        self.controlnet, self.skips = controlnet, skips

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, *added):
        return tuple(
            shallow_controlnet_residuals(
                self.controlnet,
                self.skips,
                sample,
                timestep,
                encoder_hidden_states,
                controlnet_cond,
                conditioning_scale,
                added_cond_kwargs={"text_embeds": added[0], "time_ids": added[1]} if added else None,
            )
        )


class CachedUNetForExport(torch.nn.Module):
    """Feature cache: the full U-Net returning (out_sample, deep_features), or the shallow branch. Inputs:
    sample, timestep, encoder_hidden_states, `extra` by name (SDXL: text_embeds, time_ids), then, with
    `residuals` > 0, that many ControlNet down residuals (full: every skip's, then the mid residual; shallow:
    the shallow skips' only), then (shallow) the deep features."""

    def __init__(self, unet, branch: int, shallow: bool, extra: list[str] | None = None, residuals: int = 0):
        super().__init__()

        self.split, self.shallow = SplitUNet(unet, branch), shallow
        self.extra, self.residuals = list(extra or []), residuals

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        named = dict(zip(self.extra, rest))
        added = (named.get("text_embeds"), named.get("time_ids"))
        control = rest[len(self.extra) :]
        down = tuple(control[: self.residuals]) if self.residuals else None
        if self.shallow:
            return self.split.shallow(
                sample, timestep, encoder_hidden_states, *added, deep=control[-1], down_residuals=down
            )
        mid = control[self.residuals] if self.residuals else None
        return self.split.full(sample, timestep, encoder_hidden_states, *added, down_residuals=down, mid_residual=mid)


class TextEncoderForExport(torch.nn.Module):
    def __init__(self, model, hidden_states: bool):
        super().__init__()
        self.model, self.hidden_states = model, hidden_states

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=self.hidden_states, return_dict=True)
        first = (
            [out.text_embeds, out.last_hidden_state]
            if hasattr(out, "text_embeds")
            else [out.last_hidden_state, out.pooler_output]
        )
        return tuple(first) + (tuple(out.hidden_states) if self.hidden_states else ())


class VaeEncoderForExport(torch.nn.Module):
    """Images in [-1, 1] -> the posterior's parameters (mean and log-variance on the channel axis), or a tiny
    VAE's latents."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return vae_encoding(self.vae.encode(sample))


WEIGHTS_FILE = "model.onnx.data"  # the one external-data file of a component folder
UNET_REFRESH = "unet_refresh"  # the feature cache's refresh graph: a component whose graph lies in unet/
GRAPH_PATHS = {UNET_REFRESH: "unet/refresh.onnx"}  # components not at `<name>/model.onnx`


SHALLOW_CONTROLNET = "_shallow"  # `<folder>_shallow`: a ControlNet's shallow graph, `<folder>/shallow.onnx`


def shallow_controlnet_graph(folder: str) -> str:
    """The component name of the ControlNet graph in `folder` cut down to a feature cache's shallow residuals."""
    return f"{folder}{SHALLOW_CONTROLNET}"


def graph_path(name: str) -> str:
    """Where component `name`'s graph lies in an artifact, relative to its root."""
    if name.startswith("controlnet") and name.endswith(SHALLOW_CONTROLNET):
        return f"{name[: -len(SHALLOW_CONTROLNET)]}/shallow.onnx"
    return GRAPH_PATHS.get(name, f"{name}/model.onnx")


@dataclass
class OnnxExport:
    """One component to export: the module, its example inputs, and its names, axes and dtype in the graph.

    `view_of` names an earlier export whose graph this one is, cut down to `output_names` and sharing its
    weights file (`write_graph_view`): not traced itself, but verified against its own `module`.
    `external_weights` puts the weights in `model.onnx.data` whatever their size (a graph that views share).
    """

    name: str
    module: torch.nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    dtype: torch.dtype
    view_of: str | None = None
    external_weights: bool = False

    @property
    def path(self) -> str:
        """The graph's path in the artifact (`graph_path`)."""
        return graph_path(self.name)


def component_exports(
    pipe,
    spec: ArchSpec,
    precision: str = "fp32",
    vae_precision: str = "fp32",
    vae_encoder: bool = True,
    cache: CacheSettings | None = None,
    controlnets: Mapping[str, torch.nn.Module] | None = None,
) -> list[OnnxExport]:
    """The exports of `pipe`'s components in optimum's layout: text encoder(s), U-Net (with `cache`: the
    `unet_refresh` graph, the plain `unet` as its view, and `unet_shallow`; see the module docstring), VAE
    decoder, VAE encoder (`vae_encoder`); U-Net and text encoders at `precision`, the VAE at `vae_precision`
    ("fp32" | "fp16"). With `controlnets` (artifact folder -> `ControlNetModel`, in call order), one graph per
    net named by its folder, at `precision`, and the U-Net graphs with their residual inputs (`unet_shallow`:
    the shallow skips' down residuals only).
    Example inputs come from a generator seeded 0, so the same pipeline always exports the same graphs."""
    dtype, vae_dtype = DTYPES[precision], DTYPES[vae_precision]
    generator = torch.Generator().manual_seed(0)
    exports = []
    batch = {0: "batch_size"}
    for name in spec.text_encoders:
        encoder = getattr(pipe, name)
        hidden = True  # every layer's output, as optimum exports SDXL's: SDXL's embeddings and clip_skip read them
        first = (
            ["text_embeds", "last_hidden_state"]
            if "WithProjection" in type(encoder).__name__
            else ["last_hidden_state", "pooler_output"]
        )
        layers = encoder.config.num_hidden_layers
        outputs = first + ([f"hidden_states.{i}" for i in range(layers + 1)] if hidden else [])
        ids = torch.randint(0, encoder.config.vocab_size, (2, 77), generator=generator)
        seq = {0: "batch_size", 1: "sequence_length"}
        axes = {"input_ids": seq} | {o: (batch if o in ("pooler_output", "text_embeds") else seq) for o in outputs}
        exports.append(
            OnnxExport(name, TextEncoderForExport(encoder, hidden), (ids,), ["input_ids"], outputs, axes, dtype)
        )

    inputs = unet_example_inputs(
        pipe.unet, 2, (TRACE_LATENT, TRACE_LATENT), generator=generator, time_ids=spec.time_ids
    )
    args = [inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]]
    names = ["sample", "timestep", "encoder_hidden_states"]
    axes = {
        "sample": {0: "batch_size", 2: "height", 3: "width"},
        "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
        "out_sample": {0: "batch_size", 2: "height", 3: "width"},
    }
    if spec.is_sdxl:
        args += [inputs["added_cond_kwargs"]["text_embeds"], inputs["added_cond_kwargs"]["time_ids"]]
        names += ["text_embeds", "time_ids"]
        axes |= {"text_embeds": batch, "time_ids": batch}
    if "timestep_cond" in inputs:  # optimum's name for the guidance embedding input
        args.append(inputs["timestep_cond"])
        names.append("timestep_cond")
        axes |= {"timestep_cond": batch}
    extra, control, down_residuals = names[3:], [], 0
    residual_names = []
    if controlnets:
        control, residuals, residual_axes = _controlnet_exports(pipe, controlnets, args, names, axes, dtype, generator)
        residual_names = list(residual_axes)
        args, names, axes = args + residuals, names + residual_names, axes | residual_axes
        down_residuals = len(residuals) - 1
    unet_module = UNetForExport(pipe.unet, extra, down_residuals)
    unet = OnnxExport("unet", unet_module, tuple(args), names, ["out_sample"], axes, dtype)
    exports += control
    if cache is None:
        exports.append(unet)
    else:  # the refresh graph also returns the deep features; `unet_shallow` runs the shallow branch from them
        deep_axes = {"deep_features": {0: "batch_size", 2: "deep_height", 3: "deep_width"}}
        full = CachedUNetForExport(pipe.unet, cache.branch, False, extra, down_residuals)
        refresh_outputs = ["out_sample", "deep_features"]
        refresh = OnnxExport(
            UNET_REFRESH, full, tuple(args), names, refresh_outputs, axes | deep_axes, dtype, external_weights=True
        )
        exports += [refresh, replace(unet, view_of=UNET_REFRESH)]
        with torch.no_grad():
            deep = full(*args)[1]
        shallow = CachedUNetForExport(pipe.unet, cache.branch, True, extra)
        if down_residuals:  # only the residuals of the skips the shallow branch makes
            shallow.residuals = shallow.split.shallow_skips()
        # each ControlNet's graph cut down to those residuals: the nets stop there on a shallow step
        for net in list(control):
            module = ShallowControlNetForExport(net.module.controlnet, shallow.residuals)
            outputs = net.output_names[: shallow.residuals]
            axes_kept = {n: a for n, a in net.dynamic_axes.items() if n in net.input_names or n in outputs}
            name = shallow_controlnet_graph(net.name)
            view = replace(
                net, name=name, module=module, output_names=outputs, dynamic_axes=axes_kept, view_of=net.name
            )
            exports.append(view)
        kept = len(names) - len(residual_names) + shallow.residuals
        shallow_names = [*names[:kept], "deep_features"]
        exports.append(
            OnnxExport(
                "unet_shallow",
                shallow,
                (*args[:kept], deep),
                shallow_names,
                ["out_sample"],
                {n: a for n, a in (axes | deep_axes).items() if n in shallow_names or n == "out_sample"},
                dtype,
            )
        )

    latent = torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=generator)
    axes = {
        "latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"},
        "sample": {0: "batch_size", 2: "height", 3: "width"},
    }
    exports.append(
        OnnxExport("vae_decoder", VaeDecode(pipe.vae), (latent,), ["latent_sample"], ["sample"], axes, vae_dtype)
    )
    if vae_encoder:
        pixels = torch.rand(1, 3, 8 * pipe.vae_scale_factor, 8 * pipe.vae_scale_factor, generator=generator) * 2 - 1
        output = "latent_parameters" if type(pipe.vae).__name__ == "AutoencoderKL" else "latent_sample"  # tiny VAE
        axes = {
            "sample": {0: "batch_size", 2: "sample_height", 3: "sample_width"},
            output: {0: "batch_size", 2: "latent_height", 3: "latent_width"},
        }
        exports.append(
            OnnxExport("vae_encoder", VaeEncoderForExport(pipe.vae), (pixels,), ["sample"], [output], axes, vae_dtype)
        )
    return exports


def _controlnet_exports(pipe, controlnets, args, names, axes, dtype, generator):
    """The ControlNet graphs (see the module docstring) on the U-Net's example inputs plus a control image of
    the latent size in pixels; returns them, the first net's residuals (the U-Net's example residual inputs)
    and the residuals' dynamic axes, in input order."""
    sample = args[0]
    pixels = [pipe.vae_scale_factor * side for side in sample.shape[-2:]]
    image = torch.rand(sample.shape[0], 3, *pixels, generator=generator)
    added = [(n, a) for n, a in zip(names, args) if n in ("text_embeds", "time_ids")]
    control_names = [*names[:3], "controlnet_cond", "conditioning_scale", *(n for n, _ in added)]
    control_args = (*args[:3], image, torch.tensor(1.0), *(a for _, a in added))
    control_axes = {n: axes[n] for n in control_names if n in axes}
    control_axes["controlnet_cond"] = {0: "batch_size", 2: "image_height", 3: "image_width"}
    exports, residuals = [], None
    for folder, net in controlnets.items():
        module = ControlNetForExport(net)
        if residuals is None:
            with torch.no_grad():
                residuals = list(module(*control_args))
            outputs = [*down_residual_names(len(residuals) - 1), MID_RESIDUAL]
            residual_axes = {n: {0: "batch_size", 2: f"{n}_height", 3: f"{n}_width"} for n in outputs}
        exports.append(
            OnnxExport(folder, module, control_args, control_names, outputs, control_axes | residual_axes, dtype)
        )
    return exports, residuals, residual_axes


def _cast_args(args: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if a.is_floating_point() and a.ndim > 0 else a for a in args)


def export_model(export: OnnxExport, folder: Path, opset: int) -> Path:
    """Export one component to its graph file in `folder` (`model.onnx`, or the name `graph_path` gives it)
    (+ `model.onnx.data` when large, or with `export.external_weights`)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(export.path).name
    module = export.module.to(export.dtype).eval()
    args = _cast_args(export.args, export.dtype)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with tempfile.TemporaryDirectory(dir=folder) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    args,
                    str(raw),
                    dynamo=False,
                    opset_version=opset,
                    input_names=export.input_names,
                    output_names=export.output_names,
                    dynamic_axes=export.dynamic_axes,
                    do_constant_folding=True,
                )
        except Exception as exc:  # the exporter raises many types; name the component
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LoweringError(
                f"ONNX export of {export.name} failed: {first}; rerun with --debug for the trace"
            ) from exc
        if nbytes > EXTERNAL_DATA_BYTES or export.external_weights:
            model = onnx.load(str(raw))  # (over 2 GB the TorchScript exporter wrote one file per tensor)
            (folder / WEIGHTS_FILE).unlink(missing_ok=True)  # onnx would append to it
            onnx.save_model(
                model,
                str(target),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=WEIGHTS_FILE,
                size_threshold=1024,
            )
            del model
            # onnx creates the weights file 0600: give it the graph's mode (the umask's), so whoever may read
            # the graph (a serving user) may read its weights too
            (folder / WEIGHTS_FILE).chmod(target.stat().st_mode & 0o777)
        else:
            shutil.move(str(raw), target)
    module.to(torch.float32)
    return target


def write_graph_view(source: Path, target: Path, outputs: list[str]) -> Path:
    """Write `target`: the ONNX graph at `source` computing only `outputs` (a subset of its outputs), without
    the nodes, weights and value infos nothing else needs. External weights keep their location, so both
    graphs must lie in one folder (ONNX Runtime reads external data only from the graph's own folder) and read
    one weights file. Reads the graph only, never the weights."""
    import onnx

    if source.parent != target.parent:
        raise ValueError(f"a graph view shares its source's weights file: {target} must lie next to {source}")
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    missing = sorted(set(outputs) - {o.name for o in graph.output})
    if missing:
        raise LoweringError(f"{source.name} has no output(s) {', '.join(missing)} to keep in {target.name}")
    needed, kept = set(outputs), []
    for node in reversed(graph.node):  # nodes are topologically sorted: walk back from the outputs
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    kept.reverse()
    kept_ids = {id(node) for node in kept}
    produced = {name for node in kept for name in node.output}
    for field, keep in (
        (graph.node, lambda node: id(node) in kept_ids),
        (graph.output, lambda value: value.name in outputs),
        (graph.initializer, lambda tensor: tensor.name in needed),
        (graph.value_info, lambda value: value.name in produced),
    ):
        for index in reversed(range(len(field))):  # in place: the kept messages are never copied
            if not keep(field[index]):
                del field[index]
    onnx.save_model(model, str(target))
    return target


def _subgraph_inputs(node) -> set[str]:
    """Names the subgraphs of `node` (If / Loop / Scan bodies) read, their own or the outer graph's."""
    names = set()
    for attribute in node.attribute:
        for graph in [attribute.g, *attribute.graphs]:
            for inner in graph.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


# --- LoRA weight map: which ONNX initializer holds each LoRA-addressable weight ------------------------------


def initializer_arrays(path: Path, names=None) -> dict:
    """The initializers of the ONNX model at `path` as numpy arrays (only `names` when given), read from the
    graph or from its external-data file (memory-mapped, so a multi-GB U-Net is not copied)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    wanted = None if names is None else set(names)
    arrays = {}
    for tensor in model.graph.initializer:
        if wanted is not None and tensor.name not in wanted:
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            count = int(np.prod(tensor.dims)) if tensor.dims else 1
            data = np.memmap(path.parent / info["location"], dtype=np.uint8, mode="r")
            offset = int(info.get("offset", 0))
            raw = data[offset : offset + int(info.get("length", count * np.dtype(dtype).itemsize))]
            arrays[tensor.name] = raw.view(dtype).reshape(tuple(tensor.dims))
        else:
            arrays[tensor.name] = numpy_helper.to_array(tensor)
    return arrays


def initializer_names(path: Path) -> set[str]:
    """The names of the initializers of the ONNX graph at `path` (the graph only, not its weights)."""
    import onnx

    return {tensor.name for tensor in onnx.load(str(path), load_external_data=False).graph.initializer}


def lora_weight_map(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> dict[str, dict]:
    """Where the exported graph at `path` holds each Linear / Conv2d weight of `module` (the diffusers
    component: the keys LoRAs address): `{param name: {"initializer": name, "transposed": bool}}`.

    The TorchScript exporter names most weights after their parameters but leaves linear weights folded into
    anonymous, transposed MatMul initializers (`onnx::MatMul_123`), so weights are matched by value: the
    bytes of the weight (and of its transpose) at the export `dtype` against each initializer's. A weight
    found in no initializer, or in one that two weights share, is left out (a LoRA touching it is refused at
    run time)."""
    import hashlib

    import numpy as np

    def key(array) -> tuple:  # the bytes, not the dtype: a bf16 weight is matched through its int16 view
        return array.shape, array.dtype.itemsize, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()

    by_value: dict[tuple, list[str]] = {}
    for name, array in initializer_arrays(path).items():
        if array.dtype.kind == "f" or array.dtype.name == "bfloat16":  # weights only: bytes alone could match ints
            by_value.setdefault(key(array), []).append(name)
    found: dict[str, dict] = {}
    claimed: dict[str, list[str]] = {}
    for module_name, child in module.named_modules():
        if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        weight = child.weight.detach().to(dtype).cpu()
        weight = (weight.view(torch.int16) if dtype == torch.bfloat16 else weight).numpy()  # numpy has no bf16
        candidates = [(weight, False)] + ([(weight.T, True)] if weight.ndim == 2 else [])
        for array, transposed in candidates:
            names = by_value.get(key(array), [])
            if len(names) == 1:
                param = f"{module_name}.weight"
                found[param] = {"initializer": names[0], "transposed": transposed}
                claimed.setdefault(names[0], []).append(param)
                break
    for params in claimed.values():  # two equal weights share one initializer: neither can change alone
        if len(params) > 1:
            for param in params:
                found.pop(param)
    return found
