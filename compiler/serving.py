"""Serving export: a Triton Inference Server model repository from a compiled artifact.

    export_server("out/", "repo/", max_batch_size=8, instance_count=1, kind="GPU")  # kind None: the artifact's
    tritonserver --model-repository repo/

The repository holds one model per component (for an `onnx` artifact:
`onnxruntime_onnx` models `text_encoder[_2]`, `unet` (for a deepcache artifact
`unet_refresh` and `unet_shallow` instead, the graphs its loop runs), and
`vae_decoder`, their ONNX files hard-linked from the artifact when it lies on
the same filesystem, copied otherwise) and a Python-backend model `pipeline`
that serves text-to-image: `prompt` (TYPE_STRING) plus optional
`negative_prompt`, `num_inference_steps`, `guidance_scale`, `seed`, `height`,
`width` -> `image` (uint8, N x H x W x 3). Its loop is sd-compiler's own
(`sampling.generate`, through `runtime.CompiledPipeline`, so the artifact's
defaults apply: steps, guidance, a recorded timestep schedule, the feature
cache); each component call is a BLS request to a sibling model. A denoising
loop cannot be a Triton ensemble, hence the Python model.

Batching: a model batches (`max_batch_size > 0`, dims without the batch) only
when every input and output has a dynamic leading batch dimension and at
least one more. The U-Net's `timestep` is a 0-d scalar shared by the whole
batch, so the U-Net models are non-batching (`max_batch_size: 0`, full dims
with -1 for the batch, the scalar declared `dims: [ 1 ]`: Triton refuses an
empty reshape for non-batching models, and the ONNX Runtime backend feeds a
one-element tensor to a 0-d model input as a scalar, onnxruntime_backend#213).
The BLS side sends 0-d inputs as shape [1] to match.

The `pipeline` model needs `sd-compiler` (with torch, diffusers, transformers)
importable in the server's Python: install it into the Triton image, or pack
an environment and pass its path as `python_env` (the Python backend's
`EXECUTION_ENV_PATH`). Everything else it reads (tokenizers, scheduler config,
`model_index.json`, `manifest.json`, `models.json`: the component models'
inputs and outputs) is copied into `pipeline/1/`.

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
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from sdcompiler.artifact import MANIFEST, check_writable_destination, read_manifest, staged_folder, verify_files
from sdcompiler.errors import ArtifactError, ConfigError
from sdcompiler.passes.errors import resolved_path
from sdcompiler.targets.served_models import ModelSpec, TensorSpec

PIPELINE = "pipeline"
VERSION = "1"  # the model version folder Triton serves
SERVED_MODELS = "models.json"  # pipeline/1/models.json: the component models' specs, for the BLS calls
KINDS = ("GPU", "CPU")

Infer = Callable[[str, dict, list], dict]  # (model name, {input: array}, [output]) -> {output: array}


# The pipeline model's request: prompts are its batch; scalars are one-element tensors.
PIPELINE_INPUTS = (
    TensorSpec("prompt", "TYPE_STRING", (-1,)),
    TensorSpec("negative_prompt", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("num_inference_steps", "TYPE_INT32", (1,), optional=True),
    TensorSpec("guidance_scale", "TYPE_FP32", (1,), optional=True),
    TensorSpec("seed", "TYPE_INT64", (1,), optional=True),
    TensorSpec("height", "TYPE_INT32", (1,), optional=True),
    TensorSpec("width", "TYPE_INT32", (1,), optional=True),
)
PIPELINE_OUTPUTS = (TensorSpec("image", "TYPE_UINT8", (-1, -1, -1, 3)),)

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
    max_batch_size: int = 8,
    instance_count: int = 1,
    kind: str | None = None,
    python_env: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write a Triton Inference Server model repository for a compiled `onnx` or `tensorrt` artifact.

    The repository appears atomically: it is built in a temporary sibling folder and renamed into
    place, so a failed export leaves nothing at `out` (and an overwritten repository intact).

    Args:
        artifact: the artifact folder (holds manifest.json), compiled with target "onnx" or "tensorrt".
        out: the model repository folder to write; must be new or empty unless `overwrite`.
        max_batch_size: max_batch_size of the models that can batch (text encoders, VAE decoder);
            0 makes every model non-batching.
        instance_count: instances per component model (per GPU for "GPU") and of the pipeline model.
        kind: "GPU" or "CPU": where the component models run; None: the artifact's (`default_kind`). The
            pipeline model (the Python loop) always runs on CPU instances.
        python_env: the Python backend's EXECUTION_ENV_PATH for the pipeline model (a packed
            environment with sd-compiler); default: the server's own Python.
        overwrite: replace a model repository earlier written by export-server at `out`.
        verify: check every file of the artifact against its manifest's sha256 first (the default).

    Returns:
        The repository folder.
    """
    from sdcompiler.targets import TARGETS, get_target

    root = resolved_path(artifact, ArtifactError, "pass an artifact folder")
    manifest = read_manifest(root)
    target = get_target(manifest["target"])
    if not target.serves_components:
        served = [name for name, cls in TARGETS.items() if cls.serves_components]
        raise ArtifactError(
            f"export-server needs an {' or '.join(served)} artifact; {root} was compiled for target "
            f"{manifest['target']!r}: recompile it with --target {' (or '.join(served)}{')' * (len(served) - 1)}"
        )
    kind = kind or default_kind(manifest)[0]
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    for name, value, least in (("max_batch_size", max_batch_size, 0), ("instance_count", instance_count, 1)):
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    verify_files(root, manifest, hashes=verify)
    models = target.serving_models(root, manifest)
    specs = [spec for spec, _ in models]
    pipeline = ModelSpec(
        PIPELINE,
        PIPELINE_INPUTS,
        PIPELINE_OUTPUTS,
        backend="python",
        parameters={"EXECUTION_ENV_PATH": python_env} if python_env else {},
        unbatched_reason="one request runs one sampling loop (its prompts are the batch)",
    )

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
        for name in ("tokenizer", "tokenizer_2", "scheduler"):
            if (root / name).is_dir():
                shutil.copytree(root / name, version / name)
        for name in ("model_index.json", MANIFEST):
            shutil.copy2(root / name, version / name)
        (version / SERVED_MODELS).write_text(json.dumps({s.name: asdict(s) for s in specs}, indent=2) + "\n")
        (version / "model.py").write_text(MODEL_PY)
        (repo / PIPELINE / "config.pbtxt").write_text(
            model_config(pipeline, max_batch_size=0, kind="CPU", instance_count=instance_count)
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
            if not (out / PIPELINE / VERSION / MANIFEST).is_file():
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


def serve_request(pipeline, get: Callable[[str], np.ndarray | None]) -> np.ndarray:
    """Run one `pipeline` request; `get(name)` returns an input as numpy, or None when absent.

    Returns the images as uint8 (N, H, W, 3), rounded as `generate` rounds PIL images. No seed: 0.
    """
    import torch

    arguments = {}
    for tensor in PIPELINE_INPUTS:
        value = get(tensor.name)
        if value is None:
            continue
        if tensor.dtype == "TYPE_STRING":
            arguments[tensor.name] = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]
        else:
            arguments[tensor.name] = value.reshape(-1)[0].item()
    generator = torch.Generator().manual_seed(int(arguments.pop("seed", 0)))
    images = pipeline(**arguments, generator=generator, output_type="np").images
    return (images * 255).round().astype(np.uint8)


MODEL_PY = '''\
"""Triton Python-backend model `pipeline`, written by `sdcompiler export-server`.

Text-to-image with sd-compiler's own sampling loop; each component call is a BLS request to a
sibling model. Needs `sd-compiler` importable in the server's Python (or the EXECUTION_ENV_PATH
set at export).
"""

import functools
from pathlib import Path

import triton_python_backend_utils as pb_utils

from sdcompiler.serving import serve_request, served_pipeline


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


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        self.pipeline = served_pipeline(Path(args["model_repository"]) / args["model_version"], _infer)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                image = serve_request(self.pipeline, functools.partial(_input, request))
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("image", image)]))
            except Exception as exc:  # a bad request fails alone
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses
'''
