"""Checkpoint loading: a path or a cached Hugging Face id -> a diffusers pipeline and its arch.

Three kinds of source are accepted, all loaded offline, in fp32 on the CPU:

- a diffusers pipeline folder (`model_index.json` + component folders);
- a single original-layout (CompVis / SGM) checkpoint file: `.safetensors`, or
  a pickle (`.ckpt`, `.bin`, `.pt`, `.pth`) only when the caller allows it,
  since unpickling can run arbitrary code. Its component configs and
  tokenizer vocabularies come from the shipped config tree of the detected
  arch (`sdcompiler.archs.shipped_config_dir`), so nothing is downloaded;
- a Hugging Face repo id (`owner/name`) already in the local hub cache.

Every failure is a `CheckpointError` with one line naming the source and the
fix; errors raised inside diffusers / transformers are wrapped likewise.
The safety checker is never loaded: the compiler does not run it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from sdcompiler import knobs
from sdcompiler.archs import ArchSpec, detect_arch_from_keys, detect_arch_from_unet_config, shipped_config_dir
from sdcompiler.errors import CheckpointError, SDCompilerError
from sdcompiler.model_configs import check_component_configs
from sdcompiler.passes.errors import path_problem

if TYPE_CHECKING:
    import diffusers

__all__ = ["LoadedCheckpoint", "check_controlnet_fits", "checkpoint_sha256", "load_checkpoint", "load_controlnet"]

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# owner/name with exactly one slash; names ending like a checkpoint file are treated as paths.
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# libraries a pipeline folder's components may come from (model_index.json), the components the compiler drops
# unread, the ones that hold weights, and their weight files' usual names
COMPONENT_LIBRARIES = ("diffusers", "transformers")
DROPPED_COMPONENTS = ("safety_checker", "feature_extractor")
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_WEIGHT_NAMES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}
_SUPPORTED = "pass a diffusers folder, a .safetensors file or a cached Hugging Face id"


@dataclass
class LoadedCheckpoint:
    """A loaded pipeline with what the compiler records about its origin.

    Attributes:
        pipeline: `StableDiffusionPipeline` or `StableDiffusionXLPipeline`, fp32, CPU, eval mode.
        arch: the detected architecture family.
        source: {"path": resolved path or the HF id, "kind": "diffusers" | "single_file" | "hf_cache",
            "sha256": content hash from `checkpoint_sha256`}.
    """

    pipeline: diffusers.DiffusionPipeline
    arch: ArchSpec
    source: dict[str, str]


def load_checkpoint(
    source: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    prediction_type: str | None = None,
    config: str | os.PathLike | None = None,
    allow_nonfinite: bool = False,
) -> LoadedCheckpoint:
    """Load a SD 1.x / 2.x / SDXL checkpoint as a diffusers pipeline (fp32, CPU, eval).

    The safety checker and its feature extractor are dropped even when a
    folder lists them: the compiler never runs them.

    Args:
        source: a diffusers pipeline folder, a single-file checkpoint, or a
            Hugging Face repo id present in the local cache.
        allow_pickle: accept pickle weights (`.ckpt`/`.bin`/`.pt`/`.pth` files,
            or folders holding only `.bin` weights). Unpickling can run code.
        prediction_type: override the scheduler's prediction type
            ("epsilon", "v_prediction", "sample"). Single SD 2.x files default
            to the 768-v config (v_prediction); the 512 base model needs "epsilon".
        config: single files only: a diffusers folder whose component configs
            and tokenizers replace the shipped config tree of the detected arch
            (for fine-tunes with other widths, or the tiny test checkpoints).
            Weights found in it are used for components the file lacks.
        allow_nonfinite: load weights holding NaN / Inf. By default such a checkpoint is refused, naming the
            first such tensor, before any model is built (its images would be NaN: black).

    Returns:
        The pipeline, its arch and its source record.

    Raises:
        CheckpointError: missing, unsafe, corrupt or unsupported checkpoint (one line).
    """
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        choices = ", ".join(PREDICTION_TYPES)
        raise CheckpointError(f"unknown prediction_type {prediction_type!r}; choose one of {choices}")
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir() or path.is_file():
        if config is not None and path.is_dir():
            raise CheckpointError(f"config= applies to single-file checkpoints only, and {text} is a folder")
        kind, shown = ("diffusers" if path.is_dir() else "single_file"), str(path.resolve())
        load = _load_folder if path.is_dir() else _load_file
    elif (
        _HF_ID.fullmatch(text)
        and not text.lower().endswith((".safetensors", *PICKLE_SUFFIXES))
        and not os.path.lexists(path)  # a link that loops or a FIFO at owner/name is a bad path, not an id
    ):
        if config is not None:
            raise CheckpointError(f"config= applies to single-file checkpoints only, and {text} is a Hugging Face id")
        path, kind, shown, load = _cached_snapshot(text), "hf_cache", text, _load_folder
    else:
        problem = path_problem(path)
        if problem == "does not exist":
            raise CheckpointError(f"{text} does not exist: {_SUPPORTED}")
        raise CheckpointError(f"{text} {problem}: {_SUPPORTED}")

    where = text
    with _quiet_libraries():
        pipe, arch = load(path, where, allow_pickle=allow_pickle, config=config, allow_nonfinite=allow_nonfinite)
    _check_materialized(pipe, where, arch)
    if prediction_type is not None:
        # Re-create rather than patch the config: some schedulers derive state from it at init.
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    source_info = {"path": shown, "kind": kind, "sha256": checkpoint_sha256(path)}
    dtype = unet_weights_dtype(path)
    if dtype is not None:
        source_info["unet_dtype"] = dtype  # loaded as fp32 whatever it was; compile says when precision drops
    return LoadedCheckpoint(pipe, arch, source_info)


SAFETENSORS_DTYPES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}


def unet_weights_dtype(path: Path) -> str | None:
    """The floating-point dtype most of a checkpoint's U-Net weights are stored in ("fp16", "bf16", "fp32"), read
    from safetensors headers only (a single file's `model.diffusion_model.*` tensors, or a folder's unet/*.safetensors);
    None for pickles or when it cannot tell."""
    if path.is_file():
        files, prefix = [path], "model.diffusion_model."
    else:
        files, prefix = sorted((path / "unet").glob("*.safetensors")), ""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for file in files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:  # the header only
                dtypes = [handle.get_slice(key).get_dtype() for key in handle.keys() if key.startswith(prefix)]
        except Exception:  # SafetensorError: a header that does not read (the loader names it)
            return None
        for dtype in dtypes:
            if dtype in SAFETENSORS_DTYPES:
                counts[SAFETENSORS_DTYPES[dtype]] = counts.get(SAFETENSORS_DTYPES[dtype], 0) + 1
    return max(counts, key=counts.get) if counts else None


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Content hash of a checkpoint: a file's sha256, or for a folder the sha256 over
    "relative/path NUL file-sha256 LF" of every non-hidden file, sorted by path.

    Folder hashes ignore where the folder lives and hidden files (download
    markers, `.cache/`), so copies of one checkpoint hash the same.
    """
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)
    files = sorted(
        (p.relative_to(path).as_posix(), p)
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    digest = hashlib.sha256()
    for relative, file in files:
        digest.update(f"{relative}\0{_file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- folders ----------------------------------------------------------------------------------------------


def _load_folder(path: Path, where: str, *, allow_pickle: bool, config: Any = None, allow_nonfinite: bool = False):
    if not (path / "model_index.json").is_file():
        raise CheckpointError(
            f"{where} is not a diffusers pipeline folder (no model_index.json); "
            "pass a pipeline folder, a single .safetensors checkpoint or a Hugging Face id"
        )
    index = _read_json(path / "model_index.json", where)
    _check_component_classes(index, where)
    arch = detect_arch_from_unet_config(_read_json(path / "unet" / "config.json", where), where, index)
    if not allow_pickle:
        _refuse_pickle_only(path, index, where)
    check_component_configs(path, where)  # before diffusers builds (and allocates) anything
    _check_component_weights(path, index, where)
    components = [
        path / name for name in MODEL_COMPONENTS if isinstance(index.get(name), list) and (path / name).is_dir()
    ]
    if not allow_nonfinite:
        for file in sorted(f for folder in components for f in folder.glob("*.safetensors")):
            _refuse_nonfinite_file(file, f"{where}: {file.parent.name}/{file.name}")
    pipeline_class = _pipeline_class(arch)
    with _wrapped(where):
        # use_safetensors=None prefers safetensors and falls back to pickle; True refuses pickle.
        pipe = pipeline_class.from_pretrained(
            path, torch_dtype=torch.float32, use_safetensors=None if allow_pickle else True, **_no_safety(arch)
        )
    pickled = [folder.name for folder in components if not any(folder.glob("*.safetensors"))]
    if not allow_nonfinite and pickled:  # weights that came from pickle files were not scanned above
        for name in pickled:
            module = getattr(pipe, name, None)
            if isinstance(module, torch.nn.Module):
                _refuse_nonfinite(module.state_dict().items(), f"{where}: {name}")
    return pipe, arch


def _check_component_classes(index: dict, where: str) -> None:
    """Every component model_index.json names must be a class of diffusers or transformers: diffusers imports
    whatever module an entry names and calls what it finds there (`["os", "system"]` would run a command)."""
    import importlib

    for name, entry in index.items():
        if name.startswith("_") or name in DROPPED_COMPONENTS or not isinstance(entry, list) or entry == [None, None]:
            continue
        library, class_name = entry if len(entry) == 2 else (None, None)
        allowed = library in COMPONENT_LIBRARIES and isinstance(class_name, str) and class_name.isidentifier()
        if not allowed or not hasattr(importlib.import_module(library), class_name):
            shown = ".".join(map(str, entry)) if len(entry) == 2 else json.dumps(entry)
            raise CheckpointError(
                f"{where}/model_index.json names {shown} for component {name!r}, which is not a class of "
                f'{" or ".join(COMPONENT_LIBRARIES)}; fix the entry (e.g. ["diffusers", "UNet2DConditionModel"]) '
                "or re-save the pipeline with diffusers"
            )


def _check_component_weights(path: Path, index: dict, where: str) -> None:
    """Each model component model_index.json lists has a folder with a weight file whose header reads; diffusers
    would otherwise fail deep inside (after logging its own error lines) or name no fix."""
    for name in MODEL_COMPONENTS:
        entry = index.get(name)
        if not isinstance(entry, list) or entry == [None, None]:
            continue
        folder = path / name
        files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
        weights = [f for f in files if f.suffix in (".safetensors", *PICKLE_SUFFIXES) or f.name.endswith(".index.json")]
        if not weights:
            raise CheckpointError(
                f"{where}/{name} has no weight file (e.g. {_WEIGHT_NAMES.get(name, 'model.safetensors')}): "
                "the folder is incomplete; re-download or re-save the checkpoint"
            )
        for file in (f for f in weights if f.suffix == ".safetensors"):
            _safetensors_keys(file, f"{where}/{name}/{file.name}")


def _refuse_pickle_only(path: Path, index: dict, where: str) -> None:
    pickled = []
    for name, entry in index.items():
        if name in DROPPED_COMPONENTS or not (isinstance(entry, list) and entry[0]):
            continue
        files = [f for f in (path / name).glob("*") if f.is_file()] if (path / name).is_dir() else []
        if not any(f.suffix == ".safetensors" for f in files):
            pickled += [f"{name}/{f.name}" for f in files if f.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise CheckpointError(
            f"{where} holds only pickle weights ({', '.join(sorted(pickled))}); "
            "convert to safetensors or pass allow_pickle=True / --allow-pickle"
        )


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # not cached, malformed id or incomplete snapshot: the same advice applies
        raise CheckpointError(
            f"{repo_id} is neither a local path nor a Hugging Face id in the local cache (no network here): "
            "download it first or pass a local path"
        ) from exc


# --- single files -----------------------------------------------------------------------------------------


def _load_file(
    path: Path, where: str, *, allow_pickle: bool, config: str | os.PathLike | None, allow_nonfinite: bool = False
):
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        arch = detect_arch_from_keys(_safetensors_keys(path, where), where)
        if not allow_nonfinite:
            _refuse_nonfinite_file(path, where)
        return _from_single_file(path, where, arch, config), arch
    if suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{where} has unsupported suffix {suffix or '(none)'!r}: {_SUPPORTED} "
            "(.ckpt/.bin/.pt/.pth only with allow_pickle=True)"
        )
    if not allow_pickle:
        raise CheckpointError(
            f"{where} is a pickle checkpoint, which can run arbitrary code when loaded; "
            "convert it to .safetensors or pass allow_pickle=True (CLI: --allow-pickle)"
        )
    tensors = _unpickle(path, where)
    arch = detect_arch_from_keys(tensors, where)
    if not allow_nonfinite:
        _refuse_nonfinite(tensors.items(), where)
    # diffusers unpickles with weights_only=True, which rejects the Lightning objects many .ckpt files
    # carry; the caller allowed pickle, so unpickle fully here and hand diffusers a safetensors copy.
    with tempfile.TemporaryDirectory(prefix="sdcompiler-ckpt-") as tmp:
        converted = Path(tmp) / f"{path.stem}.safetensors"
        _save_safetensors(tensors, converted)
        del tensors
        return _from_single_file(converted, where, arch, config), arch


def _safetensors_keys(path: Path, where: str) -> list[str]:
    from safetensors import safe_open

    # safe_open checks that the header's data offsets cover the file exactly, so this catches
    # truncation and garbage as well as a broken header.
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as exc:
        raise CheckpointError(f"{where} is truncated or corrupt ({_first_line(exc)}): re-download it") from exc


def _unpickle(path: Path, where: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))
    except Exception as exc:
        raise CheckpointError(
            f"{where} could not be unpickled ({_first_line(exc)}): it is truncated, corrupt or needs a missing module"
        ) from exc
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning nests it
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds a {type(state).__name__}, not a state dict")
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    seen: set[int] = set()
    unique = {}
    for key, value in tensors.items():
        pointer = value.untyped_storage().data_ptr()
        # safetensors refuses tensors that share storage (tied weights): copy all but the first.
        unique[key] = value.contiguous() if pointer not in seen else value.clone().contiguous()
        seen.add(pointer)
    save_file(unique, str(path))


def _from_single_file(file: Path, where: str, arch: ArchSpec, config: str | os.PathLike | None):
    config_dir = Path(config) if config is not None else shipped_config_dir(arch.name)
    if not (config_dir / "model_index.json").is_file():
        raise CheckpointError(f"config {config_dir} is not a diffusers folder (no model_index.json)")
    check_component_configs(config_dir, f"config {config_dir}")
    with _wrapped(where):
        return _pipeline_class(arch).from_single_file(
            str(file), config=str(config_dir), torch_dtype=torch.float32, local_files_only=True, **_no_safety(arch)
        )


# --- shared helpers ---------------------------------------------------------------------------------------


def _pipeline_class(arch: ArchSpec):
    import diffusers

    return getattr(diffusers, arch.pipeline_class)


def _no_safety(arch: ArchSpec) -> dict[str, Any]:
    return {} if arch.is_sdxl else dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{where} has no {path.parent.name}/{path.name}; the folder is incomplete") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where} has an unreadable {path.parent.name}/{path.name} ({_first_line(exc)})") from exc


def _check_materialized(pipe, where: str, arch: ArchSpec) -> None:
    """Single-file loading builds models on the meta device; weights absent from the file stay there."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for tensor_name, tensor in [*component.named_parameters(), *component.named_buffers()]:
                if tensor.is_meta:
                    raise CheckpointError(
                        f"{where} lacks weights for {name} (e.g. {tensor_name!r}): the file is incomplete "
                        f"or its shapes do not match the {arch.name} configs"
                    )


def _refuse_nonfinite_file(path: Path, where: str) -> None:
    """Refuse a safetensors file holding a NaN / Inf, reading it tensor by tensor (memory-mapped)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            _refuse_nonfinite(((key, handle.get_tensor(key)) for key in handle.keys()), where)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{where} is truncated or corrupt ({_first_line(exc)}): re-download it") from exc


def nonfinite_tensor(tensors) -> tuple[str, str] | None:
    """`(name, "N NaN / M Inf value(s)")` of the first floating-point tensor of `(name, tensor)` pairs that holds a
    NaN or Inf, else None."""
    return next(((name, bad) for name, tensor in tensors if (bad := first_nonfinite(tensor))), None)


def _refuse_nonfinite(tensors, where: str) -> None:
    """Raise naming the first floating-point tensor (of `(name, tensor)` pairs) that holds a NaN or Inf."""
    found = nonfinite_tensor(tensors)
    if found:
        name, bad = found
        raise CheckpointError(
            f"{where}: tensor {name!r} holds {bad}, so every image would be NaN (black); use an intact "
            "checkpoint, or pass allow_nonfinite=True (CLI: --allow-nonfinite) to load it anyway"
        )


def first_nonfinite(tensor: torch.Tensor) -> str | None:
    """ "N NaN / M Inf value(s)" when a floating-point tensor holds any, else None.

    The common case (all finite) costs one min/max pass (NaN propagates through both, an Inf shows as the min or
    the max), ~15x faster than `isfinite` on CPU; the counts are computed only for a tensor that has some."""
    if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() == 0:
        return None
    try:
        low, high = torch.aminmax(tensor)
    except RuntimeError:  # dtypes without a min/max kernel (e.g. float8 on some builds)
        tensor = tensor.float()
        low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return None
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return " and ".join(f"{count} {kind}" for count, kind in ((nan, "NaN"), (inf, "Inf")) if count) + " value(s)"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


@contextlib.contextmanager
def _wrapped(where: str) -> Iterator[None]:
    """Turn any library error while loading into a one-line CheckpointError naming the source."""
    try:
        yield
    except SDCompilerError:
        raise
    except Exception as exc:
        if "meta tensor" in str(exc):  # single-file loading left a weight the file lacks on the meta device
            raise CheckpointError(
                f"{where} lacks weights the model needs ({_first_line(exc)[:80]}...): "
                "the file is incomplete or its shapes do not match the configs"
            ) from exc
        raise CheckpointError(f"could not load {where}: {_first_line(exc)}") from exc


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence diffusers' and transformers' loading chatter (fp32 casting notes, the error lines they log before
    raising, Python warnings; progress bars when quiet), then restore. What goes wrong reaches the caller as an
    exception, which `_wrapped` turns into one line."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    verbosity, bars_enabled = dlogging.get_verbosity(), dlogging.is_progress_bar_enabled()
    transformers_verbosity = tlogging.get_verbosity()
    dlogging.set_verbosity(dlogging.CRITICAL)
    tlogging.set_verbosity(tlogging.CRITICAL)
    if knobs.quiet():
        dlogging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlogging.set_verbosity(verbosity)
        tlogging.set_verbosity(transformers_verbosity)
        if bars_enabled:
            dlogging.enable_progress_bar()


# --- ControlNets ------------------------------------------------------------------------------------------

CONTROLNET_FIT_KEYS = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
)


def load_controlnet(source: str | os.PathLike, *, allow_nonfinite: bool = False):
    """Load a diffusers `ControlNetModel` folder (config.json + safetensors weights), fp32, CPU, eval.

    Returns:
        `(model, source record)`: the record holds the resolved path and the folder's content hash.

    Raises:
        CheckpointError: a missing or unreadable folder, pickle-only weights, a class other than ControlNetModel,
            NaN / Inf weights (unless `allow_nonfinite`); one line naming the folder and the fix.
    """
    import diffusers

    where = os.fspath(source)
    path = Path(where).expanduser()
    if not path.is_dir():
        problem = "is a file" if path.is_file() else path_problem(path)
        raise CheckpointError(
            f"ControlNet {where} {problem}: pass a diffusers ControlNetModel folder (config.json + safetensors)"
        )
    config = _read_json(path / "config.json", f"ControlNet {where}")
    if config.get("_class_name") != "ControlNetModel":
        raise CheckpointError(
            f"ControlNet {where}/config.json names class {config.get('_class_name')!r}; pass a diffusers "
            "ControlNetModel folder (SD 1.x / 2.x / SDXL ControlNet)"
        )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(
            f"ControlNet {where} has no .safetensors weights (pickle weights are not read); convert them with "
            "ControlNetModel.from_pretrained(...).save_pretrained(..., safe_serialization=True)"
        )
    if not allow_nonfinite:
        for file in weights:
            _refuse_nonfinite_file(file, f"ControlNet {where}: {file.name}")
    with _quiet_libraries(), _wrapped(f"ControlNet {where}"):
        model = diffusers.ControlNetModel.from_pretrained(path, torch_dtype=torch.float32, use_safetensors=True)
    return model.eval(), {"path": str(path.resolve()), "sha256": checkpoint_sha256(path)}


def check_controlnet_fits(controlnet, unet, where: str) -> None:
    """Refuse a ControlNet whose residuals do not fit the U-Net (other widths, depths or conditioning), one line."""

    def value(config, key):
        found = config.get(key)
        return list(found) if isinstance(found, (list, tuple)) else found

    unet_config, net_config = dict(unet.config), dict(controlnet.config)
    keys = [*CONTROLNET_FIT_KEYS, "down_blocks"]
    unet_config["down_blocks"] = len(unet_config["down_block_types"])
    net_config["down_blocks"] = len(net_config["down_block_types"])
    for key in keys:
        if value(unet_config, key) != value(net_config, key):
            raise CheckpointError(
                f"ControlNet {where} does not fit this checkpoint's U-Net: {key} is {value(net_config, key)!r} "
                f"there and {value(unet_config, key)!r} in the U-Net; pass a ControlNet made for this base model"
            )
