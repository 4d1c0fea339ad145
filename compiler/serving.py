"""Serving export: a Triton Inference Server model repository from a compiled artifact.

    export_server("out/", "repo/", max_batch_size=8, instance_count=1, kind="GPU")  # kind None: the artifact's
    tritonserver --model-repository repo/
    sdcompiler serve out/      # layout "pipeline" on the server in the nvidia-pytriton wheel (`triton_server`)
    export_server("base/", "repo/", refiner="refiner/")   # an SDXL base + refiner served as one unit

Two layouts, one request interface (`PIPELINE_INPUTS` -> `PIPELINE_OUTPUTS`, served by a Python-backend model
`pipeline` whose `execute` is `triton_execute`):
- "pipeline": that model alone; it runs `load_compiled` on the artifact hard-linked into `pipeline/1/artifact/`
  (onnx: ONNX Runtime sessions in the backend's process; torch: the torch modules). Any target; what the
  bundled server (no ONNX Runtime or TensorRT backend) serves. With an SDXL refiner (`refiner=`), the refiner
  artifact is hard-linked into `pipeline/1/refiner/` and model.py runs `load_compiled(artifact, refiner=...)`:
  every row runs the base to `denoising_end` (default 0.8), then the refiner from there (diffusers' ensemble
  of experts). An SDXL refiner artifact alone is served in this layout too (image-to-image: rows need `image`).
- "components" (onnx and tensorrt artifacts, for a full Triton image): one model per component (for an `onnx`
  artifact: `onnxruntime_onnx` models `text_encoder[_2]`, `unet` (for a deepcache artifact `unet_refresh` and
  `unet_shallow` instead, the graphs its loop runs), `vae_decoder`, their ONNX
  files hard-linked from the artifact when it lies on the same filesystem, copied otherwise) and the
  `pipeline` model, whose component calls are BLS requests to them.

The request: a batch of rows, each one prompt (`prompt`, TYPE_STRING [rows, 1]) with its own optional
`negative_prompt`, `num_inference_steps`, `guidance_scale`, `seed`, `height`, `width`, `num_images`, `strength`
([rows, 1] each), `image` (uint8 [rows, H, W, 3], image-to-image), `control_image` (uint8 [rows, nets, H, W, 3]:
an artifact with ControlNets; with `image`, ControlNet image-to-image), `mask_image` (uint8 [rows, H, W, 1],
inpainting; 255 repaints), `loras` ("NAME[:SCALE],...": LoRAs
from the folder the server was started with, `lora_dir`; layout "pipeline"), and for SDXL `denoising_end` (with a
refiner: the base's share of the schedule, diffusers' high_noise_frac, default 0.8), `aesthetic_score` and
`negative_aesthetic_score` (an SDXL refiner's, alone or after a base; default 6 / 2.5) -> `images` (uint8
[rows, num_images, H, W, 3]). Image j of a row draws its noise from `seed + j`. Each row is checked with
`CompiledPipeline.check`, so a bad request gets the Python API's one-line message as a Triton error and fails
alone. Dynamic batching hands the model concurrent requests together; rows with the same call settings
(`batch_key`) run as one pipeline call and give the images they give alone. The loop is sd-compiler's own
(`sampling.generate`, through `runtime.CompiledPipeline`, so the artifact's defaults apply: steps, guidance,
a recorded timestep schedule, the feature cache). A denoising loop cannot be a Triton ensemble, hence the
Python model.

Batching: a model batches (`max_batch_size > 0`, dims without the batch) only
when every input and output has a dynamic leading batch dimension and at
least one more. The U-Net's `timestep` is a 0-d scalar shared by the whole
batch, so the U-Net models are non-batching (`max_batch_size: 0`, full dims
with -1 for the batch, the scalar declared `dims: [ 1 ]`: Triton refuses an
empty reshape for non-batching models, and the ONNX Runtime backend feeds a
one-element tensor to a 0-d model input as a scalar, onnxruntime_backend#213).
The BLS side sends 0-d inputs as shape [1] to match.

The `pipeline` model needs `sd-compiler` (with torch, diffusers, transformers)
importable in the server's Python: model.py starts with the site folders of the
Python that exported (`environment_prelude`); elsewhere install it into the
Triton image, or pack an environment and pass its path as `python_env` (the
Python backend's `EXECUTION_ENV_PATH`). In layout "components" everything else
it reads (tokenizers, scheduler config, `model_index.json`, `manifest.json`,
`models.json`: the component models' inputs and outputs) is copied into
`pipeline/1/`.

A `tensorrt` artifact gives `tensorrt_plan` models instead: the engines
(`model_sm<cc>.plan`, hard-linked) mapped by GPU compute capability in
`cc_model_filenames`, the engine's optimization profile "0" in
`instance_group.profile`, I/O types from the optimized graph (fp16 where the
engine takes fp16), and `max_batch_size` capped by the profile's batch range
(0 for static engines). Instances run on GPUs only. An engine for another GPU
kind comes from compiling on that kind; the repository serves what the
artifact holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from sdcompiler.artifact import MANIFEST, check_writable_destination, read_manifest, staged_folder, verify_files
from sdcompiler.errors import ArtifactError, ConfigError, PipelineArgumentError, SDCompilerError
from sdcompiler.passes.errors import resolved_path
from sdcompiler.targets.served_models import ModelSpec, TensorSpec

PIPELINE = "pipeline"
VERSION = "1"  # the model version folder Triton serves
SERVED_MODELS = "models.json"  # pipeline/1/models.json: the component models' specs, for the BLS calls
ARTIFACT = "artifact"  # pipeline/1/artifact/: the artifact itself (layout "pipeline")
REFINER = "refiner"  # pipeline/1/refiner/: the SDXL refiner artifact run after the base (layout "pipeline")
KINDS = ("GPU", "CPU")

Infer = Callable[[str, dict, list], dict]  # (model name, {input: array}, [output]) -> {output: array}


# The `pipeline` model's request and response, the same in both layouts. A request is a batch of rows, each
# one prompt with its own settings ([rows, 1] tensors; `image`: [rows, H, W, 3]); `images` comes back as
# [rows, num_images, H, W, 3]. Every input is optional in the config so that the model, not Triton, answers
# a missing prompt, with the Python API's message. Triton's dynamic batcher hands the model several
# requests at once; rows that ask for the same call settings (`batch_key`) run as one pipeline call.
PIPELINE_INPUTS = (
    TensorSpec("prompt", "TYPE_STRING", (-1, 1), optional=True),
    TensorSpec("negative_prompt", "TYPE_STRING", (-1, 1), optional=True),
    TensorSpec("num_inference_steps", "TYPE_INT32", (-1, 1), optional=True),
    TensorSpec("guidance_scale", "TYPE_FP32", (-1, 1), optional=True),
    TensorSpec("seed", "TYPE_INT64", (-1, 1), optional=True),
    TensorSpec("height", "TYPE_INT32", (-1, 1), optional=True),
    TensorSpec("width", "TYPE_INT32", (-1, 1), optional=True),
    TensorSpec("num_images", "TYPE_INT32", (-1, 1), optional=True),
    TensorSpec("image", "TYPE_UINT8", (-1, -1, -1, 3), optional=True),
    TensorSpec("strength", "TYPE_FP32", (-1, 1), optional=True),
    TensorSpec("loras", "TYPE_STRING", (-1, 1), optional=True),
    # [rows, nets, H, W, 3]: the control image of each ControlNet (with `image`: ControlNet image-to-image)
    TensorSpec("control_image", "TYPE_UINT8", (-1, -1, -1, -1, 3), optional=True),
    TensorSpec("mask_image", "TYPE_UINT8", (-1, -1, -1, 1), optional=True),  # [rows, H, W, 1]: inpainting, 255 repaints
    # SDXL: where the base stops (with a refiner: its share of the schedule, the refiner runs the rest; default 0.8)
    TensorSpec("denoising_end", "TYPE_FP32", (-1, 1), optional=True),
    TensorSpec("aesthetic_score", "TYPE_FP32", (-1, 1), optional=True),  # an SDXL refiner's (alone or after a base)
    TensorSpec("negative_aesthetic_score", "TYPE_FP32", (-1, 1), optional=True),
)
# the image inputs: uint8 in, float arrays in [0, 1] to the pipeline; grouped rows must agree on their shapes
IMAGE_INPUTS = ("image", "control_image", "mask_image")
PIPELINE_OUTPUTS = (TensorSpec("images", "TYPE_UINT8", (-1, -1, -1, -1, 3)),)
CALL_ARGUMENTS = {"num_images": "num_images_per_prompt"}
LORA_DIR = "lora_dir"  # the pipeline model's config parameter: the server's LoRA folder  # input -> pipeline call argument, where they differ
LAYOUTS = ("components", "pipeline")

_NUMPY_TYPES = {
    "TYPE_FP32": np.float32,
    "TYPE_FP16": np.float16,
    "TYPE_FP64": np.float64,
    "TYPE_INT64": np.int64,
    "TYPE_INT32": np.int32,
}


# --- config.pbtxt ---------------------------------------------------------------------------


def model_config(spec: ModelSpec, *, max_batch_size: int, kind: str, instance_count: int) -> str:
    """The config.pbtxt text (protobuf text format of Triton's `ModelConfig`) for one model.

    Args:
        spec: names, types and full shapes of the model's inputs and outputs, and its platform/backend.
        max_batch_size: used when the model can batch (see the module docstring); 0 disables batching.
        kind: "GPU" or "CPU" (instance_group kind).
        instance_count: instances of the model (per GPU for "GPU").
    """
    if spec.platform == "tensorrt_plan" and kind != "GPU":
        raise ConfigError(f"model {spec.name}: TensorRT plans run only on GPU instances, got kind={kind!r}")
    if spec.batch_limit is not None:
        max_batch_size = min(max_batch_size, spec.batch_limit)
    blocker = _batch_blocker(spec) if max_batch_size else None
    batch = max_batch_size if blocker is None else 0
    lines = ["# Written by sd-compiler export-server; re-export instead of editing.", f"name: {_quote(spec.name)}"]
    lines += [f"platform: {_quote(spec.platform)}"] if spec.platform else [f"backend: {_quote(spec.backend)}"]
    if batch:
        lines += [
            "# Every input and output has a dynamic leading batch dimension, so dims exclude it;",
            f"# requests carry up to {batch} items, and dynamic_batching merges concurrent ones.",
        ]
    else:
        if blocker is not None:
            t, where = blocker
            reason = f"{where} '{t.name}' {_why_unbatched(t)}, which Triton cannot batch"
        else:
            reason = spec.unbatched_reason or "batching turned off at export"
        lines += [
            f"# max_batch_size 0: {reason};",
            "# dims are full shapes (-1 for dynamic sizes, the batch included).",
        ]
        if any(not t.shape for t in (*spec.inputs, *spec.outputs)):
            lines.append("# A 0-d tensor is declared dims [ 1 ]: the backend passes its one element as the scalar.")
    lines.append(f"max_batch_size: {batch}")
    for key, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        blocks = [_tensor_block(t, batched=batch > 0) for t in tensors]
        lines += [f"{key} ["] + [",\n".join(blocks)] + ["]"]
    if batch:
        lines.append("dynamic_batching { }")
    group = [f"    kind: KIND_{kind}", f"    count: {instance_count}"]
    if spec.profiles:
        group.append(f"    profile: [ {', '.join(_quote(p) for p in spec.profiles)} ]")
    lines += ["instance_group [", "  {", *group, "  }", "]"]
    lines += [
        f"cc_model_filenames {{ key: {_quote(cc)} value: {_quote(file)} }}"
        for cc, file in sorted(spec.cc_model_filenames.items())
    ]
    lines += [
        f"parameters {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}"
        for k, v in sorted(spec.parameters.items())
    ]
    return "\n".join(lines) + "\n"


def _batch_blocker(spec: ModelSpec) -> tuple[TensorSpec, str] | None:
    """The first tensor without a dynamic leading batch dimension followed by others, or None."""
    for where, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        for t in tensors:
            if len(t.shape) < 2 or t.shape[0] != -1:
                return t, where
    return None


def _why_unbatched(t: TensorSpec) -> str:
    if not t.shape:
        return "is a 0-d scalar shared by the whole batch"
    return f"(shape {list(t.shape)}) lacks a dynamic leading batch dimension followed by others"


def _tensor_block(t: TensorSpec, batched: bool) -> str:
    dims = t.shape[1:] if batched else (t.shape or (1,))
    lines = [
        "  {",
        f"    name: {_quote(t.name)}",
        f"    data_type: {t.dtype}",
        f"    dims: [ {', '.join(map(str, dims))} ]",
    ]
    if t.optional:
        lines.append("    optional: true")
    return "\n".join(lines + ["  }"])


def _quote(text: str) -> str:
    if "\n" in text:
        raise ConfigError(f"config value {text!r} contains a line break")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- export ----------------------------------------------------------------------------------


def default_kind(manifest: dict) -> tuple[str, str]:
    """Where an artifact's component models run unless told ("GPU" / "CPU"), and why, in words.

    The manifest records no compile device, so the graphs decide: TensorRT plans run on GPUs only; fp16
    ONNX graphs are made for the CUDA execution provider (ONNX Runtime's CPU kernels run fp16 slowly or
    not at all); fp32 ONNX graphs are what a CPU compile (the onnx target's default) makes.
    """
    if manifest["target"] == "tensorrt":
        return "GPU", "TensorRT engines run on GPUs only"
    if manifest["lowering"]["config"].get("precision") == "fp16":
        return "GPU", "its ONNX graphs are fp16, made for CUDA"
    return "CPU", "its ONNX graphs are fp32 (the onnx target's CPU default)"


def export_server(
    artifact: str | Path,
    out: str | Path,
    *,
    layout: str | None = None,
    max_batch_size: int = 8,
    instance_count: int = 1,
    kind: str | None = None,
    device: str | None = None,
    python_env: str | None = None,
    lora_dir: str | Path | None = None,
    refiner: str | Path | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write a Triton Inference Server model repository for a compiled artifact.

    The repository appears atomically: it is built in a temporary sibling folder and renamed into
    place, so a failed export leaves nothing at `out` (and an overwritten repository intact).

    Args:
        artifact: the artifact folder (holds manifest.json).
        out: the model repository folder to write; must be new or empty unless `overwrite`.
        layout: "components" (one model per component, `onnxruntime_onnx` / `tensorrt_plan`, called by the
            `pipeline` model over BLS: onnx and tensorrt artifacts, for a full Triton image) or "pipeline"
            (the `pipeline` model alone, running `load_compiled` on a hard-linked copy of the artifact
            inside the Python backend: any target, and what the server in the nvidia-pytriton wheel runs);
            None: "components" where the target serves its components, else "pipeline" (always "pipeline" for an
            SDXL refiner, alone or after a base).
        max_batch_size: max_batch_size of the models that can batch (text encoders, VAE decoder, and the
            `pipeline` model's rows); 0 makes every model non-batching.
        instance_count: instances per component model (per GPU for "GPU") and of the pipeline model.
        kind: "GPU" or "CPU": where the component models run; None: the artifact's (`default_kind`). The
            pipeline model (the Python loop) always runs on CPU instances.
        device: layout "pipeline": the `load_compiled` device ("cpu", "cuda"); None: CUDA when torch sees one.
        python_env: the Python backend's EXECUTION_ENV_PATH for the pipeline model (a packed
            environment with sd-compiler); default: the server's own Python, given the site folders of
            the Python that exports (see `environment_prelude`).
        lora_dir: layout "pipeline": a folder of `NAME.safetensors` LoRAs that requests name in their `loras`
            input (the config's `lora_dir` parameter: its absolute path, read when the model loads).
        refiner: an SDXL refiner artifact to run after this SDXL base on every row, as diffusers' ensemble of
            experts (layout "pipeline"; hard-linked into the repository as the base is). A pair that does not fit
            is refused (RefinerError, `runtime.check_refiner_pair`) before anything is written.
        overwrite: replace a model repository earlier written by export-server at `out`.
        verify: check every file of the artifact against its manifest's sha256 first (the default).

    Returns:
        The repository folder.
    """
    from sdcompiler.runtime import check_refiner_pair
    from sdcompiler.targets import TARGETS, get_target

    root = resolved_path(artifact, ArtifactError, "pass an artifact folder")
    manifest = read_manifest(root)
    model = manifest.get("model", {})
    inpainting = model.get("unet_in_channels", model.get("latent_channels")) != model.get("latent_channels")
    refiner_root = None
    if refiner is not None:
        refiner_root = resolved_path(refiner, ArtifactError, "pass a refiner artifact folder")
        check_refiner_pair(manifest, read_manifest(refiner_root), refiner_root)
    refines = refiner_root is not None or manifest["arch"] == "sdxl-refiner"
    target = get_target(manifest["target"])
    layout = layout or ("components" if target.serves_components and not (inpainting or refines) else "pipeline")
    if refines and layout == "components":
        what = "a base + refiner pair" if refiner_root is not None else "an SDXL refiner (it refines images)"
        raise ConfigError(
            f"export-server's components layout does not serve {what} yet (its pipeline model has no VAE encoder "
            "and runs one U-Net); use --layout pipeline"
        )
    if inpainting and layout == "components":
        raise ArtifactError(
            f"{root} holds an inpainting U-Net ({model['unet_in_channels']} input channels); the components layout "
            "takes no mask yet: use --layout pipeline (its model takes mask_image)"
        )
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "components" and not target.serves_components:
        served = [name for name, cls in TARGETS.items() if cls.serves_components]
        raise ArtifactError(
            f"export-server needs an {' or '.join(served)} artifact for layout 'components'; {root} was compiled "
            f"for target {manifest['target']!r}: recompile it with --target {' (or '.join(served)}"
            f"{')' * (len(served) - 1)}, or use --layout pipeline"
        )
    if layout == "components" and manifest.get("controlnets"):
        raise ConfigError(
            "export-server's components layout does not serve ControlNet graphs yet (its pipeline model would call "
            "the U-Net without their residuals); use --layout pipeline"
        )
    kind = kind or default_kind(manifest)[0]
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    for name, value, least in (("max_batch_size", max_batch_size, 0), ("instance_count", instance_count, 1)):
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    parameters = {"EXECUTION_ENV_PATH": python_env} if python_env else {}
    if lora_dir is not None:
        if layout != "pipeline":
            raise ConfigError(
                "lora_dir needs layout 'pipeline' (the components layout's U-Net is a fixed ONNX Runtime / TensorRT "
                "model that run-time LoRAs cannot switch); pass --layout pipeline"
            )
        parameters[LORA_DIR] = str(LoraFolder(lora_dir).folder)
    verify_files(root, manifest, hashes=verify)
    if refiner_root is not None:
        verify_files(refiner_root, read_manifest(refiner_root), hashes=verify)
    models = target.serving_models(root, manifest) if layout == "components" else []
    specs = [spec for spec, _ in models]
    pipeline = ModelSpec(PIPELINE, PIPELINE_INPUTS, PIPELINE_OUTPUTS, backend="python", parameters=parameters)

    with _staged_repository(Path(out), overwrite) as repo:
        for spec, files in models:
            version = repo / spec.name / VERSION
            version.mkdir(parents=True)
            for file, source in files.items():
                _link_or_copy(root / source, version / file)
            (repo / spec.name / "config.pbtxt").write_text(
                model_config(spec, max_batch_size=max_batch_size, kind=kind, instance_count=instance_count)
            )
        version = repo / PIPELINE / VERSION
        version.mkdir(parents=True)
        if layout == "pipeline":  # the whole artifact, hard-linked: load_compiled reads it as it is
            shutil.copytree(root, version / ARTIFACT, copy_function=_link_or_copy)
            if refiner_root is not None:
                shutil.copytree(refiner_root, version / REFINER, copy_function=_link_or_copy)
        else:
            for name in ("tokenizer", "tokenizer_2", "scheduler"):
                if (root / name).is_dir():
                    shutil.copytree(root / name, version / name)
            for name in ("model_index.json", MANIFEST):
                shutil.copy2(root / name, version / name)
            (version / SERVED_MODELS).write_text(json.dumps({s.name: asdict(s) for s in specs}, indent=2) + "\n")
        (version / "model.py").write_text(model_py(layout, device=device, refiner=refiner_root is not None))
        (repo / PIPELINE / "config.pbtxt").write_text(
            model_config(pipeline, max_batch_size=max_batch_size, kind="CPU", instance_count=instance_count)
        )
    return Path(out).resolve()


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (artifacts are never modified in place, so sharing the inode is safe), else copy."""
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, target)


def _staged_repository(out: Path, overwrite: bool):
    """A staging folder that becomes `out` on success (`artifact.staged_folder`), after checking that `out`
    is new, empty, or (with `overwrite`) a repository export-server wrote."""
    out = resolved_path(out, ArtifactError, "pass a folder path")
    check_writable_destination(out)
    if out.exists():
        if any(out.iterdir()):
            if not overwrite:
                raise ArtifactError(
                    f"output folder {out} is not empty; pass --overwrite to replace a model repository "
                    "written by export-server, or a new folder"
                )
            version = out / PIPELINE / VERSION
            if not ((version / MANIFEST).is_file() or (version / ARTIFACT / MANIFEST).is_file()):
                raise ArtifactError(
                    f"output folder {out} is not a model repository written by export-server; "
                    "refusing to replace it: pass a new or empty folder"
                )
    return staged_folder(out)


# --- the pipeline model's side (runs inside Triton's Python backend) --------------------------


class BlsModel:
    """A served component called like `targets.components.OrtModel`: torch tensors by input name.

    Inputs are cast to the model's declared types and 0-d ones sent as shape [1] (see the module
    docstring), so the ONNX Runtime adapters (`ort_text_encoder`, `ort_unet`, ...) run on it unchanged.
    """

    def __init__(self, infer: Infer, spec: ModelSpec):
        self.infer, self.name = infer, spec.name
        self.inputs = {t.name: t for t in spec.inputs}
        self.outputs = [t.name for t in spec.outputs]

    def __call__(self, outputs: list[str] | None = None, **inputs) -> dict:
        import torch

        feed = {}
        for name, value in inputs.items():
            if name not in self.inputs or value is None:  # e.g. SD's text_embeds, which only SDXL U-Nets take
                continue
            tensor = self.inputs[name]
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            array = array.astype(_NUMPY_TYPES[tensor.dtype], copy=False)
            if not tensor.shape:  # a 0-d model input travels as a one-element tensor (its config dims: [ 1 ])
                array = array.reshape(1)
            feed[name] = np.ascontiguousarray(array)
        names = list(outputs or self.outputs)
        results = self.infer(self.name, feed, names)
        # a copy: BLS outputs can be read-only views of shared memory
        return {n: torch.from_numpy(np.array(results[n], dtype=np.float32)) for n in names}


def bls_components(infer: Infer, root: str | Path, manifest: dict):
    """`sampling.Components` whose callables are `infer` calls to the repository's component models.

    Args:
        infer: `(model_name, {input: np.ndarray}, [output]) -> {output: np.ndarray}`; in Triton a BLS
            request, in tests anything that runs the models.
        root: the pipeline's version folder (`REPO/pipeline/1`: tokenizers, scheduler, models.json).
        manifest: the artifact's manifest (copied there as manifest.json).
    """
    from sdcompiler.archs import get_arch
    from sdcompiler.targets.components import (
        cache_settings,
        make_components,
        ort_feature_cache,
        ort_text_encoder,
        ort_unet,
        ort_vae_decoder,
    )
    from sdcompiler.targets.onnx_target import unet_component

    root = Path(root)
    specs = {name: ModelSpec.from_dict(data) for name, data in json.loads((root / SERVED_MODELS).read_text()).items()}
    models = {name: BlsModel(infer, spec) for name, spec in specs.items()}
    spec = get_arch(manifest["arch"])
    encoders = [ort_text_encoder(models[name], spec.is_sdxl) for name in spec.text_encoders]
    settings = cache_settings(manifest)
    unet = models[unet_component(manifest)]  # with a feature cache: the refresh graph (as `OnnxTarget.load`)
    cache = None if settings is None else ort_feature_cache(unet, models["unet_shallow"], settings)
    return make_components(
        root, manifest, encoders, ort_unet(unet), ort_vae_decoder(models["vae_decoder"]), feature_cache=cache
    )


def served_pipeline(root: str | Path, infer: Infer):
    """The pipeline model's `CompiledPipeline` (the runtime's argument handling and defaults) over BLS components."""
    from sdcompiler import knobs
    from sdcompiler.runtime import CompiledPipeline

    knobs.set_quiet(True)  # no progress bars in the server log
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    return CompiledPipeline(root, manifest, bls_components(infer, root, manifest), device="cpu")


def request_rows(get: Callable[[str], np.ndarray | None], parameters: dict | None = None) -> list[dict]:
    """The rows of one `pipeline` request as pipeline call arguments: one prompt each, with "seed" (default 0)
    and, for image-to-image, "image" as an (H, W, 3) float array in [0, 1].

    Args:
        get: an input by name as numpy (Triton's batched shapes: [rows, 1], `image` [rows, H, W, 3]), or None.
        parameters: the request's parameters; the served interface takes none, so any is an unsupported
            argument, refused with the Python API's message.
    """
    from sdcompiler.runtime import unsupported_arguments_message

    if parameters:
        raise PipelineArgumentError(unsupported_arguments_message(parameters))
    arrays = {t.name: get(t.name) for t in PIPELINE_INPUTS}
    arrays = {name: array for name, array in arrays.items() if array is not None}
    if not arrays:
        raise PipelineArgumentError("prompt is required (a string or a list of strings)")
    rows = [{} for _ in range(len(next(iter(arrays.values()))))]
    for name, array in arrays.items():
        if len(array) != len(rows):  # Triton checks this for clients; a direct caller may not
            raise PipelineArgumentError(f"input {name} has {len(array)} rows, the request {len(rows)}")
        argument = CALL_ARGUMENTS.get(name, name)
        for i, row in enumerate(rows):
            if name in IMAGE_INPUTS:
                row[argument] = array[i].astype(np.float32) / 255.0
            elif array.dtype == object or array.dtype.kind == "S":
                row[argument] = _text(array[i].reshape(-1)[0], name, i)
            else:
                row[argument] = array[i].reshape(-1)[0].item()
    return rows


class LoraFolder:
    """The LoRAs a server offers: `NAME.safetensors` files in one folder (configured at start, `lora_dir`), named
    in requests as "NAME[:SCALE],NAME[:SCALE]" (the order fuses as given; scale 1 when left out)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        if not self.folder.is_dir():
            raise ConfigError(f"lora_dir {folder} is not a folder; pass a folder of NAME.safetensors LoRA files")

    def names(self) -> list[str]:
        files = self.folder.glob("*.safetensors")
        return sorted(p.stem for p in files if p.is_file() and p.resolve().is_relative_to(self.folder))

    def resolve(self, text: str) -> tuple[tuple[str, float], ...]:
        """The (path, scale) pairs a request's `loras` names; "" names none (the artifact's own weights)."""
        loras = []
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            name, _, scale = entry.partition(":")
            try:
                weight = float(scale) if scale else 1.0
            except ValueError:
                raise PipelineArgumentError(f"loras entry {entry!r}: the scale after ':' is not a number") from None
            path = self.folder / f"{name}.safetensors"  # a plain name: no folder, no "..", nothing hidden
            plain = re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) is not None
            if not plain or not path.is_file() or not path.resolve().is_relative_to(self.folder):
                offered = ", ".join(self.names()) or "none"
                raise PipelineArgumentError(
                    f"LoRA {name!r} is not in the server's LoRA folder (offered: {offered}); name a NAME.safetensors "
                    "file of that folder"
                )
            loras.append((str(path), weight))
        return tuple(loras)


def _text(value, name: str, row: int) -> str:
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise PipelineArgumentError(f"{name} of row {row} is not UTF-8 text") from None


def _generators(seed: int, count: int) -> list:
    """Image j of a row draws from seed + j: a row's images are those of `count` one-image rows."""
    import torch

    return [torch.Generator().manual_seed(seed + j) for j in range(count)]


def batch_key(row: dict) -> tuple:
    """Rows with equal keys run as one pipeline call: every call setting but the prompts, seeds and images,
    and whether a negative prompt is given (SDXL zeroes the negative embedding without one)."""
    shapes = tuple(None if row.get(name) is None else row[name].shape for name in IMAGE_INPUTS)
    skip = ("prompt", "negative_prompt", "seed", *IMAGE_INPUTS)
    settings = sorted((k, v) for k, v in row.items() if k not in skip)
    # `loras` (resolved by serve_rows: a tuple of (path, scale)) is one of the settings: one set per call
    return (tuple(settings), "negative_prompt" in row, shapes)


def serve_rows(pipeline, requests: list[list[dict]], loras: LoraFolder | None = None) -> list[np.ndarray | Exception]:
    """Serve a batch of requests (each a list of rows from `request_rows`): uint8 images
    (rows, num_images, H, W, 3) per request, or the exception that refused or failed it.

    Each row is first checked alone (`CompiledPipeline.check`: the Python API's one-line messages; its `loras`
    resolved in `loras`, the server's LoRA folder), so a bad request fails alone; the good rows run grouped by
    `batch_key`, at most SDCOMPILER_MAX_BATCH images per call. When a grouped call fails, its rows run one at a
    time, so the error reaches only its own request. Image j of a row draws its noise from seed + j, so grouped
    rows give the images they give alone. A row runs with exactly the LoRAs it names (none: the artifact's own
    weights): the pipeline switches (`set_loras`) between groups, the set it holds first.
    """
    from sdcompiler import knobs

    results: list = [None] * len(requests)
    images: dict[tuple[int, int], np.ndarray | Exception] = {}
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, rows in enumerate(requests):
        try:
            for row in rows:
                row["loras"] = _row_loras(row.get("loras", ""), loras)
                pipeline.check(**_call_arguments([row]))
        except Exception as exc:
            results[r] = exc
            continue
        for i, row in enumerate(rows):
            groups.setdefault(batch_key(row), []).append((r, i))
    held = _held_loras(pipeline)
    for members in sorted(groups.values(), key=lambda m: requests[m[0][0]][m[0][1]]["loras"] != held):
        first = requests[members[0][0]][members[0][1]]
        try:
            _hold_loras(pipeline, first["loras"])
        except Exception as exc:  # a LoRA that does not fit this artifact: its rows fail, the weights are restored
            images.update((member, exc) for member in members)
            continue
        count = first.get("num_images_per_prompt", 1)
        per_call = max(1, knobs.max_batch() // count)
        for start in range(0, len(members), per_call):
            chunk = members[start : start + per_call]
            try:
                done = _run(pipeline, [requests[r][i] for r, i in chunk])
            except Exception as exc:
                done = [exc] if len(chunk) == 1 else [_run_alone(pipeline, requests[r][i]) for r, i in chunk]
            images.update(zip(chunk, done))
    for r, rows in enumerate(requests):
        if results[r] is not None:
            continue
        answers = [images[r, i] for i in range(len(rows))]
        failed = next((a for a in answers if isinstance(a, Exception)), None)
        if failed is not None:
            results[r] = failed
        elif len({a.shape for a in answers}) > 1:
            shapes = sorted({"x".join(map(str, a.shape[:3])) for a in answers})
            results[r] = PipelineArgumentError(
                f"the rows of one request give images of different counts or sizes ({', '.join(shapes)}); "
                "send them as separate requests"
            )
        else:
            results[r] = np.stack(answers)
    return results


def _row_loras(text: str, folder: LoraFolder | None) -> tuple[tuple[str, float], ...]:
    if not text.strip():
        return ()
    if folder is None:
        raise PipelineArgumentError(
            "this server offers no LoRAs: start it with a LoRA folder (`sdcompiler serve ART --lora-dir DIR`, "
            "or export-server --layout pipeline --lora-dir DIR)"
        )
    return folder.resolve(text)


def _held_loras(pipeline) -> tuple[tuple[str, float], ...]:
    """The LoRAs the pipeline holds, as `_row_loras` gives them (BLS pipelines hold none)."""
    return tuple(map(tuple, getattr(pipeline, "loras", [])))


def _hold_loras(pipeline, loras: tuple[tuple[str, float], ...]) -> None:
    """Switch the pipeline to exactly `loras` unless it holds them already."""
    if _held_loras(pipeline) != loras:
        pipeline.set_loras(list(loras))


def _call_arguments(rows: list[dict]) -> dict:
    """One pipeline call's arguments for rows that share a `batch_key`."""
    first = rows[0]
    count = first.get("num_images_per_prompt", 1)
    skip = ("prompt", "negative_prompt", "seed", "loras", *IMAGE_INPUTS)
    arguments = {k: v for k, v in first.items() if k not in skip}
    arguments["prompt"] = [row["prompt"] for row in rows] if "prompt" in first else None
    if "negative_prompt" in first:
        arguments["negative_prompt"] = [row["negative_prompt"] for row in rows]
    for name in ("image", "mask_image"):  # one per generated image: each sampled as a lone row samples it
        if name in first:
            arguments[name] = np.repeat(np.stack([row[name] for row in rows]), count, axis=0)
    if "control_image" in first:  # per net: one control image per row (a prompt), as diffusers spreads them
        nets = [np.stack([row["control_image"][n] for row in rows]) for n in range(first["control_image"].shape[0])]
        control = nets[0] if len(nets) == 1 else nets
        # with a start image: ControlNet image-to-image; else the control images are the call's `image`
        arguments["control_image" if "image" in first else "image"] = control
    if isinstance(count, int) and count >= 1:  # else the check refuses num_images first
        arguments["generator"] = [g for row in rows for g in _generators(int(row.get("seed", 0)), count)]
    return arguments


def _run(pipeline, rows: list[dict]) -> list[np.ndarray]:
    count = rows[0].get("num_images_per_prompt", 1)
    images = pipeline(**_call_arguments(rows), output_type="np").images
    images = (images * 255).round().astype(np.uint8)  # as `generate` rounds PIL images
    return [images[i * count : (i + 1) * count] for i in range(len(rows))]


def _run_alone(pipeline, row: dict) -> np.ndarray | Exception:
    try:
        return _run(pipeline, [row])[0]
    except Exception as exc:
        return exc


def lora_folder(model_config: str | dict) -> LoraFolder | None:
    """The `pipeline` model's LoRA folder: its config's `lora_dir` parameter (Triton hands model.py the config
    as JSON), or None."""
    config = json.loads(model_config) if isinstance(model_config, str) else model_config
    folder = config.get("parameters", {}).get(LORA_DIR, {}).get("string_value")
    return LoraFolder(folder) if folder else None


def one_line(exc: Exception) -> str:
    """An error as the one line a client gets: sd-compiler's own messages as they are, others with their type."""
    if isinstance(exc, SDCompilerError):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"


def triton_execute(pipeline, requests: list, pb_utils, loras: LoraFolder | None = None) -> list:
    """The `pipeline` model's `execute` (both layouts): Triton requests in, one response per request, a bad
    request answered by a TritonError carrying its one-line message. `loras`: the server's LoRA folder."""
    batch, refused = [], {}
    for n, request in enumerate(requests):

        def get(name, request=request):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        try:
            batch.append(request_rows(get, json.loads(request.parameters() or "{}")))
        except Exception as exc:
            refused[n] = exc
            batch.append([])
    served = iter(serve_rows(pipeline, [rows for n, rows in enumerate(batch) if n not in refused], loras))
    responses = []
    for n in range(len(batch)):
        result = refused[n] if n in refused else next(served)
        if isinstance(result, Exception):
            error = pb_utils.TritonError(one_line(result))
            responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        else:
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", result)]))
    return responses


def environment_prelude() -> str:
    """model.py's first lines: this Python's site folders and the folder `sdcompiler` was imported from go on
    sys.path, ahead of the backend stub's own.

    The Python backend's stub embeds the system's libpython and ignores PYTHONPATH and virtualenvs. The site
    folders go through `site.addsitedir`, which also runs their .pth files (an editable install's finder);
    the package's parent is added only where the package is a plain `sdcompiler/` folder (an installed
    copy, or a tree laid out as the package): a checkout's root holds `compiler/`, `passes/` and `kernels/`,
    which must never become importable top-level packages.
    """
    import site
    import sysconfig

    import sdcompiler
    from sdcompiler import knobs

    folders = [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    folders = list(dict.fromkeys(folders))
    package = Path(sdcompiler.__file__).parent
    roots = [str(package.parent)] if package.name == "sdcompiler" else []
    stub_site = knobs.triton_stub_site()
    numpy1 = [str(stub_site)] if (stub_site / "numpy").is_dir() else []
    return PRELUDE.format(folders=folders, roots=roots, numpy1=numpy1)


def model_py(layout: str, device: str | None = None, refiner: bool = False) -> str:
    """The `pipeline` model's model.py for a layout (see `export_server`); `refiner`: layout "pipeline" with an
    SDXL refiner in refiner/, attached to the base."""
    if layout == "pipeline":
        what = "It runs `load_compiled` on the artifact hard-linked into its version folder (artifact/)."
        attach = ""
        if refiner:
            what += " The SDXL refiner in refiner/ runs after it on every row (diffusers' ensemble of experts)."
            attach = f", refiner=folder / {REFINER!r}"
        load = f"load_compiled(folder / {ARTIFACT!r}, device={device!r}{attach})"
        imports, infer = "from sdcompiler import load_compiled  # noqa: E402\n", ""
    else:
        what = "Its component calls are BLS requests to the sibling models."
        load = "served_pipeline(folder, _infer)"
        imports, infer = "", BLS_INFER
    return MODEL_PY.format(
        layout=layout, what=what, prelude=environment_prelude(), imports=imports, infer=infer, load=load
    )


PRELUDE = """\
import site
import sys

# Written at export from the exporting Python: the Python backend's stub ignores PYTHONPATH and
# virtualenvs, so that Python's site folders (with their .pth files) and sdcompiler's folder go first.
SITE_FOLDERS = {folders!r}
PACKAGE_ROOTS = {roots!r}
# numpy 1.26 alone (`knobs.triton_stub_site`), ahead of the environment's numpy 2: the stub of nvidia-pytriton
# 0.7.0 builds and reads numpy arrays with numpy 1's struct layout (under numpy 2 it garbles every tensor)
NUMPY1 = {numpy1!r} if "numpy" not in sys.modules else []
_before = list(sys.path)
for _folder in SITE_FOLDERS:
    site.addsitedir(_folder)
_added = [p for p in sys.path if p not in _before]
_first = [p for p in NUMPY1 + PACKAGE_ROOTS if p not in _before]
sys.path[:] = _first + _added + [p for p in _before if p not in _added]
"""

BLS_INFER = """

def _infer(model_name, inputs, outputs):
    response = pb_utils.InferenceRequest(
        model_name=model_name,
        requested_output_names=outputs,
        inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()],
        preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),  # GPU models: to host
    ).exec()
    if response.has_error():
        raise pb_utils.TritonModelException(f"{model_name}: {response.error().message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}
"""

MODEL_PY = '''\
"""Triton Python-backend model `pipeline` (layout "{layout}"), written by sd-compiler's export_server.

Text-to-image and image-to-image with sd-compiler's own sampling loop; the request and response:
`sdcompiler.serving.PIPELINE_INPUTS` / `PIPELINE_OUTPUTS`. {what}
"""

{prelude}
from pathlib import Path  # noqa: E402

import triton_python_backend_utils as pb_utils  # noqa: E402

{imports}from sdcompiler.serving import lora_folder, served_pipeline, triton_execute  # noqa: E402
{infer}

class TritonPythonModel:
    def initialize(self, args):
        from sdcompiler import knobs

        knobs.set_quiet(True)  # no progress bars in the server log
        folder = Path(args["model_repository"]) / args["model_version"]
        self.pipeline = {load}
        self.loras = lora_folder(args.get("model_config", "{{}}"))  # the config's `lora_dir` parameter, if any

    def execute(self, requests):
        return triton_execute(self.pipeline, requests, pb_utils, self.loras)
'''
