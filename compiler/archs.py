"""Supported architectures: SD 1.x (`sd15`), SD 2.x (`sd21`), SDXL (`sdxl`) and the SDXL refiner (`sdxl-refiner`).

Each architecture is described once: its `ArchSpec` (which diffusers pipeline
class runs it, which text encoders it has) in `sdcompiler.passes.architectures`,
where passes read it too, and here the diffusers configs of its real
checkpoint (shipped in `configs/<arch>/`, so single-file checkpoints load
offline). The CLIP BPE vocabulary that single-file checkpoints lack is
derived from `data/clip_bpe_simple_vocab_16e6.txt.gz` (the list of merges
CLIP's tokenizer was built from) into a cache folder on first use.

Detection works on a U-Net config (diffusers folders) or on the key set of an
original-layout state dict (single files), and rejects anything else with a
one-line error.
"""

from __future__ import annotations

import gzip
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

from sdcompiler import knobs
from sdcompiler.errors import CheckpointError
from sdcompiler.passes.architectures import ARCHS, ArchSpec

# an inpainting U-Net's input: the latents, the mask (1 channel) and the masked image's latents, concatenated
INPAINT_IN_CHANNELS = 9
INPAINT_GUIDANCE_SCALE = 7.5  # diffusers' inpainting pipelines' default, SDXL's included


def is_inpainting(unet_config: Mapping) -> bool:
    """Whether a U-Net config is an inpainting U-Net's (its input concatenates mask and masked-image latents)."""
    return unet_config.get("in_channels", 4) == INPAINT_IN_CHANNELS


def get_arch(name: str) -> ArchSpec:
    try:
        return ARCHS[name]
    except KeyError:
        raise CheckpointError(f"unknown arch {name!r}; choose one of {', '.join(ARCHS)}") from None


def detect_arch_from_unet_config(
    config: Mapping, where: str = "checkpoint", pipeline_config: Mapping | None = None
) -> ArchSpec:
    """Classify a UNet2DConditionModel config as sd15 / sd21 / sdxl / sdxl-refiner.

    SDXL is the only family with the `text_time` added embedding; SD 2.x is
    the one with linear projections in its transformer blocks. The refiner is
    the SDXL U-Net whose pipeline (`pipeline_config`, a folder's
    model_index.json) sets `requires_aesthetics_score`, as diffusers reads it. Inpainting
    U-Nets (`INPAINT_IN_CHANNELS`: latents + mask + masked-image latents) are
    accepted in every family (`is_inpainting`); depth, upscaler and
    image-variation U-Nets (other input channels or class embeddings) are
    rejected: their pipelines need inputs we do not serve.
    """
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise CheckpointError(
            f"unsupported architecture in {where}: U-Net class {config.get('_class_name')!r}; "
            "sd-compiler handles SD 1.x, SD 2.x and SDXL text-to-image U-Nets"
        )
    if config.get("in_channels", 4) not in (4, INPAINT_IN_CHANNELS) or config.get("class_embed_type") is not None:
        raise CheckpointError(
            f"unsupported architecture in {where}: a U-Net with in_channels={config.get('in_channels')} "
            f"and class_embed_type={config.get('class_embed_type')!r} (depth/upscale/variation variant); "
            "only text-to-image and inpainting (in_channels=9) SD 1.x, SD 2.x and SDXL checkpoints are supported"
        )
    if config.get("addition_embed_type") == "text_time":
        return ARCHS["sdxl-refiner" if (pipeline_config or {}).get("requires_aesthetics_score") else "sdxl"]
    if config.get("addition_embed_type") is not None:
        raise CheckpointError(
            f"unsupported architecture in {where}: addition_embed_type={config['addition_embed_type']!r}; "
            "only SD 1.x, SD 2.x and SDXL are supported"
        )
    if config.get("use_linear_projection"):
        return ARCHS["sd21"]
    return ARCHS["sd15"]


def detect_arch_from_keys(keys: Iterable[str], where: str) -> ArchSpec:
    """Classify an original-layout (CompVis / SGM) single-file state dict."""
    keys = set(keys)
    has_unet = any(k.startswith("model.diffusion_model.") for k in keys)
    if not has_unet:
        raise CheckpointError(
            f"unsupported architecture in {where}: no 'model.diffusion_model.*' U-Net weights; "
            "pass a full SD 1.x / 2.x / SDXL checkpoint (not a LoRA, VAE or embedding file)"
        )
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return ARCHS["sdxl"]
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):  # OpenCLIP bigG alone: the refiner
        raise CheckpointError(
            f"{where} looks like a single-file SDXL refiner, which is not supported yet; pass its diffusers "
            "folder (e.g. stabilityai/stable-diffusion-xl-refiner-1.0)"
        )
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP text tower: SD 2.x
        return ARCHS["sd21"]
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return ARCHS["sd15"]
    raise CheckpointError(
        f"unsupported architecture in {where}: text encoder weights are neither CLIP ViT-L (SD 1.x), "
        "OpenCLIP ViT-H (SD 2.x) nor the SDXL pair"
    )


def shipped_config_dir(arch: str) -> Path:
    """The diffusers config tree of the real `arch` checkpoint, with tokenizer vocabularies.

    The tree in the package has no vocabulary files; they are written next to
    a copy of it in the cache, once.
    """
    get_arch(arch)
    target = knobs.cache_dir() / "configs" / arch
    if (target / ".complete").exists():
        return target
    source = resources.files("sdcompiler") / "configs" / arch
    staging = target.with_name(f".{arch}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    with resources.as_file(source) as src:
        shutil.copytree(src, staging)
    for tokenizer_dir in sorted(staging.glob("tokenizer*")):
        write_clip_vocabulary(tokenizer_dir)
    (staging / ".complete").write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to one printable character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


CLIP_VOCAB_SIZE = 49408


def write_clip_vocabulary(folder: Path) -> None:
    """Write CLIP's `vocab.json` / `merges.txt` (49,408 tokens) into `folder`.

    CLIP's vocabulary is: the 256 byte characters, the same with `</w>`, the
    first 48,894 merges of the BPE list, then the two special tokens.
    """
    data = resources.files("sdcompiler") / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(data.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_VOCAB_SIZE - 256 * 2 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def assemble_pipeline(spec: ArchSpec, components: Mapping, flags: Mapping | None = None):
    """Build the diffusers pipeline object of `spec` from already-built components.

    `flags`: pipeline config entries (a model_index.json), of which the pipeline class's own flags are passed
    (`force_zeros_for_empty_prompt`, the refiner's `requires_aesthetics_score`)."""
    import inspect

    import diffusers

    pipeline_cls = getattr(diffusers, spec.pipeline_class)
    if spec.is_sdxl:
        absent = {name: None for name in ("text_encoder", "tokenizer") if name not in components}  # the refiner
        accepted = inspect.signature(pipeline_cls.__init__).parameters
        flags = {k: v for k, v in (flags or {}).items() if k in accepted and isinstance(v, bool)}
        if spec.aesthetic_time_ids:
            flags["requires_aesthetics_score"] = True
        return pipeline_cls(**components, **absent, **flags)
    return pipeline_cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
